"""One attribution benchmark: every method's scores against retraining (LDS, counterfactual removal) and retrieval.

The methods are score groups in the lake (``lake/scores.py``): Kronfluence influence
(``tasks/influence.py``) and the baselines made here from what the lake already holds
for the attributed model:

- ``grad-dot`` and ``grad-cosine``: the full stored gradient (every tensor of the
  ``store`` group), query against training sample, accumulated block by block;
- ``grad-cosine:<tensor>``: the single tensor that finds paraphrases best (the
  select-vs-project evaluation's top-1, when one was run);
- ``proj-cosine:<setting>`` and ``trak:<setting>`` for each projection group: cosine of
  the projected gradients, and TRAK's score on them with traker's own score computer
  (``phi_q (Phi^T Phi + lambda I)^-1 phi_i``, one model, no ensemble; lambda is
  ``trak_lambda`` times the mean diagonal of ``Phi^T Phi``);
- ``bm25`` and ``dense``: the text baselines on the user turns.

The ground truth retrains the attributed model's own training run (`TrainSpec`) with
only its data changed: M seeded random subsets for LDS, and per query its top-k training
samples removed (for the methods asked) or k random ones (several draws) for
counterfactual removal.  Each retraining is an ordinary ``train-model`` run with its own
checkpoint prefix, so a finished one is found and skipped and a killed one resumes.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import time
from collections.abc import Callable

import numpy as np
import pandas as pd
import torch
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

from gradlake.lake import layout
from gradlake.lake.gradients import NOT_GRADIENTS
from gradlake.lake.integrity import read_checked
from gradlake.lake.scores import ScoreGroup, list_score_groups, scores_path
from gradlake.lake.store import LakeError, LakeStore
from gradlake.tasks.groundtruth import draw_subsets, lds, random_removals, top_k_removals
from gradlake.tasks.model import ModelSpec
from gradlake.tasks.train import CHECKPOINT_PREFIX, TrainSpec, checkpoint_name, total_steps

TRAIN_DEPLOYMENT = "train-model/train-model"


class AttributionError(ValueError):
    """Settings that cannot give an attribution benchmark, with what would be accepted."""


class AttributionSpec(BaseModel):
    """The attributed model (a checkpoint of a training run, the final one unless named), its queries, methods and
    ground truth."""

    model_config = ConfigDict(extra="forbid")

    train: TrainSpec = Field(title="Training run", description="The run whose checkpoint is attributed; the ground truth retrains it with only its data changed.")
    checkpoint: str | None = Field(default=None, description="Checkpoint of the run to attribute (e.g. checkpoint-000100); empty: the final one. The retrainings save the run's checkpoints too, so one set of retrainings serves every checkpoint.")
    queries: str = Field(default="paraphrased", description="Variant of the training dataset whose samples are the queries ('model_generated': the attributed model's answers).")
    retrieval_queries: list[str] = Field(default=["paraphrased", "model_generated"], description="Query variants whose retrieval top-1 is reported next to the LDS, for the methods with scores for them in the lake.")
    max_queries: int | None = Field(default=None, ge=2, description="Only the first this many queries; empty: all.")
    methods: list[str] = Field(default=[], description="Score groups (method names) to compare; empty: every one the lake holds for this model, dataset and queries.")
    baselines: bool = Field(default=True, description="First score the gradient, projection, TRAK, BM25 and dense baselines from the lake's groups of the attributed model.")
    trak_lambda: float = Field(default=0.01, gt=0, description="TRAK's ridge: this times the mean diagonal of Phi^T Phi.")
    n_subsets: int = Field(default=16, ge=2, description="LDS: random training subsets, each retrained (studies use 50-100).")
    fraction: float = Field(default=0.5, description="LDS: fraction of the training set in each subset, in (0, 1).")
    subset_seed: int = Field(default=0, description="LDS: subset m is numpy's default_rng([seed, m]) choice.")
    counterfactual_k: int = Field(default=0, ge=0, description="Counterfactual removal: training samples removed per query; 0: skip.")
    counterfactual_queries: int = Field(default=4, ge=1, description="Counterfactual removal: the first this many queries.")
    counterfactual_methods: list[str] = Field(default=["influence-ekfac"], description="Methods whose top-k are removed (one retraining per method and query).")
    random_draws: int = Field(default=3, ge=1, description="Counterfactual removal: retrainings with k random samples removed.")
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
        return self

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
        from gradlake.tasks.train import load_train_data

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
    from gradlake.tasks.evaluate import lake_keys

    queries = queries or spec.queries
    if queries == "model_generated":
        return layout.generated_variant(*lake_keys(spec.model))
    return queries


def benchmark_dir(spec: AttributionSpec) -> str:
    from gradlake.tasks.evaluate import lake_keys

    model_key, checkpoint_key = lake_keys(spec.model)
    return f"evaluations/{model_key}/{checkpoint_key}/{spec.train.dataset}/attribution/{spec.queries}"


def method_path(spec: AttributionSpec, method: str, queries: str | None = None) -> str:
    from gradlake.tasks.evaluate import lake_keys

    model_key, checkpoint_key = lake_keys(spec.model)
    return scores_path(model_key, checkpoint_key, spec.train.dataset, spec.train.dataset, query_variant(spec, queries),
                       method)


def ground_truth_key(fingerprint: str, kind: str, **extra) -> str:
    what = {"run": fingerprint, "kind": kind, **extra}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:12]


# ---------------------------------------------------------------- the baselines as score groups

def _write_scores(store: LakeStore, path: str, query_ids: list[str], train_keys: list[str], scores: np.ndarray,
                  meta: dict) -> str:
    try:
        group = ScoreGroup.create(store, path, query_ids, train_keys, meta, query_rows=max(1, len(query_ids)))
    except LakeError:  # a baseline of other samples (a new dataset version): cheap, derived, made again
        store.fs.rm(store.path(path), recursive=True)
        group = ScoreGroup.create(store, path, query_ids, train_keys, meta, query_rows=max(1, len(query_ids)))
    if not group.meta.get("complete"):
        group.write_rows(0, scores.astype(np.float32))
        group.finish(lake_bytes=int(scores.size * 4), **{k: v for k, v in meta.items() if k == "compute_seconds"})
    return path


def trak_scores(query_features: np.ndarray, train_features: np.ndarray, ratio: float) -> np.ndarray:
    """TRAK on stored projected gradients with traker's score computer: (queries, train)."""
    from trak.score_computers import BasicScoreComputer

    train = torch.as_tensor(train_features, dtype=torch.float32)
    query = torch.as_tensor(query_features, dtype=torch.float32)
    xtx = train.T @ train
    computer = BasicScoreComputer(dtype=torch.float32, device=torch.device("cpu"),
                                  lambda_reg=float(ratio * xtx.diagonal().mean()))
    features = computer.get_x_xtx_inv(train, computer.get_xtx(train))
    scores = torch.zeros(train.shape[0], query.shape[0])
    computer.get_scores(features, query, scores)
    return scores.T.numpy()


def _accumulate(queries, docs, arrays: list[str], budget: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Dot products over a set of arrays, with both sides' squared norms, block by block from the lake."""
    from gradlake.tasks.similarity import blocks

    n_query, n_docs = queries[arrays[0]].shape[0], docs[arrays[0]].shape[0]
    dots, q_sq, d_sq = np.zeros((n_query, n_docs)), np.zeros(n_query), np.zeros(n_docs)
    seen = set()
    for q0, q1, name, block, qs, ds in blocks(queries, docs, arrays, 1, budget):
        dots[q0:q1] += block
        q_sq[q0:q1] += qs
        if name not in seen:
            d_sq += ds
            seen.add(name)
    return dots, q_sq, d_sq


def baseline_scores(spec: AttributionSpec, queries: str | None = None, log: Callable[[str], None] = print) -> list[str]:
    """Score groups for the gradient, projection, TRAK, BM25 and dense baselines over every query of a variant
    (default: the benchmark's); returns their method names."""
    from gradlake.lake.datasets import read_dataset
    from gradlake.tasks.evaluate import EvaluationSpec, Evaluation, _meta, _user_turns, dense_scores
    from gradlake.tasks.metrics import bm25_scores, cosine_from_parts

    queries = queries or spec.queries
    store = LakeStore(spec.train.lake)
    try:
        evaluation = Evaluation(EvaluationSpec(model=spec.model, dataset=spec.train.dataset, queries=[queries],
                                               paradigm=spec.train.paradigm, lake=spec.train.lake), queries, store)
    except LakeError as err:
        if "no group at" not in str(err) and "not complete" not in str(err):
            raise
        log(f"no gradients of {spec.model.model}@{spec.model.checkpoint} for {queries!r} ({err}); "
            "scoring the text baselines only (extract 'original' and the queries for the gradient baselines)")
        evaluation = None
    if evaluation is not None:
        fingerprints = {_meta(g)["lineage"].get("tokenizer_hash") for g in (evaluation.originals, evaluation.query)}
        if len(fingerprints) != 1:
            raise AttributionError(f"the queries ({queries}) and the training set (original) were tokenized with "
                                   f"different tokenizers ({sorted(map(str, fingerprints))}); extract both with one model")
        query_ids, doc_ids = evaluation.query_ids, evaluation.doc_ids
        query_text, doc_text = evaluation.query_text, evaluation.doc_text
        lineage = {"model": spec.model.model, "checkpoint": spec.model.checkpoint,
                   "gradients": evaluation.original_dir, "queries": evaluation.query_dir}
    else:
        texts = {v: _user_turns(read_dataset(store, spec.train.dataset, v))
                 for v in ("original", query_variant(spec, queries))}
        doc_text_by_id, query_text_by_id = texts["original"], texts[query_variant(spec, queries)]
        doc_ids, query_ids = list(doc_text_by_id), [q for q in query_text_by_id if q in doc_text_by_id]
        doc_text, query_text = [doc_text_by_id[i] for i in doc_ids], [query_text_by_id[q] for q in query_ids]
        lineage = {"model": spec.model.model, "checkpoint": spec.model.checkpoint, "queries": query_variant(spec, queries)}
    n_query = len(query_ids)
    train_keys = [f"{spec.train.variants[0]}:{i}" for i in doc_ids]
    written, reused = [], []

    def write(method: str, kind: str, scores: np.ndarray, seconds: float, settings: dict | None = None) -> None:
        _write_scores(store, method_path(spec, method, queries), query_ids, train_keys, scores[:n_query],
                      {"method": method, "kind": kind, "settings": settings or {}, "lineage": lineage,
                       "compute_seconds": round(seconds, 3)})
        written.append(method)

    def held(*methods: str, settings: dict | None = None) -> bool:
        """Whether the lake holds these scores, complete, for these samples and settings: computed once, reused."""
        for method in methods:
            group = ScoreGroup.open(store, method_path(spec, method, queries), missing_ok=True)
            if (group is None or not group.meta.get("complete") or group.meta.get("settings") != (settings or {})
                    or group.query_ids() != query_ids or group.train_ids() != train_keys):
                return False
        written.extend(methods)
        reused.extend(methods)
        return True

    if evaluation is not None and evaluation.tensors and not held("grad-dot", "grad-cosine"):
        started = time.perf_counter()
        dots, q_sq, d_sq = _accumulate(evaluation.query, evaluation.originals, evaluation.tensors, 1 << 30)
        seconds = time.perf_counter() - started
        write("grad-dot", "gradient", dots, seconds)
        write("grad-cosine", "gradient", cosine_from_parts(dots, q_sq, d_sq), seconds)
    if evaluation is not None and evaluation.tensors:
        best = best_tensor(store, spec, queries)
        if best is not None and not held(f"grad-cosine:{best}"):
            started = time.perf_counter()
            dots, q_sq, d_sq = _accumulate(evaluation.query, evaluation.originals, [best], 1 << 30)
            write(f"grad-cosine:{best}", "tensor", cosine_from_parts(dots, q_sq, d_sq), time.perf_counter() - started)
    for label, projection, query_group, docs in (evaluation.projection_pairs() if evaluation is not None else []):
        arrays = sorted(set(query_group.array_keys()) - set(NOT_GRADIENTS))
        if not held(f"proj-cosine:{label}", settings={"projection": projection}):
            started = time.perf_counter()
            dots, q_sq, d_sq = _accumulate(query_group, docs, arrays, 1 << 30)
            write(f"proj-cosine:{label}", "projection", cosine_from_parts(dots, q_sq, d_sq),
                  time.perf_counter() - started, {"projection": projection})
        if held(f"trak:{label}", settings={"projection": projection, "trak_lambda": spec.trak_lambda}):
            continue
        started = time.perf_counter()
        features_q = np.concatenate([read_checked(query_group[a], slice(None), np.float32) for a in arrays], axis=1)
        features_t = np.concatenate([read_checked(docs[a], slice(None), np.float32) for a in arrays], axis=1)
        write(f"trak:{label}", "trak", trak_scores(features_q, features_t, spec.trak_lambda),
              time.perf_counter() - started, {"projection": projection, "trak_lambda": spec.trak_lambda})
    if not held("bm25"):
        started = time.perf_counter()
        write("bm25", "text", bm25_scores(query_text, doc_text), time.perf_counter() - started)
    if not held("dense"):
        started = time.perf_counter()
        write("dense", "text", dense_scores(query_text, doc_text), time.perf_counter() - started)
    log(f"baselines for queries {queries!r} in the lake: {written} "
        f"(computed {[m for m in written if m not in reused]}, found in the lake {reused})")
    return written


def best_tensor(store: LakeStore, spec: AttributionSpec, queries: str) -> str | None:
    """The single tensor with the best paraphrase top-1 (cosine) in the select-vs-project evaluation, if one ran."""
    from gradlake.tasks.evaluate import lake_keys

    model_key, checkpoint_key = lake_keys(spec.model)
    path = store.path(f"evaluations/{model_key}/{checkpoint_key}/{spec.train.dataset}/{spec.train.paradigm}/results.parquet")
    try:
        results = pd.read_parquet(io.BytesIO(store.fs.cat_file(path)))
    except FileNotFoundError:
        return None
    tensors = results[(results["kind"] == "tensor") & (results["similarity"] == "cosine")
                      & (results["query"] == queries)]
    return None if tensors.empty else str(tensors.sort_values("top1", ascending=False)["vectors"].iloc[0])


# ---------------------------------------------------------------- retraining plans

def lds_runs(spec: AttributionSpec, fingerprint: str, train_ids: list[str],
             saves: list[int], total: int) -> tuple[str, np.ndarray, list[TrainSpec]]:
    """(key, subset masks, one TrainSpec per subset) for the LDS retrainings.

    `saves` and `total` are the attributed run's checkpoint steps and length: each retraining
    saves its counterpart of every checkpoint, so one set serves them all.
    """
    key = ground_truth_key(fingerprint, "lds", fraction=spec.fraction, seed=spec.subset_seed, saves=saves)
    masks = draw_subsets(len(train_ids), spec.fraction, spec.n_subsets, spec.subset_seed)
    runs = [_retrain(spec, f"lds-{key}/subset-{m:03d}", len(train_ids), saves, total,
                     keep=[train_ids[i] for i in np.flatnonzero(mask)])
            for m, mask in enumerate(masks)]
    return key, masks, runs


def counterfactual_runs(spec: AttributionSpec, fingerprint: str, train_ids: list[str], saves: list[int], total: int,
                        scores: dict[str, np.ndarray]) -> tuple[str, dict[str, list[TrainSpec]], list[TrainSpec]]:
    """(key, per method one TrainSpec per query with its top-k removed, random-removal TrainSpecs)."""
    k = spec.counterfactual_k
    # The removals follow the scores of the attributed checkpoint, so each checkpoint has its own retrainings.
    key = ground_truth_key(fingerprint, "counterfactual", k=k, seed=spec.subset_seed,
                           checkpoint=spec.model.checkpoint, saves=saves)
    n = len(train_ids)
    per_method = {}
    for method, matrix in scores.items():
        top = top_k_removals(matrix[: spec.counterfactual_queries], k)
        per_method[method] = [_retrain(spec, f"cf-{key}/{layout.key(method)}/q{q:03d}", n, saves, total,
                                       drop=[train_ids[i] for i in row])
                              for q, row in enumerate(top)]
    draws = random_removals(n, k, spec.random_draws, spec.subset_seed)
    random_key = ground_truth_key(fingerprint, "random-removal", k=k, seed=spec.subset_seed, saves=saves)
    random = [_retrain(spec, f"cf-random-{random_key}/d{d:03d}", n, saves, total, drop=[train_ids[i] for i in row])
              for d, row in enumerate(draws)]
    return key, per_method, random


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


def _retrain(spec: AttributionSpec, name: str, n_train: int, saves: list[int], total: int,
             keep: list[str] | None = None, drop: list[str] | None = None) -> TrainSpec:
    run = spec.train.model_copy(update={"keep": keep, "drop": drop, "output": f"{spec.retrain_prefix.rstrip('/')}/{name}",
                                        "quality": None, "save_initial": False, "checkpoint_every": 0})
    run_total = run_steps(run, n_train)
    return run.model_copy(update={"save_steps": sorted({counterpart(s, total, run_total) for s in saves if s > 0})})


def retrained_model(run: TrainSpec, step: int, total: int, n_train: int) -> ModelSpec:
    """A retraining's checkpoint at the counterpart of the attributed step."""
    at = counterpart(step, total, run_steps(run, n_train))
    return ModelSpec(model=run.output, checkpoint=checkpoint_name(at), dtype=run.model.dtype, device=run.model.device)


# ---------------------------------------------------------------- query losses

def query_losses(model: ModelSpec, chats: list[list[dict]], paradigm: str, max_length: int, batch_size: int = 8) -> np.ndarray:
    """Each query's loss (the extraction's convention) under a model: shape (n_query,)."""
    from transformers import AutoModelForCausalLM

    from gradlake.tasks.loss import encode_sample, pad_batch, sample_losses
    from gradlake.tasks.model import DTYPES, capped_length, check_model, load_tokenizer

    config = check_model(model)  # a missing or incomplete checkpoint is one error naming it
    max_length = capped_length(max_length, config, model.model)[0]
    spec = model.resolved()
    tokenizer = load_tokenizer(spec)
    path, revision = spec.source()
    net = AutoModelForCausalLM.from_pretrained(path, revision=revision, dtype=DTYPES[spec.dtype]).to(spec.torch_device()).eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encoded = [encode_sample(tokenizer, c, paradigm, max_length) for c in chats]
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
    losses = query_losses(model, chats, spec.train.paradigm, spec.train.max_length)
    buffer = io.BytesIO()
    pd.DataFrame({"query": query_ids, "loss": losses, "model": model.model, "checkpoint": model.checkpoint}).to_parquet(buffer, index=False)
    store.fs.makedirs(store.path(f"{directory}/losses"), exist_ok=True)
    store.fs.pipe_file(path, buffer.getvalue())
    return losses


# ---------------------------------------------------------------- the table

def retrieval_top1(scores: np.ndarray, query_ids: list[str], train_keys: list[str], train_variant: str) -> float:
    """Fraction of queries whose top-scored training sample is the one they were made from (same id)."""
    position = {k: i for i, k in enumerate(train_keys)}
    truth = np.array([position.get(f"{train_variant}:{q}", -1) for q in query_ids])
    if (truth < 0).all():
        return float("nan")
    return float((scores.argmax(axis=1) == truth)[truth >= 0].mean())


def available_methods(store: LakeStore, spec: AttributionSpec) -> list[str]:
    prefix = method_path(spec, "x").rsplit("/", 1)[0] + "/"
    return sorted(g["method"] for g in list_score_groups(store) if g["path"].startswith(prefix) and g.get("complete"))


def benchmark_table(store: LakeStore, spec: AttributionSpec, methods: list[str], query_ids: list[str],
                    train_keys: list[str], masks: np.ndarray, lds_losses: np.ndarray,
                    cf: dict | None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(one row per method, LDS per query per method)."""
    rows, per_query = [], []
    for method in methods:
        group = ScoreGroup.open(store, method_path(spec, method))
        scores = _aligned(group, query_ids, train_keys, method)
        result = lds(scores, masks, lds_losses)
        meta = group.meta
        row = {"method": method, "kind": meta.get("kind"), "lds": result["lds"], "lds_ci_low": result["ci_low"],
               "lds_ci_high": result["ci_high"], "lds_queries": result["n_queries"],
               **retrieval_columns(store, spec, method, train_keys, query_ids, scores),
               "compute_seconds": meta.get("compute_seconds"), "lake_bytes": meta.get("lake_bytes")}
        if cf is not None:
            row["cf_loss_change"] = cf["method_change"].get(method, float("nan"))
            row["cf_random_change"] = cf["random_change"]
        rows.append(row)
        per_query += [{"method": method, "query": q, "lds": v} for q, v in zip(query_ids, result["per_query"])]
    rng = np.random.default_rng(spec.subset_seed)
    random = lds(rng.normal(size=(len(query_ids), len(train_keys))), masks, lds_losses)
    rows.append({"method": "random", "kind": "reference", "lds": random["lds"], "lds_ci_low": random["ci_low"],
                 "lds_ci_high": random["ci_high"], "lds_queries": random["n_queries"]})
    table = pd.DataFrame(rows)
    table["lake_bytes"] = table["lake_bytes"].astype("Int64")
    return table, pd.DataFrame(per_query)


def retrieval_columns(store: LakeStore, spec: AttributionSpec, method: str, train_keys: list[str],
                      query_ids: list[str], scores: np.ndarray) -> dict:
    """top1_<queries> for the benchmark's queries (their scores already read: `query_ids`, `scores`) and each
    retrieval query variant the method has scores for."""
    columns = {f"top1_{spec.queries}": retrieval_top1(scores, query_ids, train_keys, spec.train.variants[0])}
    for queries in dict.fromkeys(spec.retrieval_queries):
        if queries == spec.queries:
            continue
        group = ScoreGroup.open(store, method_path(spec, method, queries), missing_ok=True)
        if group is None or not group.meta.get("complete"):
            columns[f"top1_{queries}"] = float("nan")
            continue
        ids = group.query_ids()[: spec.max_queries]  # the same first queries for every method
        columns[f"top1_{queries}"] = retrieval_top1(_aligned(group, ids, train_keys, method), ids, train_keys,
                                                    spec.train.variants[0])
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

