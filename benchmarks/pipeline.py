"""The pipeline's platform overhead: wall time over real work, setups side by side in one run.

Starts a Prefect server on loopback and, per setup below, deploys `gradlake-pipeline` (on a cpu pool)
and `extract-shards` (on a gpu pool) from deployments/prefect.yaml's entrypoints and starts process
workers (one on the cpu pool, `--gpu-workers` on the gpu pool, each taking one run at a time).
A small random-weight OLMo-2 (the tiny model's architecture and tokenizer, wider and deeper so
that a shard holds seconds of work) and the bundled probe set go into a file lake (the per-sample
gradients of the first MLP's down projection are stored: a backward through every layer, little
disk); then the whole pipeline (original and paraphrased variants, 10 shards by default, no
evaluation) runs once per setup and round, each time into a fresh lake, the setups' order
rotating from round to round.  Each setup has its own pools, deployments and workers, started once
and kept for every round as a cluster keeps them:

- ``defaults``: what the README's worker commands and deployments/prefect.yaml give: workers at
  Prefect's default polling (``PREFECT_WORKER_QUERY_SECONDS`` 10 s), one GPU worker, the shared
  schedule (one GPU flow run per polling worker), each flow run started by the process worker as
  Prefect does by default: a workspace supervisor process, which then starts the engine process;
- ``old-entrypoint``: ``defaults`` with the GPU stage deployed from its former module
  (``gradlake.flows.pipeline:extract_shards``, which also imports the dataset recipes and the evaluation);
- ``polling``: ``defaults`` with the workers polling every ``--tuned-query-seconds`` (2 s);
- ``tuned``: ``polling`` with the pools' ``command`` set to this interpreter's ``-m prefect.engine``
  (one process per flow run);
- ``per-shard``: ``defaults`` with ``shards_per_run=1`` (one GPU flow run per shard), on request.

Real work is the same extraction run here, in this process, without Prefect, once per round: the
sum over all shards of the time `extract_shard` takes with the model already loaded.  For each
setup wall / real work is printed as the median over rounds with the min-max, and the fixed cost
(wall - real work) broken down from the flow runs' state histories: waiting for a worker
(Scheduled to Pending), the process start and imports until the run is Running (Pending to
Running), the plan (the pipeline Running to its first GPU run created), the time inside the GPU
runs beyond the real work (the model load, measured here too, lake reads, API calls), and after the
last GPU run (finalizing, noticing the end).

    python benchmarks/pipeline.py                          # defaults and tuned, 2 rounds
    python benchmarks/pipeline.py --setups defaults old-entrypoint polling tuned --rounds 3 --hidden 128 --layers 4
    python benchmarks/pipeline.py --setups defaults per-shard --rounds 1
    python benchmarks/pipeline.py --gpu-workers 2          # two GPU workers polling the pool
"""

from __future__ import annotations

import argparse
import json
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
SETUPS = {"defaults": {"query_seconds": 10.0, "one_process": False, "settings": {}},
          "old-entrypoint": {"query_seconds": 10.0, "one_process": False, "settings": {},
                             "entrypoint": "gradlake.flows.pipeline:extract_shards"},
          "polling": {"query_seconds": None, "one_process": False, "settings": {}},
          "tuned": {"query_seconds": None, "one_process": True, "settings": {}},
          "per-shard": {"query_seconds": 10.0, "one_process": False, "settings": {"shards_per_run": 1}}}
PARTS = (("wait for the cpu worker", "pipeline_pickup"), ("pipeline process start to Running", "pipeline_start"),
         ("plan (Running to first GPU run)", "plan"), ("GPU run: wait for a worker", "pickup"),
         ("GPU run: process start to Running", "start"), ("inside GPU runs beyond real work", "beyond"),
         ("after the last GPU run", "after_gpu"))


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


def real_work(settings: dict, lake: str) -> tuple[float, int, float]:
    """Seconds the shards of every variant take computed here one after another with the model loaded, their count,
    and the seconds the model's first load took (later calls find it loaded, as a warm GPU process would)."""
    from gradlake.flows.pipeline import PipelineSpec
    from gradlake.tasks.gradients.plan import create_group, plan_extraction
    from gradlake.tasks.gradients.extract import extract_shard, pending_shards
    from gradlake.tasks.common.model import load_model

    spec = PipelineSpec(**settings, lake=lake)
    load_model.cache_clear()  # a fresh load each round, as a GPU flow run's
    began = time.perf_counter()
    load_model(spec.model.resolved())  # outside the work's clock
    load = time.perf_counter() - began
    total, shards = 0.0, 0
    for variant in spec.variants:
        extraction = spec.extraction(variant)
        group = create_group(plan_extraction(extraction))
        for shard in pending_shards(extraction, group):
            began = time.perf_counter()
            extract_shard(extraction, group, shard, log=lambda *_: None)
            total += time.perf_counter() - began
            shards += 1
    return total, shards, load


def state_times(client, run_id) -> dict[str, float]:
    """When a flow run first entered each state type (epoch seconds)."""
    first: dict[str, float] = {}
    for state in sorted(client.read_flow_run_states(run_id), key=lambda s: s.timestamp):
        first.setdefault(state.type.value, state.timestamp.timestamp())
    return first


def run_pipeline(name: str, settings: dict, lake: str) -> dict:
    """Run the pipeline once through the deployments (its dataset already in `lake`); wall time and where it went."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName
    from prefect.deployments import run_deployment

    shard_runs = DeploymentFilter(name=DeploymentFilterName(any_=[f"extract-shards-{name}"]))
    with get_client(sync_client=True) as client:
        before = {r.id for r in client.read_flow_runs(deployment_filter=shard_runs, limit=200)}
    began = time.time()
    run = run_deployment(f"gradlake-pipeline/gradlake-pipeline-{name}", parameters={"spec": {**settings, "lake": lake}},
                         timeout=None, as_subflow=False, poll_interval=1)
    wall = time.time() - began
    if not run.state.is_completed():
        raise RuntimeError(f"the pipeline ended {run.state.name}: {run.state.message}")
    with get_client(sync_client=True) as client:
        gpu_runs = [r for r in client.read_flow_runs(deployment_filter=shard_runs, limit=200) if r.id not in before]
        pipeline = state_times(client, run.id)
        gpu = [state_times(client, r.id) for r in gpu_runs]
    taken = [t for t in gpu if "RUNNING" in t]

    def mean(values):
        return statistics.fmean(values) if values else float("nan")
    return {
        "wall": wall, "gpu_runs": len(gpu_runs), "gpu_runs_ran": len(taken),
        "pipeline_pickup": pipeline["PENDING"] - pipeline.get("SCHEDULED", began),
        "pipeline_start": pipeline["RUNNING"] - pipeline["PENDING"],
        "plan": min(t["SCHEDULED"] for t in gpu) - pipeline["RUNNING"] if gpu else float("nan"),
        "pickup": mean([t["PENDING"] - t["SCHEDULED"] for t in taken if "PENDING" in t and "SCHEDULED" in t]),
        "start": mean([t["RUNNING"] - t.get("PENDING", t["RUNNING"]) for t in taken]),
        # until the run's last state (Completed, or Cancelling: cancelled by the pipeline once the work was done)
        "inside": sum(max(t.values()) - t["RUNNING"] for t in taken),
        "after_gpu": began + wall - max(max(t.values()) for t in gpu) if gpu else float("nan"),
    }


def pool_template(one_process: bool) -> dict:
    """The process pools' base job template: Prefect's own, or with the command set to this interpreter's engine."""
    done = subprocess.run([*PREFECT, "work-pool", "get-default-base-job-template", "--type", "process"],
                          capture_output=True, text=True, check=True, timeout=300)
    template = json.loads(done.stdout)
    if one_process:
        # A configured command is started by the worker itself; without one Prefect starts a workspace supervisor
        # process (it imports Prefect's client), which then starts the engine process.
        template["variables"]["properties"]["command"]["default"] = f"{sys.executable} -m prefect.engine"
    return template


def start_setup(name: str, setup: dict, args, root: Path, env: dict) -> list[subprocess.Popen]:
    """The setup's pools (`cpu-<name>`, `gpu-<name>`), deployments/prefect.yaml's two pipeline deployments on them
    (named `<deployment>-<name>`), and its workers, started once and kept for every round as a cluster keeps them."""
    import yaml

    config = yaml.safe_load((REPO / "deployments" / "prefect.yaml").read_text())
    wanted = {"gradlake-pipeline": "cpu", "extract-shards": "gpu"}
    config["deployments"] = [{**d, "name": f"{d['name']}-{name}", "work_pool": {**d["work_pool"], "name": f"{wanted[d['name']]}-{name}"},
                              **({"entrypoint": setup["entrypoint"]} if "entrypoint" in setup and d["name"] == "extract-shards" else {})}
                             for d in config["deployments"] if d["name"] in wanted]
    template = root / f"template-{name}.json"
    template.write_text(json.dumps(pool_template(setup["one_process"])))
    for pool in ("cpu", "gpu"):
        prefect("work-pool", "create", f"{pool}-{name}", "--type", "process", "--base-job-template", str(template),
                "--overwrite", env=env)
    (root / f"prefect-{name}.yaml").write_text(yaml.safe_dump(config))  # the product's deployments, pull steps and all
    prefect("--no-prompt", "deploy", "--all", "--prefect-file", str(root / f"prefect-{name}.yaml"), env=env)
    env = {**env, "PREFECT_WORKER_QUERY_SECONDS": str(setup["query_seconds"])}
    names = [("cpu", "cpu-1")] + [("gpu", f"gpu-{i + 1}") for i in range(args.gpu_workers)]
    return [subprocess.Popen([*PREFECT, "worker", "start", "--pool", f"{pool}-{name}", "--name", f"{name}-{worker}",
                              "--type", "process", "--limit", "1"], cwd=root, env=env,
                             stdout=open(root / f"{name}-{worker}.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
            for pool, worker in names]


def wait_for_workers(setups: list[str], gpu_workers: int, timeout: float = 600) -> None:
    """Until every setup's workers poll their pools (the pipeline counts the GPU workers polling when it sends shards)."""
    from prefect.client.orchestration import get_client

    from gradlake.flows.fanout import polling_workers

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            if all(len(polling_workers(client, f"cpu-{n}")) == 1 and len(polling_workers(client, f"gpu-{n}")) == gpu_workers
                   for n in setups):
                return
            time.sleep(1)
    raise RuntimeError(f"the workers did not all poll within {timeout:.0f} s")


def spread(values: list[float], digits: int = 1) -> str:
    """Median (min-max) of `values`."""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def report(rounds: list[dict], names: list[str], args, shards: int) -> None:
    """Per setup: wall / real work and the fixed cost part by part, medians over rounds with the min-max."""
    work = [r["work"] for r in rounds]
    print(f"\n{shards} shards of {args.shard_size} samples ({args.samples} per variant, 2 variants); "
          f"{args.gpu_workers} GPU worker(s); {len(rounds)} round(s); real work {spread(work)} s; "
          f"model load here {spread([r['load'] for r in rounds], 2)} s\n")
    rows = [("wall time (s)", lambda r, n: r[n]["wall"]),
            ("wall / real work", lambda r, n: r[n]["wall"] / r["work"]),
            ("fixed: wall - real work (s)", lambda r, n: r[n]["wall"] - r["work"])]
    for label, key in PARTS:
        if key == "beyond":
            rows.append((f"  {label} (s)", lambda r, n: r[n]["inside"] - r["work"]))
        else:
            rows.append((f"  {label} (s)", lambda r, n, key=key: r[n][key]))
    width = 26
    print(f"{'':44}" + "".join(f"{n:>{width}}" for n in names))
    for label, value in rows:
        digits = 2 if "/" in label and "real" in label and "-" not in label else 1
        print(f"{label:44}" + "".join(f"{spread([value(r, n) for r in rounds], digits):>{width}}" for n in names))
    runs = ["/".join(f"{r[n]['gpu_runs']}({r[n]['gpu_runs_ran']})" for r in rounds) for n in names]
    print(f"{'GPU flow runs (that ran), per round':44}" + "".join(f"{cell:>{width}}" for cell in runs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setups", nargs="+", choices=list(SETUPS), default=["defaults", "tuned"])
    parser.add_argument("--rounds", type=int, default=2, help="rounds, each running every setup once (order rotating)")
    parser.add_argument("--gpu-workers", type=int, default=1, help="process workers polling the gpu pool")
    parser.add_argument("--tuned-query-seconds", type=float, default=2.0, help="PREFECT_WORKER_QUERY_SECONDS in 'tuned'")
    parser.add_argument("--samples", type=int, default=160, help="probe samples per variant (at most 160)")
    parser.add_argument("--shard-size", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=256, help="model width (the tests' tiny model is 64)")
    parser.add_argument("--layers", type=int, default=8, help="model depth (the tests' tiny model has 2)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory (logs, lakes)")
    args = parser.parse_args()
    setups = {n: {**SETUPS[n], "query_seconds": SETUPS[n]["query_seconds"] or args.tuned_query_seconds} for n in args.setups}

    root = Path(tempfile.mkdtemp(prefix="gradlake-bench-pipeline-"))
    model = build_model(root / "model", args.hidden, args.layers)
    settings = {"model": {"model": str(model), "checkpoint": "checkpoint-0", "device": "cpu"}, "variants": ["original", "paraphrased"],
                "shard_size": args.shard_size, "batch_size": 8, "max_length": 256,
                "layers": ["model.layers.0.mlp.down_proj.weight"], "evaluate": False}
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

    from gradlake.tasks.data.probes import store_probe_set

    home = root / "prefect"
    home.mkdir()
    server, url = start_server(home)
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": url, "PREFECT_LOGGING_LEVEL": "WARNING",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    # Prefect read its settings when this process first imported it (real_work): set the server explicitly.
    from prefect.settings import PREFECT_API_URL, temporary_settings

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a killed benchmark still stops its workers
    rounds, shards, workers = [], 0, []
    try:
        for name, setup in setups.items():
            workers += start_setup(name, setup, args, root, env)
        with temporary_settings(updates={PREFECT_API_URL: url}):
            wait_for_workers(list(setups), args.gpu_workers)
            names = list(setups)
            for i in range(args.rounds):
                reference = f"file://{root / f'reference-{i}'}"
                store_probe_set(reference, "probe", args.samples)
                work, shards, load = real_work(settings, reference)
                measured = {"work": work, "load": load}
                print(f"round {i + 1}: real work {shards} shards, {work:.1f} s computed here", flush=True)
                for name in names[i % len(names):] + names[:i % len(names)]:
                    lake = f"file://{root / f'lake-{name}-{i}'}"
                    store_probe_set(lake, "probe", args.samples)
                    run = {**settings, **setups[name]["settings"], "shard_deployment": f"extract-shards/extract-shards-{name}"}
                    measured[name] = run_pipeline(name, run, lake)
                    print(f"round {i + 1}: {name} {measured[name]['wall']:.1f} s wall", flush=True)
                rounds.append(measured)
    finally:
        for proc in workers:
            stop(proc)
        stop(server)
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    if rounds:
        report(rounds, list(setups), args, shards)


if __name__ == "__main__":
    main()
