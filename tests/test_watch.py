"""The checkpoint watcher: a failed checkpoint is started again (a few times at most), a missing directory is waited
for, ticks have names, and the ETA of the fan-out leaves out the time its runs waited for a worker.

The watcher tests run on the session's Prefect server with the real pipeline deployed by the
`prefect deploy` CLI on pools of their own: a process worker on 'watch-cpu' runs the pipelines,
and their shards go to 'watch-gpu' (a worker joins half way through) or 'watch-idle' (none ever).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from conftest import REPO, start_worker, stop_process, write_probe
from gradlake.flows.fanout import WorkRate

N = 16
SETTINGS = {"shard_size": 8, "batch_size": 4, "max_length": 256}  # 2 shards per variant
PREFECT = [sys.executable, "-m", "prefect"]
DEPLOYMENTS = {"pipeline": "gradlake-pipeline/watch-test-pipeline", "shards": "extract-shards/watch-test-shards",
               "idle": "extract-shards/watch-test-idle"}


# ---------------------------------------------------------------- the ETA


def test_eta_leaves_out_the_time_runs_waited_for_a_slot():
    """30 min waiting Late behind a training (the issue's case), then half the chunks in one minute: one minute left."""
    rate = WorkRate()
    t = 0.0
    while t < 30 * 60:  # nothing runs: the only GPU slot is taken
        rate.observe(t, 0, running=False)
        t += 2
    assert rate.seconds_left(0, 40) is None
    for step in range(31):  # a shard run starts and completes 20 of 40 chunks in 60 s
        rate.observe(t + 2 * step, round(20 * step / 30), running=True)
    left = rate.seconds_left(20, 40)
    assert left == pytest.approx(60, rel=0.05), left  # counting the wait it said 31 min


def test_eta_counts_only_what_was_done_while_watched():
    """Chunks an earlier run left complete do not make the rate; time between a run ending and the next look does."""
    rate = WorkRate()
    rate.observe(0, 30, running=False)  # 30 of 100 done by an earlier pipeline
    rate.observe(100, 30, running=False)
    rate.observe(110, 30, running=True)  # taken between 100 and 110: those 10 s count
    rate.observe(150, 40, running=False)  # ended between 110 and 150: those 40 s count
    rate.observe(900, 40, running=False)  # waiting again
    assert rate.busy_s == 50
    assert rate.seconds_left(40, 100) == pytest.approx(60 * 50 / 10)


# ---------------------------------------------------------------- a missing directory


def test_cli_refuses_a_directory_whose_parent_is_missing(tmp_path):
    from gradlake.flows.cli import app

    missing = tmp_path / "no-such-run" / "checkpoints"
    result = CliRunner().invoke(app, ["watch", "--model", str(missing), "--lake", f"file://{tmp_path}/lake"])
    assert result.exit_code == 2, result.output
    assert f"watched directory '{missing}' does not exist, nor does its parent '{missing.parent}'" in result.output


def test_a_directory_not_there_yet_is_waited_for(tmp_path, prefect_server):
    """Started before training: the CLI accepts it with a note, and a tick logs one line instead of a traceback."""
    from gradlake.flows.watch import WatchSpec, awaited_directory, watch_checkpoints
    from gradlake.tasks.common.checkpoints import WatchedModel

    later = tmp_path / "checkpoints"
    assert awaited_directory(WatchedModel(model=str(later))) == f"{later} is not there yet; each tick waits for it to appear"
    state = watch_checkpoints(WatchSpec(models=[{"model": str(later)}], lake=f"file://{tmp_path}/lake"), return_state=True)
    assert state.is_completed(), state
    assert state.result() == []
    name, logs = _tick_record(state)
    assert name == f"watch checkpoints-{_hash(later)}", name
    assert f"waiting for {later} to appear (nothing to list yet)" in logs, logs
    later.mkdir()
    assert awaited_directory(WatchedModel(model=str(later))) is None


# ---------------------------------------------------------------- failed checkpoints are retried


def _hash(path: Path) -> str:
    from gradlake.lake import layout

    return layout.model_key(str(path), True).rsplit("-", 1)[1]


def _tick_record(state) -> tuple[str, str]:
    """A tick's flow run name and its log, one message a line."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()
    run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        name = client.read_flow_run(run_id).name
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))
    return name, "\n".join(entry.message for entry in logs)


def _tick(spec) -> tuple[list[str], str]:
    from gradlake.flows.watch import watch_checkpoints

    state = watch_checkpoints(spec, return_state=True)
    assert state.is_completed(), state
    return state.result(), _tick_record(state)[1]


def _pipeline_runs(model: Path) -> list:
    """The pipeline runs of the watched model, oldest first."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    from gradlake.lake import layout

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(like_=layout.model_key(str(model), True))))
    return sorted((r for r in runs if r.idempotency_key and r.idempotency_key.startswith("gradlake-watch:")), key=lambda r: r.created)


def _final(run_id, timeout: float = 300):
    from gradlake.flows.fanout import wait_for_run

    state = wait_for_run(run_id, timeout)
    assert state is not None, f"pipeline run {run_id} did not end within {timeout}s"
    return state


@pytest.fixture(scope="module")
def watch_platform(prefect_server, tiny_models, tmp_path_factory):
    """Pools watch-cpu (a worker), watch-gpu and watch-idle (none yet); the pipeline and its shard stage deployed."""
    root = tmp_path_factory.mktemp("watch")
    env = {**os.environ, "PREFECT_API_URL": prefect_server, "PREFECT_WORKER_QUERY_SECONDS": "1",
           "PREFECT_WORKER_PREFETCH_SECONDS": "1", "PREFECT_LOGGING_LEVEL": "INFO", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "GRADLAKE_MODEL_CACHE": str(root / "model-cache")}
    config = {"name": "watch-test", "prefect-version": "3", "pull": [], "deployments": [
        {"name": DEPLOYMENTS["pipeline"].split("/")[1], "entrypoint": "gradlake.flows.pipeline:pipeline",
         "work_pool": {"name": "watch-cpu", "work_queue_name": "default"}},
        {"name": DEPLOYMENTS["shards"].split("/")[1], "entrypoint": "gradlake.flows.pipeline:extract_shards",
         "work_pool": {"name": "watch-gpu", "work_queue_name": "default"}},
        {"name": DEPLOYMENTS["idle"].split("/")[1], "entrypoint": "gradlake.flows.pipeline:extract_shards",
         "work_pool": {"name": "watch-idle", "work_queue_name": "default"}}]}
    (root / "prefect.yaml").write_text(yaml.safe_dump(config))
    for args in [*(["work-pool", "create", pool, "--type", "process", "--overwrite"] for pool in ("watch-cpu", "watch-gpu", "watch-idle")),
                 ["--no-prompt", "deploy", "--all", "--prefect-file", str(root / "prefect.yaml")]]:
        done = subprocess.run([*PREFECT, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"prefect {' '.join(args)}:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    workers = {"cpu": start_worker("watch-cpu", "watch-cpu-1", env, root, limit=2)}
    lake = f"file://{root / 'lake'}"
    write_probe(lake, N)
    try:
        yield {"root": root, "env": env, "workers": workers, "lake": lake}
    finally:
        for proc in workers.values():
            stop_process(proc)


def _spec(platform: dict, watched: Path, shards: str, max_attempts: int):
    from gradlake.flows.watch import WatchSpec

    return WatchSpec(models=[{"model": str(watched)}], lake=platform["lake"], max_attempts=max_attempts,
                     pipeline_deployment=DEPLOYMENTS["pipeline"],
                     pipeline={"variants": ["original", "paraphrased"], **SETTINGS, "shard_deployment": shards,
                               "worker_wait_s": 3})


def test_a_checkpoint_that_keeps_failing_stops_after_its_attempts(watch_platform, tiny_models):
    """No worker ever polls the shards' pool: two attempts, then the watcher says so and starts no third."""
    watched = watch_platform["root"] / "always-failing"
    shutil.copytree(tiny_models["olmo2"] / "checkpoint-0", watched / "checkpoint-0")
    spec = _spec(watch_platform, watched, DEPLOYMENTS["idle"], max_attempts=2)
    for attempt in (1, 2):
        started, logs = _tick(spec)
        assert started == ["checkpoint-0"], logs
        runs = _pipeline_runs(watched)
        assert len(runs) == attempt, [r.name for r in runs]
        if attempt == 2:
            assert f"checkpoint-0 of {watched}: attempt 2 of 2 (the previous run Failed: " in logs, logs
        assert _final(runs[-1].id).is_failed()
    started, logs = _tick(spec)
    assert started == [] and len(_pipeline_runs(watched)) == 2
    assert f"checkpoint-0 of {watched} failed 2 times; not started again. Last error: Failed: " in logs, logs
    assert "no worker is polling the 'watch-idle' work pool" in logs and "rerun it with `gradlake pipeline --spec '{" in logs, logs
    assert f"{watched}: 1 finished checkpoints (0 done in the lake, 0 started earlier, 0 started now, 1 given up" in logs, logs


def test_a_failed_checkpoint_is_started_again_once_a_worker_is_back(watch_platform, tiny_models):
    """Attempt 1 fails (no GPU worker); a worker starts; the next tick starts attempt 2, which completes; then nothing."""
    from gradlake.lake import open_lake

    watched = watch_platform["root"] / "recovering"
    shutil.copytree(tiny_models["olmo2"] / "checkpoint-1", watched / "checkpoint-1")
    spec = _spec(watch_platform, watched, DEPLOYMENTS["shards"], max_attempts=3)
    started, logs = _tick(spec)
    assert started == ["checkpoint-1"] and f"new checkpoint checkpoint-1 of {watched}: pipeline run" in logs, logs
    started, logs = _tick(spec)  # the first run is still waiting or running: started earlier, not a failure
    assert started == [] and "was started by an earlier tick" in logs, logs
    assert "0 done in the lake, 1 started earlier, 0 started now" in logs, logs
    first = _pipeline_runs(watched)
    assert len(first) == 1 and _final(first[0].id).is_failed()
    # what the failed run left: the groups planned, no chunk done (what the old watcher took for 'held')
    catalog = open_lake(watch_platform["lake"]).catalog().query("kind == 'gradients' and checkpoint == 'checkpoint-1'")
    assert len(catalog) and not catalog["complete"].any()

    watch_platform["workers"]["gpu"] = start_worker("watch-gpu", "watch-gpu-1", watch_platform["env"], watch_platform["root"],
                                                    limit=2)
    started, logs = _tick(spec)
    assert started == ["checkpoint-1"], logs
    assert f"checkpoint-1 of {watched}: attempt 2 of 3 (the previous run Failed: " in logs, logs
    assert "no worker is polling the 'watch-gpu' work pool" in logs, logs
    runs = _pipeline_runs(watched)
    assert len(runs) == 2 and runs[0].id == first[0].id
    assert _final(runs[1].id).is_completed()
    started, logs = _tick(spec)
    assert started == [] and len(_pipeline_runs(watched)) == 2
    assert f"{watched}: 1 finished checkpoints (1 done in the lake, 0 started earlier, 0 started now)" in logs, logs
    evaluations = open_lake(watch_platform["lake"]).catalog().query("kind == 'evaluation' and checkpoint == 'checkpoint-1'")
    assert len(evaluations) == 1
