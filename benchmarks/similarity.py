"""Block-wise similarity from Zarr against a plain in-memory matrix product of the same size, in one run.

A Zarr group holds query and original "gradients" (random float32, chunked as the lake
chunks them) larger in total than the memory budget given to the block-wise
computation.  Each round runs, in fresh subprocesses one after the other, (1) gradlake's
block-wise dot products and squared norms read straight from the Zarr chunks within the
budget, and (2) the same dot products as one in-memory ``Q @ D.T`` on arrays already in
memory (loading not timed).  Printed: the median rate of each in GFLOP/s, their ratio,
and each process's peak resident memory (VmHWM).

    python benchmarks/similarity.py                          # 2048 x 2048 samples, 65,536 values, 128 MiB budget
    python benchmarks/similarity.py --budget-mb 512
    python benchmarks/similarity.py --values 262144 --budget-mb 256
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr

REPO = Path(__file__).resolve().parents[1]


def peak_kib() -> int:
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))


def worker(mode: str, path: str, budget: int) -> None:
    sys.path.insert(0, str(REPO))
    from gradlake.tasks.evaluate.similarity import array_dots

    root = zarr.open_group(path, mode="r")
    q, d = root["queries"], root["originals"]
    if mode == "blockwise":
        start = time.perf_counter()
        dots, q_sq, d_sq = array_dots(q, d, 0, q.shape[0], budget)
        elapsed = time.perf_counter() - start
    else:
        a, b = q[:], d[:]
        start = time.perf_counter()
        dots = (a @ b.T).astype(np.float64)
        elapsed = time.perf_counter() - start
    print(json.dumps({"seconds": elapsed, "peak_kib": peak_kib(), "checksum": float(dots[:4, :4].sum())}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=2048)
    parser.add_argument("--originals", type=int, default=2048)
    parser.add_argument("--values", type=int, default=65536, help="gradient values per sample")
    parser.add_argument("--budget-mb", type=int, default=128, help="memory budget of the block-wise computation")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker[0], args.worker[1], int(args.worker[2]))
        return
    budget = args.budget_mb << 20
    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/bench.zarr"
        root = zarr.open_group(path, mode="w")
        rng = np.random.default_rng(0)
        for name, rows in (("queries", args.queries), ("originals", args.originals)):
            array = root.create_array(name, shape=(rows, args.values), dtype="float32", chunks=(8, min(args.values, 1 << 16)),
                                      compressors=None)
            for r0 in range(0, rows, 256):
                array[r0:r0 + 256] = rng.standard_normal((min(256, rows - r0), args.values), dtype=np.float32)
        data_mib = 4 * (args.queries + args.originals) * args.values / 2**20
        flops = 2 * args.queries * args.originals * args.values
        print(f"{args.queries} queries x {args.originals} originals x {args.values} values: {data_mib:.0f} MiB of float32 "
              f"on disk; block-wise budget {args.budget_mb} MiB; {args.rounds} rounds")
        results = {"blockwise": [], "in-memory": []}
        for _ in range(args.rounds):
            for mode in results:
                out = subprocess.run([sys.executable, __file__, "--worker", mode, path, str(budget)], check=True,
                                     capture_output=True, text=True).stdout
                results[mode].append(json.loads(out.strip().splitlines()[-1]))
        rates = {m: flops / statistics.median(r["seconds"] for r in rs) / 1e9 for m, rs in results.items()}
        peaks = {m: max(r["peak_kib"] for r in rs) / 1024 for m, rs in results.items()}
        assert abs(results["blockwise"][0]["checksum"] - results["in-memory"][0]["checksum"]) < 1e-2 * abs(
            results["in-memory"][0]["checksum"]) + 1, "the two computations disagree"
        print(f"{'':34s} {'GFLOP/s':>8s} {'peak MiB':>9s}")
        print(f"{'block-wise from Zarr (reads timed)':34s} {rates['blockwise']:8.1f} {peaks['blockwise']:9.0f}")
        print(f"{'in-memory Q @ D.T (load not timed)':34s} {rates['in-memory']:8.1f} {peaks['in-memory']:9.0f}")
        print(f"ratio block-wise / in-memory: {rates['blockwise'] / rates['in-memory']:.2f}x the rate, "
              f"{peaks['blockwise'] / peaks['in-memory']:.2f}x the peak memory")


if __name__ == "__main__":
    main()
