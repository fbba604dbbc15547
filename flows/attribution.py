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

from prefect import flow, get_run_logger, runtime
from prefect.artifacts import create_table_artifact

from gradlake.flows.run_names import named_by_model, run_label
from gradlake.lake.store import LakeStore
from gradlake.tasks.attribution.baselines import baselines_task
from gradlake.tasks.attribution.benchmark import compared_methods, finish_benchmark, ground_truth, plan_attribution
from gradlake.tasks.attribution.spec import AttributionSpec
from gradlake.tasks.training.plan import plan_run
from gradlake.tasks.training.spec import TrainSpec
from gradlake.tasks.training.train import train_task


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
            train_task(run)
        return
    from gradlake.flows.fanout import run_each_on_pool

    runs = [(run_label(spec.model, f"{label} {run.output.rsplit('/', 1)[-1]}"), {"spec": run.model_dump(mode="json")},
             f"{runtime.flow_run.id}:{run.output}") for run in todo]
    run_each_on_pool(spec.train_deployment, runs, spec.run_timeout_s, spec.worker_wait_s, what="training",
                     rerun="rerun the attribution evaluation to redo only those retrainings")


@flow(name="evaluate-attribution", log_prints=True,
      flow_run_name=named_by_model(AttributionSpec, lambda s: f"attribution {s.train.dataset} <- {s.queries}",
                                   "evaluate-attribution"))
def evaluate_attribution(spec: AttributionSpec) -> str:
    """LDS, counterfactual removal and retrieval for every method; returns the benchmark's directory in the lake."""
    log = get_run_logger()
    plan = plan_attribution(spec)
    store = LakeStore(spec.train.lake)
    if spec.baselines:
        baselines_task(spec, plan)
    methods = compared_methods(store, spec)
    truth = ground_truth(store, spec, plan, methods)
    run_retrainings(spec, truth.runs, "ground truth")
    directory, table = finish_benchmark(store, spec, plan, methods, truth)
    shown = table.round(4).astype(object).where(table.notna(), None)
    create_table_artifact(shown.to_dict(orient="records"),
                          key="attribution-" + hashlib.sha256(directory.encode()).hexdigest()[:16],
                          description=f"attribution benchmark of {spec.model.model}@{spec.model.checkpoint} on "
                                      f"{spec.train.dataset} <- {spec.queries}: LDS over {spec.n_subsets} subsets x "
                                      f"{spec.retrain_seeds} seeds (fraction {spec.fraction}), {len(plan['queries'].ids)} queries")
    best = table[table["kind"] != "reference"].iloc[0]
    log.info("attribution benchmark at %s/%s; best LDS %s %.3f [%.3f, %.3f]", spec.train.lake, directory,
             best["method"], best["lds"], best["lds_ci_low"], best["lds_ci_high"])
    return directory


if __name__ == "__main__":
    evaluate_attribution.serve(name="evaluate-attribution")
