"""Gradient extraction: the validated spec, the plan checked before any write, and the shard work.

`plan_extraction` reads configs, tokenizes and checks everything without loading
weights or writing; `extract_shard` computes one shard's gradients and writes them;
the Prefect wrappers at the bottom add retries and logging.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from importlib import metadata
from typing import Literal

import numpy as np
import torch
from prefect import get_run_logger, task
from prefect.cache_policies import NONE
from pydantic import BaseModel, ConfigDict, Field

from lake import layout
from lake.datasets import dataset_meta, read_dataset
from lake.gradients import GradientGroup, GradientPlan
from lake.store import LakeError, LakeStore
from tasks.gradients import PerSampleGradients
from tasks.loss import IGNORE_INDEX, Encoded, encode_sample, pad_batch
from tasks.model import (ModelError, ModelSpec, check_model, lake_names, load_model, load_tokenizer, parameter_shapes,
                         resolved_commit, select_parameters, tokenizer_fingerprint)


def default_lake() -> str:
    """The lake URL from ``GRADLAKE_LAKE``, else ``demo-lake`` in the working directory."""
    return os.environ.get("GRADLAKE_LAKE") or "demo-lake"


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
    config = check_model(model)
    shapes = parameter_shapes(model, config)
    label = f"{model.model}" + (f"@{model.checkpoint}" if model.checkpoint else "")
    names = select_parameters(list(shapes), spec.layers, label)
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
        parameters={n: list(shapes[n]) for n in names}, mode=spec.mode, dtype=spec.store_dtype, max_tokens=width,
    )
    path = layout.gradient_group_path(
        layout.model_key(model_name, model.is_local), layout.key(checkpoint), spec.dataset, spec.variant,
        spec.paradigm, spec.mode,
    )
    return ExtractionPlan(store, path, plan, lineage, [str(i) for i in frame["id"]], input_ids, label_mask)


def create_group(planned: ExtractionPlan) -> GradientGroup:
    """Create the gradient group (or reopen the identical one a previous run made)."""
    return GradientGroup.create(planned.store, planned.path, planned.plan, planned.lineage,
                                planned.sample_ids, planned.input_ids, planned.label_mask)


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
    began = time.perf_counter()
    with PerSampleGradients(model, names) as per_sample:
        for offset in range(start, stop, plan.batch_size):
            end = min(offset + plan.batch_size, stop)
            input_ids, labels = _batch(group, offset, end, pad_id, device)
            grads = per_sample(input_ids, labels)
            if plan.mode == "store":
                group.write_rows(offset, {n: g.cpu().numpy() for n, g in grads.items()})
            else:
                for n, g in grads.items():
                    if plan.mode == "mean_normalized":
                        g = g / g.norm(dim=1, keepdim=True).clamp_min(torch.finfo(g.dtype).tiny)
                    sums[n] += g.sum(dim=0, dtype=torch.float64)
    if sums is not None:
        group.write_partial_sum(shard, {n: s.cpu().numpy() for n, s in sums.items()})
    group.mark_complete(shard)
    elapsed = time.perf_counter() - began
    log(f"shard {shard + 1}/{plan.n_shards}: samples {start}-{stop - 1} in {elapsed:.1f}s "
        f"({(stop - start) / max(elapsed, 1e-9):.1f} samples/s)")
    return stop - start


# -- Prefect wrappers -------------------------------------------------------------------------

def retry_unless_bad_input(task, task_run, state) -> bool:
    """Retry failures of the machine or network, never a ValueError: bad input stays bad."""
    error = state.data if isinstance(state.data, BaseException) else None
    if error is None:
        try:
            state.result(raise_on_failure=True)
        except BaseException as raised:  # the state's own exception, re-raised to look at it
            error = raised
    return not isinstance(error, ValueError)


@task(name="plan-and-create-group", cache_policy=NONE, retries=2, retry_delay_seconds=[5, 30],
      retry_condition_fn=retry_unless_bad_input)
def prepare_extraction_task(spec: ExtractionSpec) -> tuple[str, list[int]]:
    """Validate, then create (or reopen) the group; returns its path and the shards still to do."""
    planned = plan_extraction(spec)
    group = create_group(planned)
    pending = group.pending_shards()
    get_run_logger().info(
        "group %s in %s: %d samples, %d tensors, %d/%d shards to do",
        planned.path, planned.store.url, planned.plan.n_samples, len(planned.plan.parameters),
        len(pending), planned.plan.n_shards,
    )
    return planned.path, pending


@task(name="extract-shard", cache_policy=NONE, retries=2, retry_delay_seconds=[10, 60], retry_condition_fn=retry_unless_bad_input,
      task_run_name="extract-shard-{shard}")
def extract_shard_task(spec: ExtractionSpec, path: str, shard: int) -> int:
    group = GradientGroup.open(LakeStore(spec.lake), path)
    return extract_shard(spec, group, shard, log=get_run_logger().info)


@task(name="finalize-group", cache_policy=NONE, retries=2, retry_delay_seconds=[5, 30],
      retry_condition_fn=retry_unless_bad_input)
def finalize_task(spec: ExtractionSpec, path: str) -> bool:
    group = GradientGroup.open(LakeStore(spec.lake), path)
    complete = group.finalize()
    if not complete:
        raise LakeError(f"group {path} still has shards {group.pending_shards()} to do")
    return complete


__all__ = ["ExtractionSpec", "ExtractionPlan", "plan_extraction", "create_group", "extract_shard",
           "prepare_extraction_task", "extract_shard_task", "finalize_task", "IGNORE_INDEX"]
