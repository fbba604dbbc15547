"""Top-k scores of many queries against a lake too large for memory: no full score matrix, ever.

The lake's vectors (a projection group's or a gradient group's arrays, row i of every array
being sample i) stream past the queries in row blocks, each read once per query block (once
in all when the queries fit) with the next block read on a thread meanwhile; each query keeps
its k best (score, row) pairs, merged with every new block.  Scores add over arrays: a group's
arrays are scored as one concatenated vector without being concatenated.

Order is total and deterministic: higher score first, equal scores by lower row.  Scores are
computed in tiles fixed by absolute positions (`query_tile` rows of queries times
`row_tile(arrays)` rows of the lake), never by the memory budget or by which rows a worker was
given: a matrix product's rounding depends on its shape, so a block shaped otherwise would give
a score that differs in its last bit and could swap two ranks.  Row ranges handed to workers
start and end on tile boundaries (`row_ranges`), so partial top-ks merged (`merge_topk`) equal
the one-process result exactly.

NaN is refused (a NaN score has no rank): in queries at once, in the lake's vectors by
`read_checked`, and in scores (inf times zero) where found.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import lcm

import numpy as np
import zarr

from gradlake.lake.integrity import read_checked
from gradlake.tasks.evaluate.similarity import read_ahead

QUERY_TILE = 1024  # query rows per product tile: a multiple of every query block
ROW_TILE = 512  # at least this many lake rows per product tile (rounded up to whole row chunks)
DEFAULT_BUDGET = 1 << 30  # bytes of lake rows and queries held at once
BLOCK_BYTES = 64 << 20  # a row block read at most: larger ones gain nothing, and the first read is never overlapped
METRICS = ("dot", "cosine")


@dataclass
class TopK:
    """Each query's k best rows: `scores` (q x k) float32 and `rows` (q x k) int64, best first, ties by lower row.

    Fewer than k columns where fewer rows were scored."""

    scores: np.ndarray
    rows: np.ndarray


def row_tile(arrays: list[zarr.Array]) -> int:
    """Lake rows per product tile: whole row chunks of every array, at least ROW_TILE rows."""
    height = lcm(*(a.chunks[0] for a in arrays))
    return height * -(-ROW_TILE // height)


def row_ranges(n_rows: int, rows_per_range: int, tile: int) -> list[tuple[int, int]]:
    """[start, stop) ranges covering n_rows, each a whole number of tiles (`rows_per_range` rounded up to one)."""
    size = tile * max(1, -(-rows_per_range // tile))
    return [(start, min(n_rows, start + size)) for start in range(0, n_rows, size)]


def _select(scores: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each line's k best of candidates whose columns are in increasing row order; kept in that order.

    The k-th best value is found by a partition; all above it are kept and, of those equal to it,
    the first ones (lowest rows) until k: ties are broken by row without a sort."""
    q, m = scores.shape
    if m <= k:
        return scores, rows
    kth = np.partition(scores, m - k, axis=1)[:, m - k:m - k + 1]
    above = scores > kth
    equal = scores == kth
    wanted = k - above.sum(axis=1, keepdims=True)
    keep = above | (equal & (np.cumsum(equal, axis=1) <= wanted))
    picked = np.nonzero(keep)  # row-major: each line's k columns, in column order
    return scores[picked].reshape(q, k), rows[picked].reshape(q, k)


def _best_first(scores: np.ndarray, rows: np.ndarray) -> TopK:
    """Order each line by score, highest first; equal scores keep their (increasing row) order."""
    order = np.argsort(-scores, axis=1, kind="stable")
    return TopK(np.take_along_axis(scores, order, axis=1), np.take_along_axis(rows, order, axis=1))


def merge_topk(parts: list[TopK], k: int) -> TopK:
    """The k best of several top-ks of the same queries over disjoint rows (the fan-out's partial results)."""
    if not parts:
        raise ValueError("no top-k to merge")
    scores = np.concatenate([p.scores for p in parts], axis=1)
    rows = np.concatenate([p.rows for p in parts], axis=1)
    by_row = np.argsort(rows, axis=1, kind="stable")
    scores, rows = np.take_along_axis(scores, by_row, axis=1), np.take_along_axis(rows, by_row, axis=1)
    if np.isnan(scores).any():
        raise ValueError("a partial top-k holds NaN scores; score its rows again")
    return _best_first(*_select(scores, rows, k))


def check_queries(queries: list[np.ndarray], arrays: list[zarr.Array]) -> None:
    """Queries as the arrays they are scored against expect them: one (q x columns) matrix per array, no NaN."""
    if len(queries) != len(arrays) or not arrays:
        raise ValueError(f"{len(queries)} query matrices for {len(arrays)} lake arrays: give one per array")
    for query, array in zip(queries, arrays):
        if query.ndim != 2 or query.shape[1] != array.shape[1] or query.shape[0] != queries[0].shape[0]:
            raise ValueError(f"queries of shape {query.shape} cannot be scored against {array.name} {array.shape}: "
                             f"expected ({queries[0].shape[0]}, {array.shape[1]})")
        if np.isnan(query).any():
            bad = np.flatnonzero(np.isnan(query).any(axis=1))
            raise ValueError(f"queries {bad[:5].tolist()} hold NaN against {array.name}: a NaN score has no rank")


def query_norms(queries: list[np.ndarray]) -> np.ndarray:
    """Each query's norm over all arrays (float64), for cosine scores."""
    return np.sqrt(sum(np.einsum("ij,ij->i", q, q, dtype=np.float64) for q in queries))


def block_rows(arrays: list[zarr.Array], n_queries: int, budget: int, tile: int) -> int:
    """Lake rows per read: whole tiles, so that two blocks (the current one and the one read ahead) and the
    block's scores for `n_queries` (with the candidates' copy) fit half the budget; at most BLOCK_BYTES, so that
    reading overlaps the products from the second block on."""
    width = sum(a.shape[1] for a in arrays)
    rows = min(budget // 2 // (4 * (2 * width + 2 * n_queries)), BLOCK_BYTES // (4 * width))
    return tile * max(1, rows // tile)


def query_block_rows(queries: list[np.ndarray], budget: int) -> int:
    """Queries per pass over the lake: whole QUERY_TILEs holding at most a quarter of the budget."""
    per_query = 4 * sum(q.shape[1] for q in queries)
    return QUERY_TILE * max(1, budget // 4 // per_query // QUERY_TILE)


def score_topk(queries: list[np.ndarray], arrays: list[zarr.Array], k: int, start: int = 0, stop: int | None = None,
               metric: str = "dot", budget: int = DEFAULT_BUDGET) -> TopK:
    """Each query's k best rows among lake rows [start, stop) of `arrays` (scores summed over arrays).

    queries: one (q x columns_a) float32 matrix per array (`arrays[a]` is (n x columns_a)).
    metric: 'dot' (the dot product) or 'cosine' (over all arrays together; a zero vector scores 0).
    `start` and `stop` must lie on tile boundaries (`row_ranges`) unless `stop` is the last row.
    Returns TopK with rows as absolute lake rows.
    """
    if metric not in METRICS:
        raise ValueError(f"metric {metric!r} is not known; use one of {METRICS}")
    if k < 1:
        raise ValueError(f"k={k}: keep at least one row per query")
    check_queries(queries, arrays)
    n = arrays[0].shape[0]
    stop = n if stop is None else stop
    tile = row_tile(arrays)
    if any(a.shape[0] != n for a in arrays) or not 0 <= start <= stop <= n or start % tile or (stop % tile and stop != n):
        raise ValueError(f"rows [{start}, {stop}) of arrays with {[a.shape[0] for a in arrays]} rows: every array "
                         f"needs the same rows, and a range starts and ends on a multiple of {tile} (or the last row)")
    queries = [np.ascontiguousarray(q, dtype=np.float32) for q in queries]
    if metric == "cosine":
        norms = query_norms(queries)
        norms[norms == 0] = 1.0
        queries = [(q / norms[:, None]).astype(np.float32) for q in queries]
    per_pass = query_block_rows(queries, budget)
    step = block_rows(arrays, min(per_pass, queries[0].shape[0]), budget, tile)
    blocks = [(b0, min(stop, b0 + step)) for b0 in range(start, stop, step)]
    parts = []
    for q0 in range(0, queries[0].shape[0], per_pass):  # each pass reads the rows again: whole query tiles per pass
        held = [q[q0:q0 + per_pass] for q in queries]
        parts.append(_pass(held, arrays, blocks, k, tile, metric))
    return TopK(np.concatenate([p.scores for p in parts]), np.concatenate([p.rows for p in parts]))


def _pass(queries: list[np.ndarray], arrays: list[zarr.Array], blocks: list[tuple[int, int]], k: int, tile: int,
          metric: str) -> TopK:
    """One pass over the row blocks for queries held in memory."""
    q = queries[0].shape[0]
    best_scores = np.empty((q, 0), np.float32)
    best_rows = np.empty((q, 0), np.int64)

    def reader(b0: int, b1: int):
        return lambda: [read_checked(a, (slice(b0, b1), slice(None)), np.float32) for a in arrays]

    for (b0, b1), values in zip(blocks, read_ahead([reader(*b) for b in blocks])):
        scores = np.zeros((q, b1 - b0), np.float32)
        for t0 in range(b0, b1, tile):  # tiles start at multiples of `tile`: b0 is one
            t1 = min(b1, t0 + tile)
            for i0 in range(0, q, QUERY_TILE):
                i1 = min(q, i0 + QUERY_TILE)
                out = scores[i0:i1, t0 - b0:t1 - b0]
                with np.errstate(invalid="ignore"):  # NaN (inf times 0) is found and named below
                    for query, value in zip(queries, values):
                        out += query[i0:i1] @ value[t0 - b0:t1 - b0].T
            if metric == "cosine":
                norms = np.sqrt(sum(np.einsum("ij,ij->i", v[t0 - b0:t1 - b0], v[t0 - b0:t1 - b0], dtype=np.float64)
                                    for v in values))
                norms[norms == 0] = np.inf  # a zero vector scores 0
                scores[:, t0 - b0:t1 - b0] /= norms.astype(np.float32)
        del values
        if np.isnan(scores).any():
            bad = (np.flatnonzero(np.isnan(scores).any(axis=0))[:5] + b0).tolist()
            raise ValueError(f"rows {bad} score NaN against some query (an infinite value times zero); "
                             "their vectors cannot be ranked")
        candidates = np.concatenate([best_scores, scores], axis=1)
        rows = np.concatenate([best_rows, np.broadcast_to(np.arange(b0, b1, dtype=np.int64), scores.shape)], axis=1)
        best_scores, best_rows = _select(candidates, rows, k)
    return _best_first(best_scores, best_rows)
