"""Row-chunks of a gradient group filled a batch at a time, each written whole once all its rows came.

A run's batches need not match the group's row-chunks (batches packed by length come in any
order of samples; shards and batches of another size cut the samples elsewhere): a chunk waits
here until every row is in, then is written once and flagged complete, and its lease
(`lake.leases`) is released.
"""

from __future__ import annotations

import numpy as np

from gradlake.lake.gradients import GradientGroup
from gradlake.lake.leases import ChunkLeases


class ChunkAssembly:
    """Row-chunks of a group filled a batch at a time: which rows of a batch a waiting chunk takes,
    and when a chunk has all its rows.  A batch's samples may come in any order (batches packed
    by length); each goes to its own row.  Only the chunks asked for are taken; rows of other
    chunks are ignored, so a finished chunk is never written again."""

    def __init__(self, group: GradientGroup, chunks: list[int], leases: ChunkLeases | None = None):
        self.group, self.leases = group, leases
        self.waiting = set(chunks)
        self._filled: dict[int, int] = {}

    def pieces(self, rows: np.ndarray):
        """(chunk, positions, offsets): for each waiting chunk the batch's samples `rows` reach, which
        positions of the batch it takes and their rows within the chunk."""
        rows = np.asarray(rows)
        height = self.group.plan.chunk_rows
        chunk_of = rows // height
        for k in sorted(set(chunk_of.tolist()) & self.waiting):
            positions = np.flatnonzero(chunk_of == k)
            yield k, positions, rows[positions] - self.group.plan.chunk_bounds(k)[0]

    def arrived(self, k: int, rows: int) -> bool:
        """Count `rows` more rows of chunk `k`; True once it has all of them."""
        c0, c1 = self.group.plan.chunk_bounds(k)
        self._filled[k] = self._filled.get(k, 0) + rows
        return self._filled[k] == c1 - c0

    def complete(self, k: int) -> None:
        """Flag chunk `k` complete (after its data is written): the last write for it; then free its lease."""
        self.group.mark_complete(k)
        if self.leases is not None:
            self.leases.release(self.group, k)
        self.waiting.discard(k)
        self._filled.pop(k, None)


class ChunkRows(ChunkAssembly):
    """Per-sample rows written to a group one whole row-chunk at a time.

    A run's batches need not match the group's chunks: a chunk waits here until all its rows
    came, then is written once and flagged complete.  `fill` and `write` split the two, so that
    rows are copied straight from a reused buffer (the caller's `put`) while the writes run
    elsewhere (`lake.overlap`).
    """

    def __init__(self, group: GradientGroup, chunks: list[int], leases: ChunkLeases | None = None):
        super().__init__(group, chunks, leases)
        self._rows: dict[int, dict[str, np.ndarray]] = {}

    def add(self, start: int, stop: int, arrays: dict[str, np.ndarray]) -> list[int]:
        """Take samples [start, stop) (`arrays` of `stop - start` rows each); returns the chunks completed."""
        return self.add_rows(np.arange(start, stop), arrays)

    def add_rows(self, rows: np.ndarray, arrays: dict[str, np.ndarray]) -> list[int]:
        """Take the samples `rows` (`arrays` hold their values in that order); returns the chunks completed."""
        done = []
        for k, positions, offsets in list(self.pieces(rows)):
            c0, c1 = self.group.plan.chunk_bounds(k)
            in_order = len(offsets) == c1 - c0 and bool((offsets == np.arange(c1 - c0)).all())
            if in_order and k not in self._rows:  # the whole chunk in one go, in order: no copy
                lo = int(positions[0])
                if bool((positions == np.arange(lo, lo + len(positions))).all()):
                    self.write(k, {n: a[lo:lo + len(positions)] for n, a in arrays.items()})
                    done.append(k)
                    continue
            held = self._rows.setdefault(k, {n: np.empty_like(a, shape=(c1 - c0, *a.shape[1:])) for n, a in arrays.items()})
            for n, a in arrays.items():
                held[n][offsets] = a[positions]
            if self.arrived(k, len(offsets)):
                self.write(k, self._rows.pop(k))
                done.append(k)
        return done

    def fill(self, rows: np.ndarray, values: dict, put, empty) -> list[tuple[int, dict[str, np.ndarray]]]:
        """Copy the samples `rows` into their chunks' host buffers; returns the chunks now whole, with their arrays.

        `values` hold the batch's values in the order of `rows`, of any kind: `put(out, offsets, value,
        positions)` copies rows `positions` of `value` into rows `offsets` of the host array `out`, made by
        `empty(value, rows)`.  Nothing is written: pass each chunk returned to `write`."""
        done = []
        for k, positions, offsets in list(self.pieces(rows)):
            c0, c1 = self.group.plan.chunk_bounds(k)
            held = self._rows.get(k)
            if held is None:
                held = self._rows[k] = {n: empty(v, c1 - c0) for n, v in values.items()}
            for n, value in values.items():
                put(held[n], offsets, value, positions)
            if self.arrived(k, len(offsets)):
                done.append((k, self._rows.pop(k)))
        return done

    def write(self, k: int, arrays: dict[str, np.ndarray]) -> None:
        """Write chunk `k` whole and flag it complete (its lease freed)."""
        self.group.write_chunk(k, arrays)
        self.complete(k)
