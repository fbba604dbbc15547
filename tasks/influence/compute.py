"""Influence functions with Kronfluence, under gradlake's loss convention, into the lake.

Kronfluence (Grosse et al., 2023; Bae et al., 2024) approximates the inverse Hessian
(Gauss-Newton) of the training loss per tracked ``nn.Linear`` module with one of four
strategies: ``identity`` (no preconditioning: plain gradient dot products), ``diagonal``,
``kfac`` (Kronecker factors of activation and output-gradient covariances) and ``ekfac``
(K-FAC's eigenbasis with corrected eigenvalues).  The pairwise score of query q and
training sample i is ``grad f_q . (G + damping I)^-1 . grad L_i``, positive when training
on i lowers the query's loss.  GPT-2's ``Conv1D`` layers (y = x W + b, W stored transposed) are
replaced by the equal ``nn.Linear`` (weight W^T) before Kronfluence sees the model, so they are
tracked too; a weight gradient is then the transpose of the Conv1D one, and dot products are unchanged.

Here both gradients are of the extraction's loss (``tasks/common/loss.py``): each sample's mean
token cross-entropy over its label positions (``sft``: assistant tokens; ``pre``: all), so
``identity`` scores equal dot products of the per-sample gradients the lake stores.  The
covariances are fitted with the true Fisher by default (labels sampled from the model at
the label positions), or with the empirical Fisher (the data's own labels) on request.

Nothing stays in Kronfluence's own output folder: its factors (safetensors, written by
Kronfluence) are copied into the lake with their lineage, and its scores are computed a
block of (queries x training samples) at a time and written into a `lake.scores`
group, so a matrix larger than memory is fine and a killed run resumes at its first
missing block; factors found in the lake are not fitted again.

```
<lake>/influence/<model>/<checkpoint>/<dataset>/<paradigm>-<strategy>-<key>/factors/*.safetensors   and factors.json (written last)
<lake>/attribution/<model>/<checkpoint>/<dataset>/<query dataset>.<query variant>/<method>/              the scores (lake/scores.py)
```
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import math
import re
import shutil
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from gradlake.lake.datasets import dataset_meta, read_dataset
from gradlake.lake.scores import ScoreGroup, scores_path
from gradlake.lake.store import LakeStore
from gradlake.tasks.common.loss import (CHAT_TEMPLATE_HELP, IGNORE_INDEX, Encoded, Paradigm, chat_template_text, encode_sample,
    pad_batch, sample_losses)
from gradlake.tasks.common.model import (DTYPES, ModelError, ModelSpec, capped_length, check_model, check_weights, lake_names,
    resolved_commit)

STRATEGIES: tuple[str, ...] = ("identity", "diagonal", "kfac", "ekfac")
SCORE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DAMPING_RULES: tuple[str, ...] = ("heuristic", "kronfluence")
# A block's attention or MLP: the submodule right after the block's index ('model.layers.3.self_attn.',
# 'transformer.h.3.attn.', '....3.mlp.'), as OLMo, OLMo-2, Llama, Qwen2 and GPT-2 name them.
LAYER_KEYWORDS: dict[str, re.Pattern] = {"attention": re.compile(r"\.\d+\.(self_attn|attn)\."),
                                         "mlp": re.compile(r"\.\d+\.mlp\.")}


class InfluenceError(ValueError):
    """Influence settings that cannot run, named with what would be accepted."""


class InfluenceSpec(BaseModel):
    """Influence of every training sample on every query, by one Kronfluence strategy."""

    model_config = ConfigDict(extra="forbid")

    model: ModelSpec = Field(title="Model", description="The (trained) model whose influences are computed, at its checkpoint.")
    lake: str = Field(title="Lake", description="Lake URL: the data is read from it and the factors and scores written to it.")
    dataset: str = Field(title="Training dataset", description="Dataset in the lake the model was trained on.")
    train_variants: list[str] = Field(default=["original"], min_length=1, description="Its variants that make the training set (samples 'variant:id').")
    train_ids: list[str] | None = Field(default=None, description="Only these dataset ids are training samples (e.g. the run's `keep`); empty: all.")
    query_dataset: str | None = Field(default=None, description="Dataset of the queries; empty: the training dataset.")
    queries: str = Field(default="paraphrased", description="Variant whose samples are the queries.")
    query_ids: list[str] | None = Field(default=None, description="Only these ids of the query variant are queries, in this order (e.g. samples the run never trained on); empty: all.")
    max_queries: int | None = Field(default=None, ge=1, description="Only the first this many queries (after query_ids); empty: all.")
    paradigm: Paradigm = Field(default="sft", description="Loss tokens: 'sft' assistant turns, 'pre' every token (as in training and extraction).")
    chat_template: str = Field(default="tokenizer", description=CHAT_TEMPLATE_HELP + " As the model was trained.")
    strategy: Literal["identity", "diagonal", "kfac", "ekfac"] = Field(default="ekfac", description="Kronfluence's Hessian approximation.")
    layers: list[str] = Field(default=[], description="Tracked nn.Linear modules (GPT-2's Conv1D count as nn.Linear): glob patterns over their weights' names ('model.layers.*.mlp.*.weight'), or the keywords 'attention' and 'mlp' (every Linear in each block's self_attn/attn or mlp). Empty: every nn.Linear.")
    damping: Annotated[float, Field(ge=0)] | Literal["heuristic", "kronfluence"] | None = Field(default=None, description="Damping added to the approximate Hessian: a number >= 0; 'heuristic' or empty: 0.1 x the mean eigenvalue of each module's approximation; 'kronfluence': Kronfluence's own default damping_factor (1e-08 in 1.0.1).")
    empirical_fisher: bool = Field(default=False, description="Fit the covariances with the data's labels (empirical Fisher) instead of labels sampled from the model (true Fisher).")
    max_length: int = Field(default=512, ge=8, description="Tokens per sample at most (as in extraction).")
    train_batch_size: int = Field(default=8, ge=1, description="Training samples per pass (factor fitting and scoring).")
    query_batch_size: int = Field(default=8, ge=1, description="Queries per pass.")
    train_block: int = Field(default=4096, ge=1, description="Training samples per score block: the unit written to the lake and resumed.")
    score_dtype: Literal["float32", "bfloat16", "float16"] = Field(default="float32", description="Dtype of the score computation (half precision as Kronfluence offers it); stored as float32.")
    query_low_rank: int | None = Field(default=None, ge=1, description="Kronfluence's low-rank query gradients (rank); empty: exact.")
    seed: int = Field(default=0, description="Seeds the labels sampled for the true Fisher.")
    method: str | None = Field(default=None, description="Name of the scores in the lake; empty: 'influence-<strategy>'.")

    @field_validator("strategy", mode="before")
    @classmethod
    def _strategy(cls, value):
        if value not in STRATEGIES:
            raise ValueError(f"strategy {value!r} is not one Kronfluence knows; use one of {list(STRATEGIES)}")
        return value

    @field_validator("damping", mode="before")
    @classmethod
    def _damping(cls, value):
        if isinstance(value, str) and value not in DAMPING_RULES:  # a number typed into a form or a CLI: '1e-3'
            try:
                value = float(value)
            except ValueError:
                pass
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if value is None or value in DAMPING_RULES or (number and math.isfinite(value) and value >= 0):
            return value
        raise ValueError(f"damping {value!r} is neither a number >= 0 nor one of {list(DAMPING_RULES)}; use e.g. 0.001, "
                         "'heuristic' (0.1 x the mean eigenvalue) or 'kronfluence' (Kronfluence's default)")

    @field_validator("query_ids")
    @classmethod
    def _query_ids(cls, value):
        if value is not None:
            if not value:
                raise ValueError("query_ids is an empty list: give at least one id, or leave it empty (null) for every query")
            repeated = sorted(i for i, n in Counter(value).items() if n > 1)
            if repeated:
                raise ValueError(f"query_ids repeat {repeated[:5]}: give each id once (a query is one row of scores)")
        return value

    @property
    def method_name(self) -> str:
        return self.method or f"influence-{self.strategy}"


# ---------------------------------------------------------------- the task: gradlake's loss for Kronfluence

# Kronfluence 1.0.1 builds torch.cuda.amp.GradScaler, deprecated in torch 2.x, once per pass: one FutureWarning each.
warnings.filterwarnings("ignore", category=FutureWarning, message=r"`torch\.cuda\.amp\.GradScaler")


def _task_class():
    from kronfluence.task import Task

    class LossTask(Task):
        """Train loss and measurement: the sum over the batch of each sample's mean token loss."""

        def __init__(self, tracked: list[str], seed: int):
            super().__init__()
            self.tracked = tracked
            self.seed = seed
            self.generators: dict[str, torch.Generator] = {}

        def _generator(self, device: torch.device) -> torch.Generator:
            """One seeded generator per device: the draws stay where the logits are."""
            if str(device) not in self.generators:
                self.generators[str(device)] = torch.Generator(device=device).manual_seed(self.seed)
            return self.generators[str(device)]

        def compute_train_loss(self, batch, model, sample: bool = False) -> torch.Tensor:
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


# ---------------------------------------------------------------- which modules are tracked

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


# ---------------------------------------------------------------- data

def _frame(store: LakeStore, dataset: str, variant: str):
    meta = dataset_meta(store, dataset, variant)
    return meta, read_dataset(store, dataset, variant, meta["version"])


def load_sets(spec: InfluenceSpec) -> tuple[list[str], list[list[dict]], list[str], list[list[dict]], dict]:
    """(train keys, train chats, query ids, query chats, dataset versions), or one clear error."""
    store = LakeStore(spec.lake)
    keys, chats, versions = [], [], {}
    known: set[str] = set()
    wanted = set(spec.train_ids) if spec.train_ids is not None else None
    for variant in spec.train_variants:
        meta, frame = _frame(store, spec.dataset, variant)
        versions[f"{spec.dataset}/{variant}"] = meta["version"]
        known.update(frame["id"])
        for sample_id, messages in zip(frame["id"], frame["messages"]):
            if wanted is None or sample_id in wanted:
                keys.append(f"{variant}:{sample_id}")
                chats.append(messages)
    if wanted is not None and wanted - known:
        raise InfluenceError(f"train_ids {sorted(wanted - known)[:5]} are not in dataset {spec.dataset!r}")
    query_dataset = spec.query_dataset or spec.dataset
    meta, frame = _frame(store, query_dataset, spec.queries)
    versions[f"{query_dataset}/{spec.queries}"] = meta["version"]
    frame = frame.assign(id=[str(i) for i in frame["id"]])
    if spec.query_ids is not None:
        frame = _chosen_queries(frame, spec.query_ids, f"dataset {query_dataset!r} variant {spec.queries!r}")
    if spec.max_queries:
        frame = frame.head(spec.max_queries)
    return keys, chats, list(frame["id"]), list(frame["messages"]), versions


def _chosen_queries(frame, query_ids: list[str], where: str):
    """The rows of `frame` with these ids, in their order; every id must be there."""
    rows = {sample_id: row for row, sample_id in enumerate(frame["id"])}
    missing = [i for i in query_ids if i not in rows]
    if missing:
        raise InfluenceError(f"query_ids {missing[:5]}{' ...' if len(missing) > 5 else ''} ({len(missing)} of "
                             f"{len(query_ids)}) are not in {where}; its ids look like {list(frame['id'][:3])}")
    return frame.iloc[[rows[i] for i in query_ids]]


# ---------------------------------------------------------------- running

def settings_key(spec: InfluenceSpec, versions: dict, commit: str, converted: list[str] = ()) -> str:
    """A hash of what determines the factors: model and commit, training data, loss, strategy, modules, Fisher.

    `converted`: the tracked modules that are converted Conv1D (only then in the hash, so that keys made before
    the conversion existed stay valid and a GPT-2 fitted on its lm_head alone is not taken for one with blocks).
    """
    what = {"model": list(lake_names(spec.model)), "commit": commit, "dtype": spec.model.dtype, "versions": versions,
            "train_variants": spec.train_variants, "train_ids": spec.train_ids, "paradigm": spec.paradigm,
            "strategy": spec.strategy, "layers": spec.layers, "empirical_fisher": spec.empirical_fisher,
            "max_length": spec.max_length, "seed": spec.seed}
    if converted:
        what["converted_conv1d"] = list(converted)
    if spec.chat_template != "tokenizer":  # keys made before the setting existed stay valid
        what["chat_template"] = hashlib.sha256((chat_template_text(spec.chat_template) or "").encode()).hexdigest()
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def damping_factor(spec: InfluenceSpec) -> tuple[str, float | None]:
    """(rule, the damping_factor given to Kronfluence): 'heuristic' -> None (Kronfluence then takes 0.1 x the
    mean eigenvalue per module), 'kronfluence' -> ScoreArguments' default read now, 'value' -> the number given."""
    if spec.damping is None or spec.damping == "heuristic":
        return "heuristic", None
    if spec.damping == "kronfluence":
        from kronfluence.arguments import ScoreArguments

        return "kronfluence", ScoreArguments().damping_factor
    return "value", float(spec.damping)


def _factor_args(spec: InfluenceSpec):
    from kronfluence.arguments import FactorArguments

    return FactorArguments(strategy=spec.strategy, use_empirical_fisher=spec.empirical_fisher)


def _score_args(spec: InfluenceSpec):
    from kronfluence.arguments import ScoreArguments

    dtype = SCORE_DTYPES[spec.score_dtype]
    return ScoreArguments(damping_factor=damping_factor(spec)[1], query_gradient_low_rank=spec.query_low_rank,
                          score_dtype=dtype, per_sample_gradient_dtype=dtype, precondition_dtype=torch.float32)


def _copy_factors_to_lake(store: LakeStore, local: Path, lake_dir: str, lineage: dict) -> None:
    files = sorted(p for p in local.rglob("*") if p.is_file())
    store.fs.makedirs(store.path(lake_dir), exist_ok=True)
    for path in files:
        if path.suffix in (".safetensors", ".json"):
            store.fs.put_file(str(path), store.path(f"{lake_dir}/{path.relative_to(local).as_posix()}"))
    manifest = {**lineage, "files": [p.relative_to(local).as_posix() for p in files if p.suffix in (".safetensors", ".json")]}
    store.fs.pipe_file(store.path(f"{lake_dir}/factors.json"), json.dumps(manifest, indent=1).encode())


def _factors_from_lake(store: LakeStore, lake_dir: str, local: Path) -> bool:
    """Put factors the lake holds where Kronfluence looks for them; False when the lake has none (complete)."""
    try:
        manifest = json.loads(store.fs.cat_file(store.path(f"{lake_dir}/factors.json")))
    except FileNotFoundError:
        return False
    for name in manifest["files"]:
        target = local / name
        target.parent.mkdir(parents=True, exist_ok=True)
        store.fs.get_file(store.path(f"{lake_dir}/{name}"), str(target))
    return True


def load_factors(store: LakeStore, lake_dir: str) -> dict[str, dict[str, torch.Tensor]]:
    """The factors stored in the lake: {file stem: {module name: tensor}}, read from safetensors."""
    from safetensors.torch import load as load_bytes

    manifest = json.loads(store.fs.cat_file(store.path(f"{lake_dir}/factors.json")))
    return {Path(name).stem: load_bytes(store.fs.cat_file(store.path(f"{lake_dir}/{name}")))
            for name in manifest["files"] if name.endswith(".safetensors")}


def plan_influence(spec: InfluenceSpec) -> dict:
    """Every check before any work: model config, data, tokenizer, tracked modules."""
    return _plan(spec)[0]


def _plan(spec: InfluenceSpec) -> tuple[dict, tuple]:
    """(the plan, the sets read from the lake) so that a run reads them once."""
    from transformers import AutoModelForCausalLM

    config = check_model(spec.model)
    check_weights(spec.model, config)
    chat_template_text(spec.chat_template)  # a named Jinja file must be readable before any work
    sets = load_sets(spec)
    keys, _, query_ids, _, versions = sets
    if not keys or not query_ids:
        raise InfluenceError(f"{len(keys)} training samples and {len(query_ids)} queries: nothing to score")
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    converted = linear_from_conv1d(skeleton)  # as the run will, so that patterns and keywords see the same modules
    modules = tracked_modules(skeleton, spec.layers)
    return {"n_train": len(keys), "n_query": len(query_ids), "modules": modules, "converted_conv1d": converted,
            "versions": versions}, sets


def _record(spec: InfluenceSpec, spec_model: ModelSpec, commit: str, plan: dict, tracked_conv1d: list[str],
            factors_dir: str) -> tuple[dict, dict]:
    """(settings, lineage) of a score group: what determines the scores, and how they were made."""
    name, checkpoint = lake_names(spec_model)
    # What determines the scores; not where they run (a retry on another worker or device resumes the same group).
    settings = spec.model_dump(mode="json", exclude={"lake", "train_block", "train_batch_size", "query_batch_size", "model"})
    settings["model"] = {"model": name, "checkpoint": checkpoint, "dtype": spec.model.dtype}
    # Groups written before these choices existed keep equal settings: the heuristic stays None, an unset
    # query_ids is left out, converted Conv1D appear only when tracked; 'kronfluence' is stored as its number.
    damping_rule, damping_value = damping_factor(spec)
    settings["damping"] = damping_value
    if spec.query_ids is None:
        del settings["query_ids"]
    if spec.chat_template == "tokenizer":
        del settings["chat_template"]
    if tracked_conv1d:
        settings["converted_conv1d"] = tracked_conv1d
    lineage = {"model": name, "checkpoint": checkpoint, "resolved_commit": commit, "versions": plan["versions"],
               "tracked_modules": plan["modules"], "converted_conv1d": plan["converted_conv1d"],
               "damping_rule": damping_rule, "damping_factor": damping_value, "factors": factors_dir,
               "tool": "kronfluence", "tool_version": _kronfluence_version()}
    return settings, lineage


def compute_influence(spec: InfluenceSpec, log: Callable[[str], None] = print, work_dir: str | None = None) -> str:
    """Fit (or reuse) the factors, score every block not yet in the lake, mark complete; returns the score group path."""
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.utils.dataset import DataLoaderKwargs

    from gradlake.tasks.common.lineage import lake_keys
    from gradlake.tasks.common.model import load_tokenizer

    plan, sets = _plan(spec)
    store = LakeStore(spec.lake)
    spec_model = spec.model.resolved()
    commit = resolved_commit(spec_model)
    keys, train_chats, query_ids, query_chats, versions = sets
    converted = set(plan["converted_conv1d"])
    tracked_conv1d = [m for m in plan["modules"] if m in converted]
    key = settings_key(spec, versions, commit, tracked_conv1d)
    model_key, checkpoint_key = lake_keys(spec_model)
    factors_dir = f"influence/{model_key}/{checkpoint_key}/{spec.dataset}/{spec.paradigm}-{spec.strategy}-{key}/factors"
    path = scores_path(model_key, checkpoint_key, spec.dataset, spec.query_dataset or spec.dataset, spec.queries,
                       spec.method_name)
    settings, lineage = _record(spec, spec_model, commit, plan, tracked_conv1d, factors_dir)
    n_train = len(keys)
    group = ScoreGroup.create(store, path, query_ids, keys, {"method": spec.method_name, "kind": "influence",
                                                             "settings": settings, "lineage": lineage},
                              query_rows=max(1, len(query_ids)), train_cols=spec.train_block)
    # a block: every query (their gradients are computed once per block) x `train_block` training samples
    if group.meta.get("complete"):
        log(f"scores {path} are complete in the lake; nothing to do")
        return path
    tokenizer = load_tokenizer(spec_model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    max_length, capped = capped_length(spec.max_length, check_model(spec.model), spec.model.model)
    if capped:
        log(capped)
    template = chat_template_text(spec.chat_template)
    encode = lambda chats: [encode_sample(tokenizer, c, spec.paradigm, max_length, template) for c in chats]  # noqa: E731
    train_set, query_set = EncodedSet(encode(train_chats)), EncodedSet(encode(query_chats))
    from transformers import AutoModelForCausalLM

    source, revision = spec_model.source()
    model = AutoModelForCausalLM.from_pretrained(source, revision=revision, dtype=DTYPES[spec_model.dtype],
                                                 trust_remote_code=spec_model.trust_remote_code)
    linear_from_conv1d(model)  # the same modules as the plan's skeleton: both are built from the config
    model = model.to(spec_model.torch_device()).eval()
    task = _task_class()(plan["modules"], spec.seed)
    model = prepare_model(model, task)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gradlake-kronfluence-", dir=work_dir) as tmp:
        analyzer = Analyzer(analysis_name="gradlake", model=model, task=task, cpu=spec_model.torch_device().type == "cpu",
                            output_dir=tmp, disable_tqdm=True, log_level=30)
        analyzer.set_dataloader_kwargs(DataLoaderKwargs(collate_fn=collate(pad_id)))
        local_factors = analyzer.factors_output_dir(factors_name=key)
        if _factors_from_lake(store, factors_dir, local_factors):
            log(f"factors ({spec.strategy}) found in the lake at {factors_dir}")
        else:
            log(f"fitting {spec.strategy} factors on {n_train} training samples, {len(plan['modules'])} modules")
            torch.manual_seed(spec.seed)
            analyzer.fit_all_factors(factors_name=key, dataset=train_set, per_device_batch_size=spec.train_batch_size,
                                     factor_args=_factor_args(spec))
            _copy_factors_to_lake(store, local_factors, factors_dir, {**lineage, "strategy": spec.strategy})
        fit_seconds = time.perf_counter() - started
        pending = group.pending_blocks()
        for qb, tb in pending:
            qs, ts = group.bounds(qb, tb)
            name = f"block-{qb}-{tb}"
            analyzer.compute_pairwise_scores(
                scores_name=name, factors_name=key, query_dataset=query_set, train_dataset=train_set,
                per_device_query_batch_size=spec.query_batch_size, per_device_train_batch_size=spec.train_batch_size,
                query_indices=list(range(qs.start, qs.stop)), train_indices=list(range(ts.start, ts.stop)),
                score_args=_score_args(spec))
            group.write_block(qb, tb, analyzer.load_pairwise_scores(name)["all_modules"].float().cpu().numpy())
            shutil.rmtree(analyzer.scores_output_dir(name), ignore_errors=True)
            log(f"scores block ({qb}, {tb}) written: queries {qs.start}-{qs.stop - 1}, "
                f"training samples {ts.start}-{ts.stop - 1} of {n_train}")
    group.finish(compute_seconds=round(time.perf_counter() - started, 3), fit_seconds=round(fit_seconds, 3),
                 lake_bytes=_bytes_under(store, factors_dir) + _bytes_under(store, path))
    log(f"influence ({spec.strategy}) of {n_train} training samples on {len(query_ids)} queries: {path}")
    return path


def _bytes_under(store: LakeStore, relative: str) -> int:
    try:
        return int(sum(store.fs.du(store.path(relative), total=False).values()))
    except FileNotFoundError:
        return 0


def _kronfluence_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("kronfluence")
    except metadata.PackageNotFoundError:
        raise ModelError("kronfluence is not installed; install it with `pip install --no-deps kronfluence==1.0.1` "
                         "(its torchvision dependency is never used)") from None

