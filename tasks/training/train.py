"""Training a model on lake data: deterministic, checkpointed as Hugging Face directories, resumable.

Attribution needs a model that has learned something from known samples, and a ground
truth needs many retrainings that differ only in their data.  So a training run here is
a pure function of its `TrainSpec`:

- the data order is drawn from the seed alone (epoch ``e`` is the permutation
  ``numpy.random.default_rng([seed, e])`` of the kept samples, cut into batches), so the
  samples of any step are known without replaying the run, and are recorded;
- the learning rate is a function of the step (no scheduler state);
- the loss is the extraction's (``tasks/common/loss.py``): the mean over the batch of each
  sample's mean token loss, for the same paradigm.

A checkpoint is a Hugging Face directory (config, ``model.safetensors``, tokenizer,
generation config) plus ``gradlake_train.json`` (lineage: base model and commit, dataset
versions, hyperparameters, the sample ids trained on up to that step in order, gradlake
version) and ``trainer_state/`` (AdamW moments and RNG state as safetensors, scalars as
JSON: no pickles).  It becomes visible only when whole: a local checkpoint is written
beside its final name (a hidden ``.partial`` directory, which the watcher ignores) and
renamed into place; on S3 every other file is uploaded before the weights, whose object
appears only when its upload completes, so the watcher's test (config plus whole weight
files) holds exactly when the checkpoint is complete.

A run killed at any point resumes from its last complete checkpoint (same weights,
optimizer moments, step and RNG state), and ends with the same weights, bit for bit on
CPU, as a run that was never interrupted.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import fsspec
import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from gradlake.lake.datasets import dataset_meta, read_dataset
from gradlake.lake.store import LakeStore, storage_options_for
from gradlake.tasks.common.lineage import gradlake_version
from gradlake.tasks.common.checkpoints import checkpoint_complete
from gradlake.tasks.common.loss import (CHAT_TEMPLATE_HELP, Encoded, Paradigm, chat_template_text, encode_sample, pad_batch,
    sample_losses)
from gradlake.tasks.data.quality import QualitySpec
from gradlake.tasks.common.model import (DTYPES, ModelError, ModelSpec, capped_length, check_model, check_weights, lake_names,
    resolved_commit)

LINEAGE_FILE = "gradlake_train.json"
STATE_DIR = "trainer_state"
CHECKPOINT_PREFIX = "checkpoint-"
Schedule = Literal["constant", "linear", "cosine"]


class TrainError(ValueError):
    """A training spec that cannot run, named with what would be accepted."""


class TrainSpec(BaseModel):
    """One training run: base model, lake data, loss, optimizer, schedule, length, seed and checkpoints."""

    model_config = ConfigDict(extra="forbid")

    model: ModelSpec = Field(title="Base model", description="The model and checkpoint training starts from (its dtype is the training dtype).")
    lake: str = Field(title="Lake", description="Lake URL the training data is read from.")
    dataset: str = Field(title="Dataset", description="Dataset in the lake to train on.")
    variants: list[str] = Field(default=["original"], min_length=1, title="Variants", description="Variants of the dataset trained on, together (a sample is 'variant:id').")
    version: str | None = Field(default=None, title="Version", description="Dataset version (one variant only); empty: the latest of each variant.")
    paradigm: Paradigm = Field(default="sft", description="Loss tokens: 'sft' assistant turns only, 'pre' every token (as in extraction).")
    output: str = Field(title="Checkpoint prefix", description="Directory or s3:// prefix that receives the checkpoints (checkpoint-000100, ...).")
    steps: int | None = Field(default=None, ge=1, description="Optimizer steps; empty: `epochs` passes over the data.")
    epochs: int = Field(default=1, ge=1, description="Passes over the data when `steps` is empty.")
    batch_size: int = Field(default=8, ge=1, description="Samples per optimizer step.")
    micro_batch_size: int | None = Field(default=None, ge=1, description="Samples per forward/backward pass (gradient accumulation); empty: the whole batch.")
    learning_rate: float = Field(default=1e-4, gt=0, description="Peak AdamW learning rate.")
    schedule: Schedule = Field(default="linear", description="Learning-rate decay after warm-up: constant, linear to 0 or cosine to 0.")
    warmup_steps: int = Field(default=0, ge=0, description="Steps of linear warm-up from 0 to the peak rate.")
    weight_decay: float = Field(default=0.0, ge=0, description="AdamW decoupled weight decay.")
    max_grad_norm: float | None = Field(default=1.0, gt=0, description="Clip the gradient's global norm to this; empty: no clipping.")
    seed: int = Field(default=0, description="Seeds the data order and torch's RNG.")
    max_length: int = Field(default=512, ge=8, description="Tokens per sample at most (longer chats are cut, as in extraction).")
    checkpoint_every: int = Field(default=0, ge=0, description="Save a checkpoint every this many steps; 0: only the final one.")
    save_steps: list[int] = Field(default=[], description="Further steps to save a checkpoint at (those beyond the run's end are ignored).")
    save_initial: bool = Field(default=False, description="Also save the base model as checkpoint-000000 (step 0).")
    chat_template: str = Field(default="tokenizer", description=CHAT_TEMPLATE_HELP + " The same setting must render the gradients and influence of this model.")
    keep: list[str] | None = Field(default=None, description="Train only on these sample ids (ids as in the dataset; all variants of each).")
    drop: list[str] | None = Field(default=None, description="Train on every sample except these ids.")
    storage_options: dict = Field(default={}, description="fsspec options for an s3:// prefix (no credentials: those come from the environment).")
    quality: QualitySpec | None = Field(default=QualitySpec(), title="Answer quality", description="Score each checkpoint's greedy answers (ROUGE-L, BLEU, optional LLM judge) into the lake; empty: skip.")

    @model_validator(mode="after")
    def _check(self) -> "TrainSpec":
        if self.version and len(self.variants) != 1:
            raise ValueError(f"version {self.version!r} names one version of one variant; variants are {self.variants}")
        if self.keep is not None and self.drop is not None:
            raise ValueError("give `keep` or `drop`, not both")
        if self.micro_batch_size and self.micro_batch_size > self.batch_size:
            raise ValueError(f"micro_batch_size {self.micro_batch_size} exceeds batch_size {self.batch_size}")
        if len(set(self.variants)) != len(self.variants):
            raise ValueError(f"variants {self.variants} repeat a name")
        return self


@dataclass
class TrainData:
    """The samples of a run, in dataset order, with the lineage of where they came from."""

    keys: list[str]             # 'variant:id', unique
    ids: list[str]              # the dataset id of each
    chats: list[list[dict]]
    versions: dict[str, str]    # variant -> dataset version


@dataclass
class Plan:
    """What a validated run will do: its data, length, fingerprint and where it resumes."""

    spec: TrainSpec
    data: TrainData
    total_steps: int
    steps_per_epoch: int
    base_commit: str
    fingerprint: str
    saves: list[int]
    done: list[int]             # steps whose checkpoints already exist (this run's)

    def checkpoint_name(self, step: int) -> str:
        return checkpoint_name(step)


def checkpoint_name(step: int) -> str:
    """Zero-padded so that name order is step order (the watcher lists checkpoints by name)."""
    return f"{CHECKPOINT_PREFIX}{step:06d}"


# ---------------------------------------------------------------- data and order

def load_train_data(spec: TrainSpec) -> TrainData:
    """The kept samples of every variant, or one clear error (missing dataset/variant, unknown ids, nothing left)."""
    store = LakeStore(spec.lake)
    keys, ids, chats, versions = [], [], [], {}
    known: set[str] = set()
    for variant in spec.variants:
        meta = dataset_meta(store, spec.dataset, variant, spec.version)
        frame = read_dataset(store, spec.dataset, variant, meta["version"])
        versions[variant] = meta["version"]
        known.update(frame["id"])
        chosen = set(spec.keep) if spec.keep is not None else None
        dropped = set(spec.drop or [])
        for sample_id, messages in zip(frame["id"], frame["messages"]):
            if (chosen is not None and sample_id not in chosen) or sample_id in dropped:
                continue
            keys.append(f"{variant}:{sample_id}")
            ids.append(sample_id)
            chats.append(messages)
    named = list(spec.keep or []) + list(spec.drop or [])
    unknown = [i for i in named if i not in known]
    if unknown:
        raise TrainError(f"sample ids {unknown[:5]} are not in dataset {spec.dataset!r} ({spec.variants}); "
                         f"ids look like {sorted(known)[:3]}")
    if not keys:
        raise TrainError(f"no sample of dataset {spec.dataset!r} {spec.variants} is left to train on after keep/drop")
    return TrainData(keys=keys, ids=ids, chats=chats, versions=versions)


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The permutation of the n samples used in `epoch`: a function of (seed, epoch) only."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def batch_of_step(step: int, seed: int, n: int, batch_size: int) -> list[int]:
    """Sample indexes of optimizer step `step` (0-based); an epoch's last batch may be short."""
    per_epoch = math.ceil(n / batch_size)
    epoch, within = divmod(step, per_epoch)
    order = epoch_order(seed, epoch, n)
    return order[within * batch_size:(within + 1) * batch_size].tolist()


def trained_order(plan: Plan, through_step: int) -> list[str]:
    """The sample keys of steps 0 .. through_step-1, in the order they were trained on."""
    n, size = len(plan.data.keys), plan.spec.batch_size
    return [plan.data.keys[i] for s in range(through_step) for i in batch_of_step(s, plan.spec.seed, n, size)]


def learning_rate(spec: TrainSpec, step: int, total: int) -> float:
    """The rate of optimizer step `step` (0-based): warm-up, then constant, linear or cosine decay to 0."""
    if step < spec.warmup_steps:
        return spec.learning_rate * (step + 1) / spec.warmup_steps
    if spec.schedule == "constant":
        return spec.learning_rate
    span = max(1, total - spec.warmup_steps)
    progress = min(1.0, (step - spec.warmup_steps) / span)
    if spec.schedule == "linear":
        return spec.learning_rate * (1.0 - progress)
    return spec.learning_rate * 0.5 * (1.0 + math.cos(math.pi * progress))


# ---------------------------------------------------------------- checkpoint prefix

def output_fs(spec: TrainSpec) -> tuple[fsspec.AbstractFileSystem, str]:
    url = spec.output
    return fsspec.core.url_to_fs(url, **storage_options_for(url, spec.storage_options))


def check_output_writable(spec: TrainSpec) -> None:
    """Write and delete a probe object under the checkpoint prefix, or raise one clear error."""
    fs, root = output_fs(spec)
    probe = f"{root.rstrip('/')}/.gradlake-write-probe"
    try:
        fs.makedirs(root, exist_ok=True)
        fs.pipe_file(probe, b"ok")
        fs.rm_file(probe)
    except Exception as err:  # permission, missing bucket, read-only file system, endpoint down
        raise TrainError(f"checkpoint prefix {spec.output!r} is not writable ({type(err).__name__}: {err}); "
                         "give a directory or s3:// prefix this worker can write") from None


def run_fingerprint(spec: TrainSpec, base_commit: str, versions: dict[str, str]) -> str:
    """Everything that determines the weights, hashed: checkpoints of one run share it."""
    what = spec.model_dump(mode="json", exclude={"output", "checkpoint_every", "save_steps", "save_initial", "storage_options", "lake",
                                                  "quality"})
    if spec.chat_template == "tokenizer":  # runs made before the setting existed keep their fingerprint
        del what["chat_template"]
    else:  # a Jinja file counts by its text, not its path
        what["chat_template"] = hashlib.sha256((chat_template_text(spec.chat_template) or "").encode()).hexdigest()
    what["model"] = {"source": list(lake_names(spec.model)), "commit": base_commit, "dtype": spec.model.dtype}
    what["versions"] = versions
    return "sha256:" + hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:32]


def existing_checkpoints(spec: TrainSpec) -> dict[int, dict]:
    """Complete checkpoints under the prefix: step -> their lineage record."""
    fs, root = output_fs(spec)
    if not fs.isdir(root):
        return {}
    found = {}
    for path in fs.ls(root, detail=False):
        name = path.rstrip("/").rsplit("/", 1)[-1]
        if not name.startswith(CHECKPOINT_PREFIX) or not fs.isdir(path) or not checkpoint_complete(fs, path):
            continue
        try:
            record = json.loads(fs.cat_file(f"{path}/{LINEAGE_FILE}"))
        except FileNotFoundError:
            record = {}
        found[int(record.get("step", -1))] = record | {"name": name}
    return found


def total_steps(spec: TrainSpec, n_samples: int) -> int:
    """Optimizer steps of a run over `n_samples` training samples: `steps`, else `epochs` passes of ceil(n / batch)."""
    return spec.steps or spec.epochs * math.ceil(n_samples / spec.batch_size)


def plan_run(spec: TrainSpec) -> Plan:
    """Validate everything before any training or writing; the plan says what is left to do."""
    config = check_model(spec.model)
    check_weights(spec.model, config)
    data = load_train_data(spec)
    check_output_writable(spec)
    chat_template_text(spec.chat_template)  # a named Jinja file must be readable before anything runs
    per_epoch = math.ceil(len(data.keys) / spec.batch_size)
    total = total_steps(spec, len(data.keys))
    every = spec.checkpoint_every or total
    saves = sorted({*range(every, total, every), total, *(s for s in spec.save_steps if 0 < s <= total)}
                   | ({0} if spec.save_initial else set()))
    base_commit = resolved_commit(spec.model.resolved())
    fingerprint = run_fingerprint(spec, base_commit, data.versions)
    existing = existing_checkpoints(spec)
    foreign = {s: r for s, r in existing.items() if r.get("fingerprint") != fingerprint}
    if foreign:
        step, record = sorted(foreign.items())[0]
        raise TrainError(f"checkpoint prefix {spec.output!r} holds {record['name']} of another training run "
                         f"(fingerprint {record.get('fingerprint')}, this run {fingerprint}); "
                         "give a new prefix, or the same spec to resume that run")
    del config
    return Plan(spec=spec, data=data, total_steps=total, steps_per_epoch=per_epoch, base_commit=base_commit,
                fingerprint=fingerprint, saves=saves, done=sorted(existing))


# ---------------------------------------------------------------- optimizer state without pickles

def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """AdamW's state as flat tensors ('<param index>.<name>') plus JSON-able param groups."""
    state = optimizer.state_dict()
    tensors = {f"{index}.{name}": value.detach().reshape(-1).contiguous() if value.dim() == 0 else value.contiguous()
               for index, slots in state["state"].items() for name, value in slots.items()}
    scalars = {f"{index}.{name}": value.dim() == 0 for index, slots in state["state"].items()
               for name, value in slots.items()}
    return tensors, {"param_groups": state["param_groups"], "scalar": scalars}


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], info: dict) -> None:
    state: dict[int, dict] = {}
    for flat, value in tensors.items():
        index, name = flat.split(".", 1)
        state.setdefault(int(index), {})[name] = value.reshape(()) if info["scalar"][flat] else value
    optimizer.load_state_dict({"state": state, "param_groups": info["param_groups"]})


def rng_tensors() -> dict[str, torch.Tensor]:
    out = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"torch_cuda_{i}"] = s
    return out


def restore_rng(tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("torch_cuda_"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


# ---------------------------------------------------------------- writing and reading checkpoints

def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocols or "local" in protocols


def _publish(local: Path, spec: TrainSpec, name: str) -> str:
    """Move a finished local checkpoint directory to the prefix so that it appears whole or not at all."""
    fs, root = output_fs(spec)
    target = f"{root.rstrip('/')}/{name}"
    if _is_local(fs):
        staging = Path(f"{root.rstrip('/')}/.{name}.partial")
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(local, staging)
        if Path(target).exists():  # an older copy of the same step (same fingerprint): replace it
            shutil.rmtree(target)
        os.replace(staging, target)
        return target
    files = sorted(p for p in local.rglob("*") if p.is_file())
    weights = [p for p in files if p.name.startswith("model") and p.suffix == ".safetensors"]
    index = [p for p in files if p.name == "model.safetensors.index.json"]
    first = [p for p in files if p not in weights and p not in index]
    for path in [*first, *weights, *index]:  # weights (and their index) last: their presence means complete
        fs.put_file(str(path), f"{target}/{path.relative_to(local).as_posix()}")
    return f"{spec.output.rstrip('/')}/{name}"


@contextlib.contextmanager
def _no_progress_bars():
    """transformers draws a 'Writing model shards' bar per save: noise in a training log that saves often."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def save_checkpoint(model, tokenizer, optimizer, plan: Plan, step: int, losses: list[float]) -> str:
    """Write checkpoint `step` (weights, tokenizer, lineage, optimizer and RNG state) and publish it whole."""
    from safetensors.torch import save_file

    name = checkpoint_name(step)
    spec = plan.spec
    lineage = {
        "step": step,
        "name": name,
        "fingerprint": plan.fingerprint,
        "total_steps": plan.total_steps,
        "epoch": step / plan.steps_per_epoch,
        "base_model": {"model": lake_names(spec.model)[0], "checkpoint": lake_names(spec.model)[1],
                       "commit": plan.base_commit, "dtype": spec.model.dtype},
        "data": {"lake": spec.lake, "dataset": spec.dataset, "versions": plan.data.versions,
                 "n_samples": len(plan.data.keys), "paradigm": spec.paradigm},
        "hyperparameters": spec.model_dump(mode="json", exclude={"model", "lake", "dataset", "variants", "version",
                                                                 "paradigm", "output", "storage_options", "quality"}),
        "trained_on": trained_order(plan, step),
        "recent_losses": losses[-50:],
        "gradlake_version": gradlake_version(),
        "torch_version": torch.__version__,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    with tempfile.TemporaryDirectory(prefix="gradlake-ckpt-") as tmp:
        local = Path(tmp) / name
        with _no_progress_bars():
            model.save_pretrained(local)
        tokenizer.save_pretrained(local)
        (local / LINEAGE_FILE).write_text(json.dumps(lineage, indent=1))
        state_dir = local / STATE_DIR
        state_dir.mkdir()
        tensors, info = optimizer_tensors(optimizer)
        save_file(tensors, str(state_dir / "optimizer.safetensors"))
        save_file(rng_tensors(), str(state_dir / "rng.safetensors"))
        (state_dir / "optimizer.json").write_text(json.dumps(info))
        return _publish(local, spec, name)


def local_copy(spec: TrainSpec, name: str, into: str) -> Path:
    """A checkpoint as a local directory (downloaded from S3 when the prefix is remote)."""
    fs, root = output_fs(spec)
    source = f"{root.rstrip('/')}/{name}"
    if _is_local(fs):
        return Path(source)
    target = Path(into) / name
    fs.get(source, str(target), recursive=True)
    return target


def checkpoint_keys(spec: TrainSpec, name: str) -> tuple[str, str]:
    """The lake keys (model, checkpoint) of a checkpoint of this run, as extraction of it would name them."""
    from gradlake.tasks.common.lineage import lake_keys

    return lake_keys(ModelSpec(model=spec.output, checkpoint=name))


def measure_checkpoint(spec: TrainSpec, name: str, log=print) -> dict:
    """Score checkpoint `name`'s answers on the training dataset (skipped when the lake already holds them)."""
    from gradlake.lake import layout
    from gradlake.tasks.data.quality import checkpoint_quality

    store = LakeStore(spec.lake)
    model_key, checkpoint_key = checkpoint_keys(spec, name)
    summary = store.path(layout.quality_dir(model_key, checkpoint_key, spec.dataset, spec.quality.variant)) + "/summary.json"
    if store.fs.exists(summary):
        return json.loads(store.fs.cat_file(summary))
    with tempfile.TemporaryDirectory(prefix="gradlake-quality-") as tmp:
        directory = local_copy(spec, name, tmp)
        at_checkpoint = spec.model.model_copy(update={"model": str(directory), "checkpoint": None})
        model, tokenizer = _load(spec.model_copy(update={"model": at_checkpoint}), None)
        lineage = json.loads((directory / LINEAGE_FILE).read_text())
    lineage = {k: lineage[k] for k in ("step", "fingerprint", "base_model", "data")}
    lineage["checkpoint"] = f"{spec.output.rstrip('/')}/{name}"
    result = checkpoint_quality(store, model_key, checkpoint_key, spec.dataset, spec.quality, model.eval(), tokenizer,
                                lineage, log=log)
    log(f"{name}: ROUGE-L {result['rouge_l']:.3f}, BLEU {result['bleu_corpus']:.1f}, exact {result['exact_match']:.2f}"
        + (f", judge {result['judge_mean']:.1f}/10" if "judge_mean" in result else ""))
    return result


# ---------------------------------------------------------------- the loop

@dataclass
class TrainResult:
    checkpoints: list[str]      # names of every checkpoint of the run, in step order
    final: str
    losses: list[float]         # the loss of each step run in this call
    resumed_from: int           # step the call started at


def _encode(plan: Plan, tokenizer) -> list[Encoded]:
    spec = plan.spec
    max_length = capped_length(spec.max_length, check_model(spec.model), spec.model.model)[0]
    template = chat_template_text(spec.chat_template)
    if template is None and not tokenizer.chat_template:
        raise TrainError(f"the tokenizer of {spec.model.model!r} has no chat template; give chat_template 'text' "
                         "(documents), 'tulu' or a Jinja file")
    encoded = [encode_sample(tokenizer, chat, spec.paradigm, max_length, template) for chat in plan.data.chats]
    empty = [plan.data.keys[i] for i, e in enumerate(encoded) if sum(e.label_mask) < 2]
    if empty:
        raise TrainError(f"samples {empty[:5]} have no loss tokens under paradigm {spec.paradigm!r} "
                         f"within max_length {spec.max_length}; raise max_length or drop them")
    return encoded


def _load(spec: TrainSpec, resume_dir: Path | None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, revision = spec.model.resolved().source()
    if resume_dir is not None:
        path, revision = str(resume_dir), None
    tokenizer = AutoTokenizer.from_pretrained(path, revision=revision, trust_remote_code=spec.model.trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(path, revision=revision, dtype=DTYPES[spec.model.dtype],
                                                 trust_remote_code=spec.model.trust_remote_code)
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ModelError(f"the tokenizer of {spec.model.model!r} has neither a pad nor an eos token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(spec.model.torch_device()), tokenizer


def train(plan: Plan, log: Callable[[str], None] = print, on_step: Callable[[int, float], None] | None = None) -> TrainResult:
    """Run (or finish) the planned training; every planned checkpoint exists afterwards."""
    from safetensors.torch import load_file

    spec = plan.spec
    start = max((s for s in plan.done), default=None)
    names = [checkpoint_name(s) for s in plan.saves]
    if start == plan.total_steps and all(s in plan.done for s in plan.saves):
        log(f"all {len(plan.saves)} checkpoints of this run are already at {spec.output}; nothing to train")
        return TrainResult(names, checkpoint_name(plan.total_steps), [], plan.total_steps)
    with tempfile.TemporaryDirectory(prefix="gradlake-resume-") as tmp:
        resume_dir = local_copy(spec, checkpoint_name(start), tmp) if start is not None else None
        torch.manual_seed(spec.seed)
        model, tokenizer = _load(spec, resume_dir)
        optimizer = torch.optim.AdamW(model.parameters(), lr=spec.learning_rate, weight_decay=spec.weight_decay)
        if resume_dir is not None:
            info = json.loads((resume_dir / STATE_DIR / "optimizer.json").read_text())
            restore_optimizer(optimizer, load_file(str(resume_dir / STATE_DIR / "optimizer.safetensors")), info)
            restore_rng(load_file(str(resume_dir / STATE_DIR / "rng.safetensors")))
            log(f"resuming from {checkpoint_name(start)} (step {start} of {plan.total_steps})")
    step = start or 0
    encoded = _encode(plan, tokenizer)
    device = next(model.parameters()).device
    micro = spec.micro_batch_size or spec.batch_size
    losses: list[float] = []
    if step == 0 and 0 in plan.saves and 0 not in plan.done:
        save_checkpoint(model, tokenizer, optimizer, plan, 0, losses)
    model.train()
    while step < plan.total_steps:
        batch = batch_of_step(step, spec.seed, len(encoded), spec.batch_size)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(spec, step, plan.total_steps)
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for lo in range(0, len(batch), micro):
            ids, labels = pad_batch([encoded[i] for i in batch[lo:lo + micro]], tokenizer.pad_token_id)
            per_sample = sample_losses(model(input_ids=ids.to(device)).logits, labels.to(device))
            loss = per_sample.sum() / len(batch)
            loss.backward()
            total += float(loss.detach())
        if spec.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), spec.max_grad_norm)
        optimizer.step()
        step += 1
        losses.append(total)
        if on_step is not None:
            on_step(step, total)
        if step % max(1, plan.total_steps // 20) == 0 or step == plan.total_steps:
            log(f"step {step}/{plan.total_steps} loss {total:.4f} lr {optimizer.param_groups[0]['lr']:.2e}")
        if step in plan.saves:
            model.eval()
            where = save_checkpoint(model, tokenizer, optimizer, plan, step, losses)
            log(f"checkpoint {checkpoint_name(step)} written to {where}")
            model.train()
    model.eval()
    return TrainResult(names, checkpoint_name(plan.total_steps), losses, start or 0)
