"""Reads of stored gradients: block-wise scoring reads each original once per pass, read-ahead errors surface,
and the allocator tuning that keeps whole-array reads out of page faults."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import numpy as np
import pytest
import zarr
from zarr.codecs import Crc32cCodec

from gradlake.lake.store import LakeError
from gradlake.tasks.evaluate import similarity
from gradlake.tasks.evaluate.similarity import array_dots


def _loop_dots(q: np.ndarray, d: np.ndarray) -> np.ndarray:
    """The slow obvious version: every pair's dot product, one at a time, in float64."""
    return np.array([[float(np.dot(a.astype(np.float64), b.astype(np.float64))) for b in d] for a in q])


def test_blockwise_reads_each_original_once_per_pass(tmp_path, monkeypatch):
    rng = np.random.default_rng(4)
    q, d = rng.normal(size=(48, 512)).astype(np.float32), rng.normal(size=(200, 512)).astype(np.float32)
    root = zarr.open_group(str(tmp_path / "z"), mode="w")
    root.create_array("q", data=q, chunks=(8, 128))
    root.create_array("d", data=d, chunks=(8, 128))
    reads = []
    real = similarity.read_checked

    def counted(array, selection, dtype=None):
        reads.append((array.name.strip("/"), selection[0].start, selection[0].stop, selection[1].start))
        return real(array, selection, dtype)

    monkeypatch.setattr(similarity, "read_checked", counted)
    # Too small for every row of a column chunk (4 * 248 * 128 bytes > half of it), large enough to hold all 48
    # query rows of one (3/8 of it): the originals stream past them, each row read once per column chunk.
    budget = 1 << 16
    dots, q_sq, d_sq = array_dots(root["q"], root["d"], 0, 48, budget)
    np.testing.assert_allclose(dots, _loop_dots(q, d), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(q_sq, (q.astype(np.float64) ** 2).sum(1), rtol=1e-5)
    np.testing.assert_allclose(d_sq, (d.astype(np.float64) ** 2).sum(1), rtol=1e-5)
    for side, rows in (("d", 200), ("q", 48)):
        for c0 in range(0, 512, 128):
            covered = sorted((r0, r1) for name, r0, r1, c in reads if name == side and c == c0)
            assert covered[0][0] == 0 and covered[-1][1] == rows
            assert all(a[1] == b[0] for a, b in zip(covered, covered[1:])), f"{side} rows read twice in slab {c0}"
    assert max(r1 - r0 for name, r0, r1, _ in reads if name == "d") <= budget // 8 // (4 * 128)
    # more queries than the budget holds: the originals are read once per set of held queries, and the sums still agree
    reads.clear()
    many = rng.normal(size=(120, 512)).astype(np.float32)
    root.create_array("many", data=many, chunks=(8, 128))
    dots, *_ = array_dots(root["many"], root["d"], 0, 120, budget)
    np.testing.assert_allclose(dots, many.astype(np.float64) @ d.T.astype(np.float64), rtol=1e-5, atol=1e-4)
    doc_rows = sum(r1 - r0 for name, r0, r1, _ in reads if name == "d")
    assert doc_rows == 200 * 4 * 3  # 3 sets of up to 48 queries, 4 column chunks


def test_read_ahead_raises_the_damaged_chunk_and_leaves_no_thread(tmp_path):
    rng = np.random.default_rng(5)
    root = zarr.open_group(str(tmp_path / "z"), mode="w")
    for name, rows in (("q", 24), ("d", 40)):
        root.create_array(name, data=rng.normal(size=(rows, 256)).astype(np.float32), chunks=(8, 64),
                          compressors=[Crc32cCodec()], fill_value=np.nan)
    os.remove(tmp_path / "z" / "d" / "c" / "3" / "2")  # reads as NaN: a missing chunk object
    with pytest.raises(LakeError, match="holds NaN"):
        array_dots(root["q"], root["d"], 0, 24, 4 * 64 * 8 * 6)
    assert not [t for t in threading.enumerate() if t.name.startswith("gradlake-read-ahead")]


def test_read_ahead_keeps_order_and_at_most_one_read_in_flight():
    started, held = [], []

    def read(i):
        def run():
            started.append(i)
            return i
        return run

    for i, value in enumerate(similarity.read_ahead([read(i) for i in range(5)])):
        assert value == i
        assert len(started) <= i + 2  # the current one and the next, no more
        held.append(value)
    assert held == list(range(5)) and list(similarity.read_ahead([])) == []


_MMAPPED = """
import ctypes, sys
import numpy as np
from gradlake.lake.store import LakeStore
LakeStore(sys.argv[1])  # opening a lake tunes the allocator, unless told not to
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
before = libc.mallinfo2().hblks
buffer = np.ones(16 << 20, dtype=np.uint8)  # a chunk's bytes
print(libc.mallinfo2().hblks - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_chunk_sized_buffers_are_kept_in_the_heap(tmp_path):
    """A chunk-sized buffer comes from the heap (reused when freed) once a lake is opened, not from a fresh mmap.

    What it saves is measured by benchmarks/io.py: a whole-array read of 512 MiB from S3 went from
    118,000 page faults to 800 (counts vary with the machine and what runs beside, so not asserted here)."""
    def mmapped(setting: str) -> int:
        env = {k: v for k, v in os.environ.items() if not (k.startswith("MALLOC_") or k == "GLIBC_TUNABLES")}
        env["GRADLAKE_MALLOC"] = setting
        out = subprocess.run([sys.executable, "-c", _MMAPPED, f"file://{tmp_path}"], env=env, check=True,
                             capture_output=True, text=True).stdout
        return int(out.split()[-1])

    assert mmapped("default") == 1  # glibc's own choice: a block this size is mapped, and unmapped when freed
    assert mmapped("tuned") == 0


def _written_group(store, path: str, mode: str, dtype: str):
    """A group of 11 samples x tensors of 13 and 4 values in row-chunks of 4 and column chunks of 5 (edge chunks in
    both directions), every row-chunk written; the values it was given."""
    from gradlake.lake.gradient_plan import GradientPlan
    from gradlake.lake.gradients import GradientGroup

    rng = np.random.default_rng(5)
    plan = GradientPlan(n_samples=11, parameters={"a.weight": [13], "b.weight": [2, 2]}, mode=mode, dtype=dtype,
                        max_tokens=3, chunk_rows=4)
    tokens = np.ones((11, 3), dtype=np.int32)
    group = GradientGroup.create(store, path, plan, {"test": "chunk objects"}, [f"s{i}" for i in range(11)],
                                 tokens, tokens > 0)
    values = {}
    for k in range(plan.n_chunks):
        start, stop = plan.chunk_bounds(k)
        rows = {n: rng.standard_normal((stop - start, plan.numel(n))).astype(np.float32) for n in plan.parameters}
        if mode == "store":
            group.write_chunk(k, rows)
        else:
            group.write_partial_sum(k, {n: r.sum(axis=0) for n, r in rows.items()})
        group.mark_complete(k)
        values[k] = rows
    return group, values


@pytest.mark.parametrize("place,mode,dtype", [("s3", "store", "float32"), ("s3", "store", "bfloat16"),
                                              ("s3", "mean", "float32"), ("file", "store", "float32")])
def test_chunk_objects_put_directly_are_zarrs_own_bytes(s3_endpoint, tmp_path, monkeypatch, place, mode, dtype):
    """A row-chunk's objects are encoded and put by lake.chunk_objects: the same objects, byte for byte, as
    Zarr's own writes make (edge chunks padded with the fill value, CRC32C appended), with the same digest, read
    back and verified as written."""
    import uuid

    from gradlake.lake import chunk_objects, gradients, layout
    from gradlake.lake.store import LakeStore
    from gradlake.lake.verify import verify_gradient_group

    monkeypatch.setattr(layout, "CHUNK_BYTES", 4 * 4 * 5)  # column chunks of 5 values at 4 rows of float32 (10 of 16-bit)
    store = LakeStore(f"s3://lake/chunk-objects-{uuid.uuid4().hex[:8]}" if place == "s3" else f"file://{tmp_path}/lake")
    direct, direct_values = _written_group(store, "direct", mode, dtype)
    put = []
    monkeypatch.setattr(gradients, "put_objects", lambda *args: put.append(1) or chunk_objects.put_objects(*args))
    monkeypatch.setattr(gradients, "plain", lambda array: False)  # everything through Zarr
    through_zarr, _ = _written_group(store, "zarr", mode, dtype)
    assert not put and direct.array("a.weight" if mode == "store" else "a.weight.partial_sum").chunks[1] < 13
    fs = store.fs
    objects = {p.split("/direct/", 1)[1]: fs.cat_file(p) for p in fs.find(store.path("direct"))}
    theirs = {p.split("/zarr/", 1)[1]: fs.cat_file(p) for p in fs.find(store.path("zarr"))}
    assert set(objects) == set(theirs) and any("/c/2/" in k for k in objects)
    assert not any(k.endswith(".partial") for k in objects)
    for key, data in objects.items():
        if key != "zarr.json":  # the lineage's creation time differs
            assert data == theirs[key], key
    assert all(verify_gradient_group(store, path).status == "ok" for path in ("direct", "zarr"))
    if (mode, dtype) == ("store", "float32"):
        for k, rows in direct_values.items():
            assert all(np.array_equal(got, rows[n]) for got, n in zip(direct.read_chunk(k), direct.plan.parameters))
    assert direct.digest_algorithm == "crc32c"


@pytest.mark.parametrize("algorithm", ["crc32", "crc32c"])
def test_row_chunk_digests_old_and_new_catch_swapped_and_missing_objects(tmp_path, algorithm):
    """A group written before digests named their algorithm (zlib's CRC32, no "algorithm" attr) verifies as it
    did; under either algorithm two valid chunk objects swapped, or one missing, are found by the digest."""
    import shutil

    from gradlake.lake.integrity import digest
    from gradlake.lake.store import LakeStore
    from gradlake.lake.verify import verify_gradient_group

    store = LakeStore(f"file://{tmp_path}/lake")
    group, _ = _written_group(store, "g", "store", "float32")
    digests = group.array("chunk_digest")
    if algorithm == "crc32":  # as older gradlake wrote it
        digests.attrs.put({"digest": "crc32 of the row-chunk's values, array by array in plan order"})
        for k in range(group.plan.n_chunks):
            digests[k] = digest(group.read_chunk(k))
    assert digest(group.read_chunk(0), algorithm) == group.stored_digest(0)
    assert verify_gradient_group(store, "g").status == "ok"
    chunks = tmp_path / "lake" / "g" / "a.weight" / "c"
    first, second = chunks / "0" / "0", chunks / "1" / "0"
    a, b = first.read_bytes(), second.read_bytes()
    first.write_bytes(b), second.write_bytes(a)
    found = verify_gradient_group(store, "g")
    assert found.status == "damaged" and found.chunks == [0, 1] and "digest" in found.problems[0]
    first.write_bytes(a), second.write_bytes(b)
    shutil.rmtree(chunks / "2")  # the last row-chunk: its rows past the end are the fill value anyway
    found = verify_gradient_group(store, "g")
    assert found.status == "damaged" and found.chunks == [2]


def test_put_objects_raises_the_first_failure_and_leaves_no_partial_file(tmp_path):
    """A local object that cannot be written is raised once all others are done; no partial file is left."""
    from concurrent.futures import ThreadPoolExecutor

    import fsspec

    from gradlake.lake.chunk_objects import put_objects

    (tmp_path / "blocked").write_bytes(b"")  # a file where a directory is needed
    objects = [(str(tmp_path / f"ok/c/{i}"), lambda i=i: bytearray([i])) for i in range(6)]
    objects.insert(3, (str(tmp_path / "blocked/c/0"), lambda: bytearray(1)))
    with ThreadPoolExecutor(2) as threads, pytest.raises(OSError):
        put_objects(fsspec.filesystem("file"), objects, threads)
    left = sorted(p.name for p in tmp_path.rglob("*") if p.is_file())
    assert not [name for name in left if name.endswith(".partial")] and "blocked" in left
