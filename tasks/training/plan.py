"""A run planned before it starts: its data, its order (a function of the seed), its checkpoints, and what exists already."""

from __future__ import annotations

import hashlib
import json
import math
import uuid
from dataclasses import dataclass

import fsspec
import numpy as np

from gradlake.lake.datasets import dataset_meta, read_dataset
from gradlake.lake.manifest import MANIFEST
from gradlake.lake.store import LakeStore, storage_options_for
from gradlake.tasks.common.checkpoints import checkpoint_complete
from gradlake.tasks.common.loss import chat_template_text
from gradlake.tasks.common.model import check_model, lake_names, resolved_commit
from gradlake.tasks.common.weights import check_weights
from gradlake.tasks.training.checks import read_lineage
from gradlake.tasks.training.claim import check_prefix_free, runs_apart
from gradlake.tasks.training.spec import CHECKPOINT_PREFIX, TrainError, TrainSpec, checkpoint_name, hyperparameters


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


def output_fs(spec: TrainSpec) -> tuple[fsspec.AbstractFileSystem, str]:
    url = spec.output
    return fsspec.core.url_to_fs(url, **storage_options_for(url, spec.storage_options))


def check_output_writable(spec: TrainSpec) -> None:
    """Write and delete a probe object under the checkpoint prefix, or raise one clear error; leaves nothing behind."""
    fs, root = output_fs(spec)
    probe = f"{root.rstrip('/')}/.gradlake-write-probe-{uuid.uuid4().hex}"  # its own: runs started together
    made = []  # local directories this check creates: removed again, so a refusal after it leaves nothing behind
    if "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        parent = root.rstrip("/")
        while parent and not fs.exists(parent):
            made.append(parent)
            parent = parent.rsplit("/", 1)[0]
    try:
        fs.makedirs(root, exist_ok=True)
        fs.pipe_file(probe, b"ok")
        fs.rm_file(probe)
    except Exception as err:  # permission, missing bucket, read-only file system, endpoint down
        raise TrainError(f"checkpoint prefix {spec.output!r} is not writable ({type(err).__name__}: {err}); "
                         "give a directory or s3:// prefix this worker can write") from None
    finally:
        for directory in made:  # deepest first; the first checkpoint's copy makes them again
            try:
                fs.rmdir(directory)
            except OSError:
                break


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
    fs.invalidate_cache()  # s3fs keeps listings: checkpoints another process wrote since would stay unseen
    try:  # on S3 a prefix exists only while it holds objects: one that empties between two looks is empty
        paths = fs.ls(root, detail=False) if fs.isdir(root) else []
    except FileNotFoundError:
        paths = []
    found = {}
    for path in paths:
        name = path.rstrip("/").rsplit("/", 1)[-1]
        if not name.startswith(CHECKPOINT_PREFIX) or not fs.isdir(path) or not checkpoint_complete(fs, path):
            continue
        record = read_lineage(fs, path, f"{spec.output.rstrip('/')}/{name}")  # a damaged one: one line, what to do
        if record.get("manifest") and not fs.exists(f"{path}/{MANIFEST}"):  # S3: stopped between weights and manifest
            continue
        found[int(record.get("step", -1))] = record | {"name": name}
    return found


def refuse_foreign_checkpoints(spec: TrainSpec, fingerprint: str) -> dict[int, dict]:
    """The prefix's complete checkpoints (as `existing_checkpoints`), or one TrainError if one is another run's."""
    existing = existing_checkpoints(spec)
    foreign = {s: r for s, r in existing.items() if r.get("fingerprint") != fingerprint}
    if foreign:
        step, record = sorted(foreign.items())[0]
        apart = runs_apart(record.get("fingerprint"), fingerprint, record.get("hyperparameters") or {},
                           hyperparameters(spec))
        raise TrainError(f"checkpoint prefix {spec.output!r} holds {record['name']} of another training run ({apart}); "
                         "nothing was trained or written: train into another output prefix, or give the same spec to "
                         "resume that run")
    return existing


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
    existing = refuse_foreign_checkpoints(spec, fingerprint)
    check_prefix_free(spec, fingerprint)
    del config
    return Plan(spec=spec, data=data, total_steps=total, steps_per_epoch=per_epoch, base_commit=base_commit,
                fingerprint=fingerprint, saves=saves, done=sorted(existing))
