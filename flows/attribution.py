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
from gradlake.lake.datasets import read_dataset
from gradlake.lake.scores import ScoreGroup
from gradlake.lake.store import LakeStore
from gradlake.tasks.attribution import (AttributionError, AttributionSpec, available_methods, baseline_scores,
                                        benchmark_dir, benchmark_table, counterfactual_runs, lds_runs, retrained_model,
                                        method_path, query_variant, stored_losses, write_benchmark)
from gradlake.tasks.groundtruth import check_subsets
from gradlake.tasks.retries import retry_unless_bad_input
from gradlake.tasks.train import TrainSpec, check_output_writable, checkpoint_name, plan_run, train


@task(name="plan-attribution", cache_policy=NONE)
def plan_attribution(spec: AttributionSpec) -> dict:
    """Every check before any retraining or writing; returns the training ids, queries and the run's fingerprint."""
    plan = plan_run(spec.train)
    if spec.step not in plan.saves:
        raise AttributionError(f"the training run saves no {spec.model.checkpoint} (its checkpoints: "
                               f"{[checkpoint_name(s) for s in plan.saves]}); choose one of those")
    if spec.step not in plan.done:
        raise AttributionError(f"the training run has no {spec.model.checkpoint} at {spec.train.output} yet "
                               f"(found {[checkpoint_name(s) for s in plan.done]}); run train-model with this spec first")
    train_ids = plan.data.ids
    check_subsets(len(train_ids), spec.fraction, spec.n_subsets)
    if spec.counterfactual_k and not 1 <= spec.counterfactual_k < len(train_ids):
        raise AttributionError(f"counterfactual_k={spec.counterfactual_k} out of {len(train_ids)} training samples; "
                               f"use 1 <= k < {len(train_ids)}")
    check_output_writable(spec.train.model_copy(update={"output": spec.retrain_prefix}))
    store = LakeStore(spec.train.lake)
    frame = read_dataset(store, spec.train.dataset, query_variant(spec))
    if spec.max_queries:
        frame = frame.head(spec.max_queries)
    return {"train_ids": train_ids, "train_keys": plan.data.keys, "fingerprint": plan.fingerprint,
            "saves": plan.saves, "total_steps": plan.total_steps,
            "query_ids": [str(i) for i in frame["id"]], "query_chats": list(frame["messages"])}


@task(name="baselines", cache_policy=NONE, retries=1, retry_delay_seconds=[30], retry_condition_fn=retry_unless_bad_input)
def baselines_task(spec: AttributionSpec) -> list[str]:
    """The baselines for the benchmark's queries, and for each retrieval variant whose gradients the lake holds."""
    from gradlake.lake.store import LakeError

    log = get_run_logger()
    written = baseline_scores(spec, log=log.info)
    for queries in spec.retrieval_queries:
        if queries == spec.queries:
            continue
        try:
            baseline_scores(spec, queries, log=log.info)
        except (LakeError, FileNotFoundError) as err:
            log.info("no retrieval baselines for queries %r: %s", queries, err)
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
    from gradlake.tasks.evaluate import lake_keys

    log = get_run_logger()
    plan = plan_attribution(spec)
    store = LakeStore(spec.train.lake)
    if spec.baselines:
        baselines_task(spec)
    methods = spec.methods or available_methods(store, spec)
    missing = [m for m in methods if ScoreGroup.open(store, method_path(spec, m), missing_ok=True) is None]
    if missing or not methods:
        raise AttributionError(f"no scores in the lake for methods {missing or methods}; found {available_methods(store, spec)}")
    model_key, checkpoint_key = lake_keys(spec.model)
    query_ids, chats = plan["query_ids"], plan["query_chats"]
    shape = plan["saves"], plan["total_steps"]
    lds_key, masks, subset_runs = lds_runs(spec, plan["fingerprint"], plan["train_ids"], *shape)
    runs = list(subset_runs)
    cf_plan = None
    if spec.counterfactual_k:
        from gradlake.tasks.attribution import _aligned

        chosen = [m for m in spec.counterfactual_methods if m in methods]
        if len(chosen) < len(spec.counterfactual_methods):
            raise AttributionError(f"counterfactual_methods {sorted(set(spec.counterfactual_methods) - set(chosen))} "
                                   f"have no scores among the compared methods {methods}; compute them first or "
                                   "name compared ones")
        scores = {m: _aligned(ScoreGroup.open(store, method_path(spec, m)), query_ids, plan["train_keys"], m)
                  for m in chosen}
        cf_key, per_method, random_runs = counterfactual_runs(spec, plan["fingerprint"], plan["train_ids"], *shape, scores)
        cf_plan = (cf_key, per_method, random_runs)
        runs += [r for rs in per_method.values() for r in rs] + random_runs
    run_retrainings(spec, runs, "ground truth")
    n_train = len(plan["train_ids"])

    def retrained(run: TrainSpec):
        return retrained_model(run, spec.step, plan["total_steps"], n_train)

    truth_dir = f"groundtruth/{model_key}/{checkpoint_key}/{spec.train.dataset}/{spec.queries}"
    lds_dir = f"{truth_dir}/lds-{lds_key}"
    lds_losses = np.stack([stored_losses(store, lds_dir, f"subset-{m:03d}", retrained(run), query_ids, chats, spec)
                           for m, run in enumerate(subset_runs)])
    subsets = json.dumps({"fraction": spec.fraction, "seed": spec.subset_seed, "train_ids": plan["train_ids"],
                          "subsets": [[int(i) for i in np.flatnonzero(m)] for m in masks],
                          "outputs": [r.output for r in subset_runs]}).encode()
    record = store.path(f"{lds_dir}/subsets.json")
    if not store.fs.exists(record) or store.fs.cat_file(record) != subsets:
        store.fs.pipe_file(record, subsets)
    cf = None
    if cf_plan is not None:
        cf_key, per_method, random_runs = cf_plan
        cf_dir = f"{truth_dir}/cf-{cf_key}"
        n = min(spec.counterfactual_queries, len(query_ids))
        full = stored_losses(store, cf_dir, "full", spec.model, query_ids[:n], chats[:n], spec)
        change = {}
        for method, method_runs in per_method.items():
            deltas = [stored_losses(store, cf_dir, f"{run.output.rsplit('/', 2)[-2]}-q{q:03d}", retrained(run),
                                    query_ids[q:q + 1], chats[q:q + 1], spec)[0] - full[q]
                      for q, run in enumerate(method_runs[:n])]
            change[method] = float(np.mean(deltas))
        random_change = float(np.mean([stored_losses(store, cf_dir, f"random-d{d:03d}", retrained(run), query_ids[:n],
                                                      chats[:n], spec) - full for d, run in enumerate(random_runs)]))
        cf = {"method_change": change, "random_change": random_change}
    table, per_query = benchmark_table(store, spec, methods, query_ids, plan["train_keys"], masks, lds_losses, cf)
    directory = benchmark_dir(spec)
    write_benchmark(store, directory, table, per_query, {
        "model": spec.model.model_dump(mode="json"), "train_fingerprint": plan["fingerprint"],
        "queries": spec.queries, "n_queries": len(query_ids), "n_train": len(plan["train_ids"]),
        "n_subsets": spec.n_subsets, "fraction": spec.fraction, "subset_seed": spec.subset_seed,
        "counterfactual_k": spec.counterfactual_k, "ground_truth": truth_dir})
    from gradlake.tasks.report import attribution_report

    attribution_report(store, directory)
    shown = table.round(4).replace({np.nan: None})
    create_table_artifact(shown.to_dict(orient="records"),
                          key="attribution-" + hashlib.sha256(directory.encode()).hexdigest()[:16],
                          description=f"attribution benchmark of {spec.model.model}@{spec.model.checkpoint} on "
                                      f"{spec.train.dataset} <- {spec.queries}: LDS over {spec.n_subsets} subsets "
                                      f"(fraction {spec.fraction}), {len(query_ids)} queries")
    best = table[table["method"] != "random"].sort_values("lds", ascending=False).iloc[0]
    log.info("attribution benchmark at %s/%s; best LDS %s %.3f [%.3f, %.3f]", spec.train.lake, directory,
             best["method"], best["lds"], best["lds_ci_low"], best["lds_ci_high"])
    return directory


if __name__ == "__main__":
    evaluate_attribution.serve(name="evaluate-attribution")
