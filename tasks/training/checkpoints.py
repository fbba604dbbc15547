"""Checkpoints: written whole (weights last), optimizer and RNG state without pickles, copied back, their answers measured."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path

import fsspec
import torch

from gradlake.lake.manifest import MANIFEST, local_entries, write_manifest
from gradlake.lake.store import LakeStore
from gradlake.tasks.common.checkpoints import checkpoint_complete
from gradlake.tasks.common.lineage import gradlake_version
from gradlake.tasks.common.model import DTYPES, ModelError, ModelSpec, lake_names
from gradlake.tasks.training.checks import storage_failure
from gradlake.tasks.training.claim import check_still_held, runs_apart
from gradlake.tasks.training.plan import Plan, output_fs, trained_order
from gradlake.tasks.training.spec import (LINEAGE_FILE, STATE_DIR, TrainError, TrainSpec, checkpoint_name,
                                          hyperparameters)


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


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocols or "local" in protocols


def _refuse_foreign(fs: fsspec.AbstractFileSystem, target: str, spec: TrainSpec, name: str, fingerprint: str) -> None:
    """Refuse to publish `name` over a checkpoint of another run: read its fingerprint right before writing.

    An older copy of this run's own (same fingerprint), or a leftover that never became a checkpoint, may be replaced."""
    fs.invalidate_cache()  # s3fs keeps listings: another process's checkpoint would stay unseen
    if not fs.exists(target):
        return
    try:
        record = json.loads(fs.cat_file(f"{target}/{LINEAGE_FILE}"))
        theirs = record.get("fingerprint") if isinstance(record, dict) else None
    except FileNotFoundError:
        record, theirs = {}, None
        if not checkpoint_complete(fs, target):  # an upload that stopped before its lineage: not a checkpoint yet
            return
    except (ValueError, UnicodeDecodeError):
        record, theirs = {}, "unreadable"
    if theirs == fingerprint:
        return
    shown = f"{spec.output.rstrip('/')}/{name}"
    theirs_settings = (record.get("hyperparameters") or {}) if isinstance(record, dict) else hyperparameters(spec)
    apart = runs_apart(theirs, fingerprint, theirs_settings, hyperparameters(spec))
    raise TrainError(f"{name} was not written: {shown} holds a checkpoint of another training run ({apart}), left as "
                     "it is; train into another output prefix")


def _publish(local: Path, spec: TrainSpec, name: str, fingerprint: str) -> str:
    """Move a finished local checkpoint directory to the prefix so that it appears whole or not at all.

    Its digest manifest (every file's size and sha256) is written last, so a resume can tell damage.  The
    staging directory's name is this call's own (hidden, so the watcher skips it); another run's checkpoint
    at the target is never replaced."""
    fs, root = output_fs(spec)
    target = f"{root.rstrip('/')}/{name}"
    digests = local_entries(str(local))
    if _is_local(fs):
        staging = Path(f"{root.rstrip('/')}/.{name}.partial-{uuid.uuid4().hex[:12]}")
        try:
            shutil.copytree(local, staging)
            write_manifest(fs, str(staging), digests)  # inside before the rename: no published copy lacks it
            check_still_held(spec, fingerprint, name)
            _refuse_foreign(fs, target, spec, name, fingerprint)
            if Path(target).exists():  # an older copy of the same step (same fingerprint): replace it
                shutil.rmtree(target)
            try:
                os.replace(staging, target)
            except OSError:  # a rename never replaces a full directory: a copy appeared meanwhile
                if not Path(target).exists():
                    raise
                _refuse_foreign(fs, target, spec, name, fingerprint)  # this run's own (same spec, same bytes): kept
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return target
    files = sorted(p for p in local.rglob("*") if p.is_file())
    weights = [p for p in files if p.name.startswith("model") and p.suffix == ".safetensors"]
    index = [p for p in files if p.name == "model.safetensors.index.json"]
    lineage = [p for p in files if p.name == LINEAGE_FILE and p.parent == local]
    first = [p for p in files if p not in weights and p not in index and p not in lineage]
    try:
        check_still_held(spec, fingerprint, name)
        _refuse_foreign(fs, target, spec, name, fingerprint)
        for path in [*lineage, *first, *weights, *index]:  # lineage first: whose it is; weights last: complete
            fs.put_file(str(path), f"{target}/{path.relative_to(local).as_posix()}")
        write_manifest(fs, target, digests)
    except Exception as err:  # endpoint gone, credentials refused mid-run: a line naming the endpoint, not botocore's
        told = storage_failure(err, spec.output, spec.storage_options, f"{name} was not written whole")
        if told is None:
            raise
        raise told from None
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
        "hyperparameters": hyperparameters(spec),
        "trained_on": trained_order(plan, step),
        "recent_losses": losses[-50:],
        "gradlake_version": gradlake_version(),
        "manifest": MANIFEST,  # written last: a checkpoint whose upload stopped before it is not counted as written
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
        return _publish(local, spec, name, plan.fingerprint)


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
    from gradlake.tasks.data.quality import checkpoint_quality, read_summary

    store = LakeStore(spec.lake)
    model_key, checkpoint_key = checkpoint_keys(spec, name)
    stored = read_summary(store, layout.quality_dir(model_key, checkpoint_key, spec.dataset, spec.quality.variant))
    if stored is not None:  # a damaged one is one error naming it, never a result taken on trust
        return stored
    with tempfile.TemporaryDirectory(prefix="gradlake-quality-") as tmp:
        directory = local_copy(spec, name, tmp)
        at_checkpoint = spec.model.model_copy(update={"model": str(directory), "checkpoint": None})
        model, tokenizer = load_for_training(spec.model_copy(update={"model": at_checkpoint}), None)
        lineage = json.loads((directory / LINEAGE_FILE).read_text())
    lineage = {k: lineage[k] for k in ("step", "fingerprint", "base_model", "data")}
    lineage["checkpoint"] = f"{spec.output.rstrip('/')}/{name}"
    result = checkpoint_quality(store, model_key, checkpoint_key, spec.dataset, spec.quality, model.eval(), tokenizer,
                                lineage, log=log)
    log(f"{name}: ROUGE-L {result['rouge_l']:.3f}, BLEU {result['bleu_corpus']:.1f}, exact {result['exact_match']:.2f}"
        + (f", judge {result['judge_mean']:.1f}/10" if "judge_mean" in result else ""))
    return result


def load_for_training(spec: TrainSpec, resume_dir: Path | None):
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
