"""Gradient groups: create, write chunk by chunk, resume, finalize.

A group holds the exact tokens that were differentiated and one array per parameter
tensor, stored in row-chunks whose height (``chunk_rows``) is fixed when the group is
created.  Completion is recorded per row-chunk (``shard_complete[k]``), not per shard
of whichever run wrote it: shard size and batch size are a run's scheduling choices,
so a run with other ones recognises the group (they are not in its fingerprint),
knows exactly which samples are done, and writes only the chunks still missing, each
whole and once.  An interrupted run resumes to the same bytes as an uninterrupted one.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from dataclasses import asdict, dataclass

import numpy as np
import zarr

from gradlake.lake import layout
from gradlake.lake.store import LakeError, LakeStore

ATTR = "gradlake"
MODES = ("store", "mean", "mean_normalized")
STORE_DTYPES = ("float32", "float16")


@dataclass(frozen=True)
class GradientPlan:
    """What a gradient group holds, and the row-chunk height it is stored in."""

    n_samples: int
    parameters: dict[str, list[int]]
    mode: str
    dtype: str
    max_tokens: int
    chunk_rows: int  # fixed when the group is created; layout, not identity (left out of the fingerprint)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise LakeError(f"mode {self.mode!r} is not known; use one of {MODES}")
        if self.dtype not in STORE_DTYPES:
            raise LakeError(f"storage dtype {self.dtype!r} is not supported; use one of {STORE_DTYPES}")
        if self.n_samples < 1:
            raise LakeError("the dataset has no samples; a gradient group needs at least one")
        if self.chunk_rows < 1:
            raise LakeError(f"chunk height {self.chunk_rows} must be at least 1 sample")

    def identity(self) -> dict:
        """The fields that determine the stored values: everything but the chunk height."""
        return {k: v for k, v in asdict(self).items() if k != "chunk_rows"}

    @property
    def n_chunks(self) -> int:
        return layout.n_chunks(self.n_samples, self.chunk_rows)

    def chunk_bounds(self, index: int) -> tuple[int, int]:
        return layout.chunk_bounds(index, self.n_samples, self.chunk_rows)

    def check_shard_size(self, shard_size: int, path: str) -> None:
        check_shard_size(shard_size, self.chunk_rows, path)

    def numel(self, name: str) -> int:
        return int(np.prod(self.parameters[name]))


def check_shard_size(shard_size: int, chunk_rows: int, path: str) -> None:
    """One clear error unless shards of `shard_size` are whole chunks (so two shards never write one chunk)."""
    if shard_size < 1 or shard_size % chunk_rows:
        raise LakeError(
            f"shard_size {shard_size} must be a multiple of {chunk_rows}, the chunk height of the group {path!r} "
            f"(fixed by the batch size of the run that created it); use e.g. "
            f"{chunk_rows * max(1, -(-shard_size // chunk_rows))}"
        )


def fingerprint(lineage: dict, plan: GradientPlan) -> str:
    """What makes two extractions the same: their lineage and what the group holds (not when or how they ran)."""
    stable = {k: v for k, v in lineage.items() if k not in ("created_at", "gradlake_version")}
    text = json.dumps({"lineage": stable, "plan": plan.identity()}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _read_meta(store: LakeStore, path: str) -> dict:
    """The group's `gradlake` attribute, {} where there is no group (or one whose creation did not finish)."""
    try:
        group = zarr.open_group(store.zarr_store, path=path, mode="r", zarr_format=3)
    except FileNotFoundError:
        return {}
    return _checked(dict(group.attrs).get(ATTR) or {}, path)


def _checked(meta: dict, path: str) -> dict:
    if meta and "chunk_rows" not in meta.get("plan", {}):
        raise LakeError(
            f"the group at {path!r} was written by an older gradlake that recorded completion per shard; "
            "remove that group to extract it again, or use another variant name"
        )
    return meta


def stored_chunk_rows(store: LakeStore, path: str) -> int | None:
    """The chunk height of the group at `path`, or None if there is none yet."""
    meta = _read_meta(store, path)
    return int(meta["plan"]["chunk_rows"]) if meta else None


class GradientGroup:
    """One extraction's Zarr group in the lake."""

    def __init__(self, store: LakeStore, path: str, group: zarr.Group):
        self.store, self.path, self.group = store, path, group
        meta = _checked(dict(group.attrs).get(ATTR) or {}, path)
        self.lineage: dict = meta.get("lineage", {})
        self.plan = GradientPlan(**meta["plan"]) if "plan" in meta else None

    @classmethod
    def open(cls, store: LakeStore, path: str) -> "GradientGroup":
        try:
            group = zarr.open_group(store.zarr_store, path=path, mode="r+", zarr_format=3)
        except FileNotFoundError as err:
            raise LakeError(f"no gradient group at {path!r} in {store.url}") from err
        return cls(store, path, group)

    @classmethod
    def create(
        cls,
        store: LakeStore,
        path: str,
        plan: GradientPlan,
        lineage: dict,
        sample_ids: list[str],
        input_ids: np.ndarray,
        label_mask: np.ndarray,
    ) -> "GradientGroup":
        """Create the group, or reopen it if the same extraction already made it; refuse a different one."""
        if cls.check_path(store, path, plan, lineage):
            return cls.open(store, path)
        # Attrs are written last: a group without them is a creation that did not finish.
        group = zarr.open_group(store.zarr_store, path=path, mode="w", zarr_format=3)
        n, width = input_ids.shape
        ids = group.create_array("sample", shape=(n,), dtype=str, chunks=(n,), dimension_names=["sample"])
        ids[:] = np.asarray(sample_ids, dtype=str)
        rows = layout.token_rows(n, width)
        tokens = group.create_array("input_ids", shape=(n, width), dtype="int32", chunks=(rows, width),
                                    dimension_names=["sample", "token"], fill_value=-1)
        tokens[:] = input_ids.astype("int32")
        mask = group.create_array("label_mask", shape=(n, width), dtype="bool", chunks=(rows, width),
                                  dimension_names=["sample", "token"], fill_value=False)
        mask[:] = label_mask
        lengths = group.create_array("n_tokens", shape=(n,), dtype="int32", chunks=(n,), dimension_names=["sample"])
        lengths[:] = (input_ids >= 0).sum(axis=1).astype("int32")
        # One object per flag: runs writing different shards never write the same object.
        group.create_array("shard_complete", shape=(plan.n_chunks,), dtype="uint8", chunks=(1,),
                           dimension_names=["chunk"], fill_value=0, attributes={"chunk_rows": plan.chunk_rows})
        itemsize = np.dtype(plan.dtype).itemsize
        for name in plan.parameters:
            numel = plan.numel(name)
            flat = f"{name}.flat"
            if plan.mode == "store":
                cols = layout.column_chunk(plan.chunk_rows, numel, itemsize)
                group.create_array(name, shape=(n, numel), dtype=plan.dtype, chunks=(plan.chunk_rows, cols),
                                   dimension_names=["sample", flat], compressors=None, fill_value=0,
                                   attributes={"param_shape": plan.parameters[name]})
            else:
                cols = layout.column_chunk(1, numel, 8)
                group.create_array(f"{name}.partial_sum", shape=(plan.n_chunks, numel), dtype="float64",
                                   chunks=(1, cols), dimension_names=["chunk", flat], compressors=None, fill_value=0)
                group.create_array(name, shape=(numel,), dtype=plan.dtype, chunks=(cols,), dimension_names=[flat],
                                   compressors=None, fill_value=0, attributes={"param_shape": plan.parameters[name]})
        lineage = {**lineage, "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
        group.attrs[ATTR] = {"lineage": lineage, "plan": asdict(plan), "fingerprint": fingerprint(lineage, plan)}
        return cls.open(store, path)

    @staticmethod
    def check_path(store: LakeStore, path: str, plan: GradientPlan, lineage: dict) -> bool:
        """True if the same extraction already made the group at `path`, False if there is none; else one clear error.

        Only what determines the values counts (lineage and `GradientPlan.identity`): a run with
        another shard size or batch size recognises the group.
        """
        meta = _read_meta(store, path)
        if not meta:
            return False
        if meta.get("fingerprint") == fingerprint(lineage, plan):
            return True
        old, new = meta.get("lineage", {}), lineage
        differ = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k) and k not in ("created_at", "gradlake_version"))
        held, asked = {k: v for k, v in meta.get("plan", {}).items() if k != "chunk_rows"}, plan.identity()
        differ += sorted(f"plan.{k}" for k in set(held) | set(asked) if held.get(k) != asked.get(k))
        raise LakeError(
            f"the lake already holds a different extraction at {path!r} (differs in {differ or ['fingerprint']}); "
            "use another variant name, or remove that group to replace it"
        )

    # -- chunks and shards ----------------------------------------------------------------

    def done_chunks(self) -> np.ndarray:
        """One bool per row-chunk: True once it is written in full."""
        return self.group["shard_complete"][:].astype(bool)

    def pending_chunks(self, start: int = 0, stop: int | None = None) -> list[int]:
        """The row-chunks holding samples in [start, stop) that are not written yet."""
        done = self.done_chunks()
        stop = self.plan.n_samples if stop is None else stop
        return [k for k in layout.chunks_in(start, stop, self.plan.chunk_rows) if not done[k]]

    def shard_bounds(self, index: int, shard_size: int) -> tuple[int, int]:
        """Samples [start, stop) of shard `index` of a run cutting this group in shards of `shard_size`."""
        self.plan.check_shard_size(shard_size, self.path)
        return layout.shard_bounds(index, self.plan.n_samples, shard_size)

    def pending_shards(self, shard_size: int) -> list[int]:
        """Shards of `shard_size` samples that hold any sample not written yet."""
        self.plan.check_shard_size(shard_size, self.path)
        per_shard = shard_size // self.plan.chunk_rows
        return sorted({k // per_shard for k in np.flatnonzero(~self.done_chunks()).tolist()})

    def write_chunk(self, index: int, arrays: dict[str, np.ndarray]) -> None:
        """Store mode: write row-chunk `index` of the named arrays, whole (every column chunk of its rows)."""
        start, stop = self.plan.chunk_bounds(index)
        for name, values in arrays.items():
            if values.shape[0] != stop - start:
                raise LakeError(f"chunk {index} of {name!r} holds samples {start}-{stop - 1}; got {values.shape[0]} rows")
            self.group[name][start:stop] = values.astype(self.plan.dtype, copy=False)

    def write_partial_sum(self, index: int, sums: dict[str, np.ndarray]) -> None:
        """Mean modes: write row-chunk `index`'s sum over its samples, in float64."""
        for name, values in sums.items():
            self.group[f"{name}.partial_sum"][index] = values.astype("float64", copy=False)

    def mark_complete(self, index: int) -> None:
        """Record that row-chunk `index` is fully written; the last write of a chunk."""
        self.group["shard_complete"][index] = 1

    def finalize(self) -> bool:
        """For mean modes, combine the chunks' sums into the mean; True when the group is complete."""
        if self.pending_chunks():
            return False
        if self.plan.mode != "store":
            for name in self.plan.parameters:
                # Added one chunk at a time in chunk order: the result depends on the chunks' sums
                # alone, never on which shard or run wrote which chunk, or when.
                sums = self.group[f"{name}.partial_sum"]
                total = np.zeros(sums.shape[1], dtype=np.float64)
                for k in range(sums.shape[0]):
                    total += sums[k]
                self.group[name][:] = (total / self.plan.n_samples).astype(self.plan.dtype)
        meta = dict(self.group.attrs)[ATTR]
        if not meta.get("complete"):
            self.group.attrs[ATTR] = {**meta, "complete": True}
        return True


class ChunkAssembly:
    """Row-chunks of a group filled a batch at a time: which rows of a batch a waiting chunk takes,
    and when a chunk has all its rows.  Only the chunks asked for are taken; rows of other
    chunks are ignored, so a finished chunk is never written again."""

    def __init__(self, group: GradientGroup, chunks: list[int]):
        self.group = group
        self.waiting = set(chunks)
        self._filled: dict[int, int] = {}

    def pieces(self, start: int, stop: int):
        """(chunk, lo, hi): for each waiting chunk that samples [start, stop) reach, its rows [lo, hi) among them."""
        plan = self.group.plan
        for k in layout.chunks_in(start, stop, plan.chunk_rows):
            if k in self.waiting:
                c0, c1 = plan.chunk_bounds(k)
                yield k, max(c0, start), min(c1, stop)

    def arrived(self, k: int, rows: int) -> bool:
        """Count `rows` more rows of chunk `k`; True once it has all of them."""
        c0, c1 = self.group.plan.chunk_bounds(k)
        self._filled[k] = self._filled.get(k, 0) + rows
        return self._filled[k] == c1 - c0

    def complete(self, k: int) -> None:
        """Flag chunk `k` complete (after its data is written): the last write for it."""
        self.group.mark_complete(k)
        self.waiting.discard(k)
        self._filled.pop(k, None)


class ChunkRows(ChunkAssembly):
    """Per-sample rows written to a group one whole row-chunk at a time.

    A run's batch size need not match the group's chunk height: a chunk waits here until
    all its rows came, then is written once and flagged complete.
    """

    def __init__(self, group: GradientGroup, chunks: list[int]):
        super().__init__(group, chunks)
        self._rows: dict[int, dict[str, np.ndarray]] = {}

    def add(self, start: int, stop: int, arrays: dict[str, np.ndarray]) -> list[int]:
        """Take samples [start, stop) (`arrays` of `stop - start` rows each); returns the chunks completed."""
        done = []
        for k, lo, hi in list(self.pieces(start, stop)):
            c0, c1 = self.group.plan.chunk_bounds(k)
            if (lo, hi) == (c0, c1):  # the whole chunk in one go: no copy
                self.group.write_chunk(k, {n: a[lo - start:hi - start] for n, a in arrays.items()})
            else:
                rows = self._rows.setdefault(k, {n: np.empty((c1 - c0, *a.shape[1:]), a.dtype) for n, a in arrays.items()})
                for n, a in arrays.items():
                    rows[n][lo - c0:hi - c0] = a[lo - start:hi - start]
                if not self.arrived(k, hi - lo):
                    continue
                self.group.write_chunk(k, self._rows.pop(k))
            self.complete(k)
            done.append(k)
        return done
