"""The claim a training run holds on its checkpoint prefix for as long as it runs: one run per prefix at a time.

It is a claim object (`lake.claims`: created only if absent) at ``<output>/.gradlake/training-run.json``,
owned by the run's fingerprint.  A rerun of the same spec owns it already, so a run that was killed
resumes at once; a run with other settings is refused in one line before it trains or writes anything.
A thread renews the claim while the run lives; a run that dies leaves it to run out (`CLAIM_SECONDS`),
or to be taken over at once on the machine it ran on (its process is gone).  Hidden names (a leading
dot) keep it, like the staging directories, out of the watcher's listing and out of the checkpoints.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import threading
from collections.abc import Iterator

from gradlake.lake import claims, layout
from gradlake.lake.leases import live
from gradlake.lake.store import LakeStore
from gradlake.tasks.training.spec import TrainError, TrainSpec, settings

PREFIX_CLAIM = "training-run"
CLAIM_SECONDS = 300.0  # renewed every quarter of it while the run lives; a dead run's claim stops blocking after it


def prefix_store(spec: TrainSpec) -> LakeStore:
    """The checkpoint prefix as a store the claim is made in."""
    return LakeStore(spec.output, spec.storage_options)


def differences(theirs: dict, ours: dict, most: int = 3) -> str:
    """What two runs' settings differ in, as 'learning_rate 0.003 there, 0.001 here' (at most `most` of them)."""
    changed = sorted(k for k in theirs.keys() | ours.keys() if theirs.get(k) != ours.get(k))

    def shown(value) -> str:
        text = repr(value)
        return text if len(text) <= 40 else text[:37] + "..."

    said = [f"{k} {shown(theirs.get(k))} there, {shown(ours.get(k))} here" for k in changed[:most]]
    more = f" and {len(changed) - most} more" if len(changed) > most else ""
    return "; ".join(said) + more


def runs_apart(theirs: str | None, ours: str, their_settings: dict, our_settings: dict) -> str:
    """'fingerprint <theirs>, this run <ours>; <what differs>': how a refusal tells two training runs apart."""
    differ = differences(their_settings, our_settings)
    return f"fingerprint {theirs}, this run {ours}{'; ' + differ if differ else ''}"


def refusal(spec: TrainSpec, fingerprint: str, held: claims.Claim | None,
            done: str = "nothing was trained or written") -> TrainError:
    """The one line for a prefix another run (`held`: its claim, None if it just went) is training into.

    `done`: what this run did and did not do, said before what to do."""
    theirs = (held.owner if held else "") or "unknown"
    about = held.about if held else {}
    process = about.get("process") or {}
    where = f"; pid {process.get('pid')} on {process['host']}" if process.get("host") else ""
    until = (dt.datetime.fromtimestamp(held.expires, dt.timezone.utc).strftime("%H:%M:%S UTC") if held and held.expires
             else "soon")
    return TrainError(f"checkpoint prefix {spec.output!r} is in use by another training run "
                      f"({runs_apart(theirs, fingerprint, about.get('settings') or {}, settings(spec))}{where}); {done}: train into another "
                      f"output prefix, or wait for that run to end (if it died, its claim runs out at {until})")


def check_prefix_free(spec: TrainSpec, fingerprint: str) -> None:
    """Refuse a prefix that a live run with another fingerprint holds (a plan's check: it takes nothing)."""
    held = claims.read_claim(prefix_store(spec), PREFIX_CLAIM)
    if live(held) and held.owner != fingerprint:
        raise refusal(spec, fingerprint, held)


def _keep_renewed(store: LakeStore, fingerprint: str, about: dict, stop: threading.Event) -> None:
    while not stop.wait(CLAIM_SECONDS / 4):
        try:
            claims.renew(store, PREFIX_CLAIM, fingerprint, CLAIM_SECONDS, about)
        except Exception:  # a storage blip: the next renewal tries again; publishing checks the claim itself
            pass


@contextlib.contextmanager
def prefix_claimed(spec: TrainSpec, fingerprint: str) -> Iterator[None]:
    """Hold the prefix's claim for the block (one TrainError, before anything is written, if another run holds it)."""
    store = prefix_store(spec)
    made = store.is_local and not os.path.exists(store.root)  # the claim's directory makes the prefix's: undone after
    about = {"fingerprint": fingerprint, "settings": settings(spec),
             "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    if not claims.take(store, PREFIX_CLAIM, fingerprint, CLAIM_SECONDS, about):
        raise refusal(spec, fingerprint, claims.read_claim(store, PREFIX_CLAIM))
    stop = threading.Event()
    renewer = threading.Thread(target=_keep_renewed, args=(store, fingerprint, about, stop), daemon=True,
                               name="gradlake-prefix-claim")
    renewer.start()
    ended = False
    try:
        yield
        ended = True
    finally:
        stop.set()
        renewer.join()
        try:
            _give_back(store, fingerprint, made)
        except Exception:
            if ended:
                raise  # else the run's own error says what happened (a storage outage, say): the claim runs out


def _give_back(store: LakeStore, fingerprint: str, made: bool) -> None:
    held = claims.read_claim(store, PREFIX_CLAIM)
    if held is not None and held.owner == fingerprint:
        claims.release(store, PREFIX_CLAIM)
    if store.is_local:  # leave the prefix as the checkpoints alone would: no empty claims directory
        for directory in [store.path(layout.CLAIMS_ROOT)] + ([store.root] if made else []):
            with contextlib.suppress(OSError):
                os.rmdir(directory)


def check_still_held(spec: TrainSpec, fingerprint: str, name: str) -> None:
    """Before publishing `name`: refuse when another run holds the prefix now (this run's claim ran out meanwhile)."""
    held = claims.read_claim(prefix_store(spec), PREFIX_CLAIM)
    if live(held) and held.owner != fingerprint:
        raise refusal(spec, fingerprint, held, f"{name} was not written (this run's claim on the prefix ran out while "
                                               "it trained)")
