"""Probe datasets in the lake: versioned Parquet per (dataset, variant), with lineage.

A dataset row is a sample: ``id`` (a stable string) and ``messages`` (a JSON list of
``{"role", "content"}``).  A version is named by its content hash (over ids and
messages), so writing the same content again is the same version, and a gradient
group can cite exactly the data it was computed on.  ``latest.json`` points at the
newest version and is written last.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json

import pandas as pd

from gradlake.lake import layout
from gradlake.lake.store import DamagedMetadata, LakeError, LakeStore, public_url, read_json, scan_json


def content_hash(frame: pd.DataFrame) -> str:
    """sha256 over the ids and messages of a dataset, in order."""
    digest = hashlib.sha256()
    for sample_id, messages in zip(frame["id"], frame["messages"]):
        digest.update(json.dumps([sample_id, messages], sort_keys=True, ensure_ascii=False).encode())
    return "sha256:" + digest.hexdigest()


def write_dataset(store: LakeStore, name: str, variant: str, frame: pd.DataFrame, lineage: dict | None = None) -> dict:
    """Store a dataset variant (columns ``id``, ``messages`` as lists of dicts) as a new version; returns its meta."""
    layout.name_key("dataset name", name)
    layout.name_key("variant", variant)
    if frame.empty:
        raise LakeError(f"dataset {name!r} variant {variant!r} has no rows; nothing to store")
    if frame["id"].duplicated().any():
        dup = frame["id"][frame["id"].duplicated()].iloc[0]
        raise LakeError(f"dataset {name!r} has duplicate sample id {dup!r}; ids must be unique")
    digest = content_hash(frame)
    version = layout.dataset_version(digest)
    table = pd.DataFrame({"id": frame["id"].astype(str), "messages": [json.dumps(m, ensure_ascii=False) for m in frame["messages"]]})
    for column in (c for c in frame.columns if c not in ("id", "messages")):
        table[column] = frame[column].values
    meta = {
        "dataset": name,
        "variant": variant,
        "version": version,
        "n_samples": int(len(frame)),
        "content_hash": digest,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "lineage": lineage or {},
    }
    buffer = io.BytesIO()
    table.to_parquet(buffer, index=False)
    store.fs.makedirs(store.path(layout.dataset_version_dir(name, variant, version)), exist_ok=True)
    store.fs.pipe_file(store.path(layout.dataset_data_file(name, variant, version)), buffer.getvalue())
    # Meta after data, pointer after meta: what a reader finds is always whole.
    store.fs.pipe_file(store.path(layout.dataset_meta_file(name, variant, version)), json.dumps(meta, indent=2).encode())
    store.fs.pipe_file(store.path(layout.dataset_latest_file(name, variant)), json.dumps(meta, indent=2).encode())
    return meta


def dataset_meta(store: LakeStore, name: str, variant: str, version: str | None = None) -> dict:
    """The meta record of a dataset variant's latest (or given) version; one clear error if absent or damaged."""
    meta = _read_meta(store, layout.dataset_meta_file(name, variant, version) if version
                      else layout.dataset_latest_file(name, variant))
    if meta is not None:
        return meta
    if version:
        versions = [m["version"] for m in list_versions(store, name, variant)]
        raise LakeError(f"dataset {name!r} variant {variant!r} has no version {version!r}; "
                        f"versions: {versions or 'none'}")
    known = sorted({(m["dataset"], m["variant"]) for m in list_datasets(store)})
    if not known:
        store.check_exists()  # a lake that is not there says so, not that it lacks this dataset
    raise LakeError(
        f"dataset {name!r} variant {variant!r} is not in lake {store.url}; "
        f"it holds {known or 'no datasets'} as (dataset, variant)"
    )


def read_dataset(store: LakeStore, name: str, variant: str, version: str | None = None) -> pd.DataFrame:
    """A dataset variant (latest version unless one is named) with ``id`` and ``messages`` as lists of dicts."""
    meta = dataset_meta(store, name, variant, version)
    path = store.path(layout.dataset_data_file(name, variant, meta["version"]))
    frame = pd.read_parquet(io.BytesIO(store.fs.cat_file(path)))
    frame["messages"] = [json.loads(m) for m in frame["messages"]]
    return frame


def list_datasets(store: LakeStore) -> list[dict]:
    """Meta records of every dataset variant's latest version.

    A variant whose ``latest.json`` is damaged does not end the listing: its entry is
    ``{"dataset", "variant", "path", "damaged"}``, ``damaged`` being the one line that
    reading it raises, so that a catalog can show it.
    """
    metas = []
    for directory, record, damage in scan_json(store, f"{layout.DATASET_VARIANTS}/latest.json"):
        relative = f"{directory}/latest.json"
        damage = f"{damage}; {_rewrite(relative)}" if damage else _not_a_record(store, relative, record)
        if damage:
            _, name, variant = directory.split("/")
            metas.append({"dataset": name, "variant": variant, "path": relative, "damaged": damage})
        else:
            metas.append(record)
    return metas


def list_versions(store: LakeStore, name: str, variant: str) -> list[dict]:
    """Meta records of every stored version of a dataset variant, oldest first; a damaged one is a LakeError naming it."""
    paths = store.glob(layout.dataset_meta_file(name, variant, "*"))
    return sorted((_read_meta(store, p[len(store.root) + 1:]) for p in paths), key=lambda m: m["created_at"])


_META_KEYS = ("dataset", "variant", "version", "n_samples", "content_hash", "created_at")


def _read_meta(store: LakeStore, relative: str) -> dict | None:
    """The meta record at `relative` in the lake, None where there is none; a damaged one is one DamagedMetadata line."""
    try:
        record = read_json(store, relative)
    except DamagedMetadata as err:
        raise DamagedMetadata(f"{err}; {_rewrite(relative)}") from None
    problem = record is not None and _not_a_record(store, relative, record)
    if problem:
        raise DamagedMetadata(problem)
    return record


def _not_a_record(store: LakeStore, relative: str, record: dict) -> str | None:
    """Why a JSON object read from `relative` is not a dataset meta record (a file cut or overwritten), or None."""
    missing = [k for k in _META_KEYS if k not in record]
    if not missing:
        return None
    return (f"damaged metadata: {public_url(store.url)}/{relative} is not a dataset meta record "
            f"(no {', '.join(map(repr, missing))}); restore the file; {_rewrite(relative)}")


def _rewrite(relative: str) -> str:
    name = relative.split("/")[1]  # datasets/<name>/<variant>/...
    return (f"writing dataset {name!r} again (`gradlake dataset create --name {name} ...`, "
            "or `gradlake dataset probe` for the bundled probe set) also replaces it")
