"""Block-wise similarities straight from Zarr: queries against all originals, in bounded memory.

For one query block at a time, each array's dot products with every original are
accumulated over column slabs read from the lake.  Within a slab as many query rows as the
budget allows are held while the originals stream past them a block at a time, each block
read once for every such set of queries (once per pass when all queries fit), and the next
block is read on a thread of its own while the current one is multiplied.  Squared norms
come from the same slabs.  Dot products and squared norms add over tensors, so any set of
tensors (a layer group, the full gradient, a projection group's arrays) gets its cosine
without its vectors ever being concatenated.

The budget changes what is held and read at once, never a score: every product is computed in
tiles of one row chunk of queries, one row chunk of originals and one column chunk, the same
tiles (aligned to the arrays' chunks) whatever the budget, added up in column order.  A matrix
product's rounding depends on its shape, so blocks shaped by the budget gave scores that
differed in their last bits, enough to split or join ties of duplicated samples and move ranks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from math import lcm

import numpy as np
import zarr

from gradlake.lake.integrity import read_checked


DEFAULT_BUDGET = 1 << 30  # bytes of gradient slabs held at once


def query_block_rows(n_queries: int, n_docs: int, n_accumulators: int, budget: int, height: int = 1) -> int:
    """Queries per block so that the (block x originals) float64 accumulators fit the budget: whole row chunks of
    `height` (at least one), so that every block starts where a chunk does."""
    per_query = 8 * n_docs * max(1, n_accumulators + 2)
    return _whole_chunks(budget // 2 // per_query, height, n_queries)


def _whole_chunks(rows: int, height: int, limit: int) -> int:
    """At most `limit` rows (never fewer than one chunk's), rounded down to whole chunks of `height`."""
    return min(limit, max(height, rows // height * height))


def read_ahead(reads: list[Callable[[], np.ndarray]]) -> Iterator[np.ndarray]:
    """The results of `reads` in order, each next one read on a thread of its own while the caller
    works on the current one: at most two results are held at a time.  A failed read is raised here."""
    if not reads:
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="gradlake-read-ahead") as pool:
        pending = pool.submit(reads[0])
        try:
            for i in range(len(reads)):
                current = pending.result()
                if i + 1 < len(reads):
                    pending = pool.submit(reads[i + 1])
                yield current
                del current
        finally:
            pending.cancel()


def array_dots(queries: zarr.Array, docs: zarr.Array, q_start: int, q_stop: int, budget: int,
               doc_sq: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Dot products of query rows [q_start, q_stop) with every doc row, and both sides' squared norms.

    Reads whole chunks only: column slabs are whole column chunks (whole shards, one request
    each, where a shard's rows fit), as many as fit half the budget with every query and doc
    row (then each side is read once).  Otherwise a
    slab is one column chunk; 3/8 of the budget holds as many query rows as fit, and the docs
    stream past them in blocks of 1/8 (the block after the current one is read meanwhile), so
    the docs are read once per set of held queries.  ``doc_sq`` (the docs' squared norms, when
    already known) saves their recomputation.
    Returns (dots (q x n) float64, query squared norms (q,), doc squared norms (n,)).
    """
    q, n = q_stop - q_start, docs.shape[0]
    if queries.ndim != 2 or docs.ndim != 2 or docs.shape[1] != queries.shape[1]:
        raise ValueError(f"arrays {queries.name} {queries.shape} and {docs.name} {docs.shape} cannot be compared")
    numel = queries.shape[1]
    dots = np.zeros((q, n), dtype=np.float64)
    q_sq = np.zeros(q, dtype=np.float64)
    d_sq = np.zeros(n, dtype=np.float64) if doc_sq is None else doc_sq
    half = max(1, budget // 2)
    chunk_cols = min(numel, queries.chunks[1])
    object_cols = min(numel, (queries.shards or queries.chunks)[1])  # a shard is one request, its chunks one each
    unit = object_cols if 4 * (q + n) * object_cols <= half else chunk_cols
    if 4 * (q + n) * unit <= half:  # all rows of several column chunks (whole objects where they fit) at once
        width, q_rows, d_rows = unit * max(1, half // (4 * (q + n) * unit)), q, n
    else:  # one column chunk; held query rows and streamed doc rows in whole row chunks
        width = chunk_cols
        q_rows = _whole_chunks(3 * budget // 8 // (4 * width), queries.chunks[0], q)
        d_rows = _whole_chunks(budget // 8 // (4 * width), docs.chunks[0], n)
    # Every read of the pass in order, so that each is started while the one before is in use.
    plan: list[tuple[str, int, int, int, int]] = []
    for c0 in range(0, numel, width):
        c1 = min(numel, c0 + width)
        for a0 in range(0, q, q_rows):
            plan.append(("q", c0, c1, a0, min(q, a0 + q_rows)))
            plan.extend(("d", c0, c1, b0, min(n, b0 + d_rows)) for b0 in range(0, n, d_rows))

    def reader(side: str, c0: int, c1: int, r0: int, r1: int) -> Callable[[], np.ndarray]:
        array, offset = (queries, q_start) if side == "q" else (docs, 0)
        return lambda: read_checked(array, (slice(offset + r0, offset + r1), slice(c0, c1)), np.float32)

    a = None
    for (side, c0, c1, r0, r1), values in zip(plan, read_ahead([reader(*step) for step in plan])):
        if side == "q":
            a, a0, a1 = values, r0, r1
            _add_squares(q_sq[a0:a1], a, c0, chunk_cols, queries.chunks[0], q_start + a0)
            continue
        cols = _tiles(c1 - c0, chunk_cols, c0)
        for i0, i1 in _tiles(a1 - a0, queries.chunks[0], q_start + a0):
            for j0, j1 in _tiles(r1 - r0, docs.chunks[0], r0):
                for k0, k1 in cols:
                    dots[a0 + i0:a0 + i1, r0 + j0:r0 + j1] += a[i0:i1, k0:k1] @ values[j0:j1, k0:k1].T
        if doc_sq is None and a0 == 0:
            _add_squares(d_sq[r0:r1], values, c0, chunk_cols, docs.chunks[0], r0)
        del values  # not held while the block after next is read
    return dots, q_sq, d_sq


def _tiles(length: int, size: int, at: int) -> list[tuple[int, int]]:
    """[0, length) cut where chunks of `size` begin, position 0 being position `at` of the array."""
    cuts = [0] + list(range(-at % size or size, length, size)) + [length]
    return list(zip(cuts[:-1], cuts[1:]))


def _add_squares(out: np.ndarray, values: np.ndarray, c0: int, chunk_cols: int, height: int, at: int = 0) -> None:
    """Add each row's squared norm over these columns to `out`, tile by tile (the same sums whatever the block)."""
    for i0, i1 in _tiles(values.shape[0], height, at):
        for k0, k1 in _tiles(values.shape[1], chunk_cols, c0):
            out[i0:i1] += np.einsum("ij,ij->i", values[i0:i1, k0:k1], values[i0:i1, k0:k1], dtype=np.float64)


def blocks(queries: zarr.Group, docs: zarr.Group, arrays: list[str], n_accumulators: int,
           budget: int = DEFAULT_BUDGET) -> Iterator[tuple[int, int, str, np.ndarray, np.ndarray, np.ndarray]]:
    """For each query block, each array: (q_start, q_stop, array, dots, query sq. norms, doc sq. norms)."""
    n_queries, n_docs = queries[arrays[0]].shape[0], docs[arrays[0]].shape[0]
    height = lcm(*(queries[name].chunks[0] for name in arrays))  # every block starts a chunk of every array
    rows = query_block_rows(n_queries, n_docs, n_accumulators, budget, height)
    doc_sq: dict[str, np.ndarray] = {}
    for q_start in range(0, n_queries, rows):
        q_stop = min(n_queries, q_start + rows)
        for name in arrays:
            dots, q_sq, d_sq = array_dots(queries[name], docs[name], q_start, q_stop, budget, doc_sq.get(name))
            doc_sq[name] = d_sq
            yield q_start, q_stop, name, dots, q_sq, d_sq
