"""Evaluation results in the lake: tables as Parquet, plots as PNG, reports, and their lineage.

```
evaluations/<model>/<checkpoint>/<dataset>/<stem>/   (<stem>: the paradigm, the target unless weights, -thesis; see lake.layout)
    results.parquet          metrics per query variant, vector set and similarity
    self_similarity.parquet  each query sample's cosine with its own original, per vector set
    greedy.parquet           greedy layer selection, step by step
    plots/<name>.png
    report.md  report.html   (the HTML inlines its plots)
    meta.json                lineage; written last, so its presence means the rest is complete
```
"""

from __future__ import annotations

import io
import json

import pandas as pd

from gradlake.lake.store import LakeError, LakeStore, scan_json

TABLES = ("results", "self_similarity", "greedy")


def evaluation_dir(model: str, checkpoint: str, dataset: str, paradigm: str) -> str:
    return f"evaluations/{model}/{checkpoint}/{dataset}/{paradigm}"


def write_evaluation(store: LakeStore, directory: str, tables: dict[str, pd.DataFrame], plots: dict[str, bytes],
                     reports: dict[str, str], lineage: dict) -> None:
    """Write everything, meta.json last; a rerun replaces the previous evaluation."""
    fs = store.fs
    meta_path = store.path(f"{directory}/meta.json")
    if fs.exists(meta_path):
        fs.rm(meta_path)  # the old evaluation stops counting as complete before any of it is replaced
    fs.makedirs(store.path(f"{directory}/plots"), exist_ok=True)
    for name, frame in tables.items():
        buffer = io.BytesIO()
        frame.to_parquet(buffer, index=False)
        fs.pipe_file(store.path(f"{directory}/{name}.parquet"), buffer.getvalue())
    for name, png in plots.items():
        fs.pipe_file(store.path(f"{directory}/plots/{name}"), png)
    for name, text in reports.items():
        fs.pipe_file(store.path(f"{directory}/{name}"), text.encode())
    meta = {"lineage": lineage, "tables": sorted(tables), "plots": sorted(plots), "reports": sorted(reports)}
    fs.pipe_file(meta_path, json.dumps(meta, indent=2, default=str).encode())


def read_evaluation(store: LakeStore, directory: str, table: str = "results") -> pd.DataFrame:
    """One table of a complete evaluation."""
    if table not in TABLES:
        raise LakeError(f"evaluation table {table!r} is not known; use one of {TABLES}")
    store.fs.invalidate_cache()
    if not store.fs.exists(store.path(f"{directory}/meta.json")):
        raise LakeError(f"no complete evaluation at {directory!r} in {store.url}")
    with store.fs.open(store.path(f"{directory}/{table}.parquet"), "rb") as handle:
        return pd.read_parquet(handle)


def list_evaluations(store: LakeStore) -> list[tuple[str, dict]]:
    """(directory, meta) of every complete evaluation."""
    return _complete_dirs(store, "evaluations/*/*/*/*")


def list_attribution_benchmarks(store: LakeStore) -> list[tuple[str, dict]]:
    """(directory, meta) of every complete attribution benchmark (evaluations/<m>/<c>/<d>/attribution/<queries>/)."""
    return _complete_dirs(store, "evaluations/*/*/*/attribution/*")


def list_tracing(store: LakeStore) -> list[tuple[str, dict]]:
    """(directory, meta) of every complete model-tracing result (tracing/<base>/<checkpoint>/<candidate>/<checkpoint>/)."""
    return _complete_dirs(store, "tracing/*/*/*/*")


def _complete_dirs(store: LakeStore, pattern: str) -> list[tuple[str, dict]]:
    """(directory relative to the lake, its meta.json) of the directories matching `pattern` that hold a meta.json,
    which is written last."""
    return [(relative, meta) for relative, meta, damage in scan_json(store, f"{pattern}/meta.json") if damage is None]
