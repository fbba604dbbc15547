"""Gradient extraction: the validated spec, the plan checked before any write, and the shard work.

`plan_extraction` reads configs, tokenizes and checks everything without loading
weights or writing; `extract_shard` computes one shard's gradients and writes them;
the Prefect wrappers at the bottom add retries and logging.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import partial
from importlib import metadata
from typing import Literal

import numpy as np
import torch
from prefect import get_run_logger, task
from prefect.cache_policies import NONE
from pydantic import BaseModel, ConfigDict, Field

from gradlake.lake import layout
from gradlake.lake.datasets import dataset_meta, read_dataset
from gradlake.lake.gradients import GradientGroup, GradientPlan
from gradlake.lake.store import LakeError, LakeStore, default_lake
from gradlake.tasks.gradients import PerSampleGradients, Projection
from gradlake.tasks.loss import IGNORE_INDEX, Encoded, encode_sample, pad_batch
from gradlake.tasks.model import (ModelError, ModelSpec, check_model, lake_names, load_model, load_tokenizer, parameter_shapes,
                         resolved_commit, select_parameters, tokenizer_fingerprint)
from gradlake.tasks.project import projection_group_plan, projection_path
from gradlake.tasks.projection import ProjectionSpec, output_key, projector_choices, projectors_for
from gradlake.tasks.retries import retry_unless_bad_input


class ExtractionSpec(BaseModel):
    """Everything that defines one gradient extraction."""

    model_config = ConfigDict(extra="forbid")

    model: ModelSpec = Field(description="The model under study and its checkpoint.")
    dataset: str = Field(default="probe", description="Name of a dataset in the lake (see `gradlake catalog`).")
    variant: str = Field(default="original", description="Dataset variant: 'original', 'paraphrased', 'model_generated', ...")
    paradigm: Literal["sft", "pre"] = Field(default="sft", description="'sft': loss on assistant tokens only; 'pre': loss on every token.")
    layers: list[str] = Field(default_factory=list, description="Glob patterns over parameter names, e.g. 'model.layers.*.mlp.down_proj.weight'; empty selects every parameter.")
    mode: Literal["store", "mean", "mean_normalized"] = Field(default="store", description="'store': every sample's gradient; 'mean': their mean; 'mean_normalized': the mean of per-tensor unit-normalised gradients.")
    shard_size: int = Field(default=64, ge=1, description="Samples per shard: the unit of retry, resume and (later) distribution over workers.")
    batch_size: int = Field(default=8, ge=1, description="Samples per backward pass; must divide the shard size. It is also the chunk height of stored arrays.")
    max_length: int = Field(default=1024, ge=2, description="Tokens per sample at most; longer chats are cut on the right.")
    store_dtype: Literal["float32", "float16"] = Field(default="float32", description="Dtype of the stored gradients.")
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


def gradlake_version() -> str:
    try:
        return metadata.version("gradlake")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def _encode_all(tokenizer, frame, spec: ExtractionSpec) -> list[Encoded]:
    if spec.paradigm == "sft" and not tokenizer.chat_template:
        raise ModelError(f"the tokenizer of {spec.model.model!r} has no chat template; paradigm 'sft' needs one (or use 'pre')")
    encoded = [encode_sample(tokenizer, messages, spec.paradigm, spec.max_length) for messages in frame["messages"]]
    # The first token is never predicted (labels shift by one): a sample needs a label after it.
    empty = [sid for sid, e in zip(frame["id"], encoded) if not any(e.label_mask[1:])]
    if empty:
        raise ValueError(
            f"{len(empty)} samples have no {spec.paradigm} loss token within max_length {spec.max_length} "
            f"(first: {empty[:5]}); raise max_length or drop them from the dataset"
        )
    return encoded


def plan_extraction(spec: ExtractionSpec) -> ExtractionPlan:
    """Check every input and tokenize the dataset, without loading weights or writing anything."""
    model = spec.model.resolved()
    layout.name_key("dataset", spec.dataset)
    layout.name_key("variant", spec.variant)
    if spec.shard_size % spec.batch_size:
        raise ValueError(f"shard_size {spec.shard_size} must be a multiple of batch_size {spec.batch_size}")
    if spec.projections and spec.mode != "store":
        raise ValueError(f"projections are made of per-sample gradients; they need mode 'store', not {spec.mode!r}")
    if not spec.keep_gradients and not spec.projections:
        raise ValueError("keep_gradients is off and no projection is asked for: nothing would be stored")
    labels = [p.label for p in spec.projections]
    if len(set(labels)) < len(labels):
        raise ValueError(f"the same projection is asked for twice: {labels}")
    config = check_model(model)
    shapes = parameter_shapes(model, config)
    label = f"{model.model}" + (f"@{model.checkpoint}" if model.checkpoint else "")
    names = select_parameters(list(shapes), spec.layers, label)
    selected = {n: shapes[n] for n in names}
    device = model.torch_device()
    for projection in spec.projections:  # every setting checked before anything is read or written
        projector_choices(projection, selected, device)
    store = LakeStore(spec.lake)
    store.check_writable()
    meta = dataset_meta(store, spec.dataset, spec.variant)
    frame = read_dataset(store, spec.dataset, spec.variant, meta["version"])
    if frame.empty:
        raise ValueError(f"dataset {spec.dataset!r} variant {spec.variant!r} is empty; nothing to extract")
    tokenizer = load_tokenizer(model)
    encoded = _encode_all(tokenizer, frame, spec)

    width = max(len(e.input_ids) for e in encoded)
    input_ids = np.full((len(encoded), width), -1, dtype=np.int32)
    label_mask = np.zeros((len(encoded), width), dtype=bool)
    for row, e in enumerate(encoded):
        input_ids[row, : len(e.input_ids)] = e.input_ids
        label_mask[row, : len(e.label_mask)] = e.label_mask
    model_name, checkpoint = lake_names(model)
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
        "max_length": spec.max_length,
        "gradlake_version": gradlake_version(),
    }
    plan = GradientPlan(
        n_samples=len(encoded), shard_size=spec.shard_size, batch_size=spec.batch_size,
        parameters={n: list(shapes[n]) for n in names} if spec.keep_gradients else {},
        mode=spec.mode, dtype=spec.store_dtype, max_tokens=width,
    )
    path = layout.gradient_group_path(
        layout.model_key(model_name, model.is_local), layout.key(checkpoint), spec.dataset, spec.variant,
        spec.paradigm, spec.mode,
    )
    if not spec.keep_gradients:
        lineage["gradients_kept"] = False
    projections = [projection_group_plan(path, plan, lineage, selected, p, device) for p in spec.projections]
    return ExtractionPlan(store, path, plan, lineage, [str(i) for i in frame["id"]], input_ids, label_mask, projections)


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


def _batch(group: GradientGroup, start: int, stop: int, pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The stored tokens of samples [start, stop) as a right-padded batch."""
    ids = group.group["input_ids"][start:stop]
    mask = group.group["label_mask"][start:stop]
    encoded = []
    for row_ids, row_mask in zip(ids, mask):
        keep = row_ids >= 0
        encoded.append(Encoded(row_ids[keep].tolist(), row_mask[keep].tolist()))
    input_ids, labels = pad_batch(encoded, pad_id)
    return input_ids.to(device), labels.to(device)


def extract_shard(spec: ExtractionSpec, group: GradientGroup, shard: int, log=print) -> int:
    """Compute and write one shard's gradients, then flag it complete; returns its sample count."""
    model_spec = spec.model.resolved()
    model = load_model(model_spec)
    tokenizer = load_tokenizer(model_spec)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    plan = group.plan
    start, stop = group.shard_bounds(shard)
    names = list(plan.parameters)
    sums = {n: torch.zeros(plan.numel(n), dtype=torch.float64, device=device) for n in names} if plan.mode != "store" else None
    targets = projection_groups(spec, group.store, group.path)
    layers = set(group.lineage["layers"])
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters() if n in layers}
    projections = [Projection(projectors_for(p, shapes, device), key=partial(output_key, p)) for p in spec.projections]
    began = time.perf_counter()
    with PerSampleGradients(model, names, projections) as per_sample:
        for offset in range(start, stop, plan.batch_size):
            end = min(offset + plan.batch_size, stop)
            input_ids, labels = _batch(group, offset, end, pad_id, device)
            grads = per_sample(input_ids, labels)
            for target, projected in zip(targets, per_sample.projected):
                target.write_rows(offset, {k: v.cpu().numpy() for k, v in projected.items()})
            if plan.mode == "store":
                group.write_rows(offset, {n: g.cpu().numpy() for n, g in grads.items()})
            else:
                for n, g in grads.items():
                    if plan.mode == "mean_normalized":
                        g = g / g.norm(dim=1, keepdim=True).clamp_min(torch.finfo(g.dtype).tiny)
                    sums[n] += g.sum(dim=0, dtype=torch.float64)
    if sums is not None:
        group.write_partial_sum(shard, {n: s.cpu().numpy() for n, s in sums.items()})
    for target in targets:  # the gradient group's flag last: it stands for the whole shard
        target.mark_complete(shard)
    group.mark_complete(shard)
    elapsed = time.perf_counter() - began
    log(f"shard {shard + 1}/{plan.n_shards}: samples {start}-{stop - 1} in {elapsed:.1f}s "
        f"({(stop - start) / max(elapsed, 1e-9):.1f} samples/s)")
    return stop - start


# -- Prefect wrappers -------------------------------------------------------------------------

@task(name="plan-and-create-group", cache_policy=NONE, retries=2, retry_delay_seconds=[5, 30],
      retry_condition_fn=retry_unless_bad_input)
def prepare_extraction_task(spec: ExtractionSpec) -> tuple[str, list[int]]:
    """Validate, then create (or reopen) the group; returns its path and the shards still to do."""
    planned = plan_extraction(spec)
    group = create_group(planned)
    pending = pending_shards(spec, group)
    get_run_logger().info(
        "group %s in %s: %d samples, %d tensors%s, %d/%d shards to do",
        planned.path, planned.store.url, planned.plan.n_samples, len(planned.lineage["layers"]),
        f", {len(planned.projections)} projections on the fly" if planned.projections else "",
        len(pending), planned.plan.n_shards,
    )
    return planned.path, pending


def pending_shards(spec: ExtractionSpec, group: GradientGroup) -> list[int]:
    """Shards not yet complete in the gradient group or any of its on-the-fly projection groups."""
    pending = set(group.pending_shards())
    for target in projection_groups(spec, group.store, group.path):
        pending.update(target.pending_shards())
    return sorted(pending)


@task(name="extract-shard", cache_policy=NONE, retries=2, retry_delay_seconds=[10, 60], retry_condition_fn=retry_unless_bad_input,
      task_run_name="extract-shard-{shard}")
def extract_shard_task(spec: ExtractionSpec, path: str, shard: int) -> int:
    group = GradientGroup.open(LakeStore(spec.lake), path)
    return extract_shard(spec, group, shard, log=get_run_logger().info)


@task(name="finalize-groups", cache_policy=NONE, retries=2, retry_delay_seconds=[5, 30],
      retry_condition_fn=retry_unless_bad_input)
def finalize_task(lake: str, paths: list[str]) -> bool:
    """Check every group is complete and combine mean modes' sums, in order (the gradient group last)."""
    store = LakeStore(lake)
    for path in paths:
        group = GradientGroup.open(store, path)
        if not group.finalize():
            raise LakeError(f"group {path} still has shards {group.pending_shards()} to do")
    return True


__all__ = ["ExtractionSpec", "ExtractionPlan", "plan_extraction", "create_group", "group_paths", "extract_shard",
           "prepare_extraction_task", "extract_shard_task", "finalize_task", "IGNORE_INDEX"]
