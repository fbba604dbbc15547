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
