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
from gradlake.lake.store import LakeError, LakeStore


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
    base = store.path(layout.dataset_version_dir(name, variant, version))
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
    store.fs.makedirs(base, exist_ok=True)
    store.fs.pipe_file(f"{base}/data.parquet", buffer.getvalue())
    # Meta after data, pointer after meta: what a reader finds is always whole.
    store.fs.pipe_file(f"{base}/meta.json", json.dumps(meta, indent=2).encode())
    store.fs.pipe_file(store.path(layout.dataset_dir(name, variant)) + "/latest.json", json.dumps(meta, indent=2).encode())
    return meta


def dataset_meta(store: LakeStore, name: str, variant: str, version: str | None = None) -> dict:
    """The meta record of a dataset variant's latest (or given) version; one clear error if absent."""
    base = store.path(layout.dataset_dir(name, variant))
    path = f"{base}/{version}/meta.json" if version else f"{base}/latest.json"
    try:
        return json.loads(store.fs.cat_file(path))
    except FileNotFoundError:
        if version:
            versions = [m["version"] for m in list_versions(store, name, variant)]
            raise LakeError(f"dataset {name!r} variant {variant!r} has no version {version!r}; "
                            f"versions: {versions or 'none'}") from None
        known = sorted({(m["dataset"], m["variant"]) for m in list_datasets(store)})
        if not known:
            store.check_exists()  # a lake that is not there says so, not that it lacks this dataset
        raise LakeError(
            f"dataset {name!r} variant {variant!r} is not in lake {store.url}; "
            f"it holds {known or 'no datasets'} as (dataset, variant)"
        ) from None


def read_dataset(store: LakeStore, name: str, variant: str, version: str | None = None) -> pd.DataFrame:
    """A dataset variant (latest version unless one is named) with ``id`` and ``messages`` as lists of dicts."""
    meta = dataset_meta(store, name, variant, version)
    path = store.path(layout.dataset_version_dir(name, variant, meta["version"])) + "/data.parquet"
    frame = pd.read_parquet(io.BytesIO(store.fs.cat_file(path)))
    frame["messages"] = [json.loads(m) for m in frame["messages"]]
    return frame


def list_datasets(store: LakeStore) -> list[dict]:
    """Meta records of every dataset variant's latest version."""
    return [json.loads(store.fs.cat_file(p)) for p in store.glob("datasets/*/*/latest.json")]


def list_versions(store: LakeStore, name: str, variant: str) -> list[dict]:
    """Meta records of every stored version of a dataset variant, oldest first."""
    metas = [json.loads(store.fs.cat_file(p)) for p in store.glob(f"{layout.dataset_dir(name, variant)}/*/meta.json")]
    return sorted(metas, key=lambda m: m["created_at"])
