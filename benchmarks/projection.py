"""Projection throughput against TRAK's BasicProjector at the same sizes, measured side by side in one run.

For each case, gradlake's projector (as ``auto`` picks it) and traker's ``BasicProjector``
project the same batch of random gradients, round after round, interleaved, and the
median round is reported, so that load from other processes hits both alike.  Printed:
samples/s of each in steady state, their ratio, and the one-off cost of building
gradlake's matrix (it is built once per process and reused for every batch; TRAK's
BasicProjector regenerates its matrix on every call).

Where BasicProjector cannot run the case at all in reasonable time (2,048,000
dimensions), its time is estimated from one measured block of 100 columns times the
number of blocks, and marked "(est.)".

    python benchmarks/projection.py                 # CPU, a few minutes on 2 cores
    python benchmarks/projection.py --device cuda   # on a GPU (traker.cuda when fast_jl is installed)
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from dataclasses import dataclass

import torch
from trak.projectors import BasicProjector, ProjectionType

from gradlake.tasks.projection.spec import ProjectionSpec
from gradlake.tasks.projection.projectors import projectors_for


@dataclass
class Case:
    label: str
    shape: tuple[int, int]  # the layer whose gradient is projected
    spec: ProjectionSpec
    estimate_traker: bool = False


CASES = [
    Case("512x512 layer -> 1024, rademacher", (512, 512), ProjectionSpec(kind="rademacher", dim=1024)),
    Case("512x512 layer -> 1024, gaussian", (512, 512), ProjectionSpec(kind="gaussian", dim=1024)),
    Case("1024x1024 layer -> 4096, rademacher", (1024, 1024), ProjectionSpec(kind="rademacher", dim=4096)),
    Case("1024x1024 layer -> 64x64 kronecker", (1024, 1024), ProjectionSpec(kind="kronecker", dim=4096)),
    Case("2048x2048 layer -> 2,048,000, sparse", (2048, 2048), ProjectionSpec(kind="sparse", dim=2_048_000),
         estimate_traker=True),
]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def run_case(case: Case, batch: int, rounds: int, device: torch.device) -> dict:
    name = "model.layers.0.mlp.down_proj.weight"
    n, k = math.prod(case.shape), case.spec.dim
    grads = torch.randn(batch, n, generator=torch.Generator().manual_seed(0)).to(device)
    build = timed(lambda: projectors_for(case.spec, {name: case.shape}, device), device)
    ours = projectors_for(case.spec, {name: case.shape}, device)[name]
    kind = ProjectionType.normal if case.spec.kind == "gaussian" else ProjectionType.rademacher
    if case.estimate_traker:  # one block of BasicProjector's 100 columns, times the number of blocks
        theirs = BasicProjector(n, 100, 0, kind, device)
        blocks = math.ceil(k / 100)
    else:
        theirs = BasicProjector(n, k, 0, kind, device)
        blocks = 1
    ours.project(grads)  # warm-up
    times_ours, times_theirs = [], []
    for _ in range(rounds):
        times_ours.append(timed(lambda: ours.project(grads), device))
        times_theirs.append(timed(lambda: theirs.project(grads, model_id=0), device) * blocks)
    t_ours, t_theirs = statistics.median(times_ours), statistics.median(times_theirs)
    return {"case": case.label, "projector": ours.name, "ours": batch / t_ours, "theirs": batch / t_theirs,
            "ratio": t_theirs / t_ours, "build": build, "estimated": case.estimate_traker}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16, help="samples per projected batch")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per case; the median is reported")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--only", default="", help="run only cases whose label contains this text")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    print(f"device {device}, batch {args.batch}, {args.rounds} interleaved rounds, torch threads {torch.get_num_threads()}")
    print(f"{'case':42s} {'gradlake projector':20s} {'gradlake/s':>11s} {'traker.basic/s':>15s} {'ratio':>8s} {'build s':>8s}")
    for case in CASES:
        if args.only not in case.label:
            continue
        r = run_case(case, args.batch, args.rounds, device)
        mark = " (est.)" if r["estimated"] else ""
        print(f"{r['case']:42s} {r['projector']:20s} {r['ours']:11.1f} {r['theirs']:15.3g} "
              f"{r['ratio']:7.1f}x {r['build']:8.2f}{mark}", flush=True)
    print("ratio = gradlake samples/s over traker.basic samples/s at the same sizes (steady state; build once per process)")


if __name__ == "__main__":
    main()
