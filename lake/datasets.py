"""Probe datasets in the lake: one Parquet file per (dataset, variant), with its lineage.

A dataset row is a sample: ``id`` (a stable string) and ``messages`` (a JSON list of
``{"role", "content"}``).  The content hash covers ids and messages, so a gradient
group can cite exactly the data it was computed on.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json

import pandas as pd

from lake import layout
from lake.store import LakeError, LakeStore


def content_hash(frame: pd.DataFrame) -> str:
    """sha256 over the ids and messages of a dataset, in order."""
    digest = hashlib.sha256()
    for sample_id, messages in zip(frame["id"], frame["messages"]):
        digest.update(json.dumps([sample_id, messages], sort_keys=True, ensure_ascii=False).encode())
    return "sha256:" + digest.hexdigest()


def write_dataset(store: LakeStore, name: str, variant: str, frame: pd.DataFrame, lineage: dict | None = None) -> dict:
    """Store a dataset variant (columns ``id``, ``messages`` as lists of dicts); returns its meta record."""
    layout.name_key("dataset name", name)
    layout.name_key("variant", variant)
    if frame.empty:
        raise LakeError(f"dataset {name!r} variant {variant!r} has no rows; nothing to store")
    if frame["id"].duplicated().any():
        dup = frame["id"][frame["id"].duplicated()].iloc[0]
        raise LakeError(f"dataset {name!r} has duplicate sample id {dup!r}; ids must be unique")
    base = store.path(layout.dataset_dir(name, variant))
    table = pd.DataFrame({"id": frame["id"].astype(str), "messages": [json.dumps(m, ensure_ascii=False) for m in frame["messages"]]})
    extra = [c for c in frame.columns if c not in ("id", "messages")]
    for column in extra:
        table[column] = frame[column].values
    meta = {
        "dataset": name,
        "variant": variant,
        "n_samples": int(len(frame)),
        "content_hash": content_hash(frame),
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "lineage": lineage or {},
    }
    buffer = io.BytesIO()
    table.to_parquet(buffer, index=False)
    store.fs.makedirs(base, exist_ok=True)
    store.fs.pipe_file(f"{base}/data.parquet", buffer.getvalue())
    # meta.json last: a dataset is listed only once its data is whole.
    store.fs.pipe_file(f"{base}/meta.json", json.dumps(meta, indent=2).encode())
    return meta


def dataset_meta(store: LakeStore, name: str, variant: str) -> dict:
    path = store.path(layout.dataset_dir(name, variant)) + "/meta.json"
    try:
        return json.loads(store.fs.cat_file(path))
    except FileNotFoundError:
        known = list_datasets(store)
        raise LakeError(
            f"dataset {name!r} variant {variant!r} is not in lake {store.url}; "
            f"it holds {[(m['dataset'], m['variant']) for m in known] or 'no datasets'}"
        ) from None


def read_dataset(store: LakeStore, name: str, variant: str) -> pd.DataFrame:
    """A dataset variant as a DataFrame with ``id`` and ``messages`` (lists of dicts)."""
    dataset_meta(store, name, variant)
    path = store.path(layout.dataset_dir(name, variant)) + "/data.parquet"
    frame = pd.read_parquet(io.BytesIO(store.fs.cat_file(path)))
    frame["messages"] = [json.loads(m) for m in frame["messages"]]
    return frame


def list_datasets(store: LakeStore) -> list[dict]:
    """Meta records of every complete dataset variant in the lake."""
    pattern = store.path("datasets/*/*/meta.json")
    return [json.loads(store.fs.cat_file(p)) for p in sorted(store.fs.glob(pattern))]
