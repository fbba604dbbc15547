"""The pipeline's platform overhead: wall time over real work, schedules side by side in one run.

Starts a Prefect server on loopback, deploys `gradlake-pipeline` (cpu pool) and `extract-shards`
(gpu pool) from deployments/prefect.yaml, and starts two process workers on `gpu` (one run at a
time each) and one on `cpu`, as a small cluster would.  A small random-weight OLMo-2 (the tiny
model's architecture and tokenizer, wider and deeper so that a shard holds seconds of work) and the
bundled probe set go into a file lake (the per-sample gradients of the first MLP's down
projection are stored: a backward through every layer, little disk); then the whole pipeline (original and paraphrased variants,
10 shards by default, no evaluation) runs once per schedule, each time into a fresh lake:

- ``per-shard``: the schedule before issue 13, one GPU flow run per shard (``shards_per_run=1``);
- ``shared``: the default, one GPU flow run per polling worker, each given every shard of every
  variant and taking them from the others' ends (work stealing through the chunk leases).

Real work is the same extraction run here, in this process, without Prefect: the sum over all
shards of the time `extract_shard` takes with the model already loaded.  For each schedule the
wall time (submission of the pipeline to its end, as a user sees it) and wall / real work are
printed, with where the rest went, from the flow runs' state histories: waiting for a worker to
pick a run up (its polling interval), the run's process start and imports until it is Running,
and time inside the GPU runs beyond the real work (model loads, lake reads, API calls).

    python benchmarks/pipeline.py                         # both schedules, about 10 minutes on one core
    python benchmarks/pipeline.py --schedules shared      # the default schedule only
    python benchmarks/pipeline.py --query-seconds 10      # workers polling at Prefect's default interval
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PREFECT = [sys.executable, "-m", "prefect"]
SCHEDULES = {"per-shard": {"shards_per_run": 1}, "shared": {}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(home: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_SERVER_UI_ENABLED": "false", "PREFECT_LOGGING_LEVEL": "WARNING", "PREFECT_SERVER_DATABASE_TIMEOUT": "60"}
    proc = subprocess.Popen([*PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env=env,
                            stdout=open(home / "server.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the Prefect server exited ({proc.returncode}); see {home / 'server.log'}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return proc, url
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"the Prefect server did not answer at {url} within 180 s; see {home / 'server.log'}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def prefect(*args: str, env: dict) -> None:
    done = subprocess.run([*PREFECT, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    if done.returncode:
        raise RuntimeError(f"prefect {' '.join(args)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")


def build_model(directory: Path, hidden: int, layers: int) -> Path:
    """A random-weight OLMo-2 with the tiny model's tokenizer and chat template, `hidden` wide and `layers` deep."""
    from transformers import AutoModelForCausalLM

    from gradlake.tasks.data.probes import load_probe_set, probe_variant
    from gradlake.tasks.training.tiny import tiny_config, train_tokenizer

    import torch

    target = directory / "checkpoint-0"
    if (target / "config.json").is_file():
        return directory
    chats = list(probe_variant(load_probe_set(), "original")["messages"])
    tokenizer = train_tokenizer(m["content"] for chat in chats for m in chat)
    torch.manual_seed(0)
    config = tiny_config("olmo2", tokenizer, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(target)
    tokenizer.save_pretrained(target)
    return directory


def real_work(settings: dict, lake: str) -> tuple[float, int]:
    """Seconds the shards of every variant take computed here one after another with the model loaded, and their count."""
    from gradlake.flows.pipeline import PipelineSpec
    from gradlake.tasks.gradients.plan import create_group, plan_extraction
    from gradlake.tasks.gradients.extract import extract_shard, pending_shards
    from gradlake.tasks.common.model import load_model

    spec = PipelineSpec(**settings, lake=lake)
    load_model(spec.model.resolved())  # loaded once, outside the clock: a warm GPU process
    total, shards = 0.0, 0
    for variant in spec.variants:
        extraction = spec.extraction(variant)
        group = create_group(plan_extraction(extraction))
        for shard in pending_shards(extraction, group):
            began = time.perf_counter()
            extract_shard(extraction, group, shard, log=lambda *_: None)
            total += time.perf_counter() - began
            shards += 1
    return total, shards


def state_times(client, run_id) -> dict[str, float]:
    """When a flow run first entered each state type (epoch seconds)."""
    first: dict[str, float] = {}
    for state in sorted(client.read_flow_run_states(run_id), key=lambda s: s.timestamp):
        first.setdefault(state.type.value, state.timestamp.timestamp())
    return first


def run_schedule(name: str, settings: dict, lake: str) -> dict:
    """Run the pipeline once through the deployments (its dataset already in `lake`); wall time and where it went."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName
    from prefect.deployments import run_deployment

    with get_client(sync_client=True) as client:
        before = {r.id for r in client.read_flow_runs(
            deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["extract-shards"])), limit=200)}
    began = time.time()
    run = run_deployment("gradlake-pipeline/gradlake-pipeline", parameters={"spec": {**settings, "lake": lake}},
                         timeout=None, as_subflow=False, poll_interval=1)
    wall = time.time() - began
    if not run.state.is_completed():
        raise RuntimeError(f"{name}: the pipeline ended {run.state.name}: {run.state.message}")
    with get_client(sync_client=True) as client:
        gpu_runs = [r for r in client.read_flow_runs(
            deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["extract-shards"])), limit=200)
            if r.id not in before]
        pipeline_times = state_times(client, run.id)
        gpu = [state_times(client, r.id) for r in gpu_runs]
    taken = [t for t in gpu if "RUNNING" in t]
    def mean(values):
        return statistics.fmean(values) if values else float("nan")
    return {
        "wall": wall, "gpu_runs": len(gpu_runs), "gpu_runs_ran": len(taken),
        "pipeline_pickup": pipeline_times.get("PENDING", began) - began,
        "pipeline_start": pipeline_times["RUNNING"] - pipeline_times.get("PENDING", began),
        "pickup": mean([t["PENDING"] - t["SCHEDULED"] for t in taken if "PENDING" in t and "SCHEDULED" in t]),
        "start": mean([t["RUNNING"] - t.get("PENDING", t["RUNNING"]) for t in taken]),
        # until the run's last state (Completed, or Cancelling: cancelled by the pipeline once the work was done)
        "inside": sum(max(t.values()) - t["RUNNING"] for t in taken),
        "first_gpu_submit": min(t["SCHEDULED"] for t in gpu) - began if gpu else float("nan"),
        "after_gpu": began + wall - max(max(t.values()) for t in gpu) if gpu else float("nan"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--schedules", nargs="+", choices=sorted(SCHEDULES), default=list(SCHEDULES))
    parser.add_argument("--samples", type=int, default=160, help="probe samples per variant (at most 160)")
    parser.add_argument("--shard-size", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=256, help="model width (the tests' tiny model is 64)")
    parser.add_argument("--layers", type=int, default=8, help="model depth (the tests' tiny model has 2)")
    parser.add_argument("--query-seconds", type=float, default=2.0,
                        help="PREFECT_WORKER_QUERY_SECONDS of the workers (Prefect's default is 10)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory (logs, lakes)")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="gradlake-bench-pipeline-"))
    model = build_model(root / "model", args.hidden, args.layers)
    settings = {"model": {"model": str(model), "checkpoint": "checkpoint-0", "device": "cpu"}, "variants": ["original", "paraphrased"],
                "shard_size": args.shard_size, "batch_size": 8, "max_length": 256,
                "layers": ["model.layers.0.mlp.down_proj.weight"], "evaluate": False}
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

    from gradlake.tasks.data.probes import store_probe_set

    reference = f"file://{root / 'reference'}"
    store_probe_set(reference, "probe", args.samples)
    work, shards = real_work(settings, reference)
    print(f"real work: {shards} shards, {work:.1f} s computed here with the model loaded", flush=True)

    home = root / "prefect"
    home.mkdir()
    server, url = start_server(home)
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": url, "PREFECT_LOGGING_LEVEL": "WARNING",
           "PREFECT_WORKER_QUERY_SECONDS": str(args.query_seconds), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    # Prefect read its settings when this process first imported it (real_work): set the server explicitly.
    from prefect.settings import PREFECT_API_URL, temporary_settings

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a killed benchmark still stops its workers
    workers = []
    results = {}
    try:
        for pool in ("cpu", "gpu"):
            prefect("work-pool", "create", pool, "--type", "process", "--overwrite", env=env)
        prefect("--no-prompt", "deploy", "--name", "gradlake-pipeline", "--name", "extract-shards",
                "--prefect-file", "deployments/prefect.yaml", env=env)
        for pool, name in (("gpu", "gpu-1"), ("gpu", "gpu-2"), ("cpu", "cpu-1")):
            workers.append(subprocess.Popen(
                [*PREFECT, "worker", "start", "--pool", pool, "--name", name, "--type", "process", "--limit", "1"],
                cwd=root, env=env, stdout=open(root / f"{name}.log", "w"), stderr=subprocess.STDOUT, start_new_session=True))
        time.sleep(max(5.0, 2 * args.query_seconds))  # every worker has polled once: the pipeline sees both gpu workers
        for name in args.schedules:
            lake = f"file://{root / ('lake-' + name)}"
            store_probe_set(lake, "probe", args.samples)
            with temporary_settings(updates={PREFECT_API_URL: url}):
                results[name] = run_schedule(name, {**settings, **SCHEDULES[name]}, lake)
            print(f"{name}: {results[name]['wall']:.1f} s wall", flush=True)
    finally:
        for proc in workers:
            stop(proc)
        stop(server)
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)

    print(f"\n{shards} shards of {args.shard_size} samples ({args.samples} per variant, 2 variants); "
          f"real work {work:.1f} s; two gpu workers polling every {args.query_seconds:g} s\n")
    rows = [("wall time (s)", "wall"), ("wall / real work", None), ("GPU flow runs (that ran)", "gpu_runs"),
            ("pipeline: wait for the cpu worker (s)", "pipeline_pickup"), ("pipeline: process start (s)", "pipeline_start"),
            ("submission to the first GPU run (s)", "first_gpu_submit"), ("GPU run: wait for a worker, mean (s)", "pickup"),
            ("GPU run: process start to Running, mean (s)", "start"), ("inside GPU runs, summed (s)", "inside"),
            ("inside GPU runs beyond real work (s)", None), ("after the last GPU run (s)", "after_gpu")]
    names = list(results)
    print(f"{'':46}" + "".join(f"{n:>14}" for n in names))
    for label, key in rows:
        cells = []
        for n in names:
            r = results[n]
            if label == "wall / real work":
                cells.append(f"{r['wall'] / work:14.2f}")
            elif label.startswith("inside GPU runs beyond"):
                cells.append(f"{r['inside'] - work:14.1f}")
            elif key == "gpu_runs":
                cells.append(f"{r['gpu_runs']:>8d} ({r['gpu_runs_ran']})")
            else:
                cells.append(f"{r[key]:14.1f}")
        print(f"{label:46}" + "".join(cells))


if __name__ == "__main__":
    main()
