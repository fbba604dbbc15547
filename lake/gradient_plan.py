"""What a gradient group holds and how it is recognised: its plan, its fingerprint, the record in its attrs.

The plan fixes the group's arrays, dtype and row-chunk height (``chunk_rows``) when it is
created.  Two extractions are the same when their lineage and the plan's identity (everything
but the layout fields: chunk height, checksums, object size) agree; the group's attribute
``gradlake`` records lineage, plan and fingerprint, so a rerun with other scheduling (shard
size, batch size) recognises the group, and one with other settings is refused with what differs.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

import numpy as np

from gradlake.lake import layout
from gradlake.lake.dtypes import STORE_DTYPES
from gradlake.lake.store import LakeError, LakeStore, read_json_attrs

ATTR = "gradlake"
MODES = ("store", "mean", "mean_normalized")
CHECKSUMS = (None, "crc32c")
# Layout choices: fixed when a group is created, never part of what makes two extractions the same.
LAYOUT_FIELDS = ("chunk_rows", "checksum", "object_bytes")
# The arrays of a group that are not gradients: its tokens and its bookkeeping.
NOT_GRADIENTS = ("sample", "input_ids", "label_mask", "n_tokens", "shard_complete", "chunk_digest")


@dataclass(frozen=True)
class GradientPlan:
    """What a gradient group holds, and the row-chunk height it is stored in."""

    n_samples: int
    parameters: dict[str, list[int]]
    mode: str
    dtype: str
    max_tokens: int
    chunk_rows: int  # fixed when the group is created; layout, not identity (left out of the fingerprint)
    # Every chunk object of a group made since checksums carries a CRC32C (Zarr's crc32c codec), float
    # arrays are filled with NaN (a missing chunk reads as NaN, never as plausible zeros) and each
    # row-chunk's digest is kept beside its flag.  None: a group written before that, read as it was.
    checksum: str | None = "crc32c"
    # Wide arrays' column chunks of a row-chunk gathered into objects of up to this many bytes (Zarr
    # v3 shards): fewer objects and requests, less concurrency per array.  0: one object per chunk.
    object_bytes: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise LakeError(f"mode {self.mode!r} is not known; use one of {MODES}")
        if self.dtype not in STORE_DTYPES:
            raise LakeError(f"storage dtype {self.dtype!r} is not supported; use one of {STORE_DTYPES}")
        if self.n_samples < 1:
            raise LakeError("the dataset has no samples; a gradient group needs at least one")
        if self.chunk_rows < 1:
            raise LakeError(f"chunk height {self.chunk_rows} must be at least 1 sample")
        if self.object_bytes < 0:
            raise LakeError(f"object size {self.object_bytes} bytes must be 0 (one object per chunk) or more")
        if self.checksum not in CHECKSUMS:
            raise LakeError(f"checksum {self.checksum!r} is not known; use one of {CHECKSUMS}")

    @classmethod
    def stored(cls, record: dict) -> "GradientPlan":
        """The plan recorded in a group's attrs (a group from before checksums has none)."""
        return cls(**{"checksum": None, **record})

    def identity(self) -> dict:
        """The fields that determine the stored values: everything but the layout (chunk height, checksums)."""
        return {k: v for k, v in asdict(self).items() if k not in LAYOUT_FIELDS}

    def data_arrays(self) -> list[str]:
        """The arrays holding a row-chunk's values: per-sample rows, or each chunk's sums (mean modes)."""
        return list(self.parameters) if self.mode == "store" else [f"{n}.partial_sum" for n in self.parameters]

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


def differences(meta: dict, lineage: dict, plan: GradientPlan) -> list[str]:
    """What differs between a recorded extraction and the one asked for: lineage keys and `plan.` fields."""
    old = meta.get("lineage", {})
    differ = sorted(k for k in set(old) | set(lineage)
                    if old.get(k) != lineage.get(k) and k not in ("created_at", "gradlake_version"))
    held = {k: v for k, v in meta.get("plan", {}).items() if k not in LAYOUT_FIELDS}
    asked = plan.identity()
    return differ + sorted(f"plan.{k}" for k in set(held) | set(asked) if held.get(k) != asked.get(k))


def read_meta(store: LakeStore, path: str) -> dict:
    """The group's `gradlake` attribute, {} where there is no group (or one whose creation did not finish).

    A damaged group metadata file is one LakeError naming it, never a JSONDecodeError from deep inside Zarr.
    """
    attrs = read_json_attrs(store, f"{path}/zarr.json")
    if attrs is None:
        return {}
    return checked_meta(attrs.get(ATTR) or {}, path)


def checked_meta(meta: dict, path: str) -> dict:
    """A group's `gradlake` attribute as read, refused (one LakeError) if an older gradlake wrote it per shard."""
    if meta and "chunk_rows" not in meta.get("plan", {}):
        raise LakeError(
            f"the group at {path!r} was written by an older gradlake that recorded completion per shard; "
            "remove that group to extract it again, or use another variant name"
        )
    return meta


def stored_chunk_rows(store: LakeStore, path: str) -> int | None:
    """The chunk height of the group at `path`, or None if there is none yet."""
    meta = read_meta(store, path)
    return int(meta["plan"]["chunk_rows"]) if meta else None
