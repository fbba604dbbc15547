"""The evaluation flow: select vs project, with the headline table and report as Prefect artifacts."""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NONE

from gradlake.tasks.evaluate import EvaluationSpec, run_evaluation
from gradlake.tasks.report import headline
from gradlake.tasks.retries import retry_unless_bad_input


@task(name="evaluate", cache_policy=NONE, retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=retry_unless_bad_input)
def evaluate_task(spec: EvaluationSpec) -> tuple[str, list[dict]]:
    directory, results = run_evaluation(spec, log=get_run_logger().info)
    return directory, results.to_dict("records")


@flow(name="evaluate-select-vs-project", log_prints=True)
def evaluate(spec: EvaluationSpec) -> str:
    """Rank originals for each query variant by every tensor, layer group, the full gradient, projections and BM25."""
    import pandas as pd

    from gradlake.lake.store import LakeStore

    directory, records = evaluate_task(spec)
    table = headline(pd.DataFrame(records))
    create_table_artifact(key="select-vs-project", table=table.round(4).astype(object).where(table.notna(), None).to_dict("records"),
                          description=f"Headline: {directory}")
    store = LakeStore(spec.lake)
    with store.fs.open(store.path(f"{directory}/report.md"), "r") as handle:
        report = handle.read()
    create_markdown_artifact(key="select-vs-project-report", markdown=report.split("![", 1)[0]
                             + f"\n\nPlots and the HTML report: `{spec.lake}/{directory}`\n", description=directory)
    get_run_logger().info("evaluation at %s/%s", spec.lake, directory)
    return directory
