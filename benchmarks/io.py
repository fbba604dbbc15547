"""Lake write and read throughput against raw s3fs and raw files, side by side in one run.

A gradient group of random per-sample values (row-chunks of ``--chunk-rows`` samples, column
chunks as `lake.layout.column_chunk` cuts them, crc32c on every chunk object) is written and read through gradlake
(`GradientGroup.write_chunk` and `mark_complete`, `read_checked`) and the same bytes as the same objects through the
filesystem alone (s3fs ``pipe`` / ``cat``, a row-chunk's objects at once, each with its CRC32C computed as
Zarr's codec does; plain ``open`` on a local disk), on an S3 served by moto in a process of its own (as
MinIO would be) and on a local directory.  S3 is reached through tests/s3proxy.py, in a process of its
own too, adding ``--latencies`` ms to every request (0, 10 and 50: loopback hides what a request costs).
Creating the group (claim, token arrays, metadata) is a fixed cost per group, timed apart from the writes.
Each round does every measurement once, interleaved; printed are the medians in MiB/s, the ratios
lake / raw (the median of the per-round ratios and their min-max) in wall time and in this process's
CPU time (all its threads: the machine is shared, CPU is the steadier measure), and client CPU-s per GiB.
``--through-zarr`` adds the lake with every object written by Zarr (the write path before
`lake.chunk_objects`).  ``--object-mb N`` adds the lake with a row-chunk's column chunks gathered into
objects of up to N MiB (Zarr v3 shards, the extraction's ``object_mb``), read the same two ways, and
prints the objects per row-chunk of OLMo-2-7B in both layouts.

    python benchmarks/io.py                                   # 64 samples, tensors of 2M and 1M float32, S3 and local
    python benchmarks/io.py --places s3 --samples 32 --through-zarr
    python benchmarks/io.py --places local --rounds 5
    python benchmarks/io.py --samples 128 --tensors 4194304,1048576 --dtype float16 --object-mb 256
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

from moto_s3 import latency_proxy, moto_server  # benchmarks/moto_s3.py

REPO = Path(__file__).resolve().parents[1]
MIB = 1 << 20


class Bench:
    """One place (an S3 prefix or a local directory) and the group's shapes; each method is one measurement."""

    def __init__(self, url: str, args, blocks: dict[str, np.ndarray], storage_options: dict | None = None):
        from gradlake.lake import layout
        from gradlake.lake.store import LakeStore

        self.store, self.args, self.blocks = LakeStore(url, storage_options), args, blocks
        self.groups: dict = {}  # created, not written yet
        self.n, self.rows = args.samples, args.chunk_rows
        self.itemsize = np.dtype(args.dtype).itemsize
        self.cols = {name: layout.column_chunk(self.rows, b.shape[1], self.itemsize) for name, b in blocks.items()}
        self.bytes = sum(self.n * b.shape[1] * self.itemsize for b in blocks.values())

    # -- gradlake ------------------------------------------------------------------------

    def lake_create(self, path: str, object_bytes: int = 0) -> None:
        """Create the group (its claim, token arrays and array metadata: a fixed cost per group, timed on its own)."""
        from gradlake.lake.gradient_plan import GradientPlan
        from gradlake.lake.gradients import GradientGroup

        plan = GradientPlan(n_samples=self.n, parameters={k: [b.shape[1]] for k, b in self.blocks.items()}, mode="store",
                            dtype=self.args.dtype, max_tokens=4, chunk_rows=self.rows, object_bytes=object_bytes)
        tokens = np.zeros((self.n, 4), dtype=np.int32)
        self.groups[path] = GradientGroup.create(self.store, path, plan, {"benchmark": path},
                                                 [f"s{i}" for i in range(self.n)], tokens, tokens > 0)

    def lake_create_sharded(self, path: str) -> None:
        self.lake_create(path, self.args.object_mb << 20)

    def lake_write(self, path: str) -> None:
        """Every row-chunk written and flagged, one after the other, as extraction's writer hands them over."""
        group = self.groups.pop(path)
        for k in range(group.plan.n_chunks):
            start, stop = group.plan.chunk_bounds(k)
            group.write_chunk(k, {name: b[: stop - start] for name, b in self.blocks.items()})
            group.mark_complete(k)

    def lake_write_through_zarr(self, path: str) -> None:
        """`lake_write` with every object written by Zarr (as before lake.chunk_objects): the change, side by side."""
        from gradlake.lake import gradients

        plain, gradients.plain = gradients.plain, lambda array: False
        try:
            self.lake_write(path)
        finally:
            gradients.plain = plain

    def _arrays(self, path: str):
        import zarr

        group = zarr.open_group(self.store.zarr_store, path=path, mode="r", zarr_format=3)
        return [group[name] for name in self.blocks]

    def lake_read_whole(self, path: str) -> None:
        from gradlake.lake.integrity import read_checked

        for array in self._arrays(path):
            read_checked(array, slice(None))

    def lake_read_rows(self, path: str) -> None:
        from gradlake.lake.integrity import read_checked

        for array in self._arrays(path):
            for r in range(0, self.n, self.rows):
                read_checked(array, slice(r, r + self.rows))

    # -- the filesystem alone -------------------------------------------------------------

    def _objects(self, path: str, name: str) -> list[tuple[str, int, int, int, int]]:
        """(object path, row start, row stop, column start, column stop) of every chunk object of an array."""
        numel, cols = self.blocks[name].shape[1], self.cols[name]
        return [(self.store.path(f"{path}/{name}/c/{r // self.rows}/{c // cols}"), r, min(self.n, r + self.rows),
                 c, min(numel, c + cols)) for r in range(0, self.n, self.rows) for c in range(0, numel, cols)]

    def raw_write(self, path: str) -> None:
        import google_crc32c

        fs = self.store.fs
        for r in range(0, self.n, self.rows):  # a row-chunk at a time, as extraction hands them over
            objects = {}
            for name, block in self.blocks.items():
                for key, r0, r1, c0, c1 in self._objects(path, name):
                    if r0 == r:
                        data = np.ascontiguousarray(block[: r1 - r0, c0:c1]).tobytes()
                        objects[key] = data + np.uint32(google_crc32c.value(data)).tobytes()
            if self.store.is_local:
                for key, data in objects.items():
                    os.makedirs(os.path.dirname(key), exist_ok=True)
                    with open(key, "wb") as f:
                        f.write(data)
            else:
                fs.pipe(objects)

    def raw_read(self, path: str) -> None:
        fs = self.store.fs
        for name, block in self.blocks.items():
            out = np.empty((self.n, block.shape[1]), dtype=block.dtype)
            objects = self._objects(path, name)
            if self.store.is_local:
                got = {}
                for key, *_ in objects:
                    with open(key, "rb") as f:
                        got[key] = f.read()
            else:
                got = fs.cat([key for key, *_ in objects])
            for key, r0, r1, c0, c1 in objects:
                out[r0:r1, c0:c1] = np.frombuffer(got[key], dtype=block.dtype, count=(r1 - r0) * (c1 - c0)).reshape(
                    r1 - r0, c1 - c0)

    def remove(self, path: str) -> None:
        if self.store.is_local:
            shutil.rmtree(self.store.path(path), ignore_errors=True)
        else:
            try:
                self.store.fs.rm(self.store.path(path), recursive=True)
            except FileNotFoundError:  # never written (no --object-mb)
                pass


def timed(fn, *args) -> tuple[float, float]:
    """Wall seconds and this process's CPU seconds (every thread: zarr's and s3fs's event loops, our writers)."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn(*args)
    return time.perf_counter() - wall, time.process_time() - cpu


def one_round(bench: Bench, sharded: bool, turn: int, through_zarr: bool = False) -> dict[str, tuple[float, float]]:
    """Every measurement once, in an order rotated by `turn` (the machine is noisy, and what runs just after
    the writes shares the disk with their writeback): (wall, cpu) seconds of each."""
    tag = uuid.uuid4().hex[:8]
    lake, raw, shard, old = (f"bench/{tag}/{what}" for what in ("lake", "raw", "sharded", "zarr"))
    seconds = {"lake create": timed(bench.lake_create, lake)}
    if through_zarr:
        bench.lake_create(old)
    if sharded:
        bench.lake_create_sharded(shard)
    writes = [("lake write", bench.lake_write, lake), ("raw write", bench.raw_write, raw)]
    reads = [("lake read", bench.lake_read_whole, lake), ("raw read", bench.raw_read, raw),
             ("lake read by row-chunk", bench.lake_read_rows, lake)]
    if through_zarr:
        writes.append(("write through zarr", bench.lake_write_through_zarr, old))
    if sharded:
        writes.append(("sharded write", bench.lake_write, shard))
        reads += [("sharded read", bench.lake_read_whole, shard),
                  ("sharded read by row-chunk", bench.lake_read_rows, shard)]
    for what, fn, path in writes[turn % len(writes):] + writes[:turn % len(writes)]:
        seconds[what] = timed(fn, path)
    if bench.store.is_local:
        os.sync()  # reads are not to wait on the writes' writeback
    for what, fn, path in reads[turn % len(reads):] + reads[:turn % len(reads)]:
        seconds[what] = timed(fn, path)
    for path in (lake, raw, shard, old):
        bench.remove(path)
    return {k: seconds[k] for k in ["lake create"] + [k for k, *_ in writes + reads]}


def ratio_line(rounds: list[dict[str, tuple[float, float]]], lake: str, raw: str) -> str:
    """Lake / raw throughput (raw seconds over lake seconds): the median of the per-round ratios and their
    min-max, in wall and in this process's CPU."""
    parts = []
    for i, what in ((0, "wall"), (1, "cpu")):
        per_round = sorted(r[raw][i] / r[lake][i] for r in rounds)
        parts.append(f"{what} {statistics.median(per_round):.2f}x ({per_round[0]:.2f}-{per_round[-1]:.2f})")
    return ", ".join(parts)


def report(place: str, rounds: list[dict[str, tuple[float, float]]], mib: float, object_mb: int) -> None:
    """Rates, lake / raw ratios with their spread, and client CPU seconds per GiB of one place."""
    measured = [k for k in rounds[0] if k != "lake create"]
    rate = {k: mib / statistics.median(r[k][0] for r in rounds) for k in measured}
    cpu = {k: statistics.median(r[k][1] for r in rounds) * 1024 / mib for k in measured}
    create = [statistics.median(r["lake create"][i] for r in rounds) for i in (0, 1)]
    print(f"\n{place}: MiB/s " + ", ".join(f"{k} {v:.0f}" for k, v in rate.items()))
    print(f"  creating the group (once per group, not in the writes): {create[0]:.2f} s, {create[1]:.2f} CPU-s")
    print("  client CPU-s per GiB: " + ", ".join(f"{k} {v:.2f}" for k, v in cpu.items()))
    print(f"  write lake / raw: {ratio_line(rounds, 'lake write', 'raw write')}")
    if "write through zarr" in rounds[0]:
        print(f"  write through zarr / raw: {ratio_line(rounds, 'write through zarr', 'raw write')}")
    print(f"  read lake / raw: {ratio_line(rounds, 'lake read', 'raw read')}")
    print(f"  lake whole-array reads / the same read a row-chunk at a time: "
          f"{ratio_line(rounds, 'lake read', 'lake read by row-chunk')}")
    if object_mb:
        print(f"  objects of {object_mb} MiB / one per chunk (throughput): write "
              f"{ratio_line(rounds, 'sharded write', 'lake write')}; whole read "
              f"{ratio_line(rounds, 'sharded read', 'lake read')}; row-chunk reads "
              f"{ratio_line(rounds, 'sharded read by row-chunk', 'lake read by row-chunk')}")


def digest_costs(blocks: dict[str, np.ndarray], rounds: int = 5) -> str:
    """CPU seconds per GiB of the row-chunk digest in each algorithm, interleaved rounds (`lake.integrity.digest`)."""
    from gradlake.lake.integrity import DIGESTS, digest

    gib = sum(b.nbytes for b in blocks.values()) / (1 << 30)
    seconds: dict[str, list[float]] = {a: [] for a in DIGESTS}
    for _ in range(rounds):
        for algorithm in DIGESTS:
            began = time.process_time()
            digest(blocks.values(), algorithm)
            seconds[algorithm].append(time.process_time() - began)
    per_gib = {a: statistics.median(s) / gib for a, s in seconds.items()}
    return ("row-chunk digest, CPU-s per GiB: " + ", ".join(f"{a} {v:.3f}" for a, v in per_gib.items())
            + f" ({per_gib['crc32'] / per_gib['crc32c']:.1f}x less in crc32c)")


def objects_7b(dtype: str, rows: int, object_bytes: int) -> tuple[int, int, int]:
    """Objects per row-chunk of OLMo-2-7B's per-sample gradients (32 layers, hidden 4096, MLP 11008, vocabulary
    100352; 355 tensors): one per chunk, and in objects of up to `object_bytes`; and the number of tensors."""
    from gradlake.lake import layout

    itemsize = np.dtype(dtype).itemsize
    per_layer = [4096 * 4096] * 4 + [11008 * 4096] * 3 + [4096] * 4
    tensors = per_layer * 32 + [100352 * 4096] * 2 + [4096]
    chunks = sum(-(-n // layout.column_chunk(rows, n, itemsize)) for n in tensors)
    objects = sum(-(-n // (layout.shard_columns(rows, n, itemsize, object_bytes) or layout.column_chunk(rows, n, itemsize)))
                  for n in tensors)
    return chunks, objects, len(tensors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--tensors", default="2097152,1048576", help="values per sample of each tensor, comma-separated")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16"))
    parser.add_argument("--chunk-rows", type=int, default=8)
    parser.add_argument("--places", default="s3,local", help="s3, local or both")
    parser.add_argument("--latencies", default="0,10,50",
                        help="S3 through tests/s3proxy.py adding this many ms to every request, comma-separated; "
                             "'direct' for moto without the proxy")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--through-zarr", action="store_true",
                        help="also write the group with every object written by Zarr (before lake.chunk_objects)")
    parser.add_argument("--object-mb", type=int, default=0, help="also measure the lake with objects of up to this many MiB")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    rng = np.random.default_rng(0)
    # One row-chunk of values per tensor, written to every row-chunk: the contents do not change the cost.
    blocks = {f"model.layers.{i}.weight": rng.standard_normal((args.chunk_rows, int(n)), dtype=np.float32)
              .astype(args.dtype) for i, n in enumerate(args.tensors.split(","))}
    places = args.places.split(",")
    procs = []
    scratch = tempfile.mkdtemp(prefix="gradlake-io-")
    try:
        benches = {}
        if "s3" in places:
            proc, endpoint = moto_server()
            procs.append(proc)
            os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                              AWS_DEFAULT_REGION="us-east-1", GRADLAKE_S3_ENDPOINT_URL=endpoint)
            for latency in args.latencies.split(","):
                if latency == "direct":
                    benches["s3 (moto, no proxy)"] = Bench("s3://lake/io", args, blocks)
                    continue
                proc, proxied = latency_proxy(endpoint, float(latency))
                procs.append(proc)
                benches[f"s3 through the proxy, +{latency} ms a request"] = Bench(
                    "s3://lake/io", args, blocks, {"endpoint_url": proxied})
        if "local" in places:
            benches["local"] = Bench(f"file://{scratch}/lake", args, blocks)
        results: dict[str, list[dict[str, tuple[float, float]]]] = {p: [] for p in benches}
        for turn in range(args.rounds):
            for place, bench in benches.items():
                results[place].append(one_round(bench, args.object_mb > 0, turn, args.through_zarr))
    finally:
        for proc in procs:
            proc.terminate()
        shutil.rmtree(scratch, ignore_errors=True)
    some = next(iter(benches.values()))
    print(f"{args.samples} samples x {len(blocks)} tensors ({args.tensors} values, {args.dtype}), chunk_rows "
          f"{args.chunk_rows}: {some.bytes / MIB:.0f} MiB per write; median of {args.rounds} interleaved rounds "
          "(min-max of the per-round ratios in brackets)")
    for place, rounds in results.items():
        report(place, rounds, some.bytes / MIB, args.object_mb)
    print("\n" + digest_costs(blocks))
    if args.object_mb:
        chunks, objects, tensors = objects_7b("float16", args.chunk_rows, args.object_mb << 20)
        print(f"\nOLMo-2-7B, 16-bit, every tensor ({tensors}): {objects} objects per row-chunk of {args.chunk_rows} "
              f"samples in objects of up to {args.object_mb} MiB, {chunks} with one object per chunk")


if __name__ == "__main__":
    main()
