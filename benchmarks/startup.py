"""The fixed cost of `gradlake extract`, part by part, beside the work it wraps, in one run.

A tiny OLMo-2 (tests' configuration, its tokenizer trained on the probe texts) and the bundled
probe set (160 chats) go into a local lake; then, in interleaved rounds (the order rotating each
round), each part runs in a fresh Python process, as the command pays it:

- ``python``: the interpreter alone (`python -c pass`);
- ``imports``: what the extract command imports (the CLI, the spec's module, the flow's module), jsonschema's
  IRI grammar deferred as the command defers it; ``imports-eager``: the same without deferring it (before);
- ``server``: the temporary Prefect server as the command starts it now (`TemporaryServer`: start, health, stop);
  ``prefect-server``: as Prefect starts it from `get_client()` (before), its server modules imported by the caller;
  the server's own CPU included in both (it is the part's child);
- ``plan``: one `plan_extraction` (inputs checked, dataset read and tokenized, group found); ``plan-again``:
  a second one in the same process, as the command's flow plans after the command's own check;
- ``load``: the model and tokenizer loaded;
- ``work``: every shard's `extract_shard` with the model already loaded (the real work);
- ``command``: `gradlake extract` from the command line to the same lake (a fresh group each time);
  ``command-before``: the same with the code given by ``--before`` (a directory holding a `gradlake`
  package: the tree before a change), side by side.

CPU time is the part's process time plus its children's (rusage), wall beside it; the machine is
shared, so CPU is the figure to compare.  Printed: the median of each part over rounds with the
spread (min-max), each part's ratio to the work (median of per-round ratios, min-max), and the
command's fixed start-up (command - work) over the work.

    OMP_NUM_THREADS=1 python benchmarks/startup.py              # 3 rounds, a few minutes
    OMP_NUM_THREADS=1 python benchmarks/startup.py --rounds 5 --parts imports,imports-eager,server,prefect-server
    # the command before a change beside it: the old tree as a package
    mkdir -p /tmp/old/gradlake && git archive OLD flows lake tasks | tar -x -C /tmp/old/gradlake && touch /tmp/old/gradlake/__init__.py
    OMP_NUM_THREADS=1 python benchmarks/startup.py --before /tmp/old
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PARTS = ("python", "imports-eager", "imports", "prefect-server", "server", "plan", "plan-again", "load", "work", "command",
         "command-before")
PAIRS = (("imports", "imports-eager"), ("server", "prefect-server"), ("plan-again", "plan"), ("command", "command-before"))
CHECKPOINT = "checkpoint-1"


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def cpu_now() -> float:
    return time.process_time() + children_cpu()


def spec_for(root: Path):
    from gradlake.tasks.common.model import ModelSpec
    from gradlake.tasks.gradients.plan import ExtractionSpec

    return ExtractionSpec(model=ModelSpec(model=str(root / "tiny-olmo2"), checkpoint=CHECKPOINT), lake=f"file://{root / 'lake'}")


def run_part(part: str, root: Path) -> dict:
    """Runs in the part's own process: the untimed preparation, then the timed section."""
    if part == "python":
        return {}
    if part in ("imports", "imports-eager"):
        cpu, wall = cpu_now(), time.perf_counter()
        if part == "imports":
            from gradlake.flows.deferred import defer_iri_grammar

            defer_iri_grammar()
        import gradlake.flows.cli  # noqa: F401
        import gradlake.flows.extract  # noqa: F401
        import gradlake.tasks.gradients.plan  # noqa: F401
        return {"cpu": cpu_now() - cpu, "wall": time.perf_counter() - wall}
    if part == "prefect-server":
        import prefect.client.orchestration as orchestration

        cpu, wall = cpu_now(), time.perf_counter()
        with orchestration.get_client(sync_client=True) as client:
            client.api_healthcheck()
        from prefect.server.api.server import SubprocessASGIServer

        SubprocessASGIServer().stop()
        return {"cpu": cpu_now() - cpu, "wall": time.perf_counter() - wall}
    if part == "server":
        from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS

        from gradlake.flows.temporary_server import TemporaryServer

        cpu, wall = cpu_now(), time.perf_counter()
        server = TemporaryServer()
        server.wait(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value())
        server.stop()
        return {"cpu": cpu_now() - cpu, "wall": time.perf_counter() - wall}
    from gradlake.lake.gradients import GradientGroup
    from gradlake.tasks.common.model import load_model, load_tokenizer
    from gradlake.tasks.gradients.extract import extract_shard
    from gradlake.tasks.gradients.plan import create_group, plan_extraction

    spec = spec_for(root)
    if part in ("plan", "plan-again"):
        if part == "plan-again":
            plan_extraction(spec)
        cpu, wall = cpu_now(), time.perf_counter()
        plan_extraction(spec)
        return {"cpu": cpu_now() - cpu, "wall": time.perf_counter() - wall}
    if part == "load":
        model = spec.model.resolved()
        cpu, wall = cpu_now(), time.perf_counter()
        load_model(model)
        load_tokenizer(model)
        return {"cpu": cpu_now() - cpu, "wall": time.perf_counter() - wall}
    assert part == "work", part
    planned = plan_extraction(spec)
    group: GradientGroup = create_group(planned)
    load_model(spec.model.resolved())
    shards = group.pending_shards(spec.shard_size)
    cpu, wall = cpu_now(), time.perf_counter()
    for shard in shards:
        extract_shard(spec, group, shard, log=lambda *a: None)
    return {"cpu": cpu_now() - cpu, "wall": time.perf_counter() - wall, "shards": len(shards)}


def measure(part: str, root: Path, before: Path | None) -> dict:
    """One part in a fresh process: its own timed section, or (python, command) the whole process."""
    shutil.rmtree(root / "lake" / "gradients", ignore_errors=True)  # each part plans or fills a fresh group
    env = {**os.environ, "PREFECT_HOME": str(root / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120"}  # as the command sets them
    env.pop("PREFECT_API_URL", None)
    if part.startswith("command"):
        argv = [sys.executable, "-m", "gradlake.flows.cli", "extract", "--model", str(root / "tiny-olmo2"),
                "--checkpoint", CHECKPOINT, "--lake", f"file://{root / 'lake'}"]
        if part == "command-before":
            env["PYTHONPATH"] = str(before)  # its gradlake package before the editable install's
    else:
        argv = [sys.executable, __file__, "--part", part, "--root", str(root)]
    cpu, wall = children_cpu(), time.perf_counter()
    done = subprocess.run(argv, env=env, capture_output=True, text=True)
    whole = {"cpu": children_cpu() - cpu, "wall": time.perf_counter() - wall}
    if done.returncode:
        raise RuntimeError(f"{part} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    if part == "python" or part.startswith("command"):
        return whole
    return json.loads(done.stdout.strip().splitlines()[-1])


def build(root: Path) -> None:
    from gradlake.tasks.data.probes import load_probe_set, probe_variant, store_probe_set
    from gradlake.tasks.training.tiny import build_tiny_model

    chats = list(probe_variant(load_probe_set(), "original")["messages"])
    build_tiny_model(root / "tiny-olmo2", "olmo2", chats)
    store_probe_set(f"file://{root / 'lake'}")


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):7.2f} ({min(values):.2f}-{max(values):.2f})"


def report(rounds: list[dict[str, dict]], parts: list[str]) -> None:
    print(f"\n{len(rounds)} rounds; median (min-max) per part; ratios are medians of per-round ratios")
    print(f"{'part':10} {'CPU-s':>22} {'wall-s':>22} {'CPU / work':>22}")
    for part in parts:
        cpu = [r[part]["cpu"] for r in rounds]
        wall = [r[part]["wall"] for r in rounds]
        ratio = spread([r[part]["cpu"] / r["work"]["cpu"] for r in rounds]) if "work" in parts else ""
        print(f"{part:10} {spread(cpu):>22} {spread(wall):>22} {ratio:>22}")
    if {"command", "work"} <= set(parts):
        for what in ("cpu", "wall"):
            fixed = [r["command"][what] - r["work"][what] for r in rounds]
            ratios = [(r["command"][what] - r["work"][what]) / r["work"][what] for r in rounds]
            print(f"fixed start-up (command - work), {what}: {spread(fixed)} s, {spread(ratios)} x the work")
        named = [p for p in ("python", "imports", "server", "plan", "plan-again", "load") if p in parts]
        rest = [r["command"]["cpu"] - r["work"]["cpu"] - sum(r[p]["cpu"] for p in named) for r in rounds]
        print(f"command CPU not in {'+'.join(named)}+work (Prefect's run bookkeeping; overlaps count twice): {spread(rest)} s")
    if {"command-before", "work"} <= set(parts):
        ratios = [(r["command-before"]["cpu"] - r["work"]["cpu"]) / r["work"]["cpu"] for r in rounds]
        print(f"fixed start-up before, cpu: {spread([r['command-before']['cpu'] - r['work']['cpu'] for r in rounds])} s, "
              f"{spread(ratios)} x the work")
    for new, old in PAIRS:
        if {new, old} <= set(parts):
            for what in ("cpu", "wall"):
                print(f"{new} / {old}, {what}: {spread([r[new][what] / r[old][what] for r in rounds])}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {','.join(PARTS)}")
    parser.add_argument("--part", help=argparse.SUPPRESS)
    parser.add_argument("--root", help="a directory to keep the model and lake in (default: a temporary one)")
    parser.add_argument("--before", type=Path, help="a directory holding the `gradlake` package before a change (command-before)")
    args = parser.parse_args()
    if args.part:
        print(json.dumps(run_part(args.part, Path(args.root))))
        return
    parts = [p.strip() for p in args.parts.split(",") if args.before or p.strip() != "command-before"]
    unknown = set(parts) - set(PARTS)
    if unknown:
        parser.error(f"unknown parts {sorted(unknown)}; choose from {','.join(PARTS)}")
    with tempfile.TemporaryDirectory(prefix="startup-") as temporary:
        root = Path(args.root or temporary)
        if not (root / "tiny-olmo2").exists():
            build(root)
        rounds = []
        for k in range(args.rounds):
            order = parts[k % len(parts):] + parts[:k % len(parts)]
            measured = {part: measure(part, root, args.before) for part in order}
            rounds.append(measured)
            print(f"round {k + 1}: " + ", ".join(f"{p} {measured[p]['cpu']:.2f}/{measured[p]['wall']:.2f}" for p in parts),
                  flush=True)
        report(rounds, parts)


if __name__ == "__main__":
    main()
