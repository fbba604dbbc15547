"""Attribution scores in the lake: one Zarr group per method, queries x training samples, written block by block.

Every attribution method (Kronfluence's influence strategies, TRAK, gradient cosine or
dot products, BM25, a dense sentence model) ends in the same place and shape, so the
ground truth (LDS, counterfactual removal) can evaluate any of them the same way:

```
<lake>/attribution/<model>/<checkpoint>/<train dataset>/<query dataset>.<query variant>/<method>/   a Zarr v3 group
    scores          (n_query, n_train) float32 (or float16), chunked (query_rows, train_cols)
    query           (n_query,) string      query sample ids
    train           (n_train,) string      training sample keys ('variant:id')
    block_complete  (n_query_blocks, n_train_blocks) uint8   1 once that chunk of scores is written
```

Every chunk object carries a CRC32C, the completion flags too: one object per block (``block_complete/c/<qb>/<tb>``),
so a damaged flag is named by its block and rewritten alone.  Groups written before that hold their flags in one
object without a checksum; they still read, verify and repair.

Its path is `layout.score_group_path`.  The group's attribute ``gradlake`` holds the
method, its settings and lineage, the compute seconds and ``complete`` (set last).  A score
matrix larger than memory is fine: it is written and read a chunk-aligned block at a time,
and a killed run resumes at the first block not flagged complete.  Positive scores mean
"this training sample helped the model on this query" (lower query loss), the sign convention of
Kronfluence and TRAK.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec

from gradlake.lake import layout
from gradlake.lake.integrity import read_checked
from gradlake.lake.store import LakeError, LakeStore, scan_json

QUERY_ROWS = 256


class ScoreGroup:
    """A method's score matrix in the lake: create or reopen, write blocks, read back."""

    def __init__(self, store: LakeStore, path: str, group: zarr.Group):
        self.store, self.path, self.group = store, path, group

    # -- creating and reopening -----------------------------------------------------------

    @classmethod
    def create(cls, store: LakeStore, path: str, query_ids: list[str], train_ids: list[str], meta: dict,
               dtype: str = "float32", query_rows: int = QUERY_ROWS, train_cols: int | None = None) -> "ScoreGroup":
        """The group at `path` for these ids and settings: reopened when it exists with the same ones, else made.

        A group that exists with other ids or settings is an error, never overwritten silently.
        """
        existing = cls.open(store, path, missing_ok=True)
        if existing is not None:
            stored = existing.meta
            same_ids = (list(existing.group["query"][:]) == list(query_ids)
                        and list(existing.group["train"][:]) == list(train_ids))
            if stored.get("settings") != meta.get("settings") or not same_ids:
                raise LakeError(f"scores at {path} were computed with other settings or samples "
                                f"({stored.get('settings')}); remove that group or choose another method name")
            return existing
        n_query, n_train = len(query_ids), len(train_ids)
        if n_query == 0 or n_train == 0:
            raise LakeError(f"no scores to store: {n_query} queries x {n_train} training samples")
        itemsize = np.dtype(dtype).itemsize
        rows = max(1, min(n_query, query_rows))
        cols = min(layout.column_chunk(rows, n_train, itemsize), train_cols or n_train)
        root = zarr.open_group(store.zarr_store, path=path, mode="w", zarr_format=3)
        # A CRC32C per chunk: a damaged block fails on read; a missing one reads as NaN (scores are finite).
        root.create_array("scores", shape=(n_query, n_train), chunks=(rows, cols), dtype=dtype, fill_value=np.nan,
                          compressors=[Crc32cCodec()], dimension_names=("query", "train"))
        for name, ids in (("query", query_ids), ("train", train_ids)):
            array = root.create_array(name, shape=(len(ids),), dtype=str, chunks=(len(ids),), dimension_names=(name,))
            array[:] = np.asarray(ids, dtype=str)
        n_blocks = (-(-n_query // rows), -(-n_train // cols))
        root.create_array("block_complete", shape=n_blocks, chunks=(1, 1), dtype="uint8", fill_value=0,
                          compressors=[Crc32cCodec()], dimension_names=("query_block", "train_block"))
        root.attrs["gradlake"] = {**meta, "complete": False, "block": [rows, cols]}
        return cls(store, path, root)

    @classmethod
    def open(cls, store: LakeStore, path: str, missing_ok: bool = False) -> "ScoreGroup | None":
        try:
            group = zarr.open_group(store.zarr_store, path=path, mode="r+", zarr_format=3)
        except FileNotFoundError:
            if missing_ok:
                return None
            raise LakeError(f"no attribution scores at {store.url}/{path}") from None
        if "gradlake" not in group.attrs or "scores" not in group:
            if missing_ok:
                return None
            raise LakeError(f"{store.url}/{path} is not a score group (no 'gradlake' attrs or 'scores' array)")
        return cls(store, path, group)

    # -- what it holds --------------------------------------------------------------------

    @property
    def meta(self) -> dict:
        return dict(self.group.attrs["gradlake"])

    @property
    def block(self) -> tuple[int, int]:
        rows, cols = self.meta["block"]
        return rows, cols

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.group["scores"].shape)

    def query_ids(self) -> list[str]:
        return [str(x) for x in self.group["query"][:]]

    def train_ids(self) -> list[str]:
        return [str(x) for x in self.group["train"][:]]

    def pending_blocks(self) -> list[tuple[int, int]]:
        """(query block, train block) indexes not yet written, in row-major order (a damaged flag object: one
        LakeError naming it)."""
        done = read_checked(self.group["block_complete"], slice(None))
        return [tuple(map(int, ix)) for ix in np.argwhere(done == 0)]

    def bounds(self, qb: int, tb: int) -> tuple[slice, slice]:
        rows, cols = self.block
        n_query, n_train = self.shape
        return slice(qb * rows, min(n_query, (qb + 1) * rows)), slice(tb * cols, min(n_train, (tb + 1) * cols))

    # -- writing --------------------------------------------------------------------------

    def write_block(self, qb: int, tb: int, values: np.ndarray) -> None:
        """Write one block's scores, then flag it complete (the flag is the last write)."""
        qs, ts = self.bounds(qb, tb)
        expected = (qs.stop - qs.start, ts.stop - ts.start)
        if values.shape != expected:
            raise ValueError(f"block ({qb}, {tb}) of {self.path} has shape {expected}, got {values.shape}")
        if not np.isfinite(values).all():
            raise ValueError(f"block ({qb}, {tb}) of {self.path} holds non-finite scores")
        self.group["scores"][qs, ts] = values.astype(self.group["scores"].dtype)
        self.group["block_complete"][qb, tb] = 1

    def write_rows(self, q_start: int, values: np.ndarray) -> None:
        """Write whole rows of scores (all training samples) for queries starting at a block boundary."""
        rows, _ = self.block
        if q_start % rows:
            raise ValueError(f"rows must start at a multiple of {rows}, not {q_start}")
        n_train = self.shape[1]
        for tb in range(-(-n_train // self.block[1])):
            qb = q_start // rows
            qs, ts = self.bounds(qb, tb)
            self.write_block(qb, tb, values[: qs.stop - qs.start, ts])

    def clear(self, blocks: list[tuple[int, int]]) -> None:
        """Mark blocks not written (found damaged), so that the next run recomputes exactly them."""
        for qb, tb in blocks:
            self.group["block_complete"][qb, tb] = 0
        if blocks:
            self.group.attrs["gradlake"] = {**self.meta, "complete": False}

    def finish(self, **extra) -> None:
        """Mark the group complete (after every block is), with extra facts such as compute seconds."""
        pending = self.pending_blocks()
        if pending:
            raise LakeError(f"{self.path}: {len(pending)} blocks are not written yet, e.g. {pending[0]}")
        self.group.attrs["gradlake"] = {**self.meta, **json.loads(json.dumps(extra)), "complete": True}

    # -- reading --------------------------------------------------------------------------

    def read(self) -> np.ndarray:
        """The whole matrix (queries x training samples); one LakeError if any block is missing or damaged, naming it."""
        return self.rows(0, self.shape[0])

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Scores of queries [start, stop) x all training samples, through the checked reader: one LakeError naming the
        group, array and chunk object if a block is damaged or missing (scores are finite: a missing one reads as NaN)."""
        if not self.meta.get("complete"):
            raise LakeError(f"scores at {self.path} are not complete ({len(self.pending_blocks())} blocks missing); run "
                            "the stage that writes them again")
        values = read_checked(self.group["scores"], slice(start, stop), dtype=np.float32, nan_ok=True)
        if np.isnan(values).any():
            rows, cols = self.block
            qb, tb = (int(i) for i in (np.argwhere(np.isnan(values))[0] + (start, 0)) // (rows, cols))
            qs, ts = self.bounds(qb, tb)
            raise LakeError(f"scores at {self.path}: block ({qb}, {tb}) (queries {qs.start}-{qs.stop - 1}, training "
                            f"samples {ts.start}-{ts.stop - 1}) reads as NaN: its chunk object scores/c/{qb}/{tb} is "
                            "missing; run `gradlake verify --repair` on the lake, then the stage that wrote it again")
        return values

    def row_blocks(self) -> Iterator[tuple[int, np.ndarray]]:
        """(first query, scores of a block of query rows x all training samples), for matrices larger than memory;
        each block read as `rows` reads it."""
        rows, _ = self.block
        for q0 in range(0, self.shape[0], rows):
            yield q0, self.rows(q0, min(self.shape[0], q0 + rows))

    def check(self) -> None:
        """Read every block once (a block of query rows at a time): one LakeError naming the first that is damaged."""
        for _ in self.row_blocks():
            pass


def list_score_groups(store: LakeStore) -> list[dict]:
    """Every score group in the lake: its path (relative to the lake) and its attributes; a group whose
    metadata is damaged as its path and `damaged` (the one-line reason)."""
    out = []
    for path, record, damage in scan_json(store, f"{layout.SCORE_GROUPS}/zarr.json"):
        attrs = (record or {}).get("attributes", {}).get("gradlake")
        if damage is not None:
            out.append({"path": path, "damaged": damage})
        elif attrs is not None:
            out.append({"path": path, **attrs})
    return out
