"""GPU runs that share one work list: shards another live run holds are left to the end, and the
pipeline's wait ends once the completed runs cover the work (the rest are cancelled) or fails when
nothing completes for the stall timeout.

The runs here are real flow runs on the session's Prefect server whose states the test sets, as a
worker would: no worker process is needed to check the waiting logic.
"""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from conftest import write_probe
from gradlake.flows.extract import extract_gradients
from gradlake.flows.fanout import ShardRun, ShardRunsFailed, wait_for_shard_runs
from gradlake.flows.pipeline import visit_shards
from gradlake.lake.leases import ChunkLeases
from gradlake.tasks.gradients.plan import ExtractionSpec, create_group, plan_extraction
from gradlake.tasks.gradients.extract import extract_shard
from gradlake.tasks.common.model import ModelSpec

N = 24


def spec_for(model_dir, lake: str) -> ExtractionSpec:
    return ExtractionSpec(model=ModelSpec(model=str(model_dir), checkpoint="checkpoint-1"), shard_size=8, batch_size=4,
                          max_length=256, layers=["model.layers.1.mlp.*", "lm_head.weight"], lake=lake)


@pytest.mark.parametrize("start", [0, 1])
def test_a_shard_another_live_run_holds_is_done_last(tiny_models, tmp_path, start):
    lake = f"file://{tmp_path / 'lake'}"
    write_probe(lake, N)
    spec = spec_for(tiny_models["olmo2"], lake)
    group = create_group(plan_extraction(spec))
    other = ChunkLeases(seconds=120)  # another run, alive, computing shard 0 (samples 0-7)
    assert other.take(group, group.pending_chunks(0, 8)) == [0, 1]
    calls = []

    def extract(spec, path, shard, wait):
        if wait:  # the end: the other run is gone without finishing (its leases freed), so this one computes shard 0
            other.release_all()
        samples = extract_shard(spec, group, shard, log=lambda *_: None, wait=wait)
        calls.append((shard, wait, samples))
        return samples

    computed = visit_shards([(spec, group.path, shard) for shard in range(3)], start, extract)
    # Shard 0 is passed over (not waited for) on the way round from `start`, then done at the end.
    rest = [(1, False, 8), (2, False, 8)]
    way_round = [(0, False, None), *rest] if start == 0 else [*rest, (0, False, None)]
    assert calls == [*way_round, (0, True, 8)]
    assert computed == N and not group.pending_chunks()
    reference = f"file://{tmp_path / 'reference'}"
    write_probe(reference, N)
    path = extract_gradients(spec.model_copy(update={"lake": reference}))
    want = xr.open_zarr(f"{tmp_path / 'reference'}/{path}", consolidated=False)
    got = xr.open_zarr(f"{tmp_path / 'lake'}/{group.path}", consolidated=False)
    for name in want.attrs["gradlake"]["lineage"]["layers"]:
        np.testing.assert_array_equal(got[name].values, want[name].values)


def _runs(client, labels: list[str], units: list[list]) -> list[ShardRun]:
    """Flow runs (of a stand-in flow) taken by a worker: Running."""
    from prefect import flow
    from prefect.states import Running

    @flow(name="stand-in-gpu-run")
    def stand_in() -> None:
        pass

    runs = []
    for label, given in zip(labels, units):
        created = client.create_flow_run(stand_in, name=label)
        client.set_flow_run_state(created.id, Running(), force=True)
        runs.append(ShardRun(label, given, created.id))
    return runs


def test_one_completed_run_given_all_the_work_ends_the_wait_and_the_others_are_cancelled(prefect_server):
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.states import Completed

    units = [("group-a", 0), ("group-a", 1), ("group-b", 0)]
    with get_client(sync_client=True) as client:
        runs = _runs(client, ["run 1/2", "run 2/2"], [units, units])
        client.set_flow_run_state(runs[1].run_id, Completed(), force=True)

        @flow
        def waiting() -> None:
            wait_for_shard_runs(runs, "unused", timeout_s=30, worker_wait_s=3600, poll=0.2, progress=lambda: (6, 6))

        waiting()
        first = client.read_flow_run(runs[0].run_id).state
    assert first.name == "Cancelling" and "not needed" in first.message, first


def test_runs_with_work_of_their_own_must_all_complete(prefect_server):
    """The fixed split: a run that failed leaves its shards undone, whatever the others did."""
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.states import Completed, Failed

    with get_client(sync_client=True) as client:
        runs = _runs(client, ["shards 0", "shards 1"], [[("g", 0)], [("g", 1)]])
        client.set_flow_run_state(runs[0].run_id, Completed(), force=True)
        client.set_flow_run_state(runs[1].run_id, Failed(message="CUDA out of memory"), force=True)

        @flow
        def waiting() -> None:
            wait_for_shard_runs(runs, "unused", timeout_s=3600, worker_wait_s=3600, poll=0.2)

        state = waiting(return_state=True)
    message = str(state.result(raise_on_failure=False))
    assert state.is_failed() and "1 of 2 shard runs did not complete (shards 1: Failed)" in message, message


def test_no_chunk_completing_for_the_stall_timeout_fails_and_cancels_the_runs(prefect_server):
    from prefect import flow
    from prefect.client.orchestration import get_client

    units = [("group-a", 0), ("group-a", 1)]
    polls = []

    def progress():
        polls.append(1)
        return 1, 4  # one chunk of four done, and no more ever

    with get_client(sync_client=True) as client:
        runs = _runs(client, ["run 1/2", "run 2/2"], [units, units])

        @flow
        def waiting() -> None:
            wait_for_shard_runs(runs, "unused", timeout_s=1, worker_wait_s=3600, poll=0.2, progress=progress)

        state = waiting(return_state=True)
        after = [client.read_flow_run(r.run_id).state for r in runs]
    message = str(state.result(raise_on_failure=False))
    assert state.is_failed() and "no chunk completed in 1s (the stall timeout)" in message, message
    assert len(polls) > 1 and all(s.name == "Cancelling" for s in after), after
