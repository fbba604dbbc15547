"""One attribution benchmark: every method's scores against retraining (LDS, counterfactual removal) and retrieval.

The methods are score groups in the lake (``lake/scores.py``): Kronfluence influence
(``tasks/influence/compute.py``) and the baselines made from what the lake already holds for the
attributed model (``tasks/attribution/baselines.py``).

The queries (``AttributionSpec.queries``) are, by default, **held-out** samples of the
training dataset that the attributed run never trained on: the setting of the LDS
literature, where no training sample is a copy of a query.  They can also be paraphrases
or the model's own answers of training samples (fact tracing: each such query has a
*source* training sample), or any dataset and variant in the lake.  Where queries have a
source, the table adds the source oracle and the LDS beyond the source
(``tasks/attribution/lds.py``), so that the part of a method's LDS that is duplicate
retrieval shows.

The ground truth retrains the attributed model's own training run (`TrainSpec`) with
only its data changed: M seeded random subsets for LDS (each with ``retrain_seeds``
data orders, losses averaged), and per query its top-k training samples removed (for the
methods asked) or k random ones (several draws) for counterfactual removal.  Each
retraining is an ordinary ``train-model`` run with its own checkpoint prefix, so a
finished one is found and skipped and a killed one resumes.

Every interval is the crossed-design interval of ``tasks/attribution/lds.py`` (queries and
subsets both vary); adjacent methods in the table are marked separated only when the
paired interval of their difference excludes 0.  The ``grad-cosine:best-tensor`` row is
cross-fitted: the queries are split into folds, and each fold is scored with the single
tensor whose LDS was best on the other folds, so no query is scored by a choice made on it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import math

import numpy as np
import pandas as pd
import torch
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

from gradlake.lake import layout
from gradlake.lake.scores import ScoreGroup, list_score_groups, scores_path
from gradlake.lake.store import LakeError, LakeStore
from gradlake.tasks.attribution.baselines import QuerySet
from gradlake.tasks.attribution.lds import (compare, crossed_interval, draw_subsets, lds, lds_beyond_source, random_removals,
    source_oracle, top_k_removals)
from gradlake.tasks.common.model import ModelSpec
from gradlake.tasks.training.train import CHECKPOINT_PREFIX, TrainSpec, checkpoint_name, total_steps

TRAIN_DEPLOYMENT = "train-model/train-model"
HELD_OUT = "held_out"
BEST_TENSOR = "grad-cosine:best-tensor"


class AttributionError(ValueError):
    """Settings that cannot give an attribution benchmark, with what would be accepted."""


class AttributionSpec(BaseModel):
    """The attributed model (a checkpoint of a training run, the final one unless named), its queries, methods and
    ground truth."""

    model_config = ConfigDict(extra="forbid")

    train: TrainSpec = Field(title="Training run", description="The run whose checkpoint is attributed; the ground truth retrains it with only its data changed.")
    checkpoint: str | None = Field(default=None, description="Checkpoint of the run to attribute (e.g. checkpoint-000100); empty: the final one. The retrainings save the run's checkpoints too, so one set of retrainings serves every checkpoint.")
    queries: str = Field(default=HELD_OUT, description="The queries: 'held_out' (samples of the training dataset the run never trained on: the LDS literature's setting), 'paraphrased' or 'model_generated' (made from training samples: fact tracing, with the source oracle), or any variant of `query_dataset`.")
    query_dataset: str | None = Field(default=None, description="Dataset of the queries; empty: the training dataset.")
    query_ids: list[str] | None = Field(default=None, description="Only these query ids, in this order; empty: every sample of the query set (held out: every sample the run did not train on).")
    retrieval_queries: list[str] = Field(default=["paraphrased", "model_generated"], description="Query variants whose retrieval top-1 is reported next to the LDS, for the methods with scores for them in the lake.")
    max_queries: int | None = Field(default=None, ge=2, description="Only the first this many queries; empty: all.")
    methods: list[str] = Field(default=[], description="Score groups (method names) to compare; empty: every one the lake holds for this model, dataset and queries.")
    baselines: bool = Field(default=True, description="First score the gradient, projection, TRAK, BM25 and dense baselines from the lake's groups of the attributed model.")
    trak_lambda: float = Field(default=0.01, gt=0, description="TRAK's ridge: this times the mean diagonal of Phi^T Phi.")
    trak_checkpoints: list[str] | None = Field(default=None, description="TRAK's ensemble: checkpoints of the run whose projected gradients are averaged over; empty: every saved checkpoint after step 0 up to the attributed one that holds the projection.")
    n_subsets: int = Field(default=50, ge=2, description="LDS: random training subsets, each retrained (50 as in the LDS studies, which use 50-100; the demo uses 16).")
    fraction: float = Field(default=0.5, description="LDS: fraction of the training set in each subset, in (0, 1).")
    subset_seed: int = Field(default=0, description="LDS: subset m is numpy's default_rng([seed, m]) choice.")
    retrain_seeds: int = Field(default=1, ge=1, description="LDS: retrainings per subset with different data-order seeds (the run's seed, +1, ...); their query losses are averaged (TRAK and Kronfluence average 5).")
    n_bootstrap: int = Field(default=1000, ge=100, description="Resamples of the subsets behind every interval.")
    best_tensor_folds: int = Field(default=2, ge=2, description="Folds of queries for the cross-fitted best-tensor row: each fold is scored by the tensor chosen on the others.")
    counterfactual_k: int = Field(default=0, ge=0, description="Counterfactual removal: training samples removed per query; 0: skip (unless counterfactual_fraction is set).")
    counterfactual_fraction: float | None = Field(default=None, gt=0, lt=1, description="Counterfactual removal: remove this fraction of the training set per query instead of k (rounded up; 0.01: the top 1%).")
    counterfactual_queries: int | None = Field(default=None, ge=1, description="Counterfactual removal: the first this many queries; empty: all.")
    counterfactual_methods: list[str] = Field(default=["influence-ekfac"], description="Methods whose top-k are removed (one retraining per method and query).")
    random_draws: int = Field(default=10, ge=1, description="Counterfactual removal: retrainings with k random samples removed (the reference).")
    retrain_prefix: str = Field(title="Retraining prefix", description="Directory or s3:// prefix for the retrained models (one subdirectory per run).")
    train_deployment: str | None = Field(default=TRAIN_DEPLOYMENT, description="Deployment that runs each retraining on the gpu pool; empty: in this flow run, one after another.")
    run_timeout_s: float = Field(default=6 * 3600, gt=0, description="Longest one retraining may take once a worker has taken it.")
    worker_wait_s: float = Field(default=900, gt=0, description="How long retrainings may wait while no worker polls their pool.")

    _final: tuple[str, int] | None = PrivateAttr(default=None)  # (training spec as JSON, its total steps)

    @model_validator(mode="after")
    def _check(self) -> "AttributionSpec":
        if self.checkpoint is not None:
            checkpoint_step(self.checkpoint)
        if not 0.0 < self.fraction < 1.0:
            raise ValueError(f"subset fraction {self.fraction} is outside (0, 1); use e.g. 0.5")
        if len(self.train.variants) != 1:
            raise ValueError(f"the ground truth retrains on subsets of one variant; the run trains on {self.train.variants}")
        if self.counterfactual_k and self.counterfactual_fraction:
            raise ValueError(f"give counterfactual_k ({self.counterfactual_k}) or counterfactual_fraction "
                             f"({self.counterfactual_fraction}), not both")
        return self

    @property
    def query_set_dataset(self) -> str:
        return self.query_dataset or self.train.dataset

    def removal_k(self, n_train: int) -> int:
        """Samples removed per query in counterfactual removal (0: none asked)."""
        if self.counterfactual_fraction:
            return max(1, math.ceil(self.counterfactual_fraction * n_train))
        return self.counterfactual_k

    @property
    def model(self) -> ModelSpec:
        """The attributed model: the training run's final checkpoint."""
        return ModelSpec(model=self.train.output, checkpoint=self.checkpoint or checkpoint_name(self._total_steps()),
                         dtype=self.train.model.dtype, device=self.train.model.device)

    @property
    def step(self) -> int:
        """The training step of the attributed checkpoint."""
        return checkpoint_step(self.model.checkpoint)

    def _total_steps(self) -> int:
        """The run's length; its data is read from the lake once per training spec, not on every use of `model`."""
        from gradlake.tasks.training.train import load_train_data

        if self.train.steps:
            return self.train.steps
        key = self.train.model_dump_json()
        if self._final is None or self._final[0] != key:
            self._final = (key, total_steps(self.train, len(load_train_data(self.train).keys)))
        return self._final[1]


def checkpoint_step(name: str) -> int:
    """The step of a training checkpoint's name (checkpoint-000100 -> 100)."""
    digits = name[len(CHECKPOINT_PREFIX):] if name.startswith(CHECKPOINT_PREFIX) else ""
    if not digits.isdigit():
        raise ValueError(f"checkpoint {name!r} is not a training checkpoint's name; use e.g. {checkpoint_name(100)!r}")
    return int(digits)


# ---------------------------------------------------------------- where things go

def query_variant(spec: AttributionSpec, queries: str | None = None) -> str:
    """The stored variant of a query label: held-out queries are the training variant's own samples."""
    from gradlake.tasks.common.lineage import lake_keys

    queries = queries or spec.queries
    if queries == HELD_OUT:
        return spec.train.variants[0]
    if queries == "model_generated":
        return layout.generated_variant(*lake_keys(spec.model))
    return queries


def benchmark_dir(spec: AttributionSpec) -> str:
    from gradlake.tasks.common.lineage import lake_keys

    model_key, checkpoint_key = lake_keys(spec.model)
    label = spec.queries if spec.query_dataset in (None, spec.train.dataset) else f"{spec.query_dataset}.{spec.queries}"
    return f"evaluations/{model_key}/{checkpoint_key}/{spec.train.dataset}/attribution/{label}"


def method_path(spec: AttributionSpec, method: str, queries: str | None = None) -> str:
    """A method's score group for the benchmark's queries (or a retrieval variant of the training dataset)."""
    from gradlake.tasks.common.lineage import lake_keys

    model_key, checkpoint_key = lake_keys(spec.model)
    dataset = spec.query_set_dataset if queries in (None, spec.queries) else spec.train.dataset
    return scores_path(model_key, checkpoint_key, spec.train.dataset, dataset, query_variant(spec, queries), method)


def resolve_queries(spec: AttributionSpec, train_ids: list[str], queries: str | None = None) -> QuerySet:
    """The query set, checked: held-out queries are never training samples; each query's source training sample."""
    from gradlake.lake.datasets import read_dataset

    label = queries or spec.queries
    own = label == spec.queries
    dataset = spec.query_set_dataset if own else spec.train.dataset
    variant = query_variant(spec, label)
    frame = read_dataset(LakeStore(spec.train.lake), dataset, variant)
    chats = {str(i): m for i, m in zip(frame["id"], frame["messages"])}
    trained = set(train_ids)
    asked = spec.query_ids if own else None
    if asked is not None:
        missing = [i for i in asked if i not in chats]
        if missing:
            raise AttributionError(f"query_ids {missing[:5]} are not in dataset {dataset!r} variant {variant!r}; "
                                   f"ids look like {list(chats)[:3]}")
    if label == HELD_OUT:
        if asked is not None:
            overlap = [i for i in asked if i in trained]
            if overlap:
                raise AttributionError(f"held-out query_ids {overlap[:5]} ({len(overlap)} in all) are training samples "
                                       "of the run; held-out queries must be samples it never trained on")
            ids = list(asked)
        else:
            ids = [i for i in chats if i not in trained]
        if not ids:
            raise AttributionError(f"the run trains on every sample of {dataset!r} {variant!r}, so none is held out; "
                                   "train it on part of the dataset (`keep` or `drop`), or choose queries from "
                                   "another variant or dataset")
    else:
        ids = list(asked) if asked is not None else list(chats)
    if spec.max_queries and own:
        ids = ids[: spec.max_queries]
    if own and len(ids) < 2:
        raise AttributionError(f"{len(ids)} queries give no LDS; the query set needs at least 2")
    position = {i: k for k, i in enumerate(train_ids)}
    same_data = dataset == spec.train.dataset and label != HELD_OUT
    sources = [position.get(i) if same_data else None for i in ids]
    return QuerySet(label, dataset, variant, ids, [chats[i] for i in ids], sources)


def ground_truth_key(fingerprint: str, kind: str, **extra) -> str:
    what = {"run": fingerprint, "kind": kind, **extra}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:12]


# ---------------------------------------------------------------- retraining plans

def lds_runs(spec: AttributionSpec, fingerprint: str, train_ids: list[str],
             saves: list[int], total: int) -> tuple[str, np.ndarray, list[list[TrainSpec]]]:
    """(key, subset masks, per subset one TrainSpec per data-order seed) for the LDS retrainings.

    `saves` and `total` are the attributed run's checkpoint steps and length: each retraining
    saves its counterpart of every checkpoint, so one set serves them all.  Seed r of a
    subset trains with the run's seed + r (r = 0 is named as before seeds were added, so
    adding seeds keeps every retraining already made).
    """
    key = ground_truth_key(fingerprint, "lds", fraction=spec.fraction, seed=spec.subset_seed, saves=saves)
    masks = draw_subsets(len(train_ids), spec.fraction, spec.n_subsets, spec.subset_seed)
    runs = []
    for m, mask in enumerate(masks):
        keep = [train_ids[i] for i in np.flatnonzero(mask)]
        runs.append([_retrain(spec, f"lds-{key}/{subset_name(m, r)}", len(train_ids), saves, total, keep,
                              seed=spec.train.seed + r)
                     for r in range(spec.retrain_seeds)])
    return key, masks, runs


def subset_name(m: int, r: int) -> str:
    return f"subset-{m:03d}" if r == 0 else f"subset-{m:03d}-seed{r}"


def check_counterfactual(spec: AttributionSpec, n_train: int) -> int:
    """k, checked against the training set and the random draws before any retraining."""
    k = spec.removal_k(n_train)
    if not k:
        return 0
    if not 1 <= k < n_train:
        raise AttributionError(f"counterfactual k={k} out of {n_train} training samples; use 1 <= k < {n_train}")
    possible = math.comb(n_train, k)
    if spec.random_draws > possible:
        raise AttributionError(f"random_draws={spec.random_draws} random removals of {k} out of {n_train} training "
                               f"samples cannot all differ (only {possible} exist); use at most {possible}")
    return k


def counterfactual_runs(spec: AttributionSpec, fingerprint: str, train_ids: list[str], saves: list[int], total: int,
                        scores: dict[str, np.ndarray]) -> tuple[str, dict[str, list[TrainSpec]], list[TrainSpec], np.ndarray]:
    """(key, per method one TrainSpec per query with its top-k removed, random-removal TrainSpecs, the random draws).

    Each removal run trains on exactly the attributed run's samples less the k removed, with
    the subsets' step rule (`counterpart`)."""
    n = len(train_ids)
    k = check_counterfactual(spec, n)
    # The removals follow the scores of the attributed checkpoint, so each checkpoint has its own retrainings.
    key = ground_truth_key(fingerprint, "counterfactual-keep", k=k, seed=spec.subset_seed,
                           checkpoint=spec.model.checkpoint, saves=saves)
    per_method = {}
    for method, matrix in scores.items():
        top = top_k_removals(matrix, k)
        per_method[method] = [_retrain(spec, f"cf-{key}/{layout.key(method)}/q{q:03d}", n, saves, total,
                                       _without(train_ids, row))
                              for q, row in enumerate(top)]
    draws = random_removals(n, k, spec.random_draws, spec.subset_seed)
    random_key = ground_truth_key(fingerprint, "random-removal-keep", k=k, seed=spec.subset_seed, saves=saves)
    random = [_retrain(spec, f"cf-random-{random_key}/d{d:03d}", n, saves, total, _without(train_ids, row))
              for d, row in enumerate(draws)]
    return key, per_method, random, draws


def _without(train_ids: list[str], removed) -> list[str]:
    gone = {train_ids[i] for i in removed}
    return [i for i in train_ids if i not in gone]


def run_steps(run: TrainSpec, n_train: int) -> int:
    """Optimizer steps of a (re)training run whose data is `keep`, or `n_train` samples less `drop`."""
    return total_steps(run, len(run.keep) if run.keep is not None else n_train - len(run.drop or []))


def counterpart(step: int, total: int, run_total: int) -> int:
    """The retraining's step at the same fraction of training as `step` of the attributed run.

    A run given in steps is retrained for as many steps (the same step); a run given in
    epochs is retrained for as many epochs of its smaller data (the same epoch), as in the
    LDS studies, which retrain with the original recipe.
    """
    return 0 if step == 0 else max(1, round(step * run_total / total))


def _retrain(spec: AttributionSpec, name: str, n_train: int, saves: list[int], total: int, keep: list[str],
             seed: int | None = None) -> TrainSpec:
    """The attributed run with only its data changed: exactly `keep` (the run's own samples, some left out)."""
    run = spec.train.model_copy(update={"keep": keep, "drop": None, "output": f"{spec.retrain_prefix.rstrip('/')}/{name}",
                                        "quality": None, "save_initial": False, "checkpoint_every": 0,
                                        "seed": spec.train.seed if seed is None else seed})
    run_total = run_steps(run, n_train)
    return run.model_copy(update={"save_steps": sorted({counterpart(s, total, run_total) for s in saves if s > 0})})


def retrained_model(run: TrainSpec, step: int, total: int, n_train: int) -> ModelSpec:
    """A retraining's checkpoint at the counterpart of the attributed step."""
    at = counterpart(step, total, run_steps(run, n_train))
    return ModelSpec(model=run.output, checkpoint=checkpoint_name(at), dtype=run.model.dtype, device=run.model.device)


# ---------------------------------------------------------------- query losses

def query_losses(model: ModelSpec, chats: list[list[dict]], paradigm: str, max_length: int, batch_size: int = 8,
                 chat_template: str = "tokenizer") -> np.ndarray:
    """Each query's loss (the extraction's convention, rendered by `chat_template` as in training): shape (n_query,)."""
    from transformers import AutoModelForCausalLM

    from gradlake.tasks.common.loss import chat_template_text, encode_sample, pad_batch, sample_losses
    from gradlake.tasks.common.model import DTYPES, capped_length, check_model, load_tokenizer

    config = check_model(model)  # a missing or incomplete checkpoint is one error naming it
    max_length = capped_length(max_length, config, model.model)[0]
    spec = model.resolved()
    tokenizer = load_tokenizer(spec)
    path, revision = spec.source()
    net = AutoModelForCausalLM.from_pretrained(path, revision=revision, dtype=DTYPES[spec.dtype]).to(spec.torch_device()).eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    template = chat_template_text(chat_template)
    encoded = [encode_sample(tokenizer, c, paradigm, max_length, template) for c in chats]
    out = []
    with torch.no_grad():
        for start in range(0, len(encoded), batch_size):
            ids, labels = pad_batch(encoded[start:start + batch_size], pad)
            device = next(net.parameters()).device
            out.append(sample_losses(net(input_ids=ids.to(device)).logits, labels.to(device)).float().cpu().numpy())
    return np.concatenate(out)


def stored_losses(store: LakeStore, directory: str, name: str, model: ModelSpec, query_ids: list[str],
                  chats: list[list[dict]], spec: AttributionSpec) -> np.ndarray:
    """A retrained model's query losses, computed once and kept in the lake (losses/<name>.parquet)."""
    path = store.path(f"{directory}/losses/{name}.parquet")
    try:
        frame = pd.read_parquet(io.BytesIO(store.fs.cat_file(path)))
        if list(frame["query"]) == list(query_ids):
            return frame["loss"].to_numpy()
    except FileNotFoundError:
        pass
    losses = query_losses(model, chats, spec.train.paradigm, spec.train.max_length, chat_template=spec.train.chat_template)
    buffer = io.BytesIO()
    pd.DataFrame({"query": query_ids, "loss": losses, "model": model.model, "checkpoint": model.checkpoint}).to_parquet(buffer, index=False)
    store.fs.makedirs(store.path(f"{directory}/losses"), exist_ok=True)
    store.fs.pipe_file(path, buffer.getvalue())
    return losses


# ---------------------------------------------------------------- the table

def _complete_methods(store: LakeStore, spec: AttributionSpec, tensors: bool) -> list[str]:
    prefix = method_path(spec, "x").rsplit("/", 1)[0] + "/"
    return sorted(g["method"] for g in list_score_groups(store)
                  if g["path"].startswith(prefix) and g.get("complete") and (g.get("kind") == "tensor") == tensors)


def available_methods(store: LakeStore, spec: AttributionSpec) -> list[str]:
    """Complete score groups for the benchmark's queries, less the per-tensor candidates of the best-tensor row."""
    return _complete_methods(store, spec, tensors=False)


def tensor_methods(store: LakeStore, spec: AttributionSpec) -> list[str]:
    """The per-tensor cosine groups (candidates of the cross-fitted best-tensor row)."""
    return _complete_methods(store, spec, tensors=True)


def query_folds(n_queries: int, folds: int, seed: int) -> np.ndarray:
    """Fold of each query (Q,): a seeded permutation dealt round-robin, so folds differ in size by at most one."""
    if folds > n_queries:
        raise AttributionError(f"best_tensor_folds={folds} with {n_queries} queries leaves a fold with no query to "
                               f"score; use at most {n_queries} folds or more queries")
    order = np.random.default_rng([seed, 31337]).permutation(n_queries)
    fold = np.empty(n_queries, dtype=int)
    fold[order] = np.arange(n_queries) % folds
    return fold


def cross_fitted_choice(per_query: dict[str, np.ndarray], fold: np.ndarray) -> list[str]:
    """For each fold, the candidate with the best mean per-query LDS over the queries of the other folds only."""
    names = sorted(per_query)
    chosen = []
    for f in range(int(fold.max()) + 1):
        train = fold != f
        means = [np.nanmean(per_query[n][train]) if np.isfinite(per_query[n][train]).any() else -np.inf for n in names]
        chosen.append(names[int(np.argmax(means))])
    return chosen


def _row(method: str, kind: str, result: dict) -> dict:
    return {"method": method, "kind": kind, "lds": result["lds"], "lds_ci_low": result["ci_low"],
            "lds_ci_high": result["ci_high"], "lds_queries": result["n_queries"]}


def benchmark_table(store: LakeStore, spec: AttributionSpec, methods: list[str], queries: QuerySet,
                    train_keys: list[str], masks: np.ndarray, lds_losses: np.ndarray,
                    cf: dict | None) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """(one row per method with the references, LDS per query per method, what the table rests on)."""
    rows, per_query, results, notes = [], [], {}, {}
    fit = lambda scores: lds(scores, masks, lds_losses, n_boot=spec.n_bootstrap, seed=spec.subset_seed)  # noqa: E731

    def beyond(scores: np.ndarray) -> dict:
        values, boot = lds_beyond_source(scores, masks, lds_losses, queries.sources, spec.n_bootstrap, spec.subset_seed)
        low, high = crossed_interval(values, boot)
        return {"lds_beyond_source": float(np.nanmean(values)), "beyond_ci_low": low, "beyond_ci_high": high}

    for method in methods:
        group = ScoreGroup.open(store, method_path(spec, method))
        scores = _aligned(group, queries.ids, train_keys, method)
        results[method] = result = fit(scores)
        meta = group.meta
        row = {**_row(method, meta.get("kind"), result),
               **retrieval_columns(store, spec, method, train_keys, queries, scores),
               "compute_seconds": meta.get("compute_seconds"), "lake_bytes": meta.get("lake_bytes")}
        if queries.has_sources:
            row.update(beyond(scores))
        rows.append(row)
    candidates = tensor_methods(store, spec)
    if len(candidates) > 1:
        fold = query_folds(len(queries.ids), spec.best_tensor_folds, spec.subset_seed)
        tensor_scores = {m: _aligned(ScoreGroup.open(store, method_path(spec, m)), queries.ids, train_keys, m)
                         for m in candidates}
        tensor_lds = {m: lds(s, masks, lds_losses, n_boot=0)["per_query"] for m, s in tensor_scores.items()}
        chosen = cross_fitted_choice(tensor_lds, fold)
        scores = np.stack([tensor_scores[chosen[f]][q] for q, f in enumerate(fold)])
        results[BEST_TENSOR] = result = fit(scores)
        row = {**_row(BEST_TENSOR, "tensor", result), **retrieval_columns(store, spec, None, train_keys, queries, scores)}
        if queries.has_sources:
            row.update(beyond(scores))
        rows.append(row)
        notes["best_tensor"] = {"folds": spec.best_tensor_folds, "candidates": len(candidates),
                                "chosen": [c.split(":", 1)[1] for c in chosen],
                                "fold_of_query": dict(zip(queries.ids, fold.tolist()))}
    rng = np.random.default_rng(spec.subset_seed)
    references = {"random": rng.normal(size=(len(queries.ids), len(train_keys))),
                  "source oracle": source_oracle(queries.sources, len(train_keys), spec.subset_seed)}
    for name, scores in references.items():
        results[name] = result = fit(scores)
        row = _row(name, "reference", result)
        if queries.has_sources:
            row.update(beyond(scores))
            row[f"top1_{queries.label}"] = retrieval_top1(scores, queries, train_keys)
        rows.append(row)
    if cf is not None:
        for row in rows:
            row.update(cf["columns"].get(row["method"], {}))
    for name, result in results.items():
        per_query += [{"method": name, "query": q, "lds": v} for q, v in zip(queries.ids, result["per_query"])]
    table = pd.DataFrame(rows).sort_values("lds", ascending=False, na_position="last").reset_index(drop=True)
    below = [None] * len(table)
    for i in range(len(table) - 1):
        a, b = table.loc[i, "method"], table.loc[i + 1, "method"]
        diff, low, high = compare(results[a], results[b])
        table.loc[i, "vs_next_low"], table.loc[i, "vs_next_high"] = low, high
        below[i] = bool(low > 0 or high < 0)
    table["separated_from_next"] = pd.array(below, dtype="boolean")
    if "lake_bytes" in table:
        table["lake_bytes"] = table["lake_bytes"].astype("Int64")
    return table, pd.DataFrame(per_query), notes


def retrieval_top1(scores: np.ndarray, queries: QuerySet, train_keys: list[str]) -> float:
    """Fraction of the queries with a source training sample whose top-scored training sample is that source."""
    truth = np.array([-1 if s is None else s for s in queries.sources])
    if (truth < 0).all():
        return float("nan")
    return float((scores.argmax(axis=1) == truth)[truth >= 0].mean())


def retrieval_columns(store: LakeStore, spec: AttributionSpec, method: str | None, train_keys: list[str],
                      queries: QuerySet, scores: np.ndarray) -> dict:
    """top1_<queries> for the benchmark's queries when they have sources, and for each retrieval variant the method has
    scores for (the training dataset's variants; a query counts where its source is a training sample)."""
    columns = {}
    if queries.has_sources:
        columns[f"top1_{queries.label}"] = retrieval_top1(scores, queries, train_keys)
    if method is None:
        return columns
    train_ids = [k.split(":", 1)[1] for k in train_keys]
    position = {i: k for k, i in enumerate(train_ids)}
    for label in dict.fromkeys(spec.retrieval_queries):
        if label == spec.queries and spec.query_set_dataset == spec.train.dataset:
            continue
        group = ScoreGroup.open(store, method_path(spec, method, label), missing_ok=True)
        if group is None or not group.meta.get("complete"):
            columns[f"top1_{label}"] = float("nan")
            continue
        ids = [q for q in group.query_ids() if q in position][: spec.max_queries]  # the same queries for every method
        if not ids:
            columns[f"top1_{label}"] = float("nan")
            continue
        other = QuerySet(label, spec.train.dataset, query_variant(spec, label), ids, [], [position[q] for q in ids])
        columns[f"top1_{label}"] = retrieval_top1(_aligned(group, ids, train_keys, method), other, train_keys)
    return columns


def _aligned(group: ScoreGroup, query_ids: list[str], train_keys: list[str], method: str) -> np.ndarray:
    """The method's scores with rows and columns in the benchmark's query and training order."""
    q_pos = {q: i for i, q in enumerate(group.query_ids())}
    t_pos = {t: i for i, t in enumerate(group.train_ids())}
    missing_q = [q for q in query_ids if q not in q_pos]
    missing_t = [t for t in train_keys if t not in t_pos]
    if missing_q or missing_t:
        raise AttributionError(f"scores of {method!r} lack queries {missing_q[:3]} or training samples {missing_t[:3]}; "
                               "compute them on the benchmark's queries and training set")
    matrix = group.read()
    return matrix[np.ix_([q_pos[q] for q in query_ids], [t_pos[t] for t in train_keys])]


def write_benchmark(store: LakeStore, directory: str, table: pd.DataFrame, per_query: pd.DataFrame, meta: dict) -> None:
    """Tables, then meta.json last (its presence means the rest is complete)."""
    base = store.path(directory)
    store.fs.makedirs(base, exist_ok=True)
    if store.fs.exists(f"{base}/meta.json"):
        store.fs.rm_file(f"{base}/meta.json")
    for name, frame in (("benchmark", table), ("lds_per_query", per_query)):
        buffer = io.BytesIO()
        frame.to_parquet(buffer, index=False)
        store.fs.pipe_file(f"{base}/{name}.parquet", buffer.getvalue())
    meta = {**meta, "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    store.fs.pipe_file(f"{base}/meta.json", json.dumps(meta, indent=1, default=str).encode())


def read_benchmark(store: LakeStore, directory: str) -> pd.DataFrame:
    if not store.fs.exists(store.path(f"{directory}/meta.json")):
        raise LakeError(f"no complete attribution benchmark at {directory}")
    return pd.read_parquet(io.BytesIO(store.fs.cat_file(store.path(f"{directory}/benchmark.parquet"))))

