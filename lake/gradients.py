"""Gradient groups: create, write chunk by chunk, resume, check, finalize.

A group holds the exact tokens that were differentiated and one array per parameter
tensor, stored in row-chunks whose height (``chunk_rows``) is fixed when the group is
created (its plan: `lake.gradient_plan`).  Completion is recorded per row-chunk
(``shard_complete[k]``), not per shard of whichever run wrote it: shard size and batch size
are a run's scheduling choices, so a run with other ones recognises the group (they are not
in its fingerprint), knows exactly which samples are done, and writes only the chunks still
missing, each whole and once.  An interrupted run resumes to the same bytes as an
uninterrupted one.  Filling row-chunks from batches is `lake.assembly`; leasing them to one
worker at a time is `lake.leases`.
"""

from __future__ import annotations

import datetime as dt
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from functools import lru_cache

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

from gradlake.lake import claims, layout
from gradlake.lake.chunk_objects import element_object, plain, put_objects, row_chunk_objects
from gradlake.lake.dtypes import array_attrs, encode, fill_value, zarr_dtype
from gradlake.lake.gradient_plan import ATTR, GradientPlan, checked_meta, differences, fingerprint, read_meta
from gradlake.lake.integrity import CHUNK_DIGEST, digest, read_checked
from gradlake.lake.store import LakeError, LakeStore, read_json_attrs

WRITE_THREADS = 8  # arrays of one row-chunk written at once
CREATE_SECONDS = 120.0  # a creation claim lives this long unless renewed (it is, after every array)
# The arrays written once, when a group is created: the digest of each is recorded in its attrs ("token_digest").
TOKEN_ARRAYS = ("sample", "input_ids", "label_mask", "n_tokens")


@lru_cache(maxsize=1)
def _chunk_writers() -> ThreadPoolExecutor:
    """Threads that write a row-chunk's arrays at the same time (a remote store's latency is paid once, not per array)."""
    return ThreadPoolExecutor(max_workers=WRITE_THREADS, thread_name_prefix="gradlake-chunk")


class GradientGroup:
    """One extraction's Zarr group in the lake."""

    def __init__(self, store: LakeStore, path: str, group: zarr.Group):
        self.store, self.path, self.group = store, path, group
        self._arrays: dict[str, zarr.Array] = {}
        meta = checked_meta(dict(group.attrs).get(ATTR) or {}, path)
        self.lineage: dict = meta.get("lineage", {})
        self.plan = GradientPlan.stored(meta["plan"]) if "plan" in meta else None

    @classmethod
    def open(cls, store: LakeStore, path: str) -> "GradientGroup":
        if read_json_attrs(store, f"{path}/zarr.json") is None:  # a damaged file: one line naming it
            raise LakeError(f"no gradient group at {path!r} in {store.url}")
        with store.explained_errors():
            group = zarr.open_group(store.zarr_store, path=path, mode="r+", zarr_format=3)
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
        """Create the group, or reopen it if the same extraction already made it; refuse a different one.

        Creation is claimed first (an object created only if absent, see `lake.claims`), so of runs
        starting together exactly one creates the group: one with the same settings waits for it and
        shares it, one with other settings is refused at once with what differs.
        """
        fp = fingerprint(lineage, plan)
        about = {"fingerprint": fp, "lineage": lineage, "plan": asdict(plan)}
        owner, key = claims.new_owner(), layout.creation_claim(path)
        deadline = time.monotonic() + CREATE_SECONDS + 30
        while True:
            if cls.check_path(store, path, plan, lineage):
                return cls.open(store, path)
            if claims.take(store, key, owner, CREATE_SECONDS, about):
                break
            held = claims.read_claim(store, key)
            if held is not None and held.about.get("fingerprint") not in (None, fp):
                raise LakeError(
                    f"another run with different settings is creating the group at {path!r} right now "
                    f"(differs in {differences(held.about, lineage, plan) or ['fingerprint']}); "
                    "wait for it to finish and remove that group to replace it, or use another variant name"
                )
            if time.monotonic() > deadline:
                raise LakeError(f"the group at {path!r} is being created by another run that has not finished in "
                                f"{CREATE_SECONDS:.0f}s; run again once it has")
            time.sleep(0.2)  # the same extraction is being created: wait, then share it
        try:
            if cls.check_path(store, path, plan, lineage):  # finished by another run just before our claim
                return cls.open(store, path)
            with store.explained_errors():
                cls._write_new(store, path, plan, lineage, sample_ids, input_ids, label_mask,
                               renew=lambda: claims.renew(store, key, owner, CREATE_SECONDS, about))
        finally:
            claims.release(store, key)
        return cls.open(store, path)

    @staticmethod
    def _write_new(store: LakeStore, path: str, plan: GradientPlan, lineage: dict, sample_ids: list[str],
                   input_ids: np.ndarray, label_mask: np.ndarray, renew) -> None:
        """Write a new group under a creation claim we hold; its attrs last (a group without them is unfinished)."""
        checked = plan.checksum == "crc32c"
        crc = [Crc32cCodec()] if checked else []
        packed = [ZstdCodec(), *crc] if checked else "auto"  # small metadata-like arrays: compressed
        group = zarr.open_group(store.zarr_store, path=path, mode="w", zarr_format=3)  # clears an unfinished one
        n, width = input_ids.shape
        ids = group.create_array("sample", shape=(n,), dtype=str, chunks=(n,), dimension_names=["sample"],
                                 compressors=packed)
        ids[:] = np.asarray(sample_ids, dtype=str)
        rows = layout.token_rows(n, width)
        tokens = group.create_array("input_ids", shape=(n, width), dtype="int32", chunks=(rows, width),
                                    dimension_names=["sample", "token"], fill_value=-1, compressors=packed)
        tokens[:] = input_ids.astype("int32")
        mask = group.create_array("label_mask", shape=(n, width), dtype="bool", chunks=(rows, width),
                                  dimension_names=["sample", "token"], fill_value=False, compressors=packed)
        mask[:] = label_mask
        lengths = group.create_array("n_tokens", shape=(n,), dtype="int32", chunks=(n,), dimension_names=["sample"],
                                     compressors=packed)
        n_tokens = (input_ids >= 0).sum(axis=1).astype("int32")
        lengths[:] = n_tokens
        # What each was written as: a chunk of them missing (read as the fill value) or swapped is found.
        tokens = {"sample": np.asarray(sample_ids, dtype=str), "input_ids": input_ids.astype("int32"),
                  "label_mask": np.asarray(label_mask, dtype=bool), "n_tokens": n_tokens}
        token_digest = {name: digest([value]) for name, value in tokens.items()} if checked else None
        renew()
        # One object per flag: runs writing different shards never write the same object.
        group.create_array("shard_complete", shape=(plan.n_chunks,), dtype="uint8", chunks=(1,),
                           dimension_names=["chunk"], fill_value=0, attributes={"chunk_rows": plan.chunk_rows},
                           compressors=crc or None)
        if checked:  # what each row-chunk held when it was flagged: a missing or swapped chunk is found
            group.create_array("chunk_digest", shape=(plan.n_chunks,), dtype="uint32", chunks=(1,),
                               dimension_names=["chunk"], fill_value=0, compressors=crc,
                               attributes={"digest": f"{CHUNK_DIGEST} of the row-chunk's values, array by array in plan "
                                           "order", "algorithm": CHUNK_DIGEST})
        itemsize = np.dtype(zarr_dtype(plan.dtype)).itemsize
        data_fill = fill_value(plan.dtype, nan=checked)  # a missing chunk of a checked group reads as NaN, never as zeros
        for name in plan.parameters:
            numel = plan.numel(name)
            flat = f"{name}.flat"
            # A row-chunk's column chunks share objects (shards) if the plan asks: see layout.shard_columns.
            if plan.mode == "store":
                cols = layout.column_chunk(plan.chunk_rows, numel, itemsize)
                wide = layout.shard_columns(plan.chunk_rows, numel, itemsize, plan.object_bytes)
                group.create_array(name, shape=(n, numel), dtype=zarr_dtype(plan.dtype), chunks=(plan.chunk_rows, cols),
                                   shards=(plan.chunk_rows, wide) if wide else None,
                                   dimension_names=["sample", flat], compressors=crc or None, fill_value=data_fill,
                                   attributes={"param_shape": plan.parameters[name], **array_attrs(plan.dtype)})
            else:
                cols, wide = layout.column_chunk(1, numel, 8), layout.shard_columns(1, numel, 8, plan.object_bytes)
                group.create_array(f"{name}.partial_sum", shape=(plan.n_chunks, numel), dtype="float64",
                                   chunks=(1, cols), shards=(1, wide) if wide else None,
                                   dimension_names=["chunk", flat], compressors=crc or None,
                                   fill_value=fill_value("float64", nan=checked))
                group.create_array(name, shape=(numel,), dtype=zarr_dtype(plan.dtype), chunks=(cols,),
                                   shards=(wide,) if wide else None, dimension_names=[flat],
                                   compressors=crc or None, fill_value=data_fill,
                                   attributes={"param_shape": plan.parameters[name], **array_attrs(plan.dtype)})
            renew()
        lineage = {**lineage, "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
        group.attrs[ATTR] = {"lineage": lineage, "plan": asdict(plan), "fingerprint": fingerprint(lineage, plan),
                             **({"token_digest": token_digest} if token_digest else {})}

    @staticmethod
    def check_path(store: LakeStore, path: str, plan: GradientPlan, lineage: dict) -> bool:
        """True if the same extraction already made the group at `path`, False if there is none; else one clear error.

        Only what determines the values counts (lineage and `GradientPlan.identity`): a run with
        another shard size or batch size recognises the group.
        """
        meta = read_meta(store, path)
        if not meta:
            return False
        if meta.get("fingerprint") == fingerprint(lineage, plan):
            return True
        raise LakeError(
            f"the lake already holds a different extraction at {path!r} (differs in "
            f"{differences(meta, lineage, plan) or ['fingerprint']}); "
            "its name comes from the settings that tell extractions apart (layers, stored dtype), "
            "and these differ in what does not name a group: extract with that group's settings to resume it, "
            "remove that group to replace it, or use another variant name"
        )

    def array(self, name: str) -> zarr.Array:
        """Array `name`, its metadata read once (each opening is a request to the store)."""
        if name not in self._arrays:
            self._arrays[name] = self.group[name]
        return self._arrays[name]

    # -- chunks and shards ----------------------------------------------------------------

    def done_chunks(self) -> np.ndarray:
        """One bool per row-chunk: True once it is written in full (a damaged flag object: one LakeError naming it)."""
        return read_checked(self.array("shard_complete"), slice(None)).astype(bool)

    def pending_chunks(self, start: int = 0, stop: int | None = None) -> list[int]:
        """The row-chunks holding samples in [start, stop) that are not written yet (only their flags are read)."""
        stop = self.plan.n_samples if stop is None else stop
        chunks = layout.chunks_in(start, stop, self.plan.chunk_rows)
        if not chunks:
            return []
        done = read_checked(self.array("shard_complete"), slice(chunks.start, chunks.stop)).astype(bool)
        return [k for k, flag in zip(chunks, done) if not flag]

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
        """Store mode: write row-chunk `index` of every array, whole (every column chunk of its rows)."""
        start, stop = self.plan.chunk_bounds(index)
        self._check_covers(index, arrays)
        values = {}
        for name in self.plan.parameters:
            if arrays[name].shape[0] != stop - start:
                raise LakeError(f"chunk {index} of {name!r} holds samples {start}-{stop - 1}; got {arrays[name].shape[0]} rows")
            values[name] = encode(arrays[name], self.plan.dtype)
        self._write_row_chunk(index, slice(start, stop), values)

    def write_partial_sum(self, index: int, sums: dict[str, np.ndarray]) -> None:
        """Mean modes: write row-chunk `index`'s sum over its samples, in float64."""
        self._check_covers(index, sums)
        self._write_row_chunk(index, index, {f"{name}.partial_sum": np.ascontiguousarray(sums[name], dtype="float64")
                                             for name in self.plan.parameters})

    def _write_row_chunk(self, index: int, rows: slice | int, values: dict[str, np.ndarray]) -> None:
        """Write row-chunk `index` (`rows`) of every array, and its digest, all at once; the flag comes after all
        (`mark_complete`), so a digest written before its data is never trusted alone.

        The objects of plain arrays (unsharded, uncompressed) are encoded here and put in one batch
        (`lake.chunk_objects`: one copy per chunk, every array's requests or files in flight together); the
        rest are Zarr's writes, on our threads meanwhile."""
        # Arrays not opened yet are opened together (each opening is a request: hundreds of tensors at a
        # remote store's latency would otherwise queue one after another before the first row-chunk).
        closed = [n for n in [*values, "shard_complete", *(["chunk_digest"] if self.plan.checksum else [])]
                  if n not in self._arrays]
        list(_chunk_writers().map(self.array, closed))
        crc = digest(values.values(), self.digest_algorithm) if self.plan.checksum else None
        objects, through_zarr = [], []
        for name, value in values.items():
            array = self.array(name)
            if array.ndim == 2 and plain(array):
                objects += row_chunk_objects(array, self.store.root, index, value.reshape(-1, array.shape[1]))
            else:
                through_zarr.append(lambda name=name, value=value: self._write_rows(name, index, rows, value))
        if crc is not None:
            digests = self.array("chunk_digest")
            if plain(digests):
                objects.append(element_object(digests, self.store.root, index, crc))
            else:
                through_zarr.append(lambda: digests.__setitem__(index, crc))
        running = [_chunk_writers().submit(write) for write in through_zarr]
        try:
            if objects:
                put_objects(self.store.fs, objects, _chunk_writers())
        finally:
            for future in running:  # each waited for, so none is still writing when the caller goes on
                future.result()

    @property
    def digest_algorithm(self) -> str:
        """The algorithm of the row-chunk digests (`lake.integrity.digest`): recorded in the group, CRC32 before that was."""
        return dict(self.array("chunk_digest").attrs).get("algorithm", "crc32")

    def _write_rows(self, name: str, index: int, rows: slice | int, value: np.ndarray) -> None:
        """Write row-chunk `index` of array `name` (its `rows`), whole.

        Zarr writes a shard by reading the one it replaces and merging into it, although ours
        are always replaced whole; a shard damaged beyond reading (the row-chunk is being
        recomputed because of it) is removed, and the row-chunk written again."""
        array = self.array(name)
        try:
            array[rows] = value
        except Exception:
            if array.shards is None:
                raise
            damaged = []
            for j in range(-(-array.shape[1] // array.shards[1])):
                try:
                    array.get_block_selection((index, j))
                except Exception:
                    damaged.append(self.store.path(f"{self.path}/{name}/c/{index}/{j}"))
            if not damaged:
                raise
            for path in damaged:  # one still being written by the failed attempt may read as damaged: same bytes
                try:
                    self.store.fs.rm_file(path)
                except FileNotFoundError:
                    pass
            array[rows] = value

    def _check_covers(self, index: int, arrays: dict) -> None:
        if set(arrays) != set(self.plan.parameters):  # a chunk is written whole, so that its digest covers it
            raise LakeError(f"chunk {index} of {self.path} is written with every array at once; got {sorted(arrays)[:3]}..., "
                            f"expected the {len(self.plan.parameters)} arrays of its plan")

    def mark_complete(self, index: int) -> None:
        """Record that row-chunk `index` is fully written; the last write of a chunk."""
        self.array("shard_complete")[index] = 1

    def expected_arrays(self) -> dict[str, tuple[tuple[int, ...], str | None]]:
        """Every array the plan says the group holds: name to (shape, dtype)."""
        plan = self.plan
        n, chunks = plan.n_samples, plan.n_chunks
        out = {"sample": ((n,), None), "input_ids": ((n, plan.max_tokens), "int32"),
               "label_mask": ((n, plan.max_tokens), "bool"), "n_tokens": ((n,), "int32"),
               "shard_complete": ((chunks,), "uint8")}
        if plan.checksum:
            out["chunk_digest"] = ((chunks,), "uint32")
        for name in plan.parameters:
            numel = plan.numel(name)
            if plan.mode == "store":
                out[name] = ((n, numel), zarr_dtype(plan.dtype))
            else:
                out[f"{name}.partial_sum"] = ((chunks, numel), "float64")
                out[name] = ((numel,), zarr_dtype(plan.dtype))
        return out

    def metadata_problems(self) -> list[str]:
        """Arrays missing, unreadable, or whose shape or dtype in their zarr.json disagrees with the plan."""
        problems = []
        for name, (shape, dtype) in self.expected_arrays().items():
            try:
                array = self.group[name]
            except Exception as err:  # KeyError when absent, a JSON error when its zarr.json is damaged
                problems.append(f"array {name!r} is missing or its metadata is damaged ({type(err).__name__})")
                continue
            if tuple(array.shape) != shape or (dtype and str(array.dtype) != dtype):
                problems.append(f"array {name!r} is {tuple(array.shape)} {array.dtype} in its zarr.json; the plan says "
                                f"{shape} {dtype}")
        return problems

    def tokens(self, name: str, rows: slice = slice(None)) -> np.ndarray:
        """Token array `name` (one of `TOKEN_ARRAYS`) at `rows`; read whole, checked against the digest recorded
        when the group was made.

        A damaged chunk object, or values that differ from what was written (a chunk missing, read as
        its fill value), is one LakeError naming the group and array."""
        remake = "flags cannot repair it: remove the group and extract again"
        try:
            values = read_checked(self.array(name), rows)
        except LakeError as err:
            raise LakeError(f"{str(err).split('; run ', 1)[0]}; {remake}") from None
        recorded = (dict(self.group.attrs)[ATTR].get("token_digest") or {}).get(name)
        if rows == slice(None) and recorded is not None and digest([values]) != recorded:
            raise LakeError(f"damaged data in {self.path}/{name}: its values differ from the digest recorded when the "
                            f"group was created (a chunk object missing or replaced); {remake}")
        return values

    def token_problems(self) -> list[str]:
        """What is wrong with the group's token arrays (`tokens`), one line each; [] when all are as written."""
        problems = []
        for name in TOKEN_ARRAYS:
            try:
                self.tokens(name)
            except LakeError as err:
                problems.append(f"array {name!r}: {str(err).split(': ', 1)[-1]}")  # the group is the finding's own
        return problems

    def meta_complete(self) -> bool:
        return bool(dict(self.group.attrs)[ATTR].get("complete"))

    def clear(self, chunks: list[int]) -> None:
        """Mark row-chunks not written (found damaged), so that the next run recomputes exactly them."""
        for k in chunks:
            self.group["shard_complete"][k] = 0
            if self.plan.checksum:
                self.group["chunk_digest"][k] = 0
        meta = dict(self.group.attrs)[ATTR]
        if chunks or meta.get("complete"):
            self.group.attrs[ATTR] = {**meta, "complete": False}

    def read_chunk(self, index: int) -> list[np.ndarray]:
        """Row-chunk `index` of every data array, in plan order, as stored (for checking it)."""
        start, stop = self.plan.chunk_bounds(index)
        if self.plan.mode == "store":
            return [self.group[name][start:stop] for name in self.plan.data_arrays()]
        return [self.group[name][index] for name in self.plan.data_arrays()]

    def stored_digest(self, index: int) -> int | None:
        """The digest recorded when row-chunk `index` was written, None for a group without checksums."""
        return int(self.group["chunk_digest"][index]) if self.plan.checksum else None

    def mean_of_sums(self, name: str) -> np.ndarray:
        """Mean modes: the mean of tensor `name` from its row-chunks' sums, in the stored dtype.

        Added one chunk at a time in chunk order: the result depends on the chunks' sums alone,
        never on which shard or run wrote which chunk, or when.
        """
        sums = self.group[f"{name}.partial_sum"]
        total = np.zeros(sums.shape[1], dtype=np.float64)
        for k in range(sums.shape[0]):
            total += sums[k]
        return encode(total / self.plan.n_samples, self.plan.dtype)

    def finalize(self) -> bool:
        """For mean modes, combine the chunks' sums into the mean; True when the group is complete."""
        if self.pending_chunks():
            return False
        if self.plan.mode != "store":
            for name in self.plan.parameters:
                self.group[name][:] = self.mean_of_sums(name)
        meta = dict(self.group.attrs)[ATTR]
        if not meta.get("complete"):
            self.group.attrs[ATTR] = {**meta, "complete": True}
        return True
