"""Is what the lake says complete really there and unchanged?  `verify_lake` walks it and says.

For every gradient and projection group it checks the metadata against the group's plan (array
shapes, dtypes, chunk shapes), then reads every row-chunk flagged complete: a chunk object whose
CRC32C does not match (Zarr's crc32c codec), a chunk object that is missing (it reads as NaN, the
fill value of checked groups) and a row-chunk whose values differ from the digest recorded when it
was written (a chunk swapped or rewritten) are each found and named.  Score groups are read
block by block the same way (a missing block reads as NaN; scores are always finite).  Datasets are
checked against their content hash, and results (evaluations, attribution benchmarks in either
layout, tracing results) by reading their meta.json and every Parquet table.  Groups written
before checksums existed can only be read, not proven; they are reported as "unchecked" for what
cannot be proven.

`repair=True` clears the completion flags of exactly the damaged chunks and blocks, so the next
run of the stage that wrote them recomputes those and nothing else.  Damaged metadata cannot be
repaired by flags: those groups are named, with what to do.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import zarr

from gradlake.lake import layout
from gradlake.lake.datasets import content_hash, dataset_meta, read_dataset
from gradlake.lake.gradient_plan import ATTR
from gradlake.lake.gradients import GradientGroup
from gradlake.lake.integrity import damaged_chunk, digest
from gradlake.lake.results import META
from gradlake.lake.scores import ScoreGroup
from gradlake.lake.store import DamagedMetadata, LakeStore, scan_json

# The results (lake.results) checked, by the catalog's kind; benchmarks in today's layout and earlier lakes'.
RESULTS = (("evaluation", layout.EVALUATIONS), ("attribution", layout.BENCHMARKS),
           ("attribution", layout.LEGACY_BENCHMARKS), ("tracing", layout.TRACING))


@dataclass
class Finding:
    """What verifying one group (or dataset version) found."""

    kind: str
    path: str
    status: str = "ok"  # ok | damaged | unchecked
    problems: list[str] = field(default_factory=list)
    chunks: list = field(default_factory=list)  # damaged row-chunks (gradients) or (query, train) blocks (scores)
    repairable: bool = True
    repaired: bool = False

    def damage(self, problem: str, chunk=None, repairable: bool = True) -> None:
        self.status = "damaged"
        self.problems.append(problem)
        if chunk is not None and chunk not in self.chunks:
            self.chunks.append(chunk)
        self.repairable = self.repairable and repairable

    def row(self) -> dict:
        return {"kind": self.kind, "path": self.path, "status": self.status,
                "damaged_chunks": len(self.chunks), "repaired": self.repaired,
                "problem": "; ".join(self.problems[:3]) + (f"; and {len(self.problems) - 3} more" if len(self.problems) > 3 else "")}


def _read(array: zarr.Array, selection, label: str) -> tuple[np.ndarray | None, str | None]:
    """Values at `selection`, or None and a one-line reason (which chunk object is damaged) if they cannot be read."""
    try:
        return np.asarray(array[selection]), None
    except Exception as err:
        rows = selection[0] if isinstance(selection, tuple) else selection
        rows = rows if isinstance(rows, slice) else slice(rows, rows + 1)
        return None, f"{label}: {damaged_chunk(array, rows, err)}"


def verify_gradient_group(store: LakeStore, path: str, repair: bool = False) -> Finding:
    """Check one gradient (or projection) group; with `repair`, clear the flags of its damaged chunks."""
    finding = Finding("projection" if "-proj-" in path.rsplit("/", 1)[-1] else "gradients", path)
    try:
        group = GradientGroup.open(store, path)
    except DamagedMetadata as err:
        finding.damage(str(err), repairable=False)
        return finding
    plan = group.plan
    for problem in group.metadata_problems():
        finding.damage(problem, repairable=False)
    if finding.status == "damaged":
        return finding
    try:
        flags = group.done_chunks()
    except Exception as err:
        finding.damage(f"completion flags cannot be read ({type(err).__name__})", repairable=False)
        return finding
    names = plan.data_arrays()
    for k in np.flatnonzero(flags).tolist():
        start, stop = plan.chunk_bounds(k)
        label = f"row-chunk {k} (samples {start}-{stop - 1})"
        selection = slice(start, stop) if plan.mode == "store" else k
        values = []
        for name in names:
            value, problem = _read(group.group[name], selection, f"{label}, array {name!r}")
            if problem:
                finding.damage(problem, k)
                break
            values.append(value)
        else:
            if not plan.checksum:
                continue
            if any(np.isnan(v).all() for v in values if v.size):
                finding.damage(f"{label}: a chunk object is missing (it reads as the fill value)", k)
            elif digest(values) != group.stored_digest(k):
                finding.damage(f"{label}: its values differ from the digest recorded when it was written", k)
    if plan.mode != "store" and flags.all() and finding.status == "ok" and group.meta_complete():
        for name in plan.parameters:  # the mean must be what its chunks' sums give
            mean, problem = _read(group.group[name], slice(None), f"array {name!r}")
            if problem or not np.array_equal(mean, group.mean_of_sums(name), equal_nan=True):
                finding.damage(problem or f"array {name!r}: the stored mean differs from its chunks' sums "
                               "(it is recomputed from them)", "mean")
    if finding.status == "ok" and not plan.checksum:
        finding.status = "unchecked"
        finding.problems.append("written before checksums: chunks were read, not proven")
    if repair and finding.status == "damaged" and finding.repairable:
        group.clear([k for k in finding.chunks if k != "mean"])
        finding.repaired = True
    return finding


def verify_score_group(store: LakeStore, path: str, repair: bool = False) -> Finding:
    """Check one score group: every block flagged complete can be read and is finite."""
    finding = Finding("scores", path)
    try:
        scores = ScoreGroup.open(store, path)
        flags = np.asarray(scores.group["block_complete"][:])
    except DamagedMetadata as err:
        finding.damage(str(err), repairable=False)
        return finding
    except Exception as err:
        finding.damage(f"cannot be opened ({type(err).__name__}: {err})", repairable=False)
        return finding
    for qb, tb in np.argwhere(flags == 1).tolist():
        qs, ts = scores.bounds(qb, tb)
        label = f"block ({qb}, {tb}) (queries {qs.start}-{qs.stop - 1}, training samples {ts.start}-{ts.stop - 1})"
        values, problem = _read(scores.group["scores"], (qs, ts), label)
        if problem:
            finding.damage(problem, (qb, tb))
        elif not np.isfinite(values).all():
            finding.damage(f"{label}: holds NaN (a missing chunk object reads as NaN; scores are always finite)", (qb, tb))
    if repair and finding.status == "damaged" and finding.repairable:
        scores.clear(finding.chunks)
        finding.repaired = True
    return finding


def verify_dataset(store: LakeStore, directory: str, repair: bool = False) -> Finding:
    """Check one dataset version: its meta is readable and its data hash to what the meta says."""
    finding = Finding("dataset", directory, repairable=False)
    _, name, variant, version = directory.split("/")
    try:
        meta = dataset_meta(store, name, variant, version)
        frame = read_dataset(store, name, variant, version)
    except DamagedMetadata as err:
        finding.damage(str(err), repairable=False)
        return finding
    except Exception as err:
        finding.damage(f"cannot be read ({type(err).__name__}: {err})", repairable=False)
        return finding
    if content_hash(frame) != meta.get("content_hash"):
        finding.damage(f"data.parquet does not hash to {meta.get('content_hash')}: it changed after it was written",
                       repairable=False)
    return finding


def verify_result(store: LakeStore, directory: str, repair: bool = False, kind: str = "result") -> Finding:
    """Check one complete result (its meta.json was read by the caller): every Parquet table in it reads whole.

    Nothing here is repaired by flags: a damaged table is rewritten by running its stage again."""
    finding = Finding(kind, directory, repairable=False)
    for path in store.glob(f"{directory}/*.parquet"):
        name = path.rsplit("/", 1)[-1]
        try:
            with store.fs.open(path, "rb") as handle:
                pq.read_table(handle)
        except Exception as err:
            finding.damage(f"table {name} cannot be read ({type(err).__name__}: {err}); run the stage that wrote it "
                           "again to replace it", repairable=False)
    return finding


def verify_lake(store: LakeStore, repair: bool = False, log=print) -> pd.DataFrame:
    """Check everything in the lake; one row per group or dataset version (status ok, damaged or unchecked)."""
    findings: list[Finding] = []
    targets = []
    for kind, pattern, check in (("gradients", layout.GRADIENT_GROUPS, verify_gradient_group),
                                 ("scores", layout.SCORE_GROUPS, verify_score_group)):
        for path, record, damage in scan_json(store, f"{pattern}/zarr.json"):
            if damage is not None:
                finding = Finding(kind, path, repairable=False)
                finding.damage(damage, repairable=False)
                findings.append(finding)
            elif ATTR in (record or {}).get("attributes", {}):
                targets.append((check, path))
    for directory, _, damage in scan_json(store, f"{layout.DATASET_VERSIONS}/meta.json"):
        targets.append((verify_dataset, directory))
    for directory, _, damage in scan_json(store, f"{layout.DATASET_VARIANTS}/latest.json"):
        if damage is not None:
            findings.append(Finding("dataset", directory, repairable=False))
            findings[-1].damage(damage, repairable=False)
    for kind, pattern in RESULTS:
        for directory, _, damage in scan_json(store, f"{pattern}/{META}"):
            if damage is not None:
                findings.append(Finding(kind, directory, repairable=False))
                findings[-1].damage(f"{damage}; or run the stage that wrote it again", repairable=False)
            else:
                targets.append((partial(verify_result, kind=kind), directory))
    for i, (check, path) in enumerate(targets, 1):
        finding = check(store, path, repair=repair)
        findings.append(finding)
        log(f"[{i}/{len(targets)}] {finding.status:9s} {path}" + (f": {finding.problems[0]}" if finding.status == "damaged" else ""))
    columns = ["kind", "path", "status", "damaged_chunks", "repaired", "problem"]
    return pd.DataFrame([f.row() for f in findings], columns=columns).sort_values(["status", "kind", "path"],
                                                                                     ignore_index=True)


__all__ = ["Finding", "verify_lake", "verify_gradient_group", "verify_score_group", "verify_dataset", "verify_result"]
