"""Evaluation results in the lake, and the listings of every stage's results (each a `lake.results` directory).

```
evaluations/<model>/<checkpoint>/<dataset>/<stem>/   (<stem>: the paradigm, the target unless weights, -thesis; see lake.layout)
    results.parquet          metrics per query variant, vector set and similarity
    self_similarity.parquet  each query sample's cosine with its own original, per vector set
    greedy.parquet           greedy layer selection, step by step
    plots/<name>.png
    report.md  report.html   (the HTML inlines its plots)
    manifest.json            size and sha256 of every file here, meta.json included (lake.results)
    meta.json                lineage; written last, so its presence means the rest is complete
```

Each listing takes `damaged`: a list that receives (directory, one-line reason) for every result whose
meta.json is there but damaged, which is then not listed as a result (the catalog shows it as damaged).
"""

from __future__ import annotations

import pandas as pd

from gradlake.lake import layout
from gradlake.lake.results import complete_results, read_result_table, write_result
from gradlake.lake.store import LakeError, LakeStore

TABLES = ("results", "self_similarity", "greedy")


def write_evaluation(store: LakeStore, directory: str, tables: dict[str, pd.DataFrame], plots: dict[str, bytes],
                     reports: dict[str, str], lineage: dict) -> None:
    """Write everything, meta.json last; a rerun replaces the previous evaluation."""
    meta = {"lineage": lineage, "tables": sorted(tables), "plots": sorted(plots), "reports": sorted(reports)}
    write_result(store, directory, tables=tables, plots=plots, texts=reports, meta=meta)


def read_evaluation(store: LakeStore, directory: str, table: str = "results") -> pd.DataFrame:
    """One table of a complete evaluation."""
    if table not in TABLES:
        raise LakeError(f"evaluation table {table!r} is not known; use one of {TABLES}")
    return read_result_table(store, directory, table, what="evaluation")


def list_evaluations(store: LakeStore, damaged: list | None = None) -> list[tuple[str, dict]]:
    """(directory, meta) of every complete evaluation."""
    return complete_results(store, layout.EVALUATIONS, damaged)


def list_attribution_benchmarks(store: LakeStore, damaged: list | None = None) -> list[tuple[str, dict]]:
    """(directory, meta) of every complete attribution benchmark, in the layout of today
    (``attribution/<m>/<c>/<d>/benchmarks/<queries>``) or of earlier lakes
    (``evaluations/<m>/<c>/<d>/attribution/<queries>``); where a lake holds one in both, today's."""
    found: dict[tuple, tuple[str, dict]] = {}
    for pattern in (layout.LEGACY_BENCHMARKS, layout.BENCHMARKS):  # today's last: it replaces an earlier one
        for directory, meta in complete_results(store, pattern, damaged):
            found[tuple(layout.parse_benchmark_dir(directory).values())] = (directory, meta)
    return sorted(found.values(), key=lambda hit: hit[0])


def list_tracing(store: LakeStore, damaged: list | None = None) -> list[tuple[str, dict]]:
    """(directory, meta) of every complete model-tracing result (tracing/<base>/<checkpoint>/<candidate>/<checkpoint>/)."""
    return complete_results(store, layout.TRACING, damaged)
