"""The ground truth: the retrainings an attribution benchmark needs (LDS subsets, counterfactual removals) and the query losses of each retrained model."""

from __future__ import annotations

import hashlib
import io
import json
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from gradlake.lake import layout
from gradlake.lake.manifest import entry, read_manifest, write_manifest
from gradlake.lake.results import read_checked_file, read_parquet_bytes
from gradlake.lake.store import LakeError, LakeStore
from gradlake.tasks.attribution.lds import crossed_interval, draw_subsets, random_removals, top_k_removals
from gradlake.tasks.attribution.queries import QuerySet
from gradlake.tasks.attribution.spec import AttributionError, AttributionSpec
from gradlake.tasks.common.model import ModelSpec
from gradlake.tasks.training.plan import total_steps
from gradlake.tasks.training.spec import TrainSpec, checkpoint_name


def ground_truth_key(fingerprint: str, kind: str, **extra) -> str:
    what = {"run": fingerprint, "kind": kind, **extra}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:12]


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


def at_attributed_step(spec: AttributionSpec, plan: dict, run: TrainSpec) -> ModelSpec:
    """A retraining of the benchmark's run (`plan`: the benchmark's plan) at the counterpart of the attributed step."""
    return retrained_model(run, spec.step, plan["total_steps"], len(plan["train_ids"]))


def retrained_model(run: TrainSpec, step: int, total: int, n_train: int) -> ModelSpec:
    """A retraining's checkpoint at the counterpart of the attributed step."""
    at = counterpart(step, total, run_steps(run, n_train))
    return ModelSpec(model=run.output, checkpoint=checkpoint_name(at), dtype=run.model.dtype, device=run.model.device)


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
    """A retrained model's query losses, computed once and kept in the lake (losses/<name>.parquet).

    Each file's digest goes into ``losses/manifest.json`` (lake.manifest) as it is written, so `gradlake verify`
    checks it.  A kept file that is damaged (not what its manifest recorded, or not Parquet) is a cache gone bad:
    it is computed again from its model, with a warning naming it, rather than failing the benchmark."""
    losses_dir, file = layout.ground_truth_losses_file(directory, name).rsplit("/", 1)
    try:
        raw = read_checked_file(store, losses_dir, file)
        frame = None if raw is None else read_parquet_bytes(store, f"{losses_dir}/{file}", raw)
        if frame is not None and list(frame["query"]) == list(query_ids):
            return frame["loss"].to_numpy()
    except (LakeError, KeyError) as err:  # KeyError: a Parquet file without the columns written here
        print(f"warning: {err if isinstance(err, LakeError) else f'{losses_dir}/{file} has no column {err}'}; "
              f"computing {model.model}@{model.checkpoint}'s query losses again")
    losses = query_losses(model, chats, spec.train.paradigm, spec.train.max_length, chat_template=spec.train.chat_template)
    buffer = io.BytesIO()
    pd.DataFrame({"query": query_ids, "loss": losses, "model": model.model, "checkpoint": model.checkpoint}).to_parquet(buffer, index=False)
    keep_losses(store, losses_dir, file, buffer.getvalue())
    return losses


def keep_losses(store: LakeStore, losses_dir: str, file: str, data: bytes) -> None:
    """Write one losses file and add its digest to the directory's manifest (a damaged manifest is started afresh)."""
    fs, where = store.fs, store.path(losses_dir)
    with store.explained_errors():
        try:
            files = read_manifest(fs, where) or {}
        except LakeError:
            files = {}
        fs.makedirs(where, exist_ok=True)
        fs.pipe_file(f"{where}/{file}", data)
        write_manifest(fs, where, {**files, file: entry(data)})


@dataclass
class CounterfactualPlan:
    """Counterfactual removal: per method one retraining per query (its top-k removed), and k random removals."""

    key: str
    per_method: dict[str, list[TrainSpec]]
    random: list[TrainSpec]
    draws: np.ndarray
    scores: dict[str, np.ndarray]  # (queries, training samples) per method
    n_queries: int
    k: int


def lds_losses(store: LakeStore, spec: AttributionSpec, plan: dict, lds_dir: str, masks: np.ndarray,
               subset_runs: list[list[TrainSpec]]) -> np.ndarray:
    """(subsets, queries) query losses of the retrained models, averaged over seeds; the subsets recorded beside them."""
    queries = plan["queries"]

    losses = np.stack([
        np.mean([stored_losses(store, lds_dir, subset_name(m, r), at_attributed_step(spec, plan, run), queries.ids, queries.chats, spec)
                 for r, run in enumerate(seeds)], axis=0)
        for m, seeds in enumerate(subset_runs)])
    record = json.dumps({"fraction": spec.fraction, "seed": spec.subset_seed, "train_ids": plan["train_ids"],
                         "subsets": [[int(i) for i in np.flatnonzero(m)] for m in masks],
                         "retrain_seeds": spec.retrain_seeds,
                         "outputs": [[r.output for r in seeds] for seeds in subset_runs]}).encode()
    path = store.path(layout.lds_subsets_file(lds_dir))
    if not store.fs.exists(path) or store.fs.cat_file(path) != record:
        store.fs.pipe_file(path, record)
    return losses


def counterfactual_results(store: LakeStore, spec: AttributionSpec, queries: QuerySet, cf: CounterfactualPlan,
                           cf_dir: str, plan: dict) -> dict:
    """Per method: the mean loss rise of its top-k removal over the attributed model, with its interval, against the
    random removals (paired by query), and how often the top-k held the query's source."""
    n, k = cf.n_queries, cf.k
    ids, chats = queries.ids[:n], queries.chats[:n]

    full = stored_losses(store, cf_dir, "full", spec.model, ids, chats, spec)
    random = np.stack([stored_losses(store, cf_dir, f"random-d{d:03d}", at_attributed_step(spec, plan, run), ids, chats, spec) - full
                       for d, run in enumerate(cf.random)])              # (draws, queries)
    random_per_query = random.mean(axis=0)
    # The draws are shared by every query, as the subsets are in the LDS: resample them for the common part.
    resampled = np.random.default_rng([spec.subset_seed, 7]).integers(0, len(random), size=(spec.n_bootstrap, len(random)))
    random_boot = random[resampled].mean(axis=1)                         # (B, queries)
    no_boot = np.zeros((0, n))
    columns = {"random": {"cf_loss_change": float(random.mean()), "cf_queries": n,
                          **dict(zip(("cf_ci_low", "cf_ci_high"), crossed_interval(random_per_query, random_boot)))}}
    for method, runs in cf.per_method.items():
        change = np.array([stored_losses(store, cf_dir, f"{run.output.rsplit('/', 2)[-2]}-q{q:03d}", at_attributed_step(spec, plan, run),
                                         ids[q:q + 1], chats[q:q + 1], spec)[0] - full[q]
                           for q, run in enumerate(runs)])
        top = np.argsort(-cf.scores[method], axis=1, kind="stable")[:, :k]
        with_source = [q for q in range(n) if queries.sources[q] is not None]
        columns[method] = {
            "cf_loss_change": float(change.mean()), "cf_queries": n,  # every query: a NaN change makes the mean NaN
            "cf_source_queries": len(with_source),  # the queries cf_source_removed rests on
            **dict(zip(("cf_ci_low", "cf_ci_high"), crossed_interval(change, no_boot))),
            "cf_vs_random": float((change - random_per_query).mean()),
            **dict(zip(("cf_vs_random_low", "cf_vs_random_high"),
                       crossed_interval(change - random_per_query, change - random_boot))),
            "cf_source_removed": (float(np.mean([queries.sources[q] in top[q] for q in with_source]))
                                  if with_source else float("nan"))}
    return {"columns": columns, "k": k, "queries": n, "draws": len(cf.random)}
