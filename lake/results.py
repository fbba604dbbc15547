"""Results in the lake: a directory of tables, plots and texts that counts only once its ``meta.json`` is there.

Every stage that ends in a report (an evaluation, an attribution benchmark, a model-tracing
result) writes it the same way:

```
<directory>/
    <table>.parquet     one per table
    plots/<name>        the figures, named as given (``lds.png``)
    <name>              the texts, named as given (``report.md``, ``report.html``)
    meta.json           lineage and settings: written last
```

A rerun first removes ``meta.json``, so from then until the new one is written the result does
not count as complete (a reader never takes the old meta for the new tables), and writes it
last, so its presence means the rest is whole.  Everything is encoded before anything is
touched: a table that cannot be written as Parquet leaves the previous result as it was.  On a
local lake ``meta.json`` is written to a temporary name and renamed, so it is never seen half
written; an S3 object is whole or absent anyway.  Files of an earlier run that this one does
not write (a plot no longer made) are left in place; ``meta.json`` says what belongs.
"""

from __future__ import annotations

import io
import json
import os
import re
import uuid

import pandas as pd

from gradlake.lake.store import LakeError, LakeStore, public_url, read_json, scan_json

META = "meta.json"
PLOTS = "plots"


def _file_name(kind: str, name: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name or "") or name == META:
        raise LakeError(f"{kind} name {name!r} is not a plain file name (letters, digits, '.', '_', '-'; not {META!r})")
    return name


def write_result(store: LakeStore, directory: str, *, tables: dict[str, pd.DataFrame], meta: dict,
                 plots: dict[str, bytes] | None = None, texts: dict[str, str] | None = None) -> None:
    """Write a result at `directory` (relative to the lake): tables, plots, texts, then `meta` as meta.json, last.

    `tables` maps a name to its frame (``<name>.parquet``), `plots` a file name to its bytes
    (``plots/<name>``), `texts` a file name to its text (``<name>``, UTF-8).  A result already
    there is replaced; it stops counting as complete before any of its files is.
    """
    plots, texts = plots or {}, texts or {}
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
    record = json.dumps(meta, indent=2, default=str).encode()
    fs, meta_path = store.fs, store.path(f"{directory}/{META}")
    with store.explained_errors():
        try:
            fs.rm_file(meta_path)  # the old result stops counting as complete before any of it is replaced
        except FileNotFoundError:
            pass
        fs.makedirs(store.path(directory), exist_ok=True)
        if plots:
            fs.makedirs(store.path(f"{directory}/{PLOTS}"), exist_ok=True)
        for name, data in files.items():
            fs.pipe_file(store.path(f"{directory}/{name}"), data)
        if store.is_local:  # renamed into place: never seen half written
            temporary = f"{meta_path}.{uuid.uuid4().hex}.tmp"
            with open(temporary, "wb") as handle:
                handle.write(record)
            os.replace(temporary, meta_path)
        else:
            fs.pipe_file(meta_path, record)
        fs.invalidate_cache()


def result_complete(store: LakeStore, directory: str) -> bool:
    """True once the result at `directory` is whole (its meta.json, written last, is there)."""
    with store.explained_errors():
        store.fs.invalidate_cache()  # s3fs caches listings: another process may have written it since
        return store.fs.exists(store.path(f"{directory}/{META}"))


def read_result_meta(store: LakeStore, directory: str, what: str = "result") -> dict:
    """The meta.json of the complete result at `directory`; one LakeError if it is not complete, or damaged."""
    record = read_json(store, f"{directory}/{META}")
    if record is None:
        raise LakeError(f"no complete {what} at {directory!r} in {public_url(store.url)} "
                        f"(its {META}, written last, is not there)")
    return record


def read_result_table(store: LakeStore, directory: str, table: str, what: str = "result") -> pd.DataFrame:
    """Table `table` (``<table>.parquet``) of the complete result at `directory`."""
    if not result_complete(store, directory):
        raise LakeError(f"no complete {what} at {directory!r} in {public_url(store.url)} "
                        f"(its {META}, written last, is not there)")
    with store.explained_errors():
        try:
            raw = store.fs.cat_file(store.path(f"{directory}/{_file_name('table', table)}.parquet"))
        except FileNotFoundError:
            held = sorted(p.rsplit("/", 1)[-1][:-len(".parquet")] for p in store.glob(f"{directory}/*.parquet"))
            raise LakeError(f"the {what} at {directory!r} has no table {table!r}; it has {held}") from None
    return pd.read_parquet(io.BytesIO(raw))


def complete_results(store: LakeStore, pattern: str) -> list[tuple[str, dict]]:
    """(directory relative to the lake, its meta) of every complete result whose directory matches `pattern`.

    A result whose meta.json is damaged is left out (`lake.verify` names it)."""
    return [(directory, meta) for directory, meta, damage in scan_json(store, f"{pattern}/{META}") if damage is None]
