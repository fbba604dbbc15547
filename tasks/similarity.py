"""Block-wise similarities straight from Zarr: queries against all originals, in bounded memory.

For one query block at a time, each array's dot products with every original are
accumulated over column slabs read from the lake, sized so that the query slab and
the originals' slab together stay within the memory budget.  Squared norms come from the
same slabs.  Dot products and squared norms add over tensors, so any set of tensors
(a layer group, the full gradient, a projection group's arrays) gets its cosine
without its vectors ever being concatenated.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import zarr

from gradlake.lake.integrity import read_checked

DEFAULT_BUDGET = 1 << 30  # bytes of gradient slabs held at once


def query_block_rows(n_queries: int, n_docs: int, n_accumulators: int, budget: int) -> int:
    """Queries per block so that the (block x originals) float64 accumulators fit the budget."""
    per_query = 8 * n_docs * max(1, n_accumulators + 2)
    return max(1, min(n_queries, budget // 2 // per_query))


def array_dots(queries: zarr.Array, docs: zarr.Array, q_start: int, q_stop: int, budget: int,
               doc_sq: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Dot products of query rows [q_start, q_stop) with every doc row, and both sides' squared norms.

    Reads whole chunks only: column slabs are whole column chunks, as many as fit half
    the budget with every query and doc row; when even one column chunk of all rows does
    not fit, rows are cut into blocks and the docs' blocks are read once per query block.
    ``doc_sq`` (the docs' squared norms, when already known) saves their recomputation.
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
    if 4 * (q + n) * chunk_cols <= half:  # all rows of several column chunks at once
        width, q_rows, d_rows = chunk_cols * max(1, half // (4 * (q + n) * chunk_cols)), q, n
    else:  # one column chunk, rows in blocks that are whole row chunks
        width = chunk_cols
        rows = max(1, half // (8 * chunk_cols))
        q_rows = min(q, max(queries.chunks[0], rows // queries.chunks[0] * queries.chunks[0]))
        d_rows = min(n, max(docs.chunks[0], rows // docs.chunks[0] * docs.chunks[0]))
    for c0 in range(0, numel, width):
        c1 = min(numel, c0 + width)
        for a0 in range(0, q, q_rows):
            a1 = min(q, a0 + q_rows)
            a = read_checked(queries, (slice(q_start + a0, q_start + a1), slice(c0, c1)), np.float32)
            q_sq[a0:a1] += np.einsum("ij,ij->i", a, a, dtype=np.float64)
            for b0 in range(0, n, d_rows):
                b1 = min(n, b0 + d_rows)
                b = read_checked(docs, (slice(b0, b1), slice(c0, c1)), np.float32)
                dots[a0:a1, b0:b1] += a @ b.T
                if doc_sq is None and a0 == 0:
                    d_sq[b0:b1] += np.einsum("ij,ij->i", b, b, dtype=np.float64)
    return dots, q_sq, d_sq


def blocks(queries: zarr.Group, docs: zarr.Group, arrays: list[str], n_accumulators: int,
           budget: int = DEFAULT_BUDGET) -> Iterator[tuple[int, int, str, np.ndarray, np.ndarray, np.ndarray]]:
    """For each query block, each array: (q_start, q_stop, array, dots, query sq. norms, doc sq. norms)."""
    n_queries, n_docs = queries[arrays[0]].shape[0], docs[arrays[0]].shape[0]
    rows = query_block_rows(n_queries, n_docs, n_accumulators, budget)
    doc_sq: dict[str, np.ndarray] = {}
    for q_start in range(0, n_queries, rows):
        q_stop = min(n_queries, q_start + rows)
        for name in arrays:
            dots, q_sq, d_sq = array_dots(queries[name], docs[name], q_start, q_stop, budget, doc_sq.get(name))
            doc_sq[name] = d_sq
            yield q_start, q_stop, name, dots, q_sq, d_sq
