"""Scoring at scale: top-k of many queries streamed from a lake group, against the store's raw read bandwidth.

Protocol.  For each row count (``--rows``; the slope is fitted over them) one lake group of
synthetic projected vectors (``--dim`` values per row, ``--dtype``, one array, row-chunks of
``--chunk-rows`` samples, crc32c on every object: the layout `GradientGroup.create` gives a
projection group) is written to a local directory and to S3 (moto in a process of its own, on
loopback).  Each round then measures, interleaved and in a rotated order:

- raw: every chunk object's bytes and nothing else (plain ``open``/``readinto`` into one
  preallocated buffer on a local disk; s3fs ``cat`` of all objects at once on S3);
- lake read: the same rows through `read_checked` in the blocks the scorer reads (Zarr, CRC32C, no math);
- score q: `tasks.evaluate.topk.score_topk`, top-100 of q queries (``--queries``), read-ahead on.

Printed: medians of wall time (I/O is what is measured; CPU seconds of the process beside them),
rows/s, GB/s, and each path's fraction of raw read bandwidth with the min-max of the per-round
ratios.  A local lake just written is read from the page cache, so "raw" there is the memory
copy rate the machine reaches, not a disk's.  Then the slope (seconds per million rows, least
squares over the row counts) and the projection to ``--project-rows`` rows x
``--project-queries`` queries: max(bytes / raw bandwidth, 2·q·rows·dim / the measured matrix
product rate).  Before timing, the top-k of 64 queries in the first rows is checked against a
direct full computation in float64: the same scores in order to 1e-5 of the largest (a float32
product of another shape rounds otherwise), and the share of identical rows printed.  Run it
with OMP_NUM_THREADS=1 on a shared machine: BLAS threads spin while waiting for a core and
inflate CPU time.

    OMP_NUM_THREADS=1 python benchmarks/scoring.py   # 4k-16k rows (local), 2k-4k (S3) x 8192 float32
    python benchmarks/scoring.py --places local --rows 8192,32768 --queries 16,2048 --rounds 3
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from moto_s3 import moto_server  # benchmarks/moto_s3.py

REPO = Path(__file__).resolve().parents[1]
K = 100


def write_group(url: str, path: str, rows: int, args) -> None:
    """A complete per-sample group of one array 'proj' of random vectors, the layout a projection group has."""
    from gradlake.lake.gradient_plan import GradientPlan
    from gradlake.lake.gradients import GradientGroup
    from gradlake.lake.store import LakeStore

    store = LakeStore(url)
    plan = GradientPlan(n_samples=rows, parameters={"proj": [args.dim]}, mode="store", dtype=args.dtype, max_tokens=2,
                        chunk_rows=args.chunk_rows)
    tokens = np.ones((rows, 2), dtype=np.int32)
    group = GradientGroup.create(store, path, plan, {"benchmark": "scoring"}, [f"s{i}" for i in range(rows)], tokens, tokens > 0)
    rng = np.random.default_rng(rows)
    array, slab = group.array("proj"), 64 * args.chunk_rows
    from gradlake.lake.dtypes import encode

    for r0 in range(0, rows, slab):  # whole row-chunks at a time, as extraction writes them
        array[r0:min(rows, r0 + slab)] = encode(rng.standard_normal((min(rows, r0 + slab) - r0, args.dim), np.float32), args.dtype)
    group.array("shard_complete")[:] = 1


def open_array(url: str, path: str):
    from gradlake.lake.gradients import GradientGroup
    from gradlake.lake.store import LakeStore

    return GradientGroup.open(LakeStore(url), path).array("proj")


def raw_read(url: str, path: str, array) -> None:
    """Every chunk object of the array, bytes only, into one preallocated buffer."""
    from gradlake.lake.store import LakeStore

    store = LakeStore(url)
    n_chunks = -(-array.shape[0] // array.chunks[0])
    keys = [store.path(f"{path}/proj/c/{k}/0") for k in range(n_chunks)]
    size = array.chunks[0] * array.shape[1] * array.dtype.itemsize + 4  # values and the crc32c
    buffer = np.empty(n_chunks * size, np.uint8)
    if store.is_local:
        view = memoryview(buffer)
        for i, key in enumerate(keys):
            with open(key, "rb", buffering=0) as f:
                f.readinto(view[i * size:(i + 1) * size])
        return
    for i, data in enumerate(store.fs.cat(keys).values()):
        buffer[i * size:i * size + len(data)] = np.frombuffer(data, np.uint8)


def lake_read(array, budget: int, queries: int) -> None:
    """The rows through read_checked in the scorer's blocks, nothing computed."""
    from gradlake.lake.integrity import read_checked
    from gradlake.tasks.evaluate.topk import block_rows, row_tile

    step = block_rows([array], queries, budget, row_tile([array]))
    for r0 in range(0, array.shape[0], step):
        read_checked(array, (slice(r0, r0 + step), slice(None)), np.float32)


def score(array, queries: np.ndarray, budget: int) -> None:
    from gradlake.tasks.evaluate.topk import score_topk

    score_topk([queries], [array], K, budget=budget)


def timed(fn, *args) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn(*args)
    return time.perf_counter() - wall, time.process_time() - cpu


def check_against_full(array, queries: np.ndarray) -> float:
    """The top-k of the first rows against a full score matrix in float64 sorted by (-score, row): the same scores
    in the same order (to float32 rounding: a product of another shape rounds otherwise); returns the fraction
    of identical rows (below 1 only where two rows' scores differ by less than the rounding)."""
    from gradlake.lake.integrity import read_checked
    from gradlake.tasks.evaluate.topk import row_tile, score_topk

    stop = min(array.shape[0], 2 * row_tile([array]))
    values = read_checked(array, (slice(0, stop), slice(None)), np.float64)
    got = score_topk([queries[:64]], [array], K, 0, stop, budget=1 << 26)
    full = queries[:64].astype(np.float64) @ values.T
    order = np.lexsort((np.broadcast_to(np.arange(stop), full.shape), -full), axis=1)[:, :K]
    want = np.take_along_axis(full, order, 1)
    scale = np.abs(full).max()
    assert np.allclose(got.scores, want, rtol=0, atol=1e-5 * scale), "top-k scores differ"
    assert np.allclose(np.take_along_axis(full, got.rows, 1), want, rtol=0, atol=1e-5 * scale), "top-k rows differ"
    return float((got.rows == order).mean())


def matmul_rate(dim: int, queries: int, rows: int = 1024) -> float:
    """FLOPs per CPU-second of the float32 matrix product the scorer runs (queries x dim times dim x rows), best of 5:
    CPU time, since other jobs share the cores (a dedicated machine gets this times its cores)."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((queries, dim), np.float32), rng.standard_normal((rows, dim), np.float32)
    best = min(timed(lambda: a @ b.T)[1] for _ in range(5))
    return 2 * queries * dim * rows / max(best, 1e-6)


def spread(ratios: list[float]) -> str:
    return f"{statistics.median(ratios):.2f} [{min(ratios):.2f}-{max(ratios):.2f}]"


def report(place: str, results: dict, rows_list: list[int], qs: list[int], args, rates: dict[int, float]) -> dict:
    """Print one place's table; return the raw bandwidth (bytes/s) and per-q slopes (s per row)."""
    bytes_per_row = args.dim * np.dtype(args.dtype if args.dtype != "bfloat16" else "float16").itemsize
    print(f"\n{place}: wall s medians; GB/s of stored bytes; fraction of raw read bandwidth [min-max per round]")
    print(f"{'rows':>8} {'GB':>6} {'path':>12} {'wall s':>8} {'cpu s':>8} {'rows/s':>10} {'GB/s':>7}  {'x raw':>18}  "
          "GFLOP/cpu-s (x bare product)")
    raw_bw = []
    slopes: dict[str, list[tuple[int, float]]] = {}
    for rows in rows_list:
        runs = results[rows]
        gb = rows * bytes_per_row / 1e9
        raw = [r["raw"][0] for r in runs]
        raw_bw.append(gb * 1e9 / statistics.median(raw))
        for name in ["raw", "lake read"] + [f"score q={q}" for q in qs]:
            wall = statistics.median(r[name][0] for r in runs)
            cpu = statistics.median(r[name][1] for r in runs)
            ratios = [r["raw"][0] / r[name][0] for r in runs]
            slopes.setdefault(name, []).append((rows, wall))
            flops = ""
            if name.startswith("score"):
                q = int(name.split("=")[1])
                per_cpu = 2 * q * rows * args.dim / cpu
                flops = f"{per_cpu / 1e9:.1f} ({per_cpu / rates[q]:.2f})"
            print(f"{rows:>8} {gb:>6.2f} {name:>12} {wall:>8.2f} {cpu:>8.2f} {rows / wall:>10.0f} {gb / wall:>7.2f}  "
                  f"{spread(ratios):>18}  {flops}")
    bw = statistics.median(raw_bw)
    print(f"slope (s per million rows, least squares over {rows_list}):")
    fitted = {}
    for name, points in slopes.items():
        x, y = np.array([p[0] for p in points], float), np.array([p[1] for p in points])
        fitted[name] = np.polyfit(x, y, 1)[0] if len(points) > 1 else y[0] / x[0]
        print(f"  {name:>12}: {fitted[name] * 1e6:8.1f} s")
    n, q = args.project_rows, args.project_queries
    rate = rates[max(qs)] * (os.cpu_count() or 1)  # every core on the product
    io_s, flop_s = n * bytes_per_row / bw, 2 * q * n * args.dim / rate
    print(f"projected, {n:,} rows x {q:,} queries x {args.dim} ({n * bytes_per_row / 1e9:.0f} GB): reading {io_s / 60:.1f} min at "
          f"{bw / 1e9:.2f} GB/s, products {flop_s / 3600:.1f} h at {rate / 1e9:.0f} GFLOP/s: "
          f"{'FLOP' if flop_s > io_s else 'bandwidth'}-bound; the queries each row is read for at balance: "
          f"{rate * bytes_per_row / (2 * args.dim * bw):.0f}")
    return {"bandwidth": bw, "slopes": fitted}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="4096,8192,16384", help="lake rows per group, comma-separated (the slope)")
    parser.add_argument("--s3-rows", default="2048,4096", help="row counts on S3 (moto holds them in memory)")
    parser.add_argument("--queries", default="64,2048", help="queries scored at once, comma-separated")
    parser.add_argument("--dim", type=int, default=8192)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--chunk-rows", type=int, default=8)
    parser.add_argument("--budget-mb", type=int, default=1024)
    parser.add_argument("--places", default="local,s3")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--project-rows", type=int, default=1_000_000)
    parser.add_argument("--project-queries", type=int, default=10_000)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # killed: still stop moto and remove the scratch lake
    sys.path.insert(0, str(REPO))
    qs = [int(q) for q in args.queries.split(",")]
    budget = args.budget_mb << 20
    queries = np.random.default_rng(1).standard_normal((max(qs), args.dim), np.float32)
    rates = {q: matmul_rate(args.dim, q) for q in qs}
    print(f"float32 matrix product ({args.dim} deep, 1024 rows): " + ", ".join(f"q={q}: {r / 1e9:.1f} GFLOP per CPU-s" for q, r in rates.items()))
    scratch, procs, places = tempfile.mkdtemp(prefix="gradlake-scoring-"), [], {}
    try:
        if "local" in args.places:
            places["local"] = (f"file://{scratch}/lake", [int(r) for r in args.rows.split(",")])
        if "s3" in args.places:
            proc, endpoint = moto_server()
            procs.append(proc)
            os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
                              GRADLAKE_S3_ENDPOINT_URL=endpoint)
            places["s3 (moto, loopback)"] = ("s3://lake/scoring", [int(r) for r in args.s3_rows.split(",")])
        arrays = {}
        for place, (url, rows_list) in places.items():
            for rows in rows_list:
                write_group(url, f"vectors-{rows}", rows, args)
                arrays[place, rows] = open_array(url, f"vectors-{rows}")
            same = check_against_full(arrays[place, rows_list[0]], queries)
            print(f"{place}: top-{K} of 64 queries in the first rows equals the full float64 computation to 1e-5 of the "
                  f"largest score; {same:.4f} of the rows identical")
        results = {place: {rows: [] for rows in rows_list} for place, (_, rows_list) in places.items()}
        for turn in range(args.rounds):
            for place, (url, rows_list) in places.items():
                for rows in rows_list:
                    array = arrays[place, rows]
                    steps = [("raw", lambda: raw_read(url, f"vectors-{rows}", array)),
                             ("lake read", lambda: lake_read(array, budget, max(qs)))]
                    steps += [(f"score q={q}", lambda q=q: score(array, queries[:q], budget)) for q in qs]
                    steps = steps[turn % len(steps):] + steps[:turn % len(steps)]
                    results[place][rows].append({name: timed(fn) for name, fn in steps})
                    print(f"round {turn + 1}/{args.rounds}, {place}, {rows} rows: done", file=sys.stderr, flush=True)
    finally:
        for proc in procs:
            proc.terminate()
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"\n{args.dim} values per row ({args.dtype}), row-chunks of {args.chunk_rows}, top-{K}, budget {args.budget_mb} MiB, "
          f"{os.cpu_count()} cores, median of {args.rounds} interleaved rounds")
    for place, (_, rows_list) in places.items():
        report(place, results[place], rows_list, qs, args, rates)


if __name__ == "__main__":
    main()
