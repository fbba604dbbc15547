"""Gradient extraction's shard work: one shard's gradients computed, checked finite and written, and its Prefect tasks.

The plan (`tasks/gradients/plan.py`) checks everything first; `extract_shard` computes one shard and writes it;
the Prefect wrappers at the bottom add retries and logging.
"""

from __future__ import annotations

import math
import time
from functools import partial

import numpy as np
import torch
from prefect import get_run_logger, task
from prefect.cache_policies import NONE

from gradlake.lake import layout
from gradlake.lake.leases import LEASE_SECONDS, ChunkLeases
from gradlake.lake.dtypes import copy_rows, host_rows, zarr_dtype
from gradlake.lake.assembly import ChunkAssembly, ChunkRows
from gradlake.lake.gradients import GradientGroup
from gradlake.lake.overlap import BackgroundWrites
from gradlake.lake.store import LakeError, LakeStore
from gradlake.tasks.common.loss import IGNORE_INDEX, Encoded, pad_batch
from gradlake.tasks.common.model import load_model, load_tokenizer
from gradlake.tasks.common.progress import Progress
from gradlake.tasks.common.retries import retry_unless_bad_input
from gradlake.tasks.gradients.batching import WINDOW_BYTES, shard_batches, window_chunks
from gradlake.tasks.gradients.engine import INPUTS_EMBEDS, PerSampleGradients, Projection
from gradlake.tasks.gradients.plan import (ExtractionPlan, ExtractionSpec, create_group, group_paths, max_tokens,
                                           plan_extraction, projection_groups, target_shape)
from gradlake.tasks.projection.spec import output_key
from gradlake.tasks.projection.projectors import projectors_for


def _batch(ids: np.ndarray, mask: np.ndarray, rows: np.ndarray, pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Samples `rows` (indexes into the shard's stored tokens `ids`, `mask`) as a right-padded batch."""
    encoded = []
    for row_ids, row_mask in zip(ids[rows], mask[rows]):
        keep = row_ids >= 0
        encoded.append(Encoded(row_ids[keep].tolist(), row_mask[keep].tolist()))
    input_ids, labels = pad_batch(encoded, pad_id)
    return input_ids.to(device), labels.to(device)


class ChunkSums(ChunkAssembly):
    """Mean modes: each row-chunk's sum of per-sample gradients (float64, on the device), written once whole.

    A chunk's rows may arrive over several batches; its sum is written when the last arrives.
    """

    def __init__(self, group: GradientGroup, chunks: list[int], normalize: bool, leases: ChunkLeases | None = None):
        super().__init__(group, chunks, leases)
        self.normalize = normalize
        self._sums: dict[int, dict[str, torch.Tensor]] = {}

    def add_rows(self, rows: np.ndarray, grads: dict[str, torch.Tensor]) -> list[int]:
        """Take the samples `rows` (`grads` hold theirs in that order); returns the chunks completed."""
        done = []
        for k, positions, offsets in list(self.pieces(rows)):
            sums = self._sums.setdefault(k, {})
            index = torch.as_tensor(positions, device=next(iter(grads.values())).device)
            for n, g in grads.items():
                g = g.index_select(0, index).float()  # float32 at least: a bfloat16 norm or sum would round
                if self.normalize:
                    g = g / g.norm(dim=1, keepdim=True).clamp_min(torch.finfo(g.dtype).tiny)
                part = g.sum(dim=0, dtype=torch.float64)
                sums[n] = sums[n] + part if n in sums else part
            if self.arrived(k, len(offsets)):
                self.group.write_partial_sum(k, {n: s.cpu().numpy() for n, s in self._sums.pop(k).items()})
                self.complete(k)
                done.append(k)
        return done


def extract_shard(spec: ExtractionSpec, group: GradientGroup, shard: int, log=print, poll: float = 2.0,
                  lease_seconds: float = LEASE_SECONDS, wait: bool = True) -> int | None:
    """Compute and write one shard's unfinished chunks in the gradient group and its projection groups.

    Returns the number of samples computed.  Batches lie on the grid of `spec.batch_size` and
    a batch holding any unfinished chunk's sample is computed whole, so every chunk holds what
    an uninterrupted run with this batch size writes; finished chunks are never rewritten.
    Each chunk is leased before it is computed: chunks another live worker holds (a run with the
    same settings at the same time) are waited for, not computed twice; a dead worker's lease runs
    out after `lease_seconds` and its chunks are then computed here.  With `wait` off, chunks another
    live worker holds are left to it: once only such chunks remain, None is returned (what this call
    computed is kept), so that the caller can do other work first and come back.  Progress (samples,
    rate, time left) is logged at most every 10 seconds, or every batch when batches are slower.
    """
    start, stop = group.shard_bounds(shard, spec.shard_size)
    targets = [*projection_groups(spec, group.store, group.path), group]  # the gradient group's flags last
    label = f"{spec.variant} shard {shard} (samples {start}-{stop - 1})"
    leases = ChunkLeases(lease_seconds)
    computed, waited = 0, False
    try:
        while True:
            todo = [t.pending_chunks(start, stop) for t in targets]
            if not any(todo):
                break
            mine = [leases.take(t, chunks) for t, chunks in zip(targets, todo)]
            if any(mine):
                computed += _compute_chunks(spec, targets, mine, start, stop, label, leases, log)
            else:  # all of them are another worker's right now
                if not wait:
                    log(f"{label}: {sum(map(len, todo))} chunks are being computed by another worker; left to it for now")
                    return None
                if not waited:
                    log(f"{label}: {sum(map(len, todo))} chunks are being computed by another worker; waiting for them")
                waited = True
                time.sleep(poll)
    finally:
        leases.release_all()
    if not computed:
        log(f"{label}: " + ("completed by another worker" if waited else "already complete"))
    return computed


def _window_rows(targets: list[GradientGroup]) -> int:
    """Samples per batching window: whole chunks of every target whose stored values fit `WINDOW_BYTES`."""
    unit = math.lcm(*(t.plan.chunk_rows for t in targets))
    per_sample = 0
    for t in targets:
        itemsize = np.dtype(zarr_dtype(t.plan.dtype)).itemsize
        numel = sum(t.plan.numel(n) for n in t.plan.parameters)
        per_sample += numel * itemsize if t.plan.mode == "store" else -(-numel * 8 // t.plan.chunk_rows)
    return unit * window_chunks(unit, per_sample, WINDOW_BYTES)


def _compute_chunks(spec: ExtractionSpec, targets: list[GradientGroup], todo: list[list[int]], start: int, stop: int,
                    label: str, leases: ChunkLeases, log) -> int:
    """Compute the batches that hold the chunks `todo` (one list per target) and write those chunks.

    The shard's batches are planned from its lengths alone (`tasks.batching`); those holding a
    wanted sample are computed.  Lake writes of a batch run on a thread of their own while the
    next batch is computed (`lake.overlap`)."""
    group = targets[-1]
    plan = group.plan
    wanted = np.zeros(stop - start, dtype=bool)
    for target, chunks in zip(targets, todo):
        for k in chunks:
            c0, c1 = target.plan.chunk_bounds(k)
            wanted[c0 - start:c1 - start] = True
    ids, mask = group.tokens("input_ids", slice(start, stop)), group.tokens("label_mask", slice(start, stop))
    lengths = (ids >= 0).sum(axis=1)
    batches = [b for b in shard_batches(lengths, start, spec.batch_size, spec.token_budget, _window_rows(targets))
               if wanted[b - start].any()]
    model_spec = spec.model.resolved()
    model = load_model(model_spec)
    tokenizer = load_tokenizer(model_spec)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    names = list(plan.parameters)
    if spec.target == "parameters":
        layers = set(group.lineage["layers"])
        shapes = {n: tuple(p.shape) for n, p in model.named_parameters() if n in layers}
    else:
        shapes = {INPUTS_EMBEDS: target_shape(spec, model.config)}
    projections = [Projection(projectors_for(p, shapes, device), key=partial(output_key, p)) for p in spec.projections]
    writers = [ChunkRows(t, chunks, leases) for t, chunks in zip(targets[:-1], todo[:-1])]
    stored = (ChunkRows(group, todo[-1], leases) if plan.mode == "store"
              else ChunkSums(group, todo[-1], plan.mode == "mean_normalized", leases))

    def write(chunks: list[tuple[ChunkRows, int, dict[str, np.ndarray]]]) -> None:
        for writer, k, arrays in chunks:
            writer.write(k, arrays)
        leases.renew()

    def whole(writer: ChunkRows, rows: np.ndarray, values: dict[str, torch.Tensor]):
        """Rows copied from the engine's buffers straight into their chunks' host arrays (cast to the stored dtype
        on the way); the chunks now whole, to write."""
        dtype = writer.group.plan.dtype
        done = writer.fill(rows, values, partial(copy_rows, dtype=dtype), lambda v, n: host_rows((n, *v.shape[1:]), dtype))
        return [(writer, k, arrays) for k, arrays in done]

    progress = Progress(sum(len(b) for b in batches), "samples", log)
    pooling = "mean" if spec.target == "inputs_embeds_mean" else "tokens"
    with PerSampleGradients(model, names, projections, pooling, max_tokens(spec, model.config)) as per_sample, \
            BackgroundWrites() as writes:
        for rows in batches:
            input_ids, labels = _batch(ids, mask, rows - start, pad_id, device)
            grads = per_sample(input_ids, labels, torch.as_tensor(lengths[rows - start], device=device))
            check_finite(per_sample.losses, grads, per_sample.projected, rows, group, label, model)
            chunks = [c for writer, out in zip(writers, per_sample.projected) for c in whole(writer, rows, out)]
            if plan.mode == "store":
                chunks += whole(stored, rows, grads)
            else:  # the sums are taken now, from buffers the next batch reuses; their writes are small
                stored.add_rows(rows, grads)
            writes.submit(write, chunks)  # the gradient group's chunks last, as `targets` orders the flags
            progress.add(len(rows), f"{label}: ")
    unwritten = {t.path: sorted(w.waiting) for t, w in zip(targets, [*writers, stored]) if w.waiting}
    if unwritten:  # every chunk asked for lies in some computed batch; this guards that reasoning
        raise RuntimeError(f"{label}: chunks {unwritten} were not written")
    log(progress.line(f"{label}: computed ", f", lake writes busy {writes.busy_s / max(progress.elapsed, 1e-9):.0%} of the time"))
    return progress.done


class NonFiniteError(ValueError):
    """A batch whose loss or gradients are NaN or infinite: the same inputs give the same result, so no retry."""


def check_finite(losses: torch.Tensor, grads: dict[str, torch.Tensor], projected: list[dict[str, torch.Tensor]],
                 rows: np.ndarray, group: GradientGroup, label: str, model) -> None:
    """Raise NonFiniteError, naming the samples and the first tensor affected, unless everything of the batch is finite.

    Checked before anything of the batch is written, so no chunk holding a NaN is ever marked complete."""
    tensors = {**grads, **{f"{key} (projection)": v for out in projected for key, v in out.items()}}
    # A sum is NaN or infinite when any of its terms is, and reads each value once (isfinite then all() cost 30
    # times more on a CPU); only a sum of finite values that overflows takes the full check below for nothing.
    sums = [losses.sum(dtype=torch.float32), *(v.sum(dtype=torch.float32) for v in tensors.values())]
    if bool(torch.isfinite(torch.stack(sums)).all()):
        return  # one device synchronisation for the whole batch
    bad = ~torch.isfinite(losses)
    first = None
    for name, value in tensors.items():
        rows_bad = ~torch.isfinite(value.reshape(value.shape[0], -1)).all(dim=1)
        if first is None and bool(rows_bad.any()):
            first = name
        bad |= rows_bad
    if not bool(bad.any()):
        return  # finite after all: only a sum overflowed
    ids = sorted(np.asarray(group.tokens("sample"))[rows[bad.cpu().numpy()]].tolist())
    loss_bad = bool((~torch.isfinite(losses)).any())
    what = " and ".join([*(["the loss"] if loss_bad else []), *([f"the gradients ({first} first)"] if first else [])])
    cause = ""
    for name, parameter in model.named_parameters():
        if not bool(torch.isfinite(parameter).all()):
            cause = f"; the model's weights hold NaN or Inf values ({name} first): check the checkpoint"
            break
    else:
        if model.dtype in (torch.float16, torch.bfloat16):
            cause = f"; the weights are finite, so the {str(model.dtype).removeprefix('torch.')} computation overflowed: try dtype float32"
    raise NonFiniteError(f"{label}: NaN or Inf in {what} of {len(ids)} samples {ids[:5]}; nothing of this batch "
                         f"was written{cause}")


# -- Prefect wrappers -------------------------------------------------------------------------

@task(name="plan-and-create-group", cache_policy=NONE, retries=2, retry_delay_seconds=[5, 30],
      retry_condition_fn=retry_unless_bad_input)
def prepare_extraction_task(spec: ExtractionSpec, device_here: bool = True) -> tuple[str, list[int]]:
    """Validate, then create (or reopen) the group; returns its path and the shards still to do."""
    planned = plan_extraction(spec, device_here)
    group = create_group(planned)
    pending = pending_shards(spec, group)
    for note in planned.notes:
        get_run_logger().warning(note)
    get_run_logger().info(
        "group %s in %s: %d samples in chunks of %d, %d tensor%s%s; %d/%d shards of up to %d samples to do",
        planned.path, planned.store.url, planned.plan.n_samples, group.plan.chunk_rows, len(planned.lineage["layers"]),
        "" if len(planned.lineage["layers"]) == 1 else "s",
        f", {len(planned.projections)} projections on the fly" if planned.projections else "",
        len(pending), layout.n_shards(planned.plan.n_samples, spec.shard_size), min(spec.shard_size, planned.plan.n_samples),
    )
    return planned.path, pending


def pending_shards(spec: ExtractionSpec, group: GradientGroup) -> list[int]:
    """Shards of `spec.shard_size` holding any sample not yet written in the gradient group or one of its
    on-the-fly projection groups (whichever shard size wrote the others)."""
    pending = set(group.pending_shards(spec.shard_size))
    for target in projection_groups(spec, group.store, group.path):
        pending.update(target.pending_shards(spec.shard_size))
    return sorted(pending)


@task(name="extract-shard", cache_policy=NONE, retries=2, retry_delay_seconds=[10, 60], retry_condition_fn=retry_unless_bad_input,
      task_run_name="extract-{spec.variant}-shard-{shard}")
def extract_shard_task(spec: ExtractionSpec, path: str, shard: int, wait: bool = True) -> int | None:
    """Compute one shard's unfinished chunks; returns the number of samples computed (None: left to another live worker, `wait` off)."""
    group = GradientGroup.open(LakeStore(spec.lake), path)
    return extract_shard(spec, group, shard, log=get_run_logger().info, wait=wait)


@task(name="finalize-groups", cache_policy=NONE, retries=2, retry_delay_seconds=[5, 30],
      retry_condition_fn=retry_unless_bad_input)
def finalize_task(lake: str, paths: list[str]) -> bool:
    """Check every group is complete and combine mean modes' sums, in order (the gradient group last)."""
    store = LakeStore(lake)
    for path in paths:
        group = GradientGroup.open(store, path)
        problems = group.metadata_problems()  # once per run: a changed zarr.json is not taken as complete
        if problems:
            raise LakeError(f"group {path} is damaged: {problems[0]}" + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")
                            + "; run `gradlake verify` on the lake, then remove that group and extract it again")
        if not group.finalize():
            chunks = group.pending_chunks()
            raise LakeError(f"group {path} still has {len(chunks)} chunks of {group.plan.chunk_rows} samples to do "
                            f"(first samples {[group.plan.chunk_bounds(k)[0] for k in chunks[:5]]}); run the extraction again")
    return True


__all__ = ["ExtractionSpec", "ExtractionPlan", "plan_extraction", "create_group", "group_paths", "extract_shard", "Progress",
           "prepare_extraction_task", "extract_shard_task", "finalize_task", "IGNORE_INDEX"]
