"""A gradient extraction planned before any write: the validated spec, the tokenized dataset, the group it fills and its lineage."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from gradlake.lake import layout
from gradlake.lake.datasets import dataset_meta, read_dataset
from gradlake.lake.extractions import group_path
from gradlake.lake.gradient_plan import GradientPlan, check_shard_size, stored_chunk_rows
from gradlake.lake.gradients import GradientGroup
from gradlake.lake.store import LakeStore, default_lake
from gradlake.tasks.common.lineage import gradlake_version
from gradlake.tasks.common.loss import CHAT_TEMPLATE_HELP, CHAT_TEMPLATES, Encoded, chat_template_text, encode_sample
from gradlake.tasks.common.model import (ModelError, ModelSpec, capped_length, check_device, check_gradient_architecture,
                                         check_model, lake_names, load_tokenizer, parameter_shapes,
                                         resolved_commit, select_parameters, tokenizer_fingerprint)
from gradlake.tasks.common.weights import check_weights
from gradlake.tasks.gradients.engine import INPUTS_EMBEDS, embeds_shape
from gradlake.tasks.gradients.footprint import check_extraction_memory
from gradlake.tasks.projection.spec import ProjectionSpec
from gradlake.tasks.projection.projectors import projector_choices
from gradlake.tasks.projection.stored import projection_group_plan, projection_path


# Measured on the probe set (benchmarks/peers.py): sorting by length is what pays (padding from 1.47x
# the real tokens to 1.03x); on a CPU, batches larger than eight gained nothing.  The budget bounds a
# batch of long chats (8 x 1024 tokens would be 8192): four of them per pass.
DEFAULT_TOKEN_BUDGET = 4096


class ExtractionData(BaseModel):
    """The dataset an extraction reads (the extraction names one variant of it, the pipeline several)."""

    model_config = ConfigDict(extra="forbid")

    dataset: str = Field(default="probe", title="Dataset", description="Name of a dataset in the lake (see `gradlake catalog`).")

    _names = layout.name_fields("dataset")


class ExtractionSettings(BaseModel):
    """How gradients are taken and stored: declared once, for `ExtractionSpec` and the pipeline's settings alike
    (their names, defaults and JSON are those of the extraction, so lineage and fingerprints do not depend on which ran)."""

    model_config = ConfigDict(extra="forbid")

    paradigm: Literal["sft", "pre"] = Field(default="sft", title="Paradigm", description="'sft': loss on assistant tokens only; 'pre': loss on every token.")
    layers: list[str] = Field(default=[], title="Layers", description="Glob patterns over parameter names, e.g. 'model.layers.*.mlp.down_proj.weight'; empty selects every parameter.")
    chat_template: str = Field(default="tokenizer", title="Chat template", description=CHAT_TEMPLATE_HELP + " A file must be readable where the extraction runs. Recorded in the lineage; part of what identifies the gradients.")
    labels: Literal["assistant", "last_assistant"] = Field(default="assistant", title="Loss on", description="Paradigm 'sft': the loss is on every assistant turn ('assistant') or on the last one only ('last_assistant', as in the thesis).")
    target: Literal["parameters", "inputs_embeds", "inputs_embeds_mean"] = Field(default="parameters", title="Gradient with respect to", description="What the gradient is taken with respect to: 'parameters' (the weights chosen by layers), 'inputs_embeds' (the input embeddings, per token: max_length x hidden values a sample, zero past its end) or 'inputs_embeds_mean' (their mean over the sample's tokens: hidden values). Each target has groups of its own (sft-inputs_embeds-store, ...), evaluated like any tensor.")
    shard_size: int = Field(default=64, ge=1, title="Shard size", description="Samples per shard: the unit of retry, resume and sharing between workers. A scheduling choice: a run with another shard size reuses finished gradients. Must be a multiple of the batch size and of the group's chunk height.")
    batch_size: int = Field(default=8, ge=1, title="Batch size", description="Samples per backward pass at most; must divide the shard size. A scheduling choice too; the run that creates a group fixes its chunk height (samples per stored chunk) to it.")
    token_budget: int | None = Field(default=DEFAULT_TOKEN_BUDGET, ge=1, title="Token budget", description="Tokens per backward pass at most, padding included: a shard's samples are sorted by length and packed into batches of up to batch_size samples within this budget (a longer sample runs alone). Empty: batches of batch_size in dataset order. A scheduling choice; results agree to float rounding, and are bitwise equal between runs with the same settings.")
    max_length: int = Field(default=1024, ge=2, title="Max length (tokens)", description="Tokens per sample at most; longer chats are cut on the right.")
    projections: list[ProjectionSpec] = Field(default=[], title="Projections", description="Random projections made on the fly, each stored in a group of its own beside the gradients (mode 'store' only).")
    keep_gradients: bool = Field(default=True, title="Keep gradients", description="Store the full per-sample gradients too; turn off for models whose gradients are too large to keep (only the projections are stored).")
    object_mb: int = Field(default=0, ge=0, title="Lake object size (MiB)", description="Gather each row-chunk's column chunks of a wide tensor into lake objects of up to this many MiB (Zarr v3 shards): at OLMo-2-7B scale 595 objects per row-chunk instead of 7,089, so fewer S3 requests and faster listings, at the cost of less concurrency per array (64 MiB objects: 0.6-0.9x the throughput on a loopback S3, 32 MiB: about 1x; benchmarks/io.py). 0: one object per 16 MiB chunk. Layout only: fixed by the run that creates a group, never changes its values.")


class _ModelUnderStudy(BaseModel):  # first in the form
    model_config = ConfigDict(extra="forbid")

    model: ModelSpec = Field(title="Model", description="The model under study and its checkpoint.")


class ExtractionSpec(ExtractionSettings, ExtractionData, _ModelUnderStudy):
    """Everything that defines one gradient extraction."""

    variant: str = Field(default="original", title="Variant", description="Dataset variant: 'original', 'paraphrased', 'model_generated', ...")
    _variant = layout.name_fields("variant")
    mode: Literal["store", "mean", "mean_normalized"] = Field(default="store", title="Mode", description="'store': every sample's gradient; 'mean': their mean; 'mean_normalized': the mean of per-tensor unit-normalised gradients.")
    store_dtype: Literal["float32", "float16", "bfloat16"] = Field(default="float32", title="Stored dtype", description="Dtype of the stored gradients; 'bfloat16' is kept as its raw 16 bits and read back as float32 (see docs/lake.md).")
    lake: str = Field(default_factory=default_lake, title="Lake", description="Lake URL: file:///path, a directory, or s3://bucket/prefix (endpoint from GRADLAKE_S3_ENDPOINT_URL).")


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


# A command plans once to check its inputs before its flow starts, and the flow plans again in the same process.
# What costs in proportion to the checkpoint (its content hash reads every weight: minutes at 7B) or to the
# dataset (tokenizing every chat) is kept from one plan to the next, keyed by what it is made from, the
# files' size, mtime and inode included: a file changed in between is read again, never taken from here.
_KEPT: dict[str, tuple[Any, Any]] = {}


def _kept(kind: str, key: Any, make: Callable[[], Any]) -> Any:
    held = _KEPT.get(kind)
    if held is None or held[0] != key:
        held = _KEPT[kind] = (key, make())
    return held[1]


def _files_state(path: str) -> tuple:
    """What a directory's files are, as far as their stats tell; empty for what is not a directory (a hub id)."""
    root = Path(path)
    if not root.is_dir():
        return ()
    return tuple((f.name, st.st_size, st.st_mtime_ns, st.st_ino) for f in sorted(root.iterdir()) if f.is_file()
                 for st in [f.stat()])


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
    directory = layout.gradients_dir(layout.model_key(model_name, model.is_local), layout.key(checkpoint),
                                     spec.dataset, spec.variant)
    meta = dataset_meta(store, spec.dataset, spec.variant)
    source = _files_state(model.source()[0])
    # A local checkpoint's content hash is kept while its files stay as they were; a hub revision is looked up every
    # time (a branch may move between two plans, and the lookup is cheap).
    commit = _kept("commit", (model.model_dump_json(), source), lambda: resolved_commit(model)) if source \
        else resolved_commit(model)
    tokenizer = load_tokenizer(model)
    fingerprint = tokenizer_fingerprint(tokenizer)
    tokens_key = (commit, source, fingerprint, meta["content_hash"], meta["version"], spec.dataset, spec.variant,
                  spec.paradigm, spec.labels, template, max_length)
    sample_ids, input_ids, label_mask = _kept("tokens", tokens_key, lambda: _tokenized(store, spec, meta, tokenizer, template,
                                                                                       max_length))
    lineage = {
        "model": model_name,
        "checkpoint": checkpoint,
        "resolved_commit": commit,
        "architecture": (config.architectures or [type(config).__name__])[0],
        "model_dtype": model.dtype,
        "tokenizer_hash": fingerprint,
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
        n_samples=len(sample_ids), parameters={n: list(s) for n, s in selected.items()} if spec.keep_gradients else {},
        mode=spec.mode, dtype=spec.store_dtype, max_tokens=input_ids.shape[1], chunk_rows=spec.batch_size,
        object_bytes=spec.object_mb << 20,
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
    # The settings that tell extractions of one variant apart name its group (lake.extractions); the chunk height
    # is layout, not identity, so the group is found before it is known.
    settings = layout.extraction_settings(spec.layers, spec.store_dtype)
    path = group_path(store, directory, spec.paradigm, spec.mode, spec.target, settings, lineage, plan)
    # A group that exists keeps the chunk height it was created with; a new one takes the batch size
    # (which divides the shard size).  Shards must be whole chunks of every group they write.
    plan = replace(plan, chunk_rows=stored_chunk_rows(store, path) or spec.batch_size)
    for where in [path, *(projection_path(path, p) for p in spec.projections)]:
        check_shard_size(spec.shard_size, stored_chunk_rows(store, where) or plan.chunk_rows, where)
    projections = [projection_group_plan(path, plan, lineage, selected, p, device, check_cost=device_here) for p in spec.projections]
    return ExtractionPlan(store, path, plan, lineage, list(sample_ids), input_ids, label_mask, projections,
                          [capped] if capped else [])


def _tokenized(store: LakeStore, spec: ExtractionSpec, meta: dict, tokenizer, template: str | None,
               max_length: int) -> tuple[list[str], np.ndarray, np.ndarray]:
    """The dataset variant's sample ids, and its chats tokenized as right-padded (-1) token ids and label masks."""
    frame = read_dataset(store, spec.dataset, spec.variant, meta["version"])
    if frame.empty:
        raise ValueError(f"dataset {spec.dataset!r} variant {spec.variant!r} is empty; nothing to extract")
    encoded = _encode_all(tokenizer, frame, spec, template, max_length)
    width = max(len(e.input_ids) for e in encoded)
    input_ids = np.full((len(encoded), width), -1, dtype=np.int32)
    label_mask = np.zeros((len(encoded), width), dtype=bool)
    for row, e in enumerate(encoded):
        input_ids[row, : len(e.input_ids)] = e.input_ids
        label_mask[row, : len(e.label_mask)] = e.label_mask
    input_ids.setflags(write=False)  # shared by the plans that reuse them (_kept)
    label_mask.setflags(write=False)
    return [str(i) for i in frame["id"]], input_ids, label_mask


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
