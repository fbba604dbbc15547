"""Scoring at scale: streamed top-k against brute force, and ranges of rows fanned out to two work-pool workers.

The fan-out test runs `score-topk` here against the session's Prefect server; its `score-rows`
runs go to two process workers on a pool of their own, each writing a partial top-k to the
lake; the merged result must equal the one-process result exactly (scores and rows).
"""

from __future__ import annotations

import asyncio
import os

import numpy as np
import pytest
import yaml
import zarr

from conftest import REPO, start_worker, stop_process
from gradlake.lake.gradient_plan import GradientPlan
from gradlake.lake.gradients import GradientGroup
from gradlake.lake.results import read_result_meta, write_result
from gradlake.lake.store import LakeError, LakeStore
from gradlake.tasks.evaluate.scoring import ScoreSpec, compute_topk, part_dir, ranges, read_scores, score_part
from gradlake.tasks.evaluate import topk
from gradlake.tasks.evaluate.topk import merge_topk, row_ranges, row_tile, score_topk


def brute_topk(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The obvious top-k: sort each line by (-score, row)."""
    rows = np.broadcast_to(np.arange(scores.shape[1]), scores.shape)
    order = np.lexsort((rows, -scores), axis=1)[:, :k]
    return np.take_along_axis(scores, order, axis=1), order


def _zarr(values: np.ndarray, chunk_rows: int) -> zarr.Array:
    array = zarr.create_array(zarr.storage.MemoryStore(), shape=values.shape, chunks=(chunk_rows, 32), dtype="float32")
    array[:] = values
    return array


def test_topk_equals_brute_force_with_ties_ranges_and_k_over_rows(monkeypatch):
    """Small integers make many equal scores: ties go to the lower row, in one pass, in blocks and query passes of a
    small budget, and merged from ranges of rows; k above the rows keeps every row."""
    rng = np.random.default_rng(0)
    docs = rng.integers(-2, 3, size=(1500, 48)).astype(np.float32)
    docs[[700, 1400]] = docs[3]  # duplicated rows: exactly equal scores
    queries = rng.integers(-2, 3, size=(40, 48)).astype(np.float32)
    arrays = [_zarr(docs[:, :32], 8), _zarr(docs[:, 32:], 8)]  # two arrays: scores add over them
    full = queries @ docs.T
    want_scores, want_rows = brute_topk(full, 9)
    for budget in (1 << 20, 1 << 30):
        got = score_topk([queries[:, :32], queries[:, 32:]], arrays, 9, budget=budget)
        np.testing.assert_array_equal(got.rows, want_rows)
        np.testing.assert_array_equal(got.scores, want_scores)
    monkeypatch.setattr(topk, "QUERY_TILE", 16)  # 3 passes of whole query tiles over the rows at this budget
    assert topk.query_block_rows([queries], 4 * 48 * 64) == 16
    got = score_topk([queries[:, :32], queries[:, 32:]], arrays, 9, budget=4 * 48 * 64)
    np.testing.assert_array_equal(got.rows, want_rows)
    np.testing.assert_array_equal(got.scores, want_scores)
    monkeypatch.undo()
    tile = row_tile(arrays)
    parts = [score_topk([queries[:, :32], queries[:, 32:]], arrays, 9, a, b) for a, b in row_ranges(1500, 500, tile)]
    assert len(parts) == 3
    merged = merge_topk(parts[::-1], 9)  # in any order
    np.testing.assert_array_equal(merged.rows, want_rows)
    np.testing.assert_array_equal(merged.scores, want_scores)
    every = score_topk([queries[:, :32], queries[:, 32:]], arrays, 5000)
    assert every.rows.shape == (40, 1500)
    np.testing.assert_array_equal(every.rows, brute_topk(full, 1500)[1])
    cosine = score_topk([queries], [_zarr(docs, 8)], 4, metric="cosine")
    norms = np.linalg.norm(docs, axis=1)
    want = brute_topk((queries / np.linalg.norm(queries, axis=1, keepdims=True)) @ (docs / np.where(norms, norms, np.inf)[:, None]).T, 4)
    np.testing.assert_allclose(cosine.scores, want[0], rtol=1e-6)


def test_nan_and_bad_ranges_are_refused():
    docs = _zarr(np.ones((20, 16), np.float32), 4)
    queries = np.ones((3, 16), np.float32)
    queries[1, 5] = np.nan
    with pytest.raises(ValueError, match=r"queries \[1\] hold NaN"):
        score_topk([queries], [docs], 2)
    with pytest.raises(ValueError, match="multiple of"):
        score_topk([np.ones((3, 16), np.float32)], [docs], 2, start=4)
    infinite = _zarr(np.array([[np.inf] + [1.0] * 15] * 20, np.float32), 4)  # stored inf is no NaN; inf times 0 is
    with pytest.raises(ValueError, match="score NaN"):
        score_topk([np.array([[0.0] + [1.0] * 15], np.float32)], [infinite], 2)


def write_group(store: LakeStore, path: str, values: np.ndarray, chunk_rows: int = 8) -> None:
    """A complete per-sample group of one array 'proj' holding `values`, as extraction writes one."""
    n = values.shape[0]
    plan = GradientPlan(n_samples=n, parameters={"proj": [values.shape[1]]}, mode="store", dtype="float32", max_tokens=2,
                        chunk_rows=chunk_rows)
    tokens = np.ones((n, 2), dtype=np.int32)
    group = GradientGroup.create(store, path, plan, {"test": path}, [f"{path}-{i}" for i in range(n)], tokens, tokens > 0)
    for k in range(plan.n_chunks):
        a, b = plan.chunk_bounds(k)
        group.write_chunk(k, {"proj": values[a:b]})
        group.mark_complete(k)
    group.finalize()


def _deploy_score_rows(pool: str) -> None:
    """The score-rows deployment on a process pool of its own (as `prefect deploy` makes it from prefect.yaml)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.deployments.runner import EntrypointType

    from gradlake.flows.score import score_rows

    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name=pool, type="process"), overwrite=True)
    score_rows.to_deployment(name="score-rows", entrypoint_type=EntrypointType.MODULE_PATH).apply(work_pool_name=pool)


async def _runs_of(deployment: str):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    async with get_client() as client:
        return await client.read_flow_runs(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[deployment])))


async def _logs_of(run_ids: list):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    async with get_client() as client:
        return await client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=run_ids)))


def test_prefect_yaml_deploys_both_scoring_flows():
    config = {d["name"]: d for d in yaml.safe_load((REPO / "deployments" / "prefect.yaml").read_text())["deployments"]}
    assert config["score-rows"]["entrypoint"] == "gradlake.flows.score:score_rows"
    # the merging flow waits on the ranges: never on the pool it sends them to, or a single worker would deadlock
    assert config["score-topk"]["work_pool"]["name"] != config["score-rows"]["work_pool"]["name"]


def test_two_workers_score_ranges_equal_to_one_process(prefect_server, tmp_path):
    """Three ranges of rows: one already scored is kept; one left half written (no meta.json) and one scored with
    other settings are sent to two process workers; the merged top-k equals one process's exactly."""
    from gradlake.flows.score import score_topk

    store = LakeStore(f"file://{tmp_path}/lake")
    rng = np.random.default_rng(1)
    docs = rng.standard_normal((1300, 96)).astype(np.float32)
    docs[1200] = docs[17]  # a tie across ranges
    write_group(store, "docs", docs)
    write_group(store, "queries", np.concatenate([rng.standard_normal((29, 96)), docs[17:18]]).astype(np.float32))
    pool = "score-test"
    _deploy_score_rows(pool)
    spec = ScoreSpec(queries="queries", docs="docs", k=7, rows_per_run=512, deployment="score-rows/score-rows",
                     lake=store.url, run_timeout_s=300, worker_wait_s=120)
    every = ranges(spec)
    assert every == [(0, 512), (512, 1024), (1024, 1300)]
    kept = score_part(spec, *every[0])
    # a run that died writing its table (no meta.json: not complete) and a range scored for other settings
    store.fs.makedirs(store.path(part_dir(spec, *every[1])), exist_ok=True)
    store.fs.pipe_file(store.path(f"{part_dir(spec, *every[1])}/topk.parquet"), b"half written")
    write_result(store, part_dir(spec, *every[2]), tables={}, meta={"key": "other settings", "queries": 30})
    env = {**os.environ, "PREFECT_API_URL": prefect_server, "PREFECT_WORKER_QUERY_SECONDS": "1",
           "PREFECT_WORKER_PREFETCH_SECONDS": "1", "OMP_NUM_THREADS": "1"}
    workers = [start_worker(pool, f"score-{i}", env, tmp_path) for i in (1, 2)]
    try:
        directory = score_topk(spec)
    finally:
        for worker in workers:
            stop_process(worker)
    runs = asyncio.run(_runs_of("score-rows"))
    assert sorted(r.parameters["start"] for r in runs) == [512, 1024] and all(r.state.is_completed() for r in runs), [(r.name, r.state.name) for r in runs]
    messages = " ".join(log.message for log in asyncio.run(_logs_of([r.id for r in runs])))
    assert "on worker score-1" in messages and "on worker score-2" in messages, messages[-2000:]
    one = compute_topk(spec.model_copy(update={"rows_per_run": None}))
    table = read_scores(store, directory)
    assert len(table) == 30 * 7
    np.testing.assert_array_equal(table["row"].to_numpy().reshape(30, 7), one.rows)
    np.testing.assert_array_equal(table["score"].to_numpy().reshape(30, 7), one.scores)
    assert table["row"].iloc[-7] == 17 and table["row"].iloc[-6] == 1200 and table["sample"].iloc[-7] == "docs-17"
    assert read_result_meta(store, kept)["rows"] == [0, 512]
    with pytest.raises(LakeError, match="not in both groups"):
        compute_topk(spec.model_copy(update={"arrays": ["nope"]}))
