"""The training flow: plan (every check before any work), train with checkpoints, measure each checkpoint's answers."""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_progress_artifact, create_table_artifact, update_progress_artifact
from prefect.cache_policies import NONE

from gradlake.flows.run_names import named_by_model
from gradlake.tasks.common.retries import retry_unless_bad_input
from gradlake.tasks.training.train import Plan, TrainSpec, measure_checkpoint, plan_run, train


@task(name="plan-training", cache_policy=NONE)
def plan_task(spec: TrainSpec) -> Plan:
    """Model config, lake data, keep/drop ids and the checkpoint prefix, checked before anything is trained or written."""
    plan = plan_run(spec)
    get_run_logger().info(
        "training %s on %d samples of %s %s for %d steps (%d per epoch); checkpoints at steps %s; %s",
        spec.model.model, len(plan.data.keys), spec.dataset, spec.variants, plan.total_steps, plan.steps_per_epoch,
        plan.saves, f"{len(plan.done)} already written" if plan.done else "none written yet")
    return plan


@task(name="train", cache_policy=NONE, retries=2, retry_delay_seconds=[10, 60], retry_condition_fn=retry_unless_bad_input)
def train_task(spec: TrainSpec) -> list[str]:
    """Train, resuming from the last complete checkpoint when a previous attempt was killed."""
    log = get_run_logger()
    plan = plan_run(spec)  # again: a retry sees the checkpoints the failed attempt left
    artifact = create_progress_artifact(100.0 * (max(plan.done, default=0) / plan.total_steps),
                                        description=f"training steps done, of {plan.total_steps}")
    every = max(1, plan.total_steps // 100)

    def on_step(step: int, loss: float) -> None:
        if step % every == 0 or step == plan.total_steps:
            update_progress_artifact(artifact, 100.0 * step / plan.total_steps)

    result = train(plan, log=log.info, on_step=on_step)
    return result.checkpoints


@task(name="answer-quality", cache_policy=NONE, retries=1, retry_delay_seconds=[30],
      retry_condition_fn=retry_unless_bad_input)
def quality_task(spec: TrainSpec, name: str) -> dict:
    """ROUGE-L, BLEU (and the judge's grade) of one checkpoint's greedy answers, stored in the lake."""
    return measure_checkpoint(spec, name, log=get_run_logger().info)


@flow(name="train-model", log_prints=True,
      flow_run_name=named_by_model(TrainSpec, lambda s: f"train on {s.dataset} -> {s.output}", "train-model"))
def train_model(spec: TrainSpec) -> list[str]:
    """Train `spec.model` on lake data; returns the checkpoint directories written under `spec.output`."""
    plan = plan_task(spec)
    names = train_task(spec)
    rows = []
    for name in names:
        row = {"checkpoint": name, "path": f"{spec.output.rstrip('/')}/{name}"}
        if spec.quality is not None:
            quality = quality_task(spec, name)
            row.update(rouge_l=round(quality["rouge_l"], 4), bleu=round(quality["bleu_corpus"], 2))
            if "judge_mean" in quality:
                row["judge"] = round(quality["judge_mean"], 2)
        rows.append(row)
    create_table_artifact(
        rows,
        description=f"checkpoints of {spec.model.model} trained on {spec.dataset} {spec.variants} "
                    f"({plan.total_steps} steps, fingerprint {plan.fingerprint})")
    return [f"{spec.output.rstrip('/')}/{n}" for n in names]


if __name__ == "__main__":
    train_model.serve(name="train-model")
