"""Gradient groups: create, write shard by shard, resume, finalize.

A group holds the exact tokens that were differentiated and one array per parameter
tensor.  Every shard writes only its own chunks and then sets its flag in
``shard_complete``; a rerun skips flagged shards and rewrites unflagged ones whole,
so an interrupted run resumes to the same bytes as an uninterrupted one.
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
    """The shape of a gradient group: what it will hold and how it is cut."""

    n_samples: int
    shard_size: int
    batch_size: int
    parameters: dict[str, list[int]]
    mode: str
    dtype: str
    max_tokens: int

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise LakeError(f"mode {self.mode!r} is not known; use one of {MODES}")
        if self.dtype not in STORE_DTYPES:
            raise LakeError(f"storage dtype {self.dtype!r} is not supported; use one of {STORE_DTYPES}")
        if self.n_samples < 1:
            raise LakeError("the dataset has no samples; a gradient group needs at least one")
        if self.batch_size < 1 or self.shard_size < 1 or self.shard_size % self.batch_size:
            raise LakeError(
                f"shard size {self.shard_size} must be a positive multiple of batch size {self.batch_size} "
                "(each batch writes whole chunks)"
            )

    @property
    def n_shards(self) -> int:
        return layout.n_shards(self.n_samples, self.shard_size)

    def numel(self, name: str) -> int:
        return int(np.prod(self.parameters[name]))


def fingerprint(lineage: dict, plan: GradientPlan) -> str:
    """What makes two extractions the same: their lineage and plan (not when they ran)."""
    stable = {k: v for k, v in lineage.items() if k not in ("created_at", "gradlake_version")}
    text = json.dumps({"lineage": stable, "plan": asdict(plan)}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


class GradientGroup:
    """One extraction's Zarr group in the lake."""

    def __init__(self, store: LakeStore, path: str, group: zarr.Group):
        self.store, self.path, self.group = store, path, group
        meta = dict(group.attrs).get(ATTR) or {}
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
        tokens = group.create_array("input_ids", shape=(n, width), dtype="int32", chunks=(plan.shard_size, width),
                                    dimension_names=["sample", "token"], fill_value=-1)
        tokens[:] = input_ids.astype("int32")
        mask = group.create_array("label_mask", shape=(n, width), dtype="bool", chunks=(plan.shard_size, width),
                                  dimension_names=["sample", "token"], fill_value=False)
        mask[:] = label_mask
        lengths = group.create_array("n_tokens", shape=(n,), dtype="int32", chunks=(n,), dimension_names=["sample"])
        lengths[:] = (input_ids >= 0).sum(axis=1).astype("int32")
        group.create_array("shard_complete", shape=(plan.n_shards,), dtype="uint8", chunks=(1,),
                           dimension_names=["shard"], fill_value=0)
        itemsize = np.dtype(plan.dtype).itemsize
        for name in plan.parameters:
            numel = plan.numel(name)
            flat = f"{name}.flat"
            if plan.mode == "store":
                cols = layout.column_chunk(plan.batch_size, numel, itemsize)
                group.create_array(name, shape=(n, numel), dtype=plan.dtype, chunks=(plan.batch_size, cols),
                                   dimension_names=["sample", flat], compressors=None, fill_value=0,
                                   attributes={"param_shape": plan.parameters[name]})
            else:
                cols = layout.column_chunk(1, numel, 8)
                group.create_array(f"{name}.partial_sum", shape=(plan.n_shards, numel), dtype="float64",
                                   chunks=(1, cols), dimension_names=["shard", flat], compressors=None, fill_value=0)
                group.create_array(name, shape=(numel,), dtype=plan.dtype, chunks=(cols,), dimension_names=[flat],
                                   compressors=None, fill_value=0, attributes={"param_shape": plan.parameters[name]})
        lineage = {**lineage, "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
        group.attrs[ATTR] = {"lineage": lineage, "plan": asdict(plan), "fingerprint": fingerprint(lineage, plan)}
        return cls.open(store, path)

    @staticmethod
    def check_path(store: LakeStore, path: str, plan: GradientPlan, lineage: dict) -> bool:
        """True if the same extraction already made the group at `path`, False if there is none; else one clear error."""
        stamp = fingerprint(lineage, plan)
        try:
            existing = zarr.open_group(store.zarr_store, path=path, mode="r", zarr_format=3)
            meta = dict(existing.attrs).get(ATTR) or {}
        except FileNotFoundError:
            meta = {}
        if meta.get("fingerprint") == stamp:
            return True
        if meta:
            old = meta.get("lineage", {})
            differ = sorted(k for k in set(old) | set(lineage) if old.get(k) != lineage.get(k) and k != "created_at")
            raise LakeError(
                f"the lake already holds a different extraction at {path!r} (differs in {differ or ['plan']}); "
                "use another variant name, or remove that group to replace it"
            )
        return False

    # -- shards ---------------------------------------------------------------------------

    def shard_bounds(self, index: int) -> tuple[int, int]:
        return layout.shard_bounds(index, self.plan.n_samples, self.plan.shard_size)

    def completed_shards(self) -> list[int]:
        flags = self.group["shard_complete"][:]
        return [int(i) for i in np.flatnonzero(flags)]

    def pending_shards(self) -> list[int]:
        done = set(self.completed_shards())
        return [i for i in range(self.plan.n_shards) if i not in done]

    def write_rows(self, start: int, arrays: dict[str, np.ndarray]) -> None:
        """Store mode: write per-sample gradients for samples [start, start + rows); chunk-aligned."""
        if start % self.plan.batch_size:
            raise LakeError(f"row {start} is not at a chunk boundary (chunks of {self.plan.batch_size} samples)")
        for name, values in arrays.items():
            self.group[name][start:start + values.shape[0]] = values.astype(self.plan.dtype, copy=False)

    def write_partial_sum(self, shard: int, sums: dict[str, np.ndarray]) -> None:
        """Mean modes: write one shard's sum over its samples, in float64."""
        for name, values in sums.items():
            self.group[f"{name}.partial_sum"][shard] = values.astype("float64", copy=False)

    def mark_complete(self, shard: int) -> None:
        """Record that shard `shard` is fully written; the last write of a shard."""
        self.group["shard_complete"][shard] = 1

    def finalize(self) -> bool:
        """For mean modes, combine the shards' sums into the mean; True when the group is complete."""
        if self.pending_shards():
            return False
        if self.plan.mode != "store":
            for name in self.plan.parameters:
                # Summed in shard order, so the result does not depend on which shard ran when.
                total = self.group[f"{name}.partial_sum"][:].sum(axis=0)
                self.group[name][:] = (total / self.plan.n_samples).astype(self.plan.dtype)
        meta = dict(self.group.attrs)[ATTR]
        if not meta.get("complete"):
            self.group.attrs[ATTR] = {**meta, "complete": True}
        return True
