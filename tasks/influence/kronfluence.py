"""Kronfluence under gradlake's loss: its Task, the tracked modules (GPT-2's Conv1D as Linear), its arguments, its factors copied to and from the lake."""

from __future__ import annotations

import fnmatch
import json
import warnings
from collections.abc import Callable
from pathlib import Path

import fsspec
import torch

from gradlake.lake.manifest import (MANIFEST, DamagedFile, entry, entry_problem, file_entry, listing_problems,
                                    local_entries, read_manifest, safe_name, write_manifest)
from gradlake.lake.store import LakeError, LakeStore, public_url
from gradlake.tasks.common.loss import IGNORE_INDEX, Encoded, pad_batch, sample_losses
from gradlake.tasks.common.model import ModelError
from gradlake.tasks.influence.spec import LAYER_KEYWORDS, SCORE_DTYPES, InfluenceError, InfluenceSpec, damping_factor


# Kronfluence 1.0.1 builds torch.cuda.amp.GradScaler, deprecated in torch 2.x, once per pass: one FutureWarning each.
warnings.filterwarnings("ignore", category=FutureWarning, message=r"`torch\.cuda\.amp\.GradScaler")



def task_class():
    from kronfluence.task import Task

    class LossTask(Task):
        """Train loss and measurement: the sum over the batch of each sample's mean token loss."""

        def __init__(self, tracked: list[str], seed: int):
            super().__init__()
            self.tracked = tracked
            self.seed = seed
            self.generators: dict[str, torch.Generator] = {}
            # Told the size of every batch Kronfluence passes through a loss: its only per-batch progress
            # outside its tqdm bars (which gradlake turns off: they would flood a log).
            self.on_batch: Callable[[int], object] | None = None

        def _seen(self, batch) -> None:
            if self.on_batch is not None:
                self.on_batch(int(batch["input_ids"].shape[0]))

        def _generator(self, device: torch.device) -> torch.Generator:
            """One seeded generator per device: the draws stay where the logits are."""
            if str(device) not in self.generators:
                self.generators[str(device)] = torch.Generator(device=device).manual_seed(self.seed)
            return self.generators[str(device)]

        def compute_train_loss(self, batch, model, sample: bool = False) -> torch.Tensor:
            self._seen(batch)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            labels = batch["labels"]
            if sample:  # the true Fisher: targets drawn from the model's own predictions
                with torch.no_grad():
                    # position t predicts label t + 1; draw only where a label is, on the logits' device
                    where = labels[:, 1:] != IGNORE_INDEX
                    probs = torch.softmax(logits[:, :-1][where].detach().float(), dim=-1)
                    drawn = torch.multinomial(probs, 1, generator=self._generator(probs.device)).squeeze(1)
                    labels = labels.clone()
                    labels[:, 1:][where] = drawn.to(labels.dtype)
            return sample_losses(logits, labels).sum()

        def compute_measurement(self, batch, model) -> torch.Tensor:
            self._seen(batch)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            return sample_losses(logits, batch["labels"]).sum()

        def get_influence_tracked_modules(self):
            return self.tracked

        def get_attention_mask(self, batch):
            return batch["attention_mask"]

    return LossTask


class EncodedSet(torch.utils.data.Dataset):
    """Encoded samples for Kronfluence's DataLoader."""

    def __init__(self, encoded: list[Encoded]):
        self.encoded = encoded

    def __len__(self) -> int:
        return len(self.encoded)

    def __getitem__(self, index: int) -> Encoded:
        return self.encoded[index]


def collate(pad_id: int) -> Callable[[list[Encoded]], dict]:
    def batch(items: list[Encoded]) -> dict:
        ids, labels = pad_batch(items, pad_id)
        mask = torch.zeros_like(ids)
        for row, item in enumerate(items):
            mask[row, : len(item.input_ids)] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    return batch


def linear_from_conv1d(model: torch.nn.Module) -> list[str]:
    """Replace every GPT-2 ``Conv1D`` in `model` by the equal ``nn.Linear``, in place; returns their names.

    Kronfluence tracks only nn.Linear and nn.Conv2d.  Conv1D computes y = x W + b with W stored (in, out); the
    Linear holding W^T computes the same y, and its weight gradient is the transpose of the Conv1D one, so every
    dot product of gradients (the scores) is unchanged.  Works on the meta device too (the plan's skeleton).
    """
    from transformers.pytorch_utils import Conv1D

    names = [name for name, module in model.named_modules() if isinstance(module, Conv1D)]
    for name in names:
        conv = model.get_submodule(name)
        n_in, n_out = conv.weight.shape
        linear = torch.nn.Linear(n_in, n_out, bias=conv.bias is not None, device=conv.weight.device,
                                 dtype=conv.weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(conv.weight.T)
            if conv.bias is not None:
                linear.bias.copy_(conv.bias)
        linear.weight.requires_grad_(conv.weight.requires_grad)
        linear.train(conv.training)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, linear)
    return names


def tracked_modules(model: torch.nn.Module, patterns: list[str]) -> list[str]:
    """Names of the nn.Linear modules chosen by `patterns`, in model order; every pattern must choose one.

    A pattern is a glob over '<module>.weight' or a keyword of LAYER_KEYWORDS ('attention', 'mlp': every Linear in
    each block's attention or MLP submodule).  Convert GPT-2's Conv1D first (:func:`linear_from_conv1d`).
    """
    linear = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
    if not patterns:
        return linear
    weights = [f"{name}.weight" for name in linear]
    if not weights:
        raise InfluenceError(f"layers {patterns} choose nn.Linear modules, but this model has none Kronfluence can track")
    chosen = set()
    for pattern in patterns:
        if pattern in LAYER_KEYWORDS:
            hits = [w for w in weights if LAYER_KEYWORDS[pattern].search(w)]
            part = "attention ('<block>.self_attn.' or '<block>.attn.')" if pattern == "attention" else "MLP ('<block>.mlp.')"
            what = f"layer keyword {pattern!r} matches no nn.Linear weight inside a block's {part}"
        else:
            hits = fnmatch.filter(weights, pattern)
            what = f"layer pattern {pattern!r} matches no nn.Linear weight Kronfluence can track"
        if not hits:
            examples = ", ".join(repr(w) for w in dict.fromkeys([weights[0], weights[len(weights) // 2], weights[-1]]))
            raise InfluenceError(f"{what}; names look like {examples}: use a glob over such names "
                                 f"(e.g. 'model.layers.*.mlp.down_proj.weight') or one of {list(LAYER_KEYWORDS)}")
        chosen.update(h[: -len(".weight")] for h in hits)
    return [name for name in linear if name in chosen]


def factor_args(spec: InfluenceSpec):
    from kronfluence.arguments import FactorArguments

    return FactorArguments(strategy=spec.strategy, use_empirical_fisher=spec.empirical_fisher)


def score_args(spec: InfluenceSpec):
    from kronfluence.arguments import ScoreArguments

    dtype = SCORE_DTYPES[spec.score_dtype]
    return ScoreArguments(damping_factor=damping_factor(spec)[1], query_gradient_low_rank=spec.query_low_rank,
                          score_dtype=dtype, per_sample_gradient_dtype=dtype, precondition_dtype=torch.float32)


FACTORS_RECORD = "factors.json"  # the lineage, the files and each file's digest of a set of factors
# written last: the digests of every file, factors.json too (lake/manifest.py)


def copy_factors_to_lake(store: LakeStore, local: Path, lake_dir: str, lineage: dict) -> None:
    """Copy Kronfluence's factor files into `lake_dir`, then their record (with each file's digest: size and sha256,
    `lake.manifest.entry`), then the digest manifest of them all."""
    names = sorted(p.relative_to(local).as_posix() for p in local.rglob("*")
                   if p.is_file() and p.suffix in (".safetensors", ".json"))
    digests = local_entries(str(local), names)
    store.fs.makedirs(store.path(lake_dir), exist_ok=True)
    for name in names:
        store.fs.put_file(str(local / name), store.path(f"{lake_dir}/{name}"))
    record = json.dumps({**lineage, "files": names, "digests": digests}, indent=1).encode()
    store.fs.pipe_file(store.path(f"{lake_dir}/{FACTORS_RECORD}"), record)
    write_manifest(store.fs, store.path(lake_dir), {**digests, FACTORS_RECORD: entry(record)})


def _redo(store: LakeStore, lake_dir: str) -> str:
    return (f"remove {public_url(store.url)}/{lake_dir} and rerun `gradlake influence` (the factors are fitted again), "
            "or run `gradlake verify` to list what else is damaged")


def _damaged(store: LakeStore, lake_dir: str, problem: str) -> DamagedFile:
    """One error line: what is wrong with a file of the factors at `lake_dir` (named by its public URL), what to do."""
    return DamagedFile(f"damaged influence factors: {problem.replace(store.root, public_url(store.url))}; "
                       f"{_redo(store, lake_dir)}")


def _digests(record: dict, names: list[str]) -> dict[str, dict] | None:
    """The digest of each listed file that `factors.json` records; None for factors written before it recorded them."""
    digests = record.get("digests")
    if digests is None:
        return None
    if (not isinstance(digests, dict) or set(digests) != set(names)
            or not all(isinstance(e, dict) and isinstance(e.get("bytes"), int) and isinstance(e.get("sha256"), str)
                       for e in digests.values())):
        raise TypeError("'digests' is not one {bytes, sha256} per listed file")
    return digests


def _factor_files(store: LakeStore, lake_dir: str) -> tuple[list[str], dict[str, dict] | None] | None:
    """(the file names `factors.json` lists, the digest each must have) of stored factors; None when there are none.

    The digests are the record's (the manifest's for factors written before the record held them; None for factors
    written before manifests).  A damaged record or manifest, a name that would leave the directory, and (seen in
    the directory's listing) a listed file missing or of another size or a file no record lists are each one
    DamagedFile naming the file."""
    directory = store.path(lake_dir)
    with store.explained_errors():
        try:
            files = read_manifest(store.fs, directory)
        except DamagedFile as err:
            raise DamagedFile(f"damaged influence factors: {err}; {_redo(store, lake_dir)}") from None
        try:
            raw = store.fs.cat_file(f"{directory}/{FACTORS_RECORD}")
        except FileNotFoundError:
            if files is None:
                return None
            raise _damaged(store, lake_dir, f"{directory}/{FACTORS_RECORD} is missing") from None
    if files is not None:
        _checked(store, lake_dir, FACTORS_RECORD, files, entry(raw))
    try:
        record = json.loads(raw)
        names = record["files"]
        if not isinstance(names, list):
            raise TypeError(f"'files' holds {type(names).__name__}, not a list")
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise _damaged(store, lake_dir, f"{directory}/{FACTORS_RECORD} is not a factors record "
                                        f"({type(err).__name__}: {str(err)[:80]})") from None
    for name in names:
        try:
            safe_name(name)
        except LakeError:
            raise _damaged(store, lake_dir, f"{directory}/{FACTORS_RECORD} names {name!r}, which is not a plain relative "
                                            "path inside its directory (a leading '/', '..', ':' or '\\'): it was "
                                            "changed after it was written") from None
    try:
        digests = _digests(record, names)
    except TypeError as err:
        raise _damaged(store, lake_dir, f"{directory}/{FACTORS_RECORD} is not a factors record ({err})") from None
    if digests is None and files is not None:
        digests = {name: files[name] for name in names if name in files}
        if len(digests) < len(names):
            missing = next(name for name in names if name not in files)
            raise _damaged(store, lake_dir, f"{directory}/{FACTORS_RECORD} lists {missing!r}, which {MANIFEST} does not")
    elif digests is not None and files is None:
        raise _damaged(store, lake_dir, f"{directory}/{MANIFEST} is missing (it is written last: the copy of these "
                                        "factors into the lake stopped before its end, or it was removed)")
    if digests is not None:
        with store.explained_errors():
            problems = listing_problems(store.fs, directory, digests, others=(MANIFEST, FACTORS_RECORD))
        if problems:
            raise _damaged(store, lake_dir, problems[0])
    return names, digests


def _checked(store: LakeStore, lake_dir: str, name: str, digests: dict[str, dict] | None, data: dict) -> None:
    """Raise one DamagedFile naming `name` unless `data` (its entry) is the digest recorded for it (if any)."""
    if digests is not None and name in digests:
        problem = entry_problem(f"{store.path(lake_dir)}/{name}", data, digests[name])
        if problem:
            raise _damaged(store, lake_dir, problem)


def _read_factor(store: LakeStore, lake_dir: str, name: str, digests: dict[str, dict] | None) -> bytes:
    with store.explained_errors():
        try:
            data = store.fs.cat_file(store.path(f"{lake_dir}/{name}"))
        except FileNotFoundError:
            raise _damaged(store, lake_dir, f"{store.path(lake_dir)}/{name} is missing") from None
    _checked(store, lake_dir, name, digests, entry(data))
    return data


def factors_from_lake(store: LakeStore, lake_dir: str, local: Path, log: Callable[[str], object] = print) -> bool:
    """Put factors the lake holds where Kronfluence looks for them; False when the lake has none (complete).

    Every file is checked against the digest `factors.json` records before it is used (a changed, missing or added
    file: one DamagedFile naming it), and never written outside `local`.  Factors written before digests were
    recorded are copied unchecked, and the log says so."""
    found = _factor_files(store, lake_dir)
    if found is None:
        return False
    names, digests = found
    local.mkdir(parents=True, exist_ok=True)  # there even if the record lists no file
    if digests is None:
        log(f"factors at {public_url(store.url)}/{lake_dir} were written before gradlake recorded their digests: "
            "reused unchecked (remove that directory to fit them again)")
    for name in names:
        target = local / name
        target.parent.mkdir(parents=True, exist_ok=True)
        with store.explained_errors():
            try:
                store.fs.get_file(store.path(f"{lake_dir}/{name}"), str(target))
            except FileNotFoundError:
                raise _damaged(store, lake_dir, f"{store.path(lake_dir)}/{name} is missing") from None
        _checked(store, lake_dir, name, digests, file_entry(fsspec.filesystem("file"), str(target)))
    return True


def load_factors(store: LakeStore, lake_dir: str) -> dict[str, dict[str, torch.Tensor]]:
    """The factors stored in the lake: {file stem: {module name: tensor}}, read from safetensors."""
    from safetensors.torch import load as load_bytes

    found = _factor_files(store, lake_dir)
    if found is None:
        raise LakeError(f"no influence factors at {public_url(store.url)}/{lake_dir}")
    names, digests = found
    return {Path(name).stem: load_bytes(_read_factor(store, lake_dir, name, digests))
            for name in names if name.endswith(".safetensors")}


def kronfluence_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("kronfluence")
    except metadata.PackageNotFoundError:
        raise ModelError("kronfluence is not installed; install it with `pip install --no-deps kronfluence==1.0.1` "
                         "(its torchvision dependency is never used)") from None
