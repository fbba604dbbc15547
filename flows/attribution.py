"""The attribution benchmark flow: baselines, retraining for the ground truth (LDS, counterfactual), one table.

``evaluate-attribution`` checks everything first (the training run and its final
checkpoint, the queries, the subsets, the retraining prefix, the methods), scores the
baselines, sends every retraining to the ``train-model`` deployment on the gpu pool (all
at once, waited on together, cancelled if it gives up; a finished retraining is found
and skipped by its own run) or runs them in-process, stores each retrained model's query
losses in the lake, and writes the benchmark: Parquet, plots, an HTML report and a table
artifact on the run.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
from prefect import flow, get_run_logger, runtime, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NONE

from gradlake.flows.run_names import named_by_model, run_label
from gradlake.lake.scores import ScoreGroup
from gradlake.lake.store import LakeError, LakeStore
from gradlake.tasks.attribution.benchmark import (AttributionError, AttributionSpec, _aligned, available_methods,
    benchmark_dir, benchmark_table, check_counterfactual, counterfactual_runs, lds_runs, method_path, query_folds,
    resolve_queries, retrained_model, stored_losses, subset_name, write_benchmark)
from gradlake.tasks.attribution.baselines import BaselineContext, QuerySet, baseline_scores
from gradlake.tasks.attribution.lds import check_subsets, crossed_interval
from gradlake.tasks.common.model import ModelSpec
from gradlake.tasks.common.retries import retry_unless_bad_input
from gradlake.tasks.training.train import TrainSpec, check_output_writable, checkpoint_name, plan_run, train


@task(name="plan-attribution", cache_policy=NONE)
def plan_attribution(spec: AttributionSpec) -> dict:
    """Every check before any retraining or writing; returns the training ids, the queries and the run's fingerprint."""
    plan = plan_run(spec.train)
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
    trak = [s for s in plan.saves if 0 < s <= spec.step] if spec.trak_checkpoints is None else None
    if spec.trak_checkpoints is not None:
        from gradlake.tasks.attribution.benchmark import checkpoint_step

        trak = [checkpoint_step(c) for c in spec.trak_checkpoints]
        unknown = [c for c, s in zip(spec.trak_checkpoints, trak) if s not in plan.done]
        if unknown:
            raise AttributionError(f"trak_checkpoints {unknown} are not checkpoints of the run at {spec.train.output} "
                                   f"(it has {[checkpoint_name(s) for s in plan.done]})")
    check_output_writable(spec.train.model_copy(update={"output": spec.retrain_prefix}))
    return {"train_ids": train_ids, "train_keys": plan.data.keys, "fingerprint": plan.fingerprint,
            "saves": plan.saves, "total_steps": plan.total_steps, "queries": queries,
            "trak_steps": sorted(set(trak) | {spec.step})}


def baseline_context(spec: AttributionSpec, plan: dict) -> BaselineContext:
    ensemble = [ModelSpec(model=spec.train.output, checkpoint=checkpoint_name(s), dtype=spec.train.model.dtype,
                          device=spec.train.model.device) for s in plan["trak_steps"]]
    return BaselineContext(store=LakeStore(spec.train.lake), model=spec.model, ensemble=ensemble,
                           train_dataset=spec.train.dataset, train_variant=spec.train.variants[0],
                           train_ids=plan["train_ids"], paradigm=spec.train.paradigm, trak_lambda=spec.trak_lambda,
                           path_of=lambda method: method_path(spec, method))


@task(name="baselines", cache_policy=NONE, retries=1, retry_delay_seconds=[30], retry_condition_fn=retry_unless_bad_input)
def baselines_task(spec: AttributionSpec, plan: dict) -> list[str]:
    """The baselines for the benchmark's queries, and for each retrieval variant whose data the lake holds."""
    log = get_run_logger()
    context = baseline_context(spec, plan)
    written = baseline_scores(context, plan["queries"], log=log.info)
    for label in spec.retrieval_queries:
        if label == spec.queries:
            continue
        try:
            queries = resolve_queries(spec, plan["train_ids"], label)
        except (LakeError, FileNotFoundError, ValueError) as err:
            log.info("no retrieval baselines for queries %r: %s", label, err)
            continue
        # retrieval is about the queries made from training samples
        keep = [k for k, s in enumerate(queries.sources) if s is not None][: spec.max_queries]
        queries = QuerySet(label, queries.dataset, queries.variant, [queries.ids[k] for k in keep],
                           [queries.chats[k] for k in keep], [queries.sources[k] for k in keep])
        if len(queries.ids) < 1:
            continue
        baseline_scores(BaselineContext(**{**context.__dict__, "path_of": lambda m, q=label: method_path(spec, m, q)}),
                        queries, log=log.info)
    return written


@task(name="retrain", cache_policy=NONE, retries=2, retry_delay_seconds=[10, 60], retry_condition_fn=retry_unless_bad_input)
def retrain_task(run: TrainSpec) -> None:
    train(plan_run(run), log=get_run_logger().info)


def run_retrainings(spec: AttributionSpec, runs: list[TrainSpec], label: str) -> None:
    """Every retraining finished: on the gpu pool through the train-model deployment, or here one after another."""
    log = get_run_logger()
    todo = []
    for run in runs:
        plan = plan_run(run)
        if not all(s in plan.done for s in plan.saves):
            todo.append(run)
    log.info("%s: %d retrainings, %d already finished", label, len(runs), len(runs) - len(todo))
    if not todo:
        return
    if spec.train_deployment is None:
        for run in todo:
            retrain_task(run)
        return
    from gradlake.flows.pipeline import run_each_on_pool

    runs = [(run_label(spec.model, f"{label} {run.output.rsplit('/', 1)[-1]}"), {"spec": run.model_dump(mode="json")},
             f"{runtime.flow_run.id}:{run.output}") for run in todo]
    run_each_on_pool(spec.train_deployment, runs, spec.run_timeout_s, spec.worker_wait_s, what="training",
                     rerun="rerun the attribution evaluation to redo only those retrainings")


@flow(name="evaluate-attribution", log_prints=True,
      flow_run_name=named_by_model(AttributionSpec, lambda s: f"attribution {s.train.dataset} <- {s.queries}",
                                   "evaluate-attribution"))
def evaluate_attribution(spec: AttributionSpec) -> str:
    """LDS, counterfactual removal and retrieval for every method; returns the benchmark's directory in the lake."""
    from gradlake.tasks.common.lineage import lake_keys

    log = get_run_logger()
    plan = plan_attribution(spec)
    queries: QuerySet = plan["queries"]
    store = LakeStore(spec.train.lake)
    if spec.baselines:
        baselines_task(spec, plan)
    methods = spec.methods or available_methods(store, spec)
    missing = [m for m in methods if ScoreGroup.open(store, method_path(spec, m), missing_ok=True) is None]
    if missing or not methods:
        raise AttributionError(f"no scores in the lake for methods {missing or methods}; found {available_methods(store, spec)}")
    model_key, checkpoint_key = lake_keys(spec.model)
    shape = plan["saves"], plan["total_steps"]
    lds_key, masks, subset_runs = lds_runs(spec, plan["fingerprint"], plan["train_ids"], *shape)
    runs = [r for seeds in subset_runs for r in seeds]
    cf_plan = None
    k = check_counterfactual(spec, len(plan["train_ids"]))
    if k:
        chosen = [m for m in spec.counterfactual_methods if m in methods]
        if len(chosen) < len(spec.counterfactual_methods):
            raise AttributionError(f"counterfactual_methods {sorted(set(spec.counterfactual_methods) - set(chosen))} "
                                   f"have no scores among the compared methods {methods}; compute them first or "
                                   "name compared ones")
        n_cf = min(spec.counterfactual_queries or len(queries.ids), len(queries.ids))
        scores = {m: _aligned(ScoreGroup.open(store, method_path(spec, m)), queries.ids[:n_cf], plan["train_keys"], m)
                  for m in chosen}
        cf_plan = (*counterfactual_runs(spec, plan["fingerprint"], plan["train_ids"], *shape, scores), scores, n_cf, k)
        runs += [r for rs in cf_plan[1].values() for r in rs] + cf_plan[2]
    run_retrainings(spec, runs, "ground truth")
    n_train = len(plan["train_ids"])

    def retrained(run: TrainSpec):
        return retrained_model(run, spec.step, plan["total_steps"], n_train)

    label = benchmark_dir(spec).rsplit("/", 1)[-1]
    truth_dir = f"groundtruth/{model_key}/{checkpoint_key}/{spec.train.dataset}/{label}"
    lds_dir = f"{truth_dir}/lds-{lds_key}"
    ids, chats = queries.ids, queries.chats
    lds_losses = np.stack([
        np.mean([stored_losses(store, lds_dir, subset_name(m, r), retrained(run), ids, chats, spec)
                 for r, run in enumerate(seeds)], axis=0)
        for m, seeds in enumerate(subset_runs)])
    subsets = json.dumps({"fraction": spec.fraction, "seed": spec.subset_seed, "train_ids": plan["train_ids"],
                          "subsets": [[int(i) for i in np.flatnonzero(m)] for m in masks],
                          "retrain_seeds": spec.retrain_seeds,
                          "outputs": [[r.output for r in seeds] for seeds in subset_runs]}).encode()
    record = store.path(f"{lds_dir}/subsets.json")
    if not store.fs.exists(record) or store.fs.cat_file(record) != subsets:
        store.fs.pipe_file(record, subsets)
    cf = None
    if cf_plan is not None:
        cf = counterfactual_results(store, spec, queries, cf_plan, f"{truth_dir}/cf-{cf_plan[0]}", retrained)
    table, per_query, notes = benchmark_table(store, spec, methods, queries, plan["train_keys"], masks, lds_losses, cf)
    directory = benchmark_dir(spec)
    write_benchmark(store, directory, table, per_query, {
        "model": spec.model.model_dump(mode="json"), "train_fingerprint": plan["fingerprint"],
        "queries": spec.queries, "query_dataset": queries.dataset, "query_variant": queries.variant,
        "query_ids": queries.ids, "queries_with_source": sum(s is not None for s in queries.sources),
        "n_queries": len(ids), "n_train": n_train, "n_subsets": spec.n_subsets, "retrain_seeds": spec.retrain_seeds,
        "fraction": spec.fraction, "subset_seed": spec.subset_seed, "n_bootstrap": spec.n_bootstrap,
        "interval": "95%, crossed design: between-query variance plus the subsets' common part (subset bootstrap), t",
        "counterfactual_k": cf_plan[-1] if cf_plan else 0, "random_draws": spec.random_draws if cf_plan else 0,
        "trak_lambda": spec.trak_lambda, "ground_truth": truth_dir, **notes})
    from gradlake.tasks.evaluate.report import attribution_report

    attribution_report(store, directory)
    shown = table.round(4).astype(object).where(table.notna(), None)
    create_table_artifact(shown.to_dict(orient="records"),
                          key="attribution-" + hashlib.sha256(directory.encode()).hexdigest()[:16],
                          description=f"attribution benchmark of {spec.model.model}@{spec.model.checkpoint} on "
                                      f"{spec.train.dataset} <- {spec.queries}: LDS over {spec.n_subsets} subsets x "
                                      f"{spec.retrain_seeds} seeds (fraction {spec.fraction}), {len(ids)} queries")
    best = table[table["kind"] != "reference"].iloc[0]
    log.info("attribution benchmark at %s/%s; best LDS %s %.3f [%.3f, %.3f]", spec.train.lake, directory,
             best["method"], best["lds"], best["lds_ci_low"], best["lds_ci_high"])
    return directory


def counterfactual_results(store: LakeStore, spec: AttributionSpec, queries: QuerySet, cf_plan: tuple, cf_dir: str,
                           retrained) -> dict:
    """Per method: the mean loss rise of its top-k removal over the attributed model, with its interval, against the
    random removals (paired by query), and how often the top-k held the query's source."""
    _, per_method, random_runs, _, scores, n, k = cf_plan
    ids, chats = queries.ids[:n], queries.chats[:n]
    full = stored_losses(store, cf_dir, "full", spec.model, ids, chats, spec)
    random = np.stack([stored_losses(store, cf_dir, f"random-d{d:03d}", retrained(run), ids, chats, spec) - full
                       for d, run in enumerate(random_runs)])              # (draws, queries)
    random_per_query = random.mean(axis=0)
    # The draws are shared by every query, as the subsets are in the LDS: resample them for the common part.
    resampled = np.random.default_rng([spec.subset_seed, 7]).integers(0, len(random), size=(spec.n_bootstrap, len(random)))
    random_boot = random[resampled].mean(axis=1)                           # (B, queries)
    no_boot = np.zeros((0, n))
    columns = {"random": {"cf_loss_change": float(random.mean()),
                          **dict(zip(("cf_ci_low", "cf_ci_high"), crossed_interval(random_per_query, random_boot)))}}
    for method, runs in per_method.items():
        change = np.array([stored_losses(store, cf_dir, f"{run.output.rsplit('/', 2)[-2]}-q{q:03d}", retrained(run),
                                         ids[q:q + 1], chats[q:q + 1], spec)[0] - full[q]
                           for q, run in enumerate(runs)])
        top = np.argsort(-scores[method], axis=1, kind="stable")[:, :k]
        with_source = [q for q in range(n) if queries.sources[q] is not None]
        columns[method] = {
            "cf_loss_change": float(change.mean()),
            **dict(zip(("cf_ci_low", "cf_ci_high"), crossed_interval(change, no_boot))),
            "cf_vs_random": float((change - random_per_query).mean()),
            **dict(zip(("cf_vs_random_low", "cf_vs_random_high"), crossed_interval(change - random_per_query, change - random_boot))),
            "cf_source_removed": (float(np.mean([queries.sources[q] in top[q] for q in with_source]))
                                  if with_source else float("nan"))}
    return {"columns": columns, "k": k, "queries": n, "draws": len(random_runs)}


if __name__ == "__main__":
    evaluate_attribution.serve(name="evaluate-attribution")
