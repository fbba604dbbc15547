"""Claims: small objects created only if absent, so that concurrent runs agree on who does what.

A claim is a JSON object under ``<lake>/.gradlake/`` holding its owner (a random token of the
run that made it), what it is for, and when it expires.  It is created with a write that
fails if the object exists: ``O_CREAT | O_EXCL`` on a local lake, ``If-None-Match: *`` on S3
(AWS S3 and MinIO honour it; s3fs answers ``FileExistsError``).  Two runs racing for the same
claim get one winner, on any number of machines.

A claim that expires was left by a run that died; anyone may take it over.  A claim also
names the process that made it (host, pid namespace, pid): on that same machine a claim whose
process is gone is taken over at once, so a run killed with SIGKILL and started again there
does not wait for its own leases to run out.  Taking over
deletes the stale object and creates a fresh one under the same rule, so two runs taking over
the same stale claim at the same instant can both believe they hold it; the work they guard is
written whole and deterministic, so the cost of that rare case is work done twice, never a
mixed result.  Claims live outside the Zarr groups, where Zarr and xarray never see them.

Two kinds are made in a lake: a group's creation claim (`lake.gradients`) and row-chunk leases
(`lake.leases`); their names are `layout.creation_claim` and `layout.lease_claim`.  A training run
holds a third under its checkpoint prefix, owned by the run's fingerprint (`tasks.training.claim`).
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from dataclasses import dataclass

from gradlake.lake import layout
from gradlake.lake.store import LakeStore


def new_owner() -> str:
    """A token naming one run (or one worker of it) as the owner of its claims."""
    return uuid.uuid4().hex


@dataclass(frozen=True)
class Claim:
    """What a claim object says."""

    owner: str
    expires: float
    about: dict

    @property
    def expired(self) -> bool:
        return time.time() > self.expires


def claim_path(store: LakeStore, key: str) -> str:
    return store.path(layout.claim_file(key))


def _create(store: LakeStore, path: str, data: bytes) -> bool:
    """Write `data` at `path` if nothing is there; False if something is."""
    if store.is_local:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            with open(path, "xb") as handle:
                handle.write(data)
        except FileExistsError:
            return False
        return True
    with store.explained_errors():
        try:
            store.fs.pipe_file(path, data, mode="create")
        except OSError as err:
            # s3fs says FileExistsError when the 412's body names the If-None-Match condition, a plain
            # OSError otherwise (stores differ in the body they send).
            if not isinstance(err, FileExistsError) and "precondition" not in str(err).lower().replace("-", ""):
                raise
            # A retried request whose first attempt was applied (its answer lost) finds its own object.
            return _read(store, path) == data
    return True


def _read(store: LakeStore, path: str) -> bytes | None:
    with store.explained_errors():
        try:
            return store.fs.cat_file(path)
        except FileNotFoundError:
            return None


def read_claim(store: LakeStore, key: str) -> Claim | None:
    """The claim at `key`, or None if there is none (or it is not readable JSON: a torn write)."""
    raw = _read(store, claim_path(store, key))
    if raw is None:
        return None
    try:
        record = json.loads(raw)
        return Claim(str(record["owner"]), float(record["expires"]), dict(record.get("about") or {}))
    except (ValueError, KeyError, TypeError):
        return Claim("", 0.0, {})  # unreadable: treated as expired, so it is taken over


def _encode(owner: str, seconds: float, about: dict) -> bytes:
    about = {**about, "process": this_process()}
    return json.dumps({"owner": owner, "expires": time.time() + seconds, "about": about}, sort_keys=True).encode()


def _pid_namespace() -> str:
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:  # not Linux: a holder's liveness is never judged, its claim simply expires
        return ""


def this_process() -> dict:
    """Which process makes a claim: its host, pid namespace and pid."""
    return {"host": socket.gethostname(), "pidns": _pid_namespace(), "pid": os.getpid()}


def died_here(about: dict) -> bool:
    """True when the claim's process ran on this machine, in this pid namespace, and is gone (or a zombie).

    A claim from another machine, or without a process, is never judged: it expires."""
    process = about.get("process") or {}
    here = this_process()
    if not here["pidns"] or process.get("host") != here["host"] or process.get("pidns") != here["pidns"]:
        return False
    pid = process.get("pid")
    if not isinstance(pid, int) or pid <= 0 or pid == here["pid"]:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, someone else's
        return False
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"  # killed, not yet reaped
    except (OSError, IndexError):
        return False


def take(store: LakeStore, key: str, owner: str, seconds: float, about: dict | None = None) -> bool:
    """Claim `key` for `owner` for `seconds`; True if it is now ours (fresh, already ours, or taken over)."""
    path = claim_path(store, key)
    data = _encode(owner, seconds, about or {})
    if _create(store, path, data):
        return True
    held = read_claim(store, key)
    if held is not None and held.owner == owner:
        renew(store, key, owner, seconds, about)
        return True
    if held is not None and not held.expired and not died_here(held.about):
        return False
    release(store, key)  # stale (its run died) or gone meanwhile: try once more under the same rule
    return _create(store, path, data)


def renew(store: LakeStore, key: str, owner: str, seconds: float, about: dict | None = None) -> bool:
    """Push a claim we hold further into the future (a long piece of work still in progress).

    False, and nothing written, if it is no longer ours (it expired and another run took it over).
    """
    held = read_claim(store, key)
    if held is not None and held.owner != owner:
        return False
    with store.explained_errors():
        path = claim_path(store, key)
        if store.is_local:
            tmp = f"{path}.{owner}.tmp"
            with open(tmp, "wb") as handle:
                handle.write(_encode(owner, seconds, about or {}))
            os.replace(tmp, path)
        else:
            store.fs.pipe_file(path, _encode(owner, seconds, about or {}))
    return True


def release(store: LakeStore, key: str) -> None:
    """Remove a claim (ours, finished; or a stale one being taken over)."""
    with store.explained_errors():
        try:
            store.fs.rm_file(claim_path(store, key))
        except FileNotFoundError:
            pass

