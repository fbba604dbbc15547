"""The benchmark table: every method under LDS, counterfactual removal and retrieval, written into the lake."""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass

import numpy as np
import pandas as pd
from prefect import task
from prefect.cache_policies import NONE

from gradlake.lake import layout
from gradlake.lake.results import read_result_table, write_result
from gradlake.lake.scores import ScoreGroup, list_score_groups
from gradlake.lake.store import LakeStore
from gradlake.tasks.attribution.lds import (check_subsets, compare, crossed_interval, dropped_text, lds, lds_beyond_source,
                                            query_drops, source_oracle)
from gradlake.tasks.attribution.queries import QuerySet, resolve_queries
from gradlake.tasks.attribution.report import attribution_files
from gradlake.tasks.attribution.retraining import (CounterfactualPlan, check_counterfactual, counterfactual_results,
                                                   counterfactual_runs, lds_losses, lds_runs)
from gradlake.tasks.attribution.spec import (BEST_TENSOR, AttributionError, AttributionSpec, benchmark_dir, checkpoint_step,
                                             ground_truth_dir, method_path, query_variant)
from gradlake.tasks.training.plan import check_output_writable, plan_run
from gradlake.tasks.training.spec import TrainSpec, checkpoint_name


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
            "lds_ci_high": result["ci_high"], "lds_queries": result["n_queries"],
            "lds_dropped": dropped_text(result["dropped"])}


def benchmark_table(store: LakeStore, spec: AttributionSpec, methods: list[str], queries: QuerySet,
                    train_keys: list[str], masks: np.ndarray, lds_losses: np.ndarray,
                    cf: dict | None, log=print) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """(one row per method with the references, LDS per query per method, what the table rests on).

    Every metric says how many queries it used (``lds_queries``, ``beyond_queries``, ``top1_<queries>_queries``) and
    why it left the others out (``..._dropped``); each left-out query is logged."""
    rows, per_query, results, notes = [], [], {}, {}
    fit = lambda scores: lds(scores, masks, lds_losses, n_boot=spec.n_bootstrap, seed=spec.subset_seed)  # noqa: E731

    def beyond(scores: np.ndarray) -> dict:
        values, boot = lds_beyond_source(scores, masks, lds_losses, queries.sources, spec.n_bootstrap, spec.subset_seed)
        low, high = crossed_interval(values, boot)
        used = int(np.isfinite(values).sum())
        return {"lds_beyond_source": float(np.nanmean(values)) if used else float("nan"), "beyond_ci_low": low,
                "beyond_ci_high": high, "beyond_queries": used, "beyond_dropped": dropped_text(query_drops(
                    scores, values, otherwise="fewer than 3 subsets with and without its source, or constant within"))}

    for method in methods:
        group = ScoreGroup.open(store, method_path(spec, method))
        scores = aligned_scores(group, queries.ids, train_keys, method)
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
        tensor_scores = {m: aligned_scores(ScoreGroup.open(store, method_path(spec, m)), queries.ids, train_keys, m)
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
            row.update(top1_columns(queries.label, *retrieval_top1(scores, queries, train_keys)))
        rows.append(row)
    if cf is not None:
        for row in rows:
            row.update(cf["columns"].get(row["method"], {}))
    for name, result in results.items():
        per_query += [{"method": name, "query": q, "lds": v} for q, v in zip(queries.ids, result["per_query"])]
    left_out: dict[tuple[str, str], list[str]] = {}  # (metric, why) -> methods: one line each, not one per method
    for row in rows:
        for name in row:
            if name.endswith("_dropped") and row[name]:
                left_out.setdefault((name.removesuffix("_dropped"), row[name]), []).append(row["method"])
    for (metric, why), methods in left_out.items():
        log(f"queries left out of {metric} for {', '.join(methods)}: {why}")
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


def retrieval_top1(scores: np.ndarray, queries: QuerySet, train_keys: list[str]) -> tuple[float, int, dict[str, int]]:
    """(fraction of the queries used whose top-scored training sample is their source, queries used, {why left out:
    how many}): a query is used where it has a source training sample and finite scores (NaN when none is).

    A tie at the top counts as a random pick among the tied samples (1/ties where the source is one of them), so a
    row of equal scores (BM25 with no word in common) is worth chance, not whichever sample comes first."""
    truth = np.array([-1 if s is None else s for s in queries.sources])
    finite = np.isfinite(scores).all(axis=1)
    used = (truth >= 0) & finite
    dropped = {why: int(n) for why, n in (("no source among the training samples", (truth < 0).sum()),
                                          ("non-finite scores", ((truth >= 0) & ~finite).sum())) if n}
    if not used.any():
        return float("nan"), 0, dropped
    rows, source = scores[used], truth[used]
    top = rows == rows.max(axis=1, keepdims=True)
    credit = top[np.arange(len(rows)), source] / top.sum(axis=1)
    return float(credit.mean()), int(used.sum()), dropped


def top1_columns(label: str, value: float, used: int, dropped: dict[str, int] | str) -> dict:
    """top1_<label> with how many queries it used and why the others were left out."""
    said = dropped if isinstance(dropped, str) else dropped_text(dropped)
    return {f"top1_{label}": value, f"top1_{label}_queries": used, f"top1_{label}_dropped": said}


def retrieval_columns(store: LakeStore, spec: AttributionSpec, method: str | None, train_keys: list[str],
                      queries: QuerySet, scores: np.ndarray) -> dict:
    """top1_<queries> for the benchmark's queries when they have sources, and for each retrieval variant the method has
    scores for (the training dataset's variants; a query counts where its source is a training sample)."""
    columns = {}
    if queries.has_sources:
        columns.update(top1_columns(queries.label, *retrieval_top1(scores, queries, train_keys)))
    if method is None:
        return columns
    train_ids = [k.split(":", 1)[1] for k in train_keys]
    position = {i: k for k, i in enumerate(train_ids)}
    for label in dict.fromkeys(spec.retrieval_queries):
        if label == spec.queries and spec.query_set_dataset == spec.train.dataset:
            continue
        group = ScoreGroup.open(store, method_path(spec, method, label), missing_ok=True)
        if group is None or not group.meta.get("complete"):
            columns.update(top1_columns(label, float("nan"), 0, "every query: no complete scores of the method for them"))
            continue
        ids = [q for q in group.query_ids() if q in position][: spec.max_queries]  # the same queries for every method
        if not ids:
            columns.update(top1_columns(label, float("nan"), 0, "every query: none has a source among the training samples"))
            continue
        other = QuerySet(label, spec.train.dataset, query_variant(spec, label), ids, [], [position[q] for q in ids])
        columns.update(top1_columns(label, *retrieval_top1(aligned_scores(group, ids, train_keys, method), other,
                                                           train_keys)))
    return columns


def aligned_scores(group: ScoreGroup, query_ids: list[str], train_keys: list[str], method: str) -> np.ndarray:
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
    """The tables, plots and HTML report, then meta.json last (its presence means the rest is complete)."""
    meta = json.loads(json.dumps({**meta, "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")},
                                 default=str))
    plots, texts = attribution_files(table, meta)
    write_result(store, directory, tables={"benchmark": table, "lds_per_query": per_query}, plots=plots, texts=texts,
                 meta=meta)


def read_benchmark(store: LakeStore, directory: str) -> pd.DataFrame:
    """The benchmark table of a complete benchmark."""
    return read_result_table(store, directory, "benchmark", what="attribution benchmark")


def plan_benchmark(spec: AttributionSpec) -> dict:
    """Every check before any retraining or writing; returns the training ids, the queries and the run's fingerprint."""
    plan = plan_run(spec.train)
    if spec.step == 0:  # the base model: retraining it on subsets changes nothing, and its scores attribute nothing
        raise AttributionError(f"{spec.model.checkpoint} of the run at {spec.train.output} is its base model, before any "
                               f"training step: there is no training to attribute; train the run first (gradlake train "
                               f"with its spec) and attribute a later checkpoint (it saves "
                               f"{[checkpoint_name(s) for s in plan.saves if s]})")
    if spec.step not in plan.saves:
        raise AttributionError(f"the training run saves no {spec.model.checkpoint} (its checkpoints: "
                               f"{[checkpoint_name(s) for s in plan.saves]}); choose one of those")
    if spec.step not in plan.done:
        raise AttributionError(f"the training run has no {spec.model.checkpoint} at {spec.train.output} yet "
                               f"(found {[checkpoint_name(s) for s in plan.done]}); run train-model with this spec first")
    train_ids = plan.data.ids
    check_subsets(len(train_ids), spec.fraction, spec.n_subsets)
    check_counterfactual(spec, len(train_ids))
    queries = resolve_queries(spec, train_ids)
    query_folds(len(queries.ids), spec.best_tensor_folds, spec.subset_seed)
    check_scores(LakeStore(spec.train.lake), spec)
    trak = [s for s in plan.saves if 0 < s <= spec.step]
    if spec.trak_checkpoints is not None:
        trak = [checkpoint_step(c) for c in spec.trak_checkpoints]
        unknown = [c for c, s in zip(spec.trak_checkpoints, trak) if s not in plan.done]
        if unknown:
            raise AttributionError(f"trak_checkpoints {unknown} are not checkpoints of the run at {spec.train.output} "
                                   f"(it has {[checkpoint_name(s) for s in plan.done]})")
    if not spec.baselines:  # no score is written before the comparison: its methods are checked here, with the rest
        methods = compared_methods(LakeStore(spec.train.lake), spec)
        if check_counterfactual(spec, len(train_ids)):
            counterfactual_methods(spec, methods)
    check_output_writable(spec.train.model_copy(update={"output": spec.retrain_prefix}))
    return {"train_ids": train_ids, "train_keys": plan.data.keys, "fingerprint": plan.fingerprint,
            "saves": plan.saves, "total_steps": plan.total_steps, "queries": queries,
            "trak_steps": sorted(set(trak) | {spec.step})}


@task(name="plan-attribution", cache_policy=NONE)
def plan_attribution(spec: AttributionSpec) -> dict:
    """`plan_benchmark` as a Prefect task."""
    return plan_benchmark(spec)


def check_scores(store: LakeStore, spec: AttributionSpec) -> None:
    """Read every complete score group the benchmark will read (a block of rows at a time): a damaged or missing
    chunk is one LakeError naming the group, array and chunk, before anything is retrained or written."""
    methods = [*(spec.methods or available_methods(store, spec)), *tensor_methods(store, spec)]
    paths = [method_path(spec, m, label) for m in dict.fromkeys(methods)
             for label in dict.fromkeys([None, *spec.retrieval_queries])]
    for path in dict.fromkeys(paths):
        group = ScoreGroup.open(store, path, missing_ok=True)
        if group is not None and group.meta.get("complete"):
            group.check()


def compared_methods(store: LakeStore, spec: AttributionSpec) -> list[str]:
    """The methods the benchmark compares (asked, or every complete score group), each checked to be in the lake."""
    methods = spec.methods or available_methods(store, spec)
    missing = [m for m in methods if ScoreGroup.open(store, method_path(spec, m), missing_ok=True) is None]
    if missing or not methods:
        raise AttributionError(f"no scores in the lake for methods {missing or methods}; found {available_methods(store, spec)}")
    return methods


def counterfactual_methods(spec: AttributionSpec, methods: list[str]) -> list[str]:
    """The methods whose top-k are removed, each checked to be among the compared `methods`."""
    chosen = [m for m in spec.counterfactual_methods if m in methods]
    if len(chosen) < len(spec.counterfactual_methods):
        raise AttributionError(f"counterfactual_methods {sorted(set(spec.counterfactual_methods) - set(chosen))} "
                               f"have no scores among the compared methods {methods}; compute them first or "
                               "name compared ones")
    return chosen


@dataclass
class GroundTruth:
    """The retrainings a benchmark needs: LDS subsets (per subset one run per seed) and counterfactual removals."""

    lds_key: str
    masks: np.ndarray
    subset_runs: list[list[TrainSpec]]
    counterfactual: CounterfactualPlan | None

    @property
    def runs(self) -> list[TrainSpec]:
        runs = [r for seeds in self.subset_runs for r in seeds]
        if self.counterfactual is not None:
            runs += [r for rs in self.counterfactual.per_method.values() for r in rs] + self.counterfactual.random
        return runs


def ground_truth(store: LakeStore, spec: AttributionSpec, plan: dict, methods: list[str]) -> GroundTruth:
    """Plan every retraining (nothing is trained here): the LDS subsets, and the removals the methods' scores pick."""
    shape = plan["saves"], plan["total_steps"]
    lds_key, masks, subset_runs = lds_runs(spec, plan["fingerprint"], plan["train_ids"], *shape)
    k = check_counterfactual(spec, len(plan["train_ids"]))
    cf = None
    if k:
        chosen = counterfactual_methods(spec, methods)
        queries: QuerySet = plan["queries"]
        n_cf = min(spec.counterfactual_queries or len(queries.ids), len(queries.ids))
        scores = {m: aligned_scores(ScoreGroup.open(store, method_path(spec, m)), queries.ids[:n_cf], plan["train_keys"], m)
                  for m in chosen}
        key, per_method, random, draws = counterfactual_runs(spec, plan["fingerprint"], plan["train_ids"], *shape, scores)
        cf = CounterfactualPlan(key, per_method, random, draws, scores, n_cf, k)
    return GroundTruth(lds_key, masks, subset_runs, cf)


def finish_benchmark(store: LakeStore, spec: AttributionSpec, plan: dict, methods: list[str],
                     truth: GroundTruth, log=print) -> tuple[str, pd.DataFrame]:
    """With every retraining done: the query losses, the table and its report; returns (directory, table)."""
    queries: QuerySet = plan["queries"]
    n_train = len(plan["train_ids"])
    truth_dir = ground_truth_dir(spec)
    losses = lds_losses(store, spec, plan, layout.lds_dir(truth_dir, truth.lds_key), truth.masks, truth.subset_runs)
    cf = None
    if truth.counterfactual is not None:
        cf = counterfactual_results(store, spec, queries, truth.counterfactual,
                                    layout.counterfactual_dir(truth_dir, truth.counterfactual.key), plan)
    table, per_query, notes = benchmark_table(store, spec, methods, queries, plan["train_keys"], truth.masks, losses, cf,
                                              log=log)
    directory = benchmark_dir(spec)
    cf_plan = truth.counterfactual
    write_benchmark(store, directory, table, per_query, {
        "model": spec.model.model_dump(mode="json"), "train_fingerprint": plan["fingerprint"],
        "queries": spec.queries, "query_dataset": queries.dataset, "query_variant": queries.variant,
        "query_ids": queries.ids, "queries_with_source": sum(s is not None for s in queries.sources),
        "n_queries": len(queries.ids), "n_train": n_train, "n_subsets": spec.n_subsets,
        "retrain_seeds": spec.retrain_seeds, "fraction": spec.fraction, "subset_seed": spec.subset_seed,
        "n_bootstrap": spec.n_bootstrap,
        "interval": "95%, crossed design: between-query variance plus the subsets' common part (subset bootstrap), t",
        "counterfactual_k": cf_plan.k if cf_plan else 0, "random_draws": spec.random_draws if cf_plan else 0,
        "trak_lambda": spec.trak_lambda, "ground_truth": truth_dir, **notes})
    return directory, table
