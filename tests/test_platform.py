"""The platform: deployments from prefect.yaml on a real server, process workers on 'gpu' and 'cpu' pools, the watcher.

One module-scoped setup: the session's Prefect server on loopback, moto's S3 on loopback
as the lake, work pools created and every deployment in deployments/prefect.yaml
deployed by the `prefect deploy` CLI, two process workers on 'gpu' (one flow run at a
time each) and one on 'cpu'.
"""

from __future__ import annotations

import asyncio
import json
import re
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import yaml

from conftest import REPO, start_worker, stop_process, write_probe
from gradlake.flows.extract import extract_gradients
from gradlake.lake import open_lake
from gradlake.tasks.gradients.plan import ExtractionSpec
from gradlake.tasks.common.model import ModelSpec

N = 24
SETTINGS = {"shard_size": 8, "batch_size": 4, "max_length": 256}  # 3 shards per variant
PREFECT = [sys.executable, "-m", "prefect"]


def _prefect(*args: str, env: dict) -> str:
    done = subprocess.run([*PREFECT, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    if done.returncode:
        raise RuntimeError(f"prefect {' '.join(args)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return done.stdout


@pytest.fixture(scope="module")
def platform(prefect_server, s3_endpoint, tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("platform")
    watched = root / "watched-olmo2"
    watched.mkdir()
    shutil.copytree(tiny_models["olmo2"] / "checkpoint-1", watched / "checkpoint-1")
    env = {**os.environ, "PREFECT_API_URL": prefect_server, "PREFECT_WORKER_QUERY_SECONDS": "1",
           "PREFECT_WORKER_PREFETCH_SECONDS": "1", "PREFECT_LOGGING_LEVEL": "INFO", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "GRADLAKE_MODEL_CACHE": str(root / "model-cache")}
    for pool in ("cpu", "gpu"):
        _prefect("work-pool", "create", pool, "--type", "process", "--overwrite", env=env)
    _prefect("work-pool", "set-concurrency-limit", "gpu", "2", env=env)
    _prefect("--no-prompt", "deploy", "--all", "--prefect-file", "deployments/prefect.yaml", env=env)
    workers = {name: start_worker(pool, name, env, root) for pool, name in (("gpu", "gpu-1"), ("gpu", "gpu-2"), ("cpu", "cpu-1"))}
    lake = "s3://lake/platform"
    write_probe(lake, N)
    try:
        yield {"lake": lake, "watched": watched, "env": env, "workers": workers, "root": root}
    finally:
        for proc in workers.values():
            stop_process(proc)


def _run_pipeline(spec: dict, timeout: float = 600):
    from prefect.deployments import run_deployment

    return run_deployment("gradlake-pipeline/gradlake-pipeline", parameters={"spec": spec}, timeout=timeout, as_subflow=False)


async def _runs_of(deployment: str):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    async with get_client() as client:
        return await client.read_flow_runs(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[deployment])))


async def _logs_of(run_ids):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    async with get_client() as client:
        return await client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=list(run_ids))))


def test_prefect_yaml_deploys_every_stage(platform):
    config = yaml.safe_load((REPO / "deployments" / "prefect.yaml").read_text())
    names = {d["name"] for d in config["deployments"]}
    assert {"gradlake-pipeline", "extract-shards", "extract-gradients", "create-dataset", "project-gradients",
            "evaluate-select-vs-project", "watch-checkpoints", "train-model",
            "compute-influence", "evaluate-attribution", "verify-lake", "trace-models", "trace-many"} <= names
    listed = _prefect("deployment", "ls", env=platform["env"])
    for name in names:
        assert name in listed
    pools = {d["name"]: d["work_pool"]["name"] for d in config["deployments"]}
    assert pools["extract-shards"] == pools["train-model"] == pools["compute-influence"] == pools["trace-models"] == "gpu"
    # Flows that wait on gpu runs never hold a gpu slot while they wait.
    assert pools["gradlake-pipeline"] == pools["evaluate-attribution"] == pools["trace-many"] == "cpu"
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("gradlake-pipeline/gradlake-pipeline")
    # workers import the flows from their own installed gradlake: no path of this machine is stored
    assert deployment.entrypoint == "gradlake.flows.pipeline:pipeline" and not deployment.pull_steps
    assert str(REPO) not in json.dumps(deployment.model_dump(mode="json"))
    form = deployment.parameter_openapi_schema
    assert "lake" in json.dumps(form) and form["definitions"]["PipelineSpec"]["required"] == ["model", "lake"]
    assert "lake" not in form["definitions"]["DatasetRecipe"]["properties"], "one Lake field in the pipeline's form"


def test_gpu_stage_process_imports_only_extraction():
    """The GPU stage's entrypoint module (every GPU flow run's process imports it) leaves out the dataset recipes
    (the paraphrasing client) and the evaluation: about 1.5 CPU-s of every GPU run's start."""
    config = yaml.safe_load((REPO / "deployments" / "prefect.yaml").read_text())
    entrypoint = next(d["entrypoint"] for d in config["deployments"] if d["name"] == "extract-shards")
    module, name = entrypoint.split(":")
    probe = (f"import importlib, sys; flow = getattr(importlib.import_module({module!r}), {name!r}); "
             "print(flow.name, *sorted(m for m in ('openai', 'gradlake.flows.evaluate', 'gradlake.flows.dataset', "
             "'gradlake.tasks.data.dataset') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, check=True)
    assert done.stdout.split() == ["extract-shards"], done.stdout


def test_pipeline_fans_out_over_both_gpu_workers(platform, tiny_models, tmp_path):
    """The pipeline creates its dataset in its own lake (S3), fans shards out to both GPU workers, puts the headline on its run."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    from gradlake.lake.datasets import read_dataset, write_dataset
    from gradlake.lake.store import LakeStore

    lake, watched = platform["lake"], platform["watched"]
    model = {"model": str(watched), "checkpoint": "checkpoint-1"}
    create = {"source": {"source": str(REPO / "tasks" / "data" / "probe_set.jsonl"), "n": N, "sampling": "first"},
              "paraphrase_column": "paraphrase"}
    spec = {"model": model, "dataset": "created", "create": create, "variants": ["original", "paraphrased"], **SETTINGS,
            "projections": [{"kind": "rademacher", "dim": 256, "scope": "flat"}], "lake": lake}
    run = _run_pipeline(spec)
    assert run.state.is_completed(), run.state
    assert run.name.startswith("watched-olmo2-") and run.name.endswith("@checkpoint-1 created"), run.name
    # One GPU run per polling worker, each given all 6 shards of both variants, starting half way apart;
    # one of them completing means every shard is done, and any other is cancelled.
    gpu_runs = asyncio.run(_runs_of("extract-shards"))
    names = sorted(r.name for r in gpu_runs)
    assert len(names) == 2 and [n.rsplit(" ", 3)[-3:] for n in names] == [["original+paraphrased", "run", "1/2"],
                                                                           ["original+paraphrased", "run", "2/2"]], names
    assert sorted(r.parameters["start"] for r in gpu_runs) == [0, 2 * N // SETTINGS["shard_size"] // 2]
    assert all(sum(len(w["shards"]) for w in r.parameters["work"]) == 2 * N // SETTINGS["shard_size"] for r in gpu_runs)
    assert any(r.state.is_completed() for r in gpu_runs) and all(r.state.is_completed() or r.state.name in
                                                                 ("Cancelling", "Cancelled") for r in gpu_runs)
    ran = [r for r in gpu_runs if r.start_time]
    messages = " ".join(log.message for log in asyncio.run(_logs_of(r.id for r in ran)))
    assert ran and "on worker gpu-" in messages
    # the dataset landed in the pipeline's lake, not in a worker's working directory
    assert len(read_dataset(LakeStore(lake), "created", "paraphrased")) == N
    assert not list(platform["root"].rglob("datasets")), "nothing may be written next to a worker"
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id])))
    assert any(a.type == "table" and a.key and "created" in a.key for a in artifacts), [(a.key, a.type) for a in artifacts]

    opened = open_lake(lake)
    catalog = opened.catalog()
    assert catalog[catalog["kind"] == "gradients"]["complete"].all() and (catalog["kind"] == "evaluation").sum() == 1
    reference_lake = f"file://{tmp_path / 'reference'}"
    for variant in ("original", "paraphrased"):
        write_dataset(LakeStore(reference_lake), "created", variant, read_dataset(LakeStore(lake), "created", variant))
    reference = extract_gradients(ExtractionSpec(model=ModelSpec(**model), dataset="created", variant="paraphrased",
                                                 **SETTINGS, lake=reference_lake))
    got = opened.gradients(dataset="created", variant="paraphrased", checkpoint="checkpoint-1", mode="store")
    want = xr.open_zarr(f"{tmp_path / 'reference'}/{reference}", consolidated=False)
    for name in want.attrs["gradlake"]["lineage"]["layers"]:
        np.testing.assert_array_equal(got[name].values, want[name].values)


def test_without_a_gpu_worker_the_pipeline_fails_fast_and_cancels_its_shard_runs(platform, tiny_models):
    """No worker polls the shard deployment's pool: the pipeline says so within worker_wait_s and cancels every shard run."""
    from gradlake.flows.pipeline import PipelineSpec, pipeline

    _prefect("work-pool", "create", "gpu-idle", "--type", "process", "--overwrite", env=platform["env"])
    _prefect("--no-prompt", "deploy", "gradlake.flows.pipeline:extract_shards", "--name", "idle-shards", "--pool", "gpu-idle",
             env=platform["env"])
    lake = "s3://lake/idle"
    write_probe(lake, N)
    spec = PipelineSpec(model=ModelSpec(model=str(platform["watched"]), checkpoint="checkpoint-1"), variants=["original"],
                        **SETTINGS, evaluate=False, shard_deployment="extract-shards/idle-shards", worker_wait_s=5, lake=lake)
    began = time.monotonic()
    state = pipeline(spec, return_state=True)
    waited = time.monotonic() - began
    assert state.is_failed()
    message = str(state.result(raise_on_failure=False))
    assert "no worker is polling the 'gpu-idle' work pool" in message and "prefect worker start --pool gpu-idle" in message
    idle = asyncio.run(_runs_of("idle-shards"))  # one run (no worker polls), given every shard
    assert len(idle) == 1 and all(r.state.is_cancelled() for r in idle), [r.state for r in idle]
    # bounded by worker_wait_s plus planning and polling, not by shards x shard_timeout_s (6 h each by default)
    assert waited < 5 + 120, waited
    row = open_lake(lake).catalog().query("kind == 'gradients'").iloc[0]
    assert row["chunks_done"] == 0 and not row["complete"]


def test_scheduled_watcher_runs_by_itself(platform, tmp_path):
    """`gradlake watch` turns the schedule on; Prefect's scheduler creates runs and the cpu worker runs them."""
    from prefect.client.orchestration import get_client

    env = platform["env"]
    gradlake = [sys.executable, "-m", "gradlake.flows.cli"]
    bad = subprocess.run([*gradlake, "watch", "--model", str(tmp_path), "--spec", '{"pipeline": {"shardsize": 32}}', "--lake", "s3://lake/w"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "shardsize" in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
    empty = tmp_path / "no-checkpoints-yet"
    empty.mkdir()
    on = subprocess.run([*gradlake, "watch", "--model", str(empty), "--interval", "2", "--lake", "s3://lake/watched"],
                        env=env, capture_output=True, text=True, timeout=120)
    assert on.returncode == 0, on.stderr
    try:
        deadline = time.monotonic() + 240
        done = []
        while not done and time.monotonic() < deadline:
            done = [r for r in asyncio.run(_runs_of("watch-checkpoints"))
                    if r.auto_scheduled and r.state and r.state.is_completed()]
            time.sleep(2)
        assert done, "the scheduler created no run of the active watcher schedule, or none completed"
        with get_client(sync_client=True) as client:
            assert client.read_flow_run(done[0].id).parameters["spec"]["models"][0]["model"] == str(empty)
    finally:
        off = subprocess.run([*gradlake, "watch", "--off"], env=env, capture_output=True, text=True, timeout=120)
        assert off.returncode == 0, off.stderr
    waiting = [r for r in asyncio.run(_runs_of("watch-checkpoints")) if r.auto_scheduled and r.state.is_scheduled()]
    assert not waiting, "turning the watcher off must leave no tick waiting"
    server_log = (Path(os.environ["PREFECT_HOME"]) / "server.log").read_text()
    # Records open with "HH:MM:SS.mmm | LEVEL | logger - message"; the scheduler's own must hold no error.
    records = re.split(r"\n(?=\d\d:\d\d:\d\d\.\d{3} \| )", server_log)
    scheduler_errors = [r for r in records if re.match(r"\S+ \| (ERROR|CRITICAL) .*\| \S*schedul", r)]
    assert not scheduler_errors and "bulk DML" not in server_log, (scheduler_errors or [server_log])[0][-3000:]


def test_watcher_starts_the_pipeline_once_per_new_checkpoint(platform, tiny_models):
    from gradlake.flows.fanout import wait_for_run
    from gradlake.flows.watch import WatchSpec, watch_checkpoints

    lake, watched = platform["lake"], platform["watched"]
    # checkpoint-1 is in the lake already (the pipeline test put it there; this reopens that group or makes it)
    extract_gradients(ExtractionSpec(model=ModelSpec(model=str(watched), checkpoint="checkpoint-1"), **SETTINGS, lake=lake))
    before = asyncio.run(_runs_of("gradlake-pipeline"))
    shutil.copytree(tiny_models["olmo2"] / "checkpoint-0", watched / "checkpoint-0")
    partial = watched / "checkpoint-2"  # still being written: its weights are cut short
    shutil.copytree(tiny_models["olmo2"] / "checkpoint-0", partial)
    weights = (partial / "model.safetensors").read_bytes()
    (partial / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    # held means done: with one variant the pipeline ends with its complete gradient group, as checkpoint-1 has
    spec = WatchSpec(models=[{"model": str(watched)}], lake=lake, pipeline={"variants": ["original"], **SETTINGS})
    started = watch_checkpoints(spec)
    assert started == ["checkpoint-0"]
    new = [r for r in asyncio.run(_runs_of("gradlake-pipeline")) if r.id not in {b.id for b in before}]
    assert len(new) == 1
    state = wait_for_run(new[0].id, timeout=600)
    assert state is not None and state.is_completed(), state
    assert watch_checkpoints(spec) == []  # a second tick starts nothing
    assert len(asyncio.run(_runs_of("gradlake-pipeline"))) == len(before) + 1
    held = open_lake(lake).catalog().query("kind == 'gradients'")
    assert set(held["checkpoint"]) == {"checkpoint-0", "checkpoint-1"}


def test_trained_checkpoint_on_s3_goes_through_the_pipeline(platform, tiny_models):
    """train-model on a gpu worker writes a checkpoint to S3; the watcher sees it and the pipeline extracts it."""
    from prefect.deployments import run_deployment

    from gradlake.flows.fanout import wait_for_run
    from gradlake.flows.watch import WatchSpec, watch_checkpoints
    from gradlake.tasks.training.spec import TrainSpec

    lake = platform["lake"]
    output = "s3://lake/trained/tiny-olmo2"
    spec = TrainSpec(model=ModelSpec(model=str(tiny_models["olmo2"]), checkpoint="checkpoint-1"), lake=lake,
                     dataset="probe", output=output, steps=3, batch_size=8, learning_rate=3e-3,
                     quality={"max_samples": 4, "max_new_tokens": 8})
    run = run_deployment("train-model/train-model", parameters={"spec": spec.model_dump(mode="json")}, timeout=600,
                         as_subflow=False)
    assert run.state.is_completed(), run.state
    assert run.name.endswith("train on probe -> s3://lake/trained/tiny-olmo2"), run.name
    before = {r.id for r in asyncio.run(_runs_of("gradlake-pipeline"))}
    watch = WatchSpec(models=[{"model": output}], lake=lake, pipeline={"variants": ["original"], **SETTINGS})
    assert watch_checkpoints(watch) == ["checkpoint-000003"]
    new = [r for r in asyncio.run(_runs_of("gradlake-pipeline")) if r.id not in before]
    assert len(new) == 1
    state = wait_for_run(new[0].id, timeout=600)
    assert state is not None and state.is_completed(), state
    held = open_lake(lake).catalog().query("kind == 'gradients' and checkpoint == 'checkpoint-000003'")
    assert len(held) == 1 and held["model_id"].iloc[0] == output
    assert watch_checkpoints(watch) == []


def test_attribution_retrainings_fan_out_to_train_model_on_the_gpu_pool(platform, tiny_models):
    """evaluate-attribution on the cpu worker sends each LDS retraining to train-model on the gpu workers, waits for
    them, and writes the benchmark; asked again, it submits nothing."""
    from prefect.deployments import run_deployment

    from gradlake.lake.datasets import read_dataset
    from gradlake.lake.scores import ScoreGroup
    from gradlake.lake.store import LakeStore
    from gradlake.tasks.attribution.spec import AttributionSpec, benchmark_dir, method_path
    from gradlake.tasks.attribution.benchmark import read_benchmark
    from gradlake.tasks.training.spec import TrainSpec

    lake = platform["lake"]
    train = TrainSpec(model=ModelSpec(model=str(tiny_models["olmo2"]), checkpoint="checkpoint-1"), lake=lake,
                      dataset="probe", output="s3://lake/attributed/tiny-olmo2", steps=2, batch_size=8,
                      learning_rate=3e-3, quality=None)
    done = run_deployment("train-model/train-model", parameters={"spec": train.model_dump(mode="json")}, timeout=600,
                          as_subflow=False)
    assert done.state.is_completed(), done.state
    spec = AttributionSpec(train=train, queries="paraphrased", max_queries=4, n_subsets=2, baselines=False, methods=["fixed"],
                           retrain_prefix="s3://lake/attributed/groundtruth", run_timeout_s=600, worker_wait_s=120)
    # A method's scores as any scorer leaves them in the lake: here fixed numbers, one row per query.
    store = LakeStore(lake)
    ids = [str(i) for i in read_dataset(store, "probe", "paraphrased")["id"]]
    group = ScoreGroup.create(store, method_path(spec, "fixed"), ids, [f"original:{i}" for i in ids],
                              {"method": "fixed", "kind": "test", "settings": {}})
    group.write_rows(0, np.random.default_rng(0).normal(size=(N, N)).astype(np.float32))
    group.finish()
    before = {r.id for r in asyncio.run(_runs_of("train-model"))}
    run = run_deployment("evaluate-attribution/evaluate-attribution", parameters={"spec": spec.model_dump(mode="json")},
                         timeout=900, as_subflow=False)
    assert run.state.is_completed(), run.state
    retrainings = [r for r in asyncio.run(_runs_of("train-model")) if r.id not in before]
    assert len(retrainings) == 2 and all(r.state.is_completed() for r in retrainings)
    # the fan-out names each retraining (a name given to a run is kept): the attributed model, then which retraining
    assert sorted(r.name.rsplit(" ", 1)[-1] for r in retrainings) == ["subset-000", "subset-001"]
    assert all(" ground truth subset-" in r.name for r in retrainings)
    table = read_benchmark(store, benchmark_dir(spec)).set_index("method")
    assert set(table.index) == {"fixed", "random", "source oracle"} and table.loc["fixed", "lds_queries"] > 0
    again = run_deployment("evaluate-attribution/evaluate-attribution", parameters={"spec": spec.model_dump(mode="json")},
                           timeout=600, as_subflow=False)
    assert again.state.is_completed(), again.state
    assert len(asyncio.run(_runs_of("train-model"))) == len(before) + 2


def test_trace_many_fans_out_to_trace_models_on_the_gpu_pool(platform, tiny_models):
    """trace-many on the cpu worker sends each candidate to trace-models on the gpu workers, then writes the summary."""
    from prefect.deployments import run_deployment

    from gradlake.lake import open_lake
    from gradlake.flows.trace import TraceManySpec

    base = ModelSpec(model=str(tiny_models["olmo2"]), checkpoint="checkpoint-1")
    candidates = [ModelSpec(model=str(tiny_models["olmo2"]), checkpoint=c) for c in ("checkpoint-0", "checkpoint-1")]
    spec = TraceManySpec(base=base, candidates=candidates, statistics=["cos", "mode"], n_samples=4, max_length=256,
                         points=2, permutations=99, lake=platform["lake"], run_timeout_s=600, worker_wait_s=120)
    before = {r.id for r in asyncio.run(_runs_of("trace-models"))}
    run = run_deployment("trace-many/trace-many", parameters={"spec": spec.model_dump(mode="json")}, timeout=900,
                         as_subflow=False)
    assert run.state.is_completed(), run.state
    pairs = [r for r in asyncio.run(_runs_of("trace-models")) if r.id not in before]
    assert len(pairs) == 2 and all(r.state.is_completed() for r in pairs)
    summary = open_lake(platform["lake"]).tracing_summary(base=str(tiny_models["olmo2"]), base_checkpoint="checkpoint-1")
    assert sorted(summary["checkpoint"]) == ["checkpoint-0", "checkpoint-1"] and summary["derived"].all()
    itself = summary.set_index("checkpoint").loc["checkpoint-1"]
    assert itself["cos"] == pytest.approx(1.0) and itself["mode"] == pytest.approx(0.0, abs=1e-9)


def _worker_of(pid: int, workers: dict[str, subprocess.Popen]) -> str | None:
    """The name of the worker process that `pid` descends from."""
    by_pid = {proc.pid: name for name, proc in workers.items()}
    while pid > 1:
        if pid in by_pid:
            return by_pid[pid]
        with open(f"/proc/{pid}/status") as status:
            pid = next(int(line.split()[1]) for line in status if line.startswith("PPid:"))
    return None


def test_killed_gpu_worker_leaves_its_share_to_the_other(platform, tmp_path):
    """SIGKILL a GPU worker and its flow run as it starts: the other GPU run does every shard but the one done
    before (never recomputed), the pipeline completes and cancels the dead run; a rerun has nothing to do."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    from gradlake.lake.store import LakeStore
    from gradlake.tasks.gradients.plan import create_group, plan_extraction
    from gradlake.tasks.gradients.extract import extract_shard

    lake = "s3://lake/killed"
    write_probe(lake, N)
    model = {"model": str(platform["watched"]), "checkpoint": "checkpoint-1"}
    spec = {"model": model, "variants": ["original"], **SETTINGS, "evaluate": False, "lake": lake}
    # shard 1 (samples 8-15) is already done: what an earlier, failed pipeline run leaves
    extraction = ExtractionSpec(model=ModelSpec(**model), **SETTINGS, lake=lake)
    group = create_group(plan_extraction(extraction, device_here=False))
    extract_shard(extraction, group, 1, log=lambda *_: None)
    store = LakeStore(lake)
    done_before = {p: store.fs.info(p)["LastModified"] for p in store.fs.find(store.path(group.path)) if "/c/2" in p or "/c/3" in p}
    assert done_before

    before = {r.id for r in asyncio.run(_runs_of("extract-shards"))}
    first = run_deployment("gradlake-pipeline/gradlake-pipeline", parameters={"spec": spec}, timeout=0, as_subflow=False)
    # The node is lost: the worker and the flow run process it started (in a session of its own) die together.
    # The flow process is frozen the moment its pid is known, seconds before its imports could finish,
    # so it takes no chunk lease before the kill.
    victim = flow_pid = victim_run = None
    deadline = time.monotonic() + 300
    while victim is None and time.monotonic() < deadline:
        for run in asyncio.run(_runs_of("extract-shards")):
            if run.id in before or not run.infrastructure_pid or (run.state and run.state.is_final()):
                continue
            flow_pid = int(str(run.infrastructure_pid).rsplit(":", 1)[-1])
            os.killpg(os.getpgid(flow_pid), signal.SIGSTOP)
            victim, victim_run = _worker_of(flow_pid, platform["workers"]), run.id
            break
        time.sleep(0.2)
    assert victim, "no GPU run started on a GPU worker"
    os.killpg(os.getpgid(flow_pid), signal.SIGKILL)
    os.killpg(platform["workers"][victim].pid, signal.SIGKILL)
    platform["workers"][victim].wait(timeout=30)
    from gradlake.flows.fanout import wait_for_run

    state = wait_for_run(first.id, timeout=600)
    assert state is not None and state.is_completed(), state
    with get_client(sync_client=True) as client:
        gpu_runs = [r for r in asyncio.run(_runs_of("extract-shards")) if r.id not in before]
        dead = client.read_flow_run(victim_run).state
    assert len(gpu_runs) == 2 and sum(r.state.is_completed() for r in gpu_runs) == 1, [r.state for r in gpu_runs]
    assert dead.name == "Cancelling" and "not needed" in dead.message, dead
    assert {p: store.fs.info(p)["LastModified"] for p in done_before} == done_before, "a finished chunk was recomputed"
    second = _run_pipeline(spec)
    assert second.state.is_completed(), second.state
    assert len(asyncio.run(_runs_of("extract-shards"))) == len(gpu_runs) + len(before), "nothing was left to do"
    reference_lake = f"file://{tmp_path / 'reference'}"
    write_probe(reference_lake, N)
    reference = extract_gradients(ExtractionSpec(model=ModelSpec(**model), **SETTINGS, lake=reference_lake))
    got = open_lake(lake).gradients(variant="original")
    want = xr.open_zarr(f"{tmp_path / 'reference'}/{reference}", consolidated=False)
    for name in want.attrs["gradlake"]["lineage"]["layers"]:
        np.testing.assert_array_equal(got[name].values, want[name].values)
