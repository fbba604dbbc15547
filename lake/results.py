"""Results in the lake: a directory of tables, plots and texts, with a digest manifest, that counts once its ``meta.json`` is there.

Every stage that ends in a report (an evaluation, an attribution benchmark, a model-tracing
result) writes it the same way:

```
<directory>/
    <table>.parquet     one per table
    plots/<name>        the figures, named as given (``lds.png``)
    <name>              the texts, named as given (``report.md``, ``report.html``)
    manifest.json       size and sha256 of every file above and of meta.json (lake.manifest): second to last
    meta.json           lineage and settings: written last
```

``meta.json`` stays the one mark of a complete result, and the digests sit beside it in the
lake's one manifest format rather than inside it: a plain reader finds the lineage where it
always was, `gradlake verify` checks a result like any other manifest directory, and the
manifest can still cover ``meta.json`` itself, since its bytes are encoded before anything is
written.  A rerun first removes ``meta.json``, so from then until the new one is written the
result does not count as complete (a reader never takes the old meta for the new tables), and
writes it last, so its presence means the rest is whole.  Two runs writing the same result take
turns (a claim under ``.gradlake/write/``, taken over at once from a run killed on this
machine): without it a run's meta could land among another run's tables and list a mixture as
complete.  Everything is encoded before anything is touched: a table that cannot be written as
Parquet leaves the previous result as it was.  On a local lake ``manifest.json`` and
``meta.json`` are renamed into place, so they are never seen half written; an S3 object is whole
or absent anyway.  Files of an earlier run that this one does not write (a plot no longer made)
are left in place; the manifest says what belongs.

Readers check what they read against the manifest: a damaged table or ``meta.json`` is one
LakeError naming the file.  Results written before manifests (no ``manifest.json``) are read
unchecked.  A listing (`complete_results`) checks each ``meta.json`` against its manifest and
hands the damaged ones to the caller, never dropping them silently.
"""

from __future__ import annotations

import io
import json
import re
import time

import pandas as pd

from gradlake.lake.claims import new_owner, release, take
from gradlake.lake.manifest import MANIFEST, DamagedFile, entry, read_checked, read_manifest, write_manifest, write_whole
from gradlake.lake.store import DamagedMetadata, LakeError, LakeStore, public_url

META = "meta.json"
PLOTS = "plots"
_WAIT = 300  # seconds a writer waits for another run writing the same result (a write takes seconds)


def _file_name(kind: str, name: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name or "") or name in (META, MANIFEST):
        raise LakeError(f"{kind} name {name!r} is not a plain file name (letters, digits, '.', '_', '-'; not "
                        f"{META!r} or {MANIFEST!r})")
    return name


def _encoded(directory: str, tables: dict[str, pd.DataFrame], plots: dict[str, bytes],
             texts: dict[str, str]) -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    for name, frame in tables.items():
        buffer = io.BytesIO()
        frame.to_parquet(buffer, index=False)
        files[f"{_file_name('table', name)}.parquet"] = buffer.getvalue()
    files.update({f"{PLOTS}/{_file_name('plot', name)}": png for name, png in plots.items()})
    for name, text in texts.items():
        if _file_name("text", name) in files or name == PLOTS:
            raise LakeError(f"text {name!r} would overwrite a table or the plots of the result at {directory!r}")
        files[name] = text.encode()
    return files


def _writing_claim(store: LakeStore, directory: str, owner: str) -> str:
    """Take the claim on writing `directory`, waiting while another live run holds it; returns its key."""
    key = f"write/{directory}"  # beside the creation claims and leases (layout.claim_file)
    deadline = time.monotonic() + _WAIT
    while not take(store, key, owner, _WAIT * 2):
        if time.monotonic() > deadline:
            raise LakeError(f"another run has been writing the result at {directory!r} in {public_url(store.url)} for "
                            f"over {_WAIT} s (its claim: .gradlake/{key}.json); wait for it, or remove that claim if "
                            "the run is gone")
        time.sleep(0.5)
    return key


def write_result(store: LakeStore, directory: str, *, tables: dict[str, pd.DataFrame], meta: dict,
                 plots: dict[str, bytes] | None = None, texts: dict[str, str] | None = None) -> None:
    """Write a result at `directory` (relative to the lake): tables, plots, texts, manifest.json, then `meta` as meta.json, last.

    `tables` maps a name to its frame (``<name>.parquet``), `plots` a file name to its bytes
    (``plots/<name>``), `texts` a file name to its text (``<name>``, UTF-8).  A result already
    there is replaced; it stops counting as complete before any of its files is.
    """
    files = _encoded(directory, tables, plots or {}, texts or {})
    record = json.dumps(meta, indent=2, default=str).encode()
    digests = {name: entry(data) for name, data in files.items()} | {META: entry(record)}
    fs, meta_path, owner = store.fs, store.path(f"{directory}/{META}"), new_owner()
    with store.explained_errors():
        key = _writing_claim(store, directory, owner)
        try:
            try:
                fs.rm_file(meta_path)  # the old result stops counting as complete before any of it is replaced
            except FileNotFoundError:
                pass
            fs.makedirs(store.path(directory), exist_ok=True)
            if plots:
                fs.makedirs(store.path(f"{directory}/{PLOTS}"), exist_ok=True)
            for name, data in files.items():
                fs.pipe_file(store.path(f"{directory}/{name}"), data)
            write_manifest(fs, store.path(directory), digests)
            write_whole(fs, meta_path, record)  # last, and never seen half written
        finally:
            release(store, key)
            fs.invalidate_cache()


def result_complete(store: LakeStore, directory: str) -> bool:
    """True once the result at `directory` is whole (its meta.json, written last, is there)."""
    with store.explained_errors():
        store.fs.invalidate_cache()  # s3fs caches listings: another process may have written it since
        return store.fs.exists(store.path(f"{directory}/{META}"))


def _public(store: LakeStore, message: str) -> str:
    """A message about a file of the lake with the lake's filesystem root given as its public URL."""
    return message.replace(store.root, public_url(store.url))


def read_checked_file(store: LakeStore, directory: str, name: str, files: dict | None = None) -> bytes | None:
    """The bytes of ``<directory>/<name>`` checked against the directory's manifest (if it has one); None if absent.

    A file that differs from its manifest entry, or a damaged manifest, is one DamagedFile naming it."""
    with store.explained_errors():
        try:
            return read_checked(store.fs, store.path(directory), name, files)
        except FileNotFoundError:
            return None
        except DamagedFile as err:
            if name == META and not store.fs.exists(store.path(f"{directory}/{name}")):
                return None  # its writer has not got to it yet (or died before): not complete, not damaged
            raise DamagedFile(_public(store, str(err))) from None


def read_result_meta(store: LakeStore, directory: str, what: str = "result", name: str = META) -> dict:
    """The meta.json (or the JSON file `name` written last in its place) of the complete result at `directory`;
    one LakeError if it is not complete, or damaged."""
    raw = read_checked_file(store, directory, name)
    if raw is None:
        raise LakeError(f"no complete {what} at {directory!r} in {public_url(store.url)} "
                        f"(its {name}, written last, is not there)")
    try:
        record = json.loads(raw)
    except ValueError as err:  # JSONDecodeError and UnicodeDecodeError alike
        record = err
    if not isinstance(record, dict):
        problem = record if isinstance(record, ValueError) else f"it holds {type(record).__name__}, not an object"
        raise DamagedMetadata(f"damaged metadata: {public_url(store.url)}/{directory}/{name} is not valid JSON "
                              f"({problem}); run `gradlake verify`, then the stage that wrote it again")
    return record


def read_result_table(store: LakeStore, directory: str, table: str, what: str = "result") -> pd.DataFrame:
    """Table `table` (``<table>.parquet``) of the complete result at `directory`, checked against its manifest."""
    if not result_complete(store, directory):
        raise LakeError(f"no complete {what} at {directory!r} in {public_url(store.url)} "
                        f"(its {META}, written last, is not there)")
    name = f"{_file_name('table', table)}.parquet"
    raw = read_checked_file(store, directory, name)
    if raw is None:
        held = sorted(p.rsplit("/", 1)[-1][:-len(".parquet")] for p in store.glob(f"{directory}/*.parquet"))
        raise LakeError(f"the {what} at {directory!r} has no table {table!r}; it has {held}")
    return read_parquet_bytes(store, f"{directory}/{name}", raw)


def read_parquet_bytes(store: LakeStore, relative: str, raw: bytes) -> pd.DataFrame:
    """A Parquet file's bytes as a frame; bytes that are not Parquet are one DamagedFile naming the file."""
    try:
        return pd.read_parquet(io.BytesIO(raw))
    except Exception as err:  # pyarrow's ArrowInvalid ("magic bytes not found") and its kin
        raise DamagedFile(f"{public_url(store.url)}/{relative} cannot be read as Parquet ({type(err).__name__}: "
                          f"{str(err)[:80]}); run `gradlake verify`, then the stage that wrote it again") from None


def complete_results(store: LakeStore, pattern: str, damaged: list | None = None) -> list[tuple[str, dict]]:
    """(directory relative to the lake, its meta) of every complete result whose directory matches `pattern`.

    A result whose meta.json is damaged (not JSON, or not what its manifest recorded) is not listed as a
    result: (directory, one-line reason) goes to `damaged` where given (the catalog shows it), and
    `gradlake verify` names it either way."""
    found = []
    for path in store.glob(f"{pattern}/{META}"):
        directory = path[len(store.root) + 1:].rsplit("/", 1)[0]
        try:
            found.append((directory, read_result_meta(store, directory)))
        except LakeError as err:
            if result_complete(store, directory) and damaged is not None:  # else rewritten meanwhile: not there now
                damaged.append((directory, str(err)))
    return found


def result_manifest(store: LakeStore, directory: str) -> dict | None:
    """The manifest entries of the result at `directory`, None for a result written before manifests."""
    with store.explained_errors():
        try:
            return read_manifest(store.fs, store.path(directory))
        except DamagedFile as err:
            raise DamagedFile(_public(store, str(err))) from None
