"""Projection throughput against TRAK's BasicProjector at the same sizes, measured side by side in one run.

For each case, gradlake's projector (as ``auto`` picks it) and traker's ``BasicProjector``
project the same batch of random gradients, round after round, interleaved, the order
swapping each round, so that load from other processes hits both alike.  Times are CPU
time of this process (wall time on a GPU).  Printed: samples/s of each (median round),
the median and min-max of the per-round ratios (TRAK's time over gradlake's), and the
CPU time of building gradlake's projector (once per process, reused for every batch;
TRAK's BasicProjector regenerates its matrix on every call).

Before timing, gradlake's projection is checked against its own matrix: the projector's
images of the basis vectors of 16 random input coordinates are rows of its matrix, and the
projection of gradients supported on those coordinates must equal their product with
those rows (float64 reference).  A case where ``auto`` picks TRAK's projector is not
checked (it is TRAK's code on both sides).

Where BasicProjector cannot run the case at all in reasonable time (2,048,000
dimensions), its time is estimated from one measured block of 100 columns times the
number of blocks, and marked "(est.)".

``--sparse-build`` instead times the sparse projector's cache build (drawing its indices
and grouping them by output coordinate) for ``sparse:flat:8192`` over the 2-D weights of
the ~10M and ~100M OLMo-2 shapes of benchmarks/extraction.py, as on-the-fly extraction
builds it, the two shapes interleaved round by round.

    OMP_NUM_THREADS=1 python benchmarks/projection.py --rounds 5     # CPU, about 25 minutes (TRAK at 1M x 4096: 1 min a call)
    OMP_NUM_THREADS=1 python benchmarks/projection.py --sparse-build --rounds 3
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

from gradlake.tasks.projection.spec import ProjectionSpec, parse_projection
from gradlake.tasks.projection.projectors import make_projector, plan_projectors, projectors_for


@dataclass
class Case:
    label: str
    shape: tuple[int, int]  # the layer whose gradient is projected
    spec: ProjectionSpec
    estimate_traker: bool = False
    max_rounds: int | None = None  # fewer rounds where one round takes minutes


CASES = [
    Case("512x512 layer -> 1024, rademacher", (512, 512), ProjectionSpec(kind="rademacher", dim=1024)),
    Case("512x512 layer -> 1024, gaussian", (512, 512), ProjectionSpec(kind="gaussian", dim=1024)),
    Case("1024x1024 layer -> 4096, rademacher", (1024, 1024), ProjectionSpec(kind="rademacher", dim=4096),
         max_rounds=3),
    Case("1024x1024 layer -> 64x64 kronecker", (1024, 1024), ProjectionSpec(kind="kronecker", dim=4096)),
    Case("2048x2048 layer -> 2,048,000, sparse", (2048, 2048), ProjectionSpec(kind="sparse", dim=2_048_000),
         estimate_traker=True),
]
CHECK_COORDINATES = 16
CHECK_TOLERANCE = 1e-5


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device) -> float:
    """CPU seconds of this process for one call (wall seconds on a GPU)."""
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    sync(device)
    start = clock()
    fn()
    sync(device)
    return clock() - start


def check_against_matrix(projector, n: int, batch: int, device: torch.device) -> float:
    """Largest error of the projection of gradients on a few input coordinates against their product with the
    matrix rows the projector gives those coordinates' basis vectors, relative to the largest output."""
    generator = torch.Generator().manual_seed(1)
    coords = torch.randperm(n, generator=generator)[:CHECK_COORDINATES]
    basis = torch.zeros(CHECK_COORDINATES, n)
    basis[torch.arange(CHECK_COORDINATES), coords] = 1
    rows = projector.project(basis.to(device)).double().cpu()  # (coordinates, k): rows of its matrix
    values = torch.randn(batch, CHECK_COORDINATES, generator=generator)
    grads = torch.zeros(batch, n)
    grads[:, coords] = values
    out = projector.project(grads.to(device)).double().cpu()
    reference = values.double() @ rows
    return ((out - reference).abs().max() / reference.abs().max()).item()


def run_case(case: Case, batch: int, rounds: int, device: torch.device) -> dict:
    name = "model.layers.0.mlp.down_proj.weight"
    n, k = math.prod(case.shape), case.spec.dim
    grads = torch.randn(batch, n, generator=torch.Generator().manual_seed(0)).to(device)
    build = timed(lambda: projectors_for(case.spec, {name: case.shape}, device), device)
    ours = projectors_for(case.spec, {name: case.shape}, device)[name]
    error = None
    if not ours.name.startswith("traker."):
        error = check_against_matrix(ours, n, batch, device)
        if not error <= CHECK_TOLERANCE:
            raise SystemExit(f"{case.label}: {ours.name}'s projection differs from its own matrix's product by "
                             f"{error:.2e} (relative, limit {CHECK_TOLERANCE:g}); its timing would mean nothing: "
                             f"fix the projector before benchmarking it")
    kind = ProjectionType.normal if case.spec.kind == "gaussian" else ProjectionType.rademacher
    if case.estimate_traker:  # one block of BasicProjector's 100 columns, times the number of blocks
        theirs = BasicProjector(n, 100, 0, kind, device)
        blocks = math.ceil(k / 100)
    else:
        theirs = BasicProjector(n, k, 0, kind, device)
        blocks = 1
    ours.project(grads)  # warm-up
    rounds = min(rounds, case.max_rounds or rounds)
    times_ours, times_theirs = [], []
    for r in range(rounds):
        runs = [(times_ours, lambda: ours.project(grads), 1),
                (times_theirs, lambda: theirs.project(grads, model_id=0), blocks)]
        for times, fn, scale in (runs if r % 2 == 0 else runs[::-1]):
            times.append(timed(fn, device) * scale)
    ratios = [t / o for o, t in zip(times_ours, times_theirs)]
    return {"case": case.label, "projector": ours.name, "ours": batch / statistics.median(times_ours),
            "theirs": batch / statistics.median(times_theirs), "ratio": statistics.median(ratios),
            "low": min(ratios), "high": max(ratios), "rounds": rounds, "build": build, "error": error,
            "estimated": case.estimate_traker}


def ratio_text(ratio: float) -> str:
    """A ratio to three figures, without an exponent."""
    return f"{ratio:.{max(0, 2 - math.floor(math.log10(ratio)))}f}"


def projections(args, device: torch.device) -> None:
    """The cases side by side: gradlake's projector against TRAK's BasicProjector."""
    print(f"device {device}, batch {args.batch}, {args.rounds} interleaved rounds (fewer where marked), "
          f"torch threads {torch.get_num_threads()}, CPU time")
    print(f"{'case':38s} {'gradlake projector':19s} {'gradlake/s':>10s} {'traker.basic/s':>14s} "
          f"{'ratio':>7s} {'(min-max)':>15s} {'rounds':>6s} {'build s':>7s} {'check':>8s}")
    for case in CASES:
        if args.only not in case.label:
            continue
        r = run_case(case, args.batch, args.rounds, device)
        mark = " (est.)" if r["estimated"] else ""
        check = "TRAK's" if r["error"] is None else f"{r['error']:.1e}"
        spread = f"({ratio_text(r['low'])}-{ratio_text(r['high'])})"
        print(f"{r['case']:38s} {r['projector']:19s} {r['ours']:10.3g} {r['theirs']:14.3g} {ratio_text(r['ratio']):>6s}x "
              f"{spread:>15s} {r['rounds']:6d} "
              f"{r['build']:7.2f} {check:>8s}{mark}", flush=True)
    print("ratio = TRAK BasicProjector's CPU time over gradlake's for the same batch: median (min-max) of the "
          "per-round ratios; build = CPU s of gradlake's projector, once per process; check = gradlake's largest "
          "relative error against its own matrix's product")


def olmo2_weights(shape: str) -> dict[str, tuple[int, ...]]:
    """The 2-D weights of one of benchmarks/extraction.py's OLMo-2 shapes (what --projections projects there)."""
    from extraction import SHAPES  # benchmarks/extraction.py

    config_cls, model_cls, sizes = SHAPES[shape]
    with torch.device("meta"):
        model = model_cls(config_cls(**sizes, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2))
    return {n: tuple(p.shape) for n, p in model.named_parameters() if p.dim() == 2}


def sparse_build(args) -> None:
    """CPU time of building the sparse projector's cache at ~10M and ~100M, interleaved."""
    spec = parse_projection(args.sparse_kind)
    weights = {shape: olmo2_weights(shape) for shape in ("olmo2-10m", "olmo2-100m")}
    print(f"{spec.label} over the 2-D weights, torch threads {torch.get_num_threads()}, CPU time, "
          f"{args.rounds} rounds, the order swapping each round")
    times: dict[str, list[float]] = {shape: [] for shape in weights}
    cached: dict[str, int] = {}
    for r in range(args.rounds):
        for shape in (list(weights) if r % 2 == 0 else list(weights)[::-1]):
            planned = plan_projectors(spec, weights[shape], "cpu")
            built = []  # as gradlake.tasks.projection.projectors builds them, without its per-process cache
            times[shape].append(timed(lambda: built.extend(
                make_projector(n, k, spec.kind, spec.seed, name, "cpu", memory_budget=budget, backend="gradlake")
                for name, n, k, _, budget in planned), torch.device("cpu")))
            cached[shape] = sum(p.cached_bytes for p in built)
            del built
        print(f"  round {r + 1}: " + ", ".join(f"{s} {t[-1]:.2f} s" for s, t in times.items()), flush=True)
    for shape, t in times.items():
        n = sum(math.prod(s) for s in weights[shape].values())
        print(f"  {shape:11s} {n / 1e6:6.1f}M coordinates: build {statistics.median(t):6.2f} CPU s "
              f"({min(t):.2f}-{max(t):.2f}), {statistics.median(t) / n * 1e9:.0f} ns per coordinate, "
              f"cache {cached[shape] / 2**30:.2f} GiB", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16, help="samples per projected batch")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per case")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--only", default="", help="run only cases whose label contains this text")
    parser.add_argument("--sparse-build", action="store_true", help="time the sparse cache build at ~10M and ~100M")
    parser.add_argument("--sparse-kind", default="sparse:flat:8192", help="the projection --sparse-build builds")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.sparse_build:
        sparse_build(args)
    else:
        projections(args, torch.device(args.device))


if __name__ == "__main__":
    main()
