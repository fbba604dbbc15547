"""The training flow: plan (every check before any work), train with checkpoints, measure each checkpoint's answers."""

from __future__ import annotations

from prefect import flow
from prefect.artifacts import create_table_artifact

from gradlake.flows.run_names import named_by_model
from gradlake.tasks.training.spec import TrainSpec
from gradlake.tasks.training.train import plan_task, quality_task, train_task


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
