"""How a shard's samples are grouped into backward passes.

Chats differ in length, and a batch is padded to its longest sample: batches of eight in
dataset order spend about a third of their tokens on padding on the probe set.  With a
token budget, the samples of a window of whole row-chunks are sorted by length (longest
first, so that the largest batch comes first) and packed greedily: a batch takes the next
sample while its padded size, samples times the longest, stays within the budget and it
holds at most `max_samples`.  A sample longer than the budget runs alone.

The plan depends only on the shard, the lengths and these settings, never on which chunks
are still to do: a resumed run computes the same batches as an uninterrupted one, and two
runs with the same settings write the same bits.  Each sample's gradient goes back to its
own row, so chunks and their completion flags are as before.

Windows bound host memory: a row-chunk is written once all its rows have come, so with
rows spread over many batches every chunk of a window may be waiting at once.  A window
holds as many whole chunks as fit in `window_bytes` of stored values (at least one).
"""

from __future__ import annotations

import numpy as np


WINDOW_BYTES = 2 << 30  # stored values a window of chunks may hold on the host while its rows arrive


def window_chunks(chunk_rows: int, bytes_per_sample: int, window_bytes: int = WINDOW_BYTES) -> int:
    """Whole row-chunks per window: as many as `window_bytes` holds, at least one."""
    return max(1, window_bytes // max(1, chunk_rows * bytes_per_sample))


def shard_batches(lengths: np.ndarray, start: int, max_samples: int, token_budget: int | None = None,
                  window_rows: int | None = None) -> list[np.ndarray]:
    """The batches of a shard whose samples begin at `start`, as arrays of sample indices.

    `lengths[i]` is the token count of sample `start + i`.  Without a token budget:
    consecutive batches of `max_samples` in dataset order.  With one: windows of
    `window_rows` samples (the whole shard when None), each sorted longest first and packed.
    """
    n = len(lengths)
    if max_samples < 1:
        raise ValueError(f"samples per batch must be at least 1, not {max_samples}")
    if token_budget is None:
        return [np.arange(start + o, start + min(o + max_samples, n)) for o in range(0, n, max_samples)]
    if token_budget < 1:
        raise ValueError(f"token budget must be at least 1 token, not {token_budget}")
    step = n if window_rows is None else max(1, window_rows)
    batches = []
    for w0 in range(0, n, step):
        part = np.asarray(lengths[w0:w0 + step])
        order = np.argsort(-part, kind="stable")  # longest first; equal lengths keep dataset order
        batch: list[int] = []
        longest = 0
        for i in order:
            size = int(part[i])
            if batch and (len(batch) + 1 > max_samples or (len(batch) + 1) * max(longest, size) > token_budget):
                batches.append(np.asarray(batch) + start + w0)
                batch, longest = [], 0
            batch.append(int(i))
            longest = max(longest, size)
        if batch:
            batches.append(np.asarray(batch) + start + w0)
    return batches


def padded_tokens(lengths: np.ndarray, batches: list[np.ndarray], start: int = 0) -> int:
    """Tokens processed, padding included, when `lengths` (of samples from `start`) run in `batches`."""
    return sum(len(b) * int(lengths[b - start].max()) for b in batches)
