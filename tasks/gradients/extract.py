"""Gradient extraction: the validated spec, the plan checked before any write, and the shard work.

`plan_extraction` reads configs, tokenizes and checks everything without loading
weights or writing; `extract_shard` computes one shard's gradients and writes them;
the Prefect wrappers at the bottom add retries and logging.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Literal

import numpy as np
import torch
from prefect import get_run_logger, task
from prefect.cache_policies import NONE
from pydantic import BaseModel, ConfigDict, Field

from gradlake.lake import layout
from gradlake.lake.datasets import dataset_meta, read_dataset
from gradlake.lake.claims import LEASE_SECONDS, ChunkLeases
from gradlake.lake.dtypes import tensor_to_host, zarr_dtype
from gradlake.lake.gradients import ChunkAssembly, ChunkRows, GradientGroup, GradientPlan, check_shard_size, stored_chunk_rows
from gradlake.lake.overlap import BackgroundWrites
from gradlake.lake.store import LakeError, LakeStore, default_lake
from gradlake.tasks.common.lineage import gradlake_version
from gradlake.tasks.gradients.batching import WINDOW_BYTES, shard_batches, window_chunks
from gradlake.tasks.gradients.footprint import check_extraction_memory
from gradlake.tasks.gradients.engine import INPUTS_EMBEDS, PerSampleGradients, Projection, embeds_shape
from gradlake.tasks.common.loss import (CHAT_TEMPLATE_HELP, CHAT_TEMPLATES, IGNORE_INDEX, Encoded, chat_template_text,
    encode_sample, pad_batch)
from gradlake.tasks.common.model import (ModelError, ModelSpec, capped_length, check_device, check_gradient_architecture,
    check_model, check_weights, lake_names, load_model, load_tokenizer, parameter_shapes, resolved_commit, select_parameters,
    tokenizer_fingerprint)
from gradlake.tasks.projection.stored import projection_group_plan, projection_path
from gradlake.tasks.projection.projectors import ProjectionSpec, output_key, projector_choices, projectors_for
from gradlake.tasks.common.retries import retry_unless_bad_input


# Measured on the probe set (benchmarks/peers.py): sorting by length is what pays (padding from 1.47x
# the real tokens to 1.03x); on a CPU, batches larger than eight gained nothing.  The budget bounds a
# batch of long chats (8 x 1024 tokens would be 8192): four of them per pass.
DEFAULT_TOKEN_BUDGET = 4096


class ExtractionSpec(BaseModel):
    """Everything that defines one gradient extraction."""

    model_config = ConfigDict(extra="forbid")

    model: ModelSpec = Field(description="The model under study and its checkpoint.")
    dataset: str = Field(default="probe", description="Name of a dataset in the lake (see `gradlake catalog`).")
    variant: str = Field(default="original", description="Dataset variant: 'original', 'paraphrased', 'model_generated', ...")
    paradigm: Literal["sft", "pre"] = Field(default="sft", description="'sft': loss on assistant tokens only; 'pre': loss on every token.")
    layers: list[str] = Field(default_factory=list, description="Glob patterns over parameter names, e.g. 'model.layers.*.mlp.down_proj.weight'; empty selects every parameter.")
    target: Literal["parameters", "inputs_embeds", "inputs_embeds_mean"] = Field(default="parameters", description="What the gradient is taken with respect to: 'parameters' (the weights chosen by layers), 'inputs_embeds' (the input embeddings, per token: max_length x hidden values a sample, zero past its end) or 'inputs_embeds_mean' (their mean over the sample's tokens: hidden values). Each target has groups of its own (sft-inputs_embeds-store, ...), evaluated like any tensor.")
    chat_template: str = Field(default="tokenizer", description=CHAT_TEMPLATE_HELP + " Recorded in the lineage; part of what identifies the gradients.")
    labels: Literal["assistant", "last_assistant"] = Field(default="assistant", description="Paradigm 'sft': the loss is on every assistant turn ('assistant') or on the last one only ('last_assistant', as in the thesis).")
    mode: Literal["store", "mean", "mean_normalized"] = Field(default="store", description="'store': every sample's gradient; 'mean': their mean; 'mean_normalized': the mean of per-tensor unit-normalised gradients.")
    shard_size: int = Field(default=64, ge=1, description="Samples per shard: the unit of retry and of distribution over workers. A scheduling choice: a run with another shard size reuses finished gradients. Must be a multiple of the batch size and of the group's chunk height.")
    batch_size: int = Field(default=8, ge=1, description="Samples per backward pass at most; must divide the shard size. A scheduling choice too; the run that creates a group fixes its chunk height (samples per stored chunk) to it.")
    token_budget: int | None = Field(default=DEFAULT_TOKEN_BUDGET, ge=1, description="Tokens per backward pass at most, padding included: a shard's samples are sorted by length and packed into batches of up to batch_size samples within this budget (a longer sample runs alone). Empty: batches of batch_size in dataset order. A scheduling choice; results agree to float rounding, and are bitwise equal between runs with the same settings.")
    max_length: int = Field(default=1024, ge=2, description="Tokens per sample at most; longer chats are cut on the right.")
    object_mb: int = Field(default=0, ge=0, description="Gather each row-chunk's column chunks of a wide tensor into lake objects of up to this many MiB (Zarr v3 shards): at OLMo-2-7B scale 595 objects per row-chunk instead of 7,089, so fewer S3 requests and faster listings, at the cost of less concurrency per array (64 MiB objects: 0.6-0.9x the throughput on a loopback S3, 32 MiB: about 1x; benchmarks/io.py). 0: one object per 16 MiB chunk. Layout only: fixed by the run that creates a group, never changes its values.")
    store_dtype: Literal["float32", "float16", "bfloat16"] = Field(default="float32", description="Dtype of the stored gradients; 'bfloat16' is kept as its raw 16 bits and read back as float32 (see docs/lake.md).")
    projections: list[ProjectionSpec] = Field(default_factory=list, description="Random projections made on the fly, each stored in a group of its own beside the gradients (mode 'store' only).")
    keep_gradients: bool = Field(default=True, description="Store the full per-sample gradients too; turn off for models whose gradients are too large to keep (only the projections are stored).")
    lake: str = Field(default_factory=default_lake, description="Lake URL: file:///path, a directory, or s3://bucket/prefix (endpoint from GRADLAKE_S3_ENDPOINT_URL).")

@dataclass
class ExtractionPlan:
    """What `plan_extraction` established: where the group goes and exactly what it will hold."""

    store: LakeStore
    path: str
    plan: GradientPlan
    lineage: dict
    sample_ids: list[str]
    input_ids: np.ndarray
    label_mask: np.ndarray
    projections: list[tuple[str, GradientPlan, dict]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what the plan changed of the spec, said once by the run


def _encode_all(tokenizer, frame, spec: ExtractionSpec, template: str | None, max_length: int) -> list[Encoded]:
    if template is None and not tokenizer.chat_template:
        raise ModelError(f"the tokenizer of {spec.model.model!r} has no chat template; give one (chat_template 'tulu' "
                         "or a Jinja file)")
    encoded = [encode_sample(tokenizer, messages, spec.paradigm, max_length, template, spec.labels)
               for messages in frame["messages"]]
    # The first token is never predicted (labels shift by one): a sample needs a label after it.
    empty = [sid for sid, e in zip(frame["id"], encoded) if not any(e.label_mask[1:])]
    if empty:
        raise ValueError(
            f"{len(empty)} {'sample has' if len(empty) == 1 else 'samples have'} no {spec.paradigm} loss token "
            f"within max_length {max_length} "
            f"(first: {empty[:5]}); raise max_length or drop them from the dataset"
        )
    return encoded


def max_tokens(spec: ExtractionSpec, config) -> int:
    """Tokens per sample at most: `spec.max_length`, capped by the model's positions."""
    return capped_length(spec.max_length, config, "the model")[0]


def target_shape(spec: ExtractionSpec, config) -> tuple[int, ...]:
    """One sample's stored shape for an input-embedding target: (max_length, hidden) per token, (hidden,) pooled."""
    pooling = "mean" if spec.target == "inputs_embeds_mean" else "tokens"
    return embeds_shape(config.hidden_size, pooling, max_tokens(spec, config))


def plan_extraction(spec: ExtractionSpec, device_here: bool = True) -> ExtractionPlan:
    """Check every input and tokenize the dataset, without loading weights or writing anything.

    `device_here` off: the plan is made for work on other machines (the pipeline's shards on GPU
    workers), so the device is checked by them, not here."""
    model = spec.model.resolved()
    layout.name_key("dataset", spec.dataset)
    layout.name_key("variant", spec.variant)
    if spec.shard_size % spec.batch_size:
        raise ValueError(f"shard_size {spec.shard_size} must be a multiple of batch_size {spec.batch_size}")
    if spec.projections and spec.mode != "store":
        raise ValueError(f"projections are made of per-sample gradients; they need mode 'store', not {spec.mode!r}")
    if not spec.keep_gradients and not spec.projections:
        raise ValueError("keep_gradients is off and no projection is asked for: nothing would be stored")
    template = chat_template_text(spec.chat_template)  # read once; a named file must be readable where the plan is made
    labels = [p.label for p in spec.projections]
    if len(set(labels)) < len(labels):
        raise ValueError(f"the same projection is asked for twice: {labels}")
    if spec.target != "parameters" and spec.layers:
        raise ValueError(f"layers {spec.layers} choose weights, but target {spec.target!r} is the gradient with respect to "
                         "the input embeddings alone: leave layers empty, or use target 'parameters'")
    config = check_model(model)
    label = f"{model.model}" + (f"@{model.checkpoint}" if model.checkpoint else "")
    check_gradient_architecture(config, label)
    max_length, capped = capped_length(spec.max_length, config, label)
    shapes = parameter_shapes(model, config)
    if spec.target == "parameters":
        names = select_parameters(list(shapes), spec.layers, label)
        selected = {n: shapes[n] for n in names}
    else:
        names = []
        selected = {INPUTS_EMBEDS: target_shape(spec, config)}
    device = model.torch_device()
    for projection in spec.projections:  # every setting checked (from the config alone) before anything is read or written
        projector_choices(projection, selected, device, check_cost=device_here)
    if device_here:  # what the device must hold at least: refused now, not after loading the weights
        check_device(model)
        # Only a weight's kronecker projection is made from its factors; every other projection forms the gradient.
        forms = any(p.kind != "kronecker" for p in spec.projections) or (spec.projections and spec.target != "parameters")
        formed = list(selected) if forms else []
        check_extraction_memory(shapes, list(selected) if spec.keep_gradients else [], formed, model.dtype, spec.batch_size,
                                spec.mode != "store", device, extra={n: s for n, s in selected.items() if n not in shapes})
    check_weights(model, config, device_here)  # files, headers, shapes and device, before the lake is touched or a weight read
    store = LakeStore(spec.lake)
    store.check_writable()
    model_name, checkpoint = lake_names(model)
    path = layout.gradient_group_path(
        layout.model_key(model_name, model.is_local), layout.key(checkpoint), spec.dataset, spec.variant,
        spec.paradigm, spec.mode, spec.target,
    )
    # A group that exists keeps the chunk height it was created with; a new one takes the batch size
    # (which divides the shard size).  Shards must be whole chunks of every group they write.
    chunk_rows = stored_chunk_rows(store, path) or spec.batch_size
    for where in [path, *(projection_path(path, p) for p in spec.projections)]:
        check_shard_size(spec.shard_size, stored_chunk_rows(store, where) or chunk_rows, where)
    meta = dataset_meta(store, spec.dataset, spec.variant)
    frame = read_dataset(store, spec.dataset, spec.variant, meta["version"])
    if frame.empty:
        raise ValueError(f"dataset {spec.dataset!r} variant {spec.variant!r} is empty; nothing to extract")
    tokenizer = load_tokenizer(model)
    encoded = _encode_all(tokenizer, frame, spec, template, max_length)

    width = max(len(e.input_ids) for e in encoded)
    input_ids = np.full((len(encoded), width), -1, dtype=np.int32)
    label_mask = np.zeros((len(encoded), width), dtype=bool)
    for row, e in enumerate(encoded):
        input_ids[row, : len(e.input_ids)] = e.input_ids
        label_mask[row, : len(e.label_mask)] = e.label_mask
    lineage = {
        "model": model_name,
        "checkpoint": checkpoint,
        "resolved_commit": resolved_commit(model),
        "architecture": (config.architectures or [type(config).__name__])[0],
        "model_dtype": model.dtype,
        "tokenizer_hash": tokenizer_fingerprint(tokenizer),
        "dataset": spec.dataset,
        "dataset_hash": meta["content_hash"],
        "dataset_version": meta["version"],
        "dataset_lineage": meta.get("lineage", {}),
        "variant": spec.variant,
        "paradigm": spec.paradigm,
        "mode": spec.mode,
        "loss": "mean token cross-entropy over label positions (transformers convention, ignore -100)",
        "layer_patterns": list(spec.layers),
        "layers": names,
        "max_length": max_length,
        "gradlake_version": gradlake_version(),
    }
    plan = GradientPlan(
        n_samples=len(encoded), parameters={n: list(s) for n, s in selected.items()} if spec.keep_gradients else {},
        mode=spec.mode, dtype=spec.store_dtype, max_tokens=width, chunk_rows=chunk_rows, object_bytes=spec.object_mb << 20,
    )
    if not spec.keep_gradients:
        lineage["gradients_kept"] = False
    # Recorded only when not the default, so that groups made before these settings keep their fingerprint.
    if template is not None:
        lineage["chat_template"] = {"name": spec.chat_template if spec.chat_template in CHAT_TEMPLATES
                                    else os.path.basename(spec.chat_template),
                                    "sha256": hashlib.sha256(template.encode()).hexdigest()}
    if spec.labels != "assistant":
        lineage["labels"] = spec.labels
    if spec.target != "parameters":
        lineage["target"] = spec.target
    projections = [projection_group_plan(path, plan, lineage, selected, p, device, check_cost=device_here) for p in spec.projections]
    return ExtractionPlan(store, path, plan, lineage, [str(i) for i in frame["id"]], input_ids, label_mask, projections,
                          [capped] if capped else [])


def create_group(planned: ExtractionPlan) -> GradientGroup:
    """Create the gradient group (or reopen the identical one a previous run made), then its projection groups."""
    args = (planned.sample_ids, planned.input_ids, planned.label_mask)
    for path, plan, lineage in [(planned.path, planned.plan, planned.lineage), *planned.projections]:
        GradientGroup.check_path(planned.store, path, plan, lineage)  # all refused before any is written
    for path, plan, lineage in planned.projections:
        GradientGroup.create(planned.store, path, plan, lineage, *args)
    return GradientGroup.create(planned.store, planned.path, planned.plan, planned.lineage, *args)


def group_paths(spec: ExtractionSpec, path: str) -> list[str]:
    """Paths of an extraction's groups: its on-the-fly projection groups in the order of
    `spec.projections`, then the gradient group itself (finalized last)."""
    return [*(projection_path(path, p) for p in spec.projections), path]


def projection_groups(spec: ExtractionSpec, store: LakeStore, path: str) -> list[GradientGroup]:
    """The on-the-fly projection groups of an extraction, in the order of `spec.projections`."""
    return [GradientGroup.open(store, p) for p in group_paths(spec, path)[:-1]]


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


def duration(seconds: float) -> str:
    """A short human duration: '45s', '12m05s', '3h07m'."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    """Work done of a total, its rate and the time left, said at most every `every` seconds."""

    def __init__(self, total: int, unit: str, log=print, every: float = 10.0, clock=time.monotonic):
        self.total, self.unit, self.log, self.every, self.clock = total, unit, log, every, clock
        self.done = 0
        self.began = self.last = clock()

    @property
    def elapsed(self) -> float:
        return self.clock() - self.began

    @property
    def percent(self) -> float:
        return 100.0 * self.done / self.total if self.total else 100.0

    def line(self, what: str = "", extra: str = "") -> str:
        elapsed = self.elapsed
        rate = self.done / elapsed if elapsed > 0 else 0.0
        left = f"ETA {duration((self.total - self.done) / rate)}" if rate > 0 else "ETA unknown"
        if self.done >= self.total:
            left = f"done in {duration(elapsed)}"
        return f"{what}{self.done}/{self.total} {self.unit} ({self.percent:.0f}%), {rate:.2f} {self.unit}/s{extra}, {left}"

    def add(self, n: int, what: str = "", extra: str = "") -> bool:
        """Count `n` more; log a line if `every` seconds passed since the last one. True if it logged."""
        self.done += n
        now = self.clock()
        if now - self.last < self.every:
            return False
        self.last = now
        self.log(self.line(what, extra))
        return True


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
    ids, mask = group.group["input_ids"][start:stop], group.group["label_mask"][start:stop]
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

    def write(rows: np.ndarray, projected: list[dict[str, np.ndarray]], grads: dict[str, np.ndarray] | None) -> None:
        for writer, arrays in zip(writers, projected):
            writer.add_rows(rows, arrays)
        if grads is not None:
            stored.add_rows(rows, grads)
        leases.renew()

    progress = Progress(sum(len(b) for b in batches), "samples", log)
    pooling = "mean" if spec.target == "inputs_embeds_mean" else "tokens"
    with PerSampleGradients(model, names, projections, pooling, max_tokens(spec, model.config)) as per_sample, \
            BackgroundWrites() as writes:
        for rows in batches:
            input_ids, labels = _batch(ids, mask, rows - start, pad_id, device)
            grads = per_sample(input_ids, labels, torch.as_tensor(lengths[rows - start], device=device))
            check_finite(per_sample.losses, grads, per_sample.projected, rows, group, label, model)
            projected = [{k: tensor_to_host(v, t.plan.dtype) for k, v in out.items()}
                         for t, out in zip(targets, per_sample.projected)]
            if plan.mode == "store":
                writes.submit(write, rows, projected, {n: tensor_to_host(g, plan.dtype) for n, g in grads.items()})
            else:  # the sums are taken now, from buffers the next batch reuses; their writes are small
                stored.add_rows(rows, grads)
                writes.submit(write, rows, projected, None)
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
    if bool(torch.stack([torch.isfinite(losses).all(), *(torch.isfinite(v).all() for v in tensors.values())]).all()):
        return  # one device synchronisation for the whole batch
    bad = ~torch.isfinite(losses)
    first = None
    for name, value in tensors.items():
        rows_bad = ~torch.isfinite(value.reshape(value.shape[0], -1)).all(dim=1)
        if first is None and bool(rows_bad.any()):
            first = name
        bad |= rows_bad
    ids = sorted(np.asarray(group.group["sample"][:])[rows[bad.cpu().numpy()]].tolist())
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
