"""Scoring at scale: what `gradlake score` is asked, and its partial and merged top-k results in the lake.

A scoring reads two groups of the lake holding the same arrays (a projection group's or a
gradient group's, stored per sample): the queries' group, held in memory, and the lake group
it is scored against, streamed (`tasks.evaluate.topk`).  Its rows are cut into ranges of whole
tiles; each range's top-k is a small result of its own (``<output>/parts/rows-<start>-<stop>``,
complete once its meta.json is written, `lake.results`), so a range whose run died is simply
scored again and never merged half written.  The merge reads every range's top-k and writes the
result at ``<output>``: one table ``topk`` (query, rank, row, sample, score).
"""

from __future__ import annotations

import hashlib
import json
from typing import Literal

import numpy as np
import pandas as pd
from prefect import task
from prefect.cache_policies import NONE
from pydantic import BaseModel, Field

from gradlake.lake.gradients import GradientGroup
from gradlake.lake.integrity import read_checked
from gradlake.lake.results import read_result_meta, read_result_table, result_complete, write_result
from gradlake.lake.store import LakeError, LakeStore, default_lake
from gradlake.tasks.common.retries import retry_unless_bad_input
from gradlake.tasks.evaluate.topk import DEFAULT_BUDGET, TopK, merge_topk, row_ranges, row_tile, score_topk

TABLE = "topk"


class ScoreSpec(BaseModel):
    """Top-k scores of a query group against a lake group, in one process or fanned out over a work pool."""

    queries: str = Field(description="Path in the lake of the queries' group (a projection or gradient group stored per sample).")
    docs: str = Field(description="Path in the lake of the group scored against (the same arrays as the queries' group).")
    arrays: list[str] | None = Field(default=None, description="Which arrays of the groups are scored (summed over them). Empty: every array of the queries' group.")
    k: int = Field(default=100, ge=1, description="Rows kept per query, best first (equal scores: lower row first).")
    metric: Literal["dot", "cosine"] = Field(default="dot", description="'dot': the dot product over the arrays; 'cosine': over the arrays together (a zero vector scores 0).")
    memory_budget: int = Field(default=DEFAULT_BUDGET, ge=1 << 20, title="Memory budget (bytes)", description="Bytes of lake rows, queries and score blocks held at once per process.")
    rows_per_run: int | None = Field(default=None, ge=1, description="Fan out: rows of the lake group per work-pool run (rounded up to whole tiles). Empty: every row in this process.")
    deployment: str = Field(default="score-rows/score-rows", description="The deployment each range of rows is sent to when fanned out.")
    run_timeout_s: float = Field(default=3600, gt=0, description="Seconds a fanned-out run may take once a worker has it.")
    worker_wait_s: float = Field(default=600, gt=0, description="Seconds to wait while no worker polls the deployment's pool.")
    output: str | None = Field(default=None, description="Where in the lake the result goes. Empty: topk/<a key of the settings that change scores>.")
    lake: str = Field(default_factory=default_lake, description="Lake URL.")

    def identity(self) -> dict:
        """The settings that decide the scores (not how they are scheduled)."""
        return self.model_dump(include={"queries", "docs", "arrays", "k", "metric", "lake"})

    def key(self) -> str:
        """A short digest of `identity`: names the default output and tells a stale partial result from a current one."""
        return hashlib.sha256(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()[:12]

    def output_dir(self) -> str:
        """The result's directory in the lake."""
        return (self.output or f"topk/{self.key()}").strip("/")


def part_dir(spec: ScoreSpec, start: int, stop: int) -> str:
    """The directory of rows [start, stop)'s partial top-k."""
    return f"{spec.output_dir()}/parts/rows-{start:012d}-{stop:012d}"


def _group(store: LakeStore, path: str) -> GradientGroup:
    group = GradientGroup.open(store, path)
    if group.plan is None or group.plan.mode != "store":
        raise LakeError(f"the group at {path!r} does not hold one vector per sample (mode "
                        f"{group.plan.mode if group.plan else 'unknown'!r}); score a group extracted or projected with mode 'store'")
    missing = int((~group.done_chunks()).sum())
    if missing:
        raise LakeError(f"the group at {path!r} is not complete: {missing} of {group.plan.n_chunks} row-chunks are not "
                        "written yet; finish its extraction or projection first")
    return group


def open_groups(spec: ScoreSpec) -> tuple[LakeStore, GradientGroup, GradientGroup, list[str]]:
    """(store, queries' group, docs' group, array names), every array checked present in both with equal widths."""
    store = LakeStore(spec.lake)
    queries, docs = _group(store, spec.queries), _group(store, spec.docs)
    names = spec.arrays or list(queries.plan.parameters)
    for name in names:
        if name not in queries.plan.parameters or name not in docs.plan.parameters:
            held = sorted(set(queries.plan.parameters) & set(docs.plan.parameters))
            raise LakeError(f"array {name!r} is not in both groups; both hold {held[:5]}{'...' if len(held) > 5 else ''}")
        if queries.plan.numel(name) != docs.plan.numel(name):
            raise LakeError(f"array {name!r} holds {queries.plan.numel(name)} values per query but "
                            f"{docs.plan.numel(name)} per row of {spec.docs!r}: they cannot be compared")
    return store, queries, docs, names


def ranges(spec: ScoreSpec) -> list[tuple[int, int]]:
    """The ranges of rows the fan-out scores, one run each."""
    _, _, docs, names = open_groups(spec)
    n = docs.plan.n_samples
    return row_ranges(n, spec.rows_per_run or n, row_tile([docs.array(name) for name in names]))


def compute_topk(spec: ScoreSpec, start: int = 0, stop: int | None = None) -> TopK:
    """The queries' top-k among rows [start, stop) of the docs' group (every row by default)."""
    _, queries, docs, names = open_groups(spec)
    held = [read_checked(queries.array(name), (slice(None), slice(None)), np.float32) for name in names]
    return score_topk(held, [docs.array(name) for name in names], spec.k, start, stop, spec.metric, spec.memory_budget)


def topk_frame(topk: TopK) -> pd.DataFrame:
    """A top-k as a long table: query, rank, row, score."""
    q, k = topk.rows.shape
    return pd.DataFrame({"query": np.repeat(np.arange(q, dtype=np.int64), k), "rank": np.tile(np.arange(k, dtype=np.int64), q),
                         "row": topk.rows.ravel(), "score": topk.scores.ravel()})


def frame_topk(frame: pd.DataFrame, n_queries: int) -> TopK:
    """A long table (query, rank, row, score) back as a TopK."""
    frame = frame.sort_values(["query", "rank"])
    k = len(frame) // max(1, n_queries)
    return TopK(frame["score"].to_numpy(np.float32).reshape(n_queries, k), frame["row"].to_numpy(np.int64).reshape(n_queries, k))


def score_part(spec: ScoreSpec, start: int, stop: int) -> str:
    """Score rows [start, stop) and write their top-k as a partial result, unless it is already there; returns its directory."""
    store = LakeStore(spec.lake)
    directory = part_dir(spec, start, stop)
    if result_complete(store, directory) and read_result_meta(store, directory).get("key") == spec.key():
        return directory
    topk = compute_topk(spec, start, stop)
    write_result(store, directory, tables={TABLE: topk_frame(topk)},
                 meta={"key": spec.key(), "spec": spec.identity(), "rows": [start, stop], "queries": int(topk.rows.shape[0])})
    return directory


@task(name="score-part", cache_policy=NONE, retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=retry_unless_bad_input)
def score_part_task(spec: ScoreSpec, start: int, stop: int) -> str:
    """`score_part` as a Prefect task (a store's hiccup retried, bad input not); returns the partial result's directory."""
    return score_part(spec, start, stop)


def pending_parts(spec: ScoreSpec, parts: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The ranges whose partial top-k is not complete (never written, its run died, or written for other settings)."""
    store = LakeStore(spec.lake)
    return [(a, b) for a, b in parts if not result_complete(store, part_dir(spec, a, b))
            or read_result_meta(store, part_dir(spec, a, b)).get("key") != spec.key()]


def write_scores(spec: ScoreSpec, topk: TopK, parts: int) -> str:
    """Write the final top-k at the spec's output, each row named by its sample id; returns the directory."""
    store, _, docs, _ = open_groups(spec)
    frame = topk_frame(topk)
    ids = np.asarray(np.asarray(docs.tokens("sample")).tolist(), dtype=object)  # checked against the group's digest
    frame.insert(3, "sample", ids[frame["row"].to_numpy()])
    directory = spec.output_dir()
    write_result(store, directory, tables={TABLE: frame},
                 meta={"key": spec.key(), "spec": spec.identity(), "parts": parts, "queries": int(topk.rows.shape[0]),
                       "rows": docs.plan.n_samples})
    return directory


def merge_parts(spec: ScoreSpec, parts: list[tuple[int, int]]) -> TopK:
    """The top-k of every range merged; one LakeError if any range's partial result is not complete."""
    missing = pending_parts(spec, parts)
    if missing:
        raise LakeError(f"{len(missing)} of {len(parts)} ranges of rows have no complete top-k (first: rows "
                        f"{missing[0][0]}-{missing[0][1]}); score them again before merging")
    store = LakeStore(spec.lake)
    found = []
    for a, b in parts:
        directory = part_dir(spec, a, b)
        n_queries = read_result_meta(store, directory)["queries"]
        found.append(frame_topk(read_result_table(store, directory, TABLE, what="partial top-k"), n_queries))
    return merge_topk(found, spec.k)


def read_scores(store: LakeStore, directory: str) -> pd.DataFrame:
    """The table of a complete scoring result (query, rank, row, sample, score)."""
    return read_result_table(store, directory, TABLE, what="scoring result")
