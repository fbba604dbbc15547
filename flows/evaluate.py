"""The evaluation flow: select vs project, with the headline table and report as Prefect artifacts."""

from __future__ import annotations

import hashlib
import re

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from gradlake.flows.run_names import named_by_model
from gradlake.lake.results import read_result_meta
from gradlake.tasks.common.render import artifact_markdown, lake_location
from gradlake.tasks.evaluate.evaluation import evaluate_task
from gradlake.tasks.evaluate.report import headline_records
from gradlake.tasks.evaluate.spec import EvaluationSpec


_KEY_LENGTH = 56  # leaves room for '-report'


def artifact_key(directory: str) -> str:
    """The Prefect artifact key of an evaluation directory: ``svp-<model>-<checkpoint>-<dataset>-<paradigm>``.

    Prefect keys allow lowercase letters, digits and dashes only; a key that would be
    longer than 56 characters, or that lost characters to that rule (so two directories
    could meet), ends in a short hash of the directory instead, keeping keys distinct.
    """
    parts = directory.strip("/").split("/")[-4:]  # evaluations/<model>/<checkpoint>/<dataset>/<paradigm>
    slugs = [re.sub(r"[^a-z0-9]+", "-", p.lower()).strip("-") for p in parts]
    slug = "svp-" + "-".join(slugs)
    if slugs == parts and len(slug) <= _KEY_LENGTH:
        return slug
    budget = _KEY_LENGTH - len("svp-") - len("-12345678") - (len(slugs) - 1)
    while sum(map(len, slugs)) > budget:  # shorten the longest part, so that each keeps a readable head
        longest = max(range(len(slugs)), key=lambda i: len(slugs[i]))
        slugs[longest] = slugs[longest][:-1]
    digest = hashlib.sha256(directory.strip("/").encode()).hexdigest()[:8]
    return "svp-" + "-".join(filter(None, (s.strip("-") for s in slugs))) + f"-{digest}"


def publish_headline(lake: str, directory: str) -> None:
    """The headline table and the report, plots embedded, of a finished evaluation as artifacts of the current flow run."""

    from gradlake.lake.evaluations import read_evaluation
    from gradlake.lake.store import LakeStore

    store = LakeStore(lake)
    results = read_evaluation(store, directory)
    lineage = read_result_meta(store, directory, what="evaluation")["lineage"]
    with store.fs.open(store.path(f"{directory}/report.md"), "r") as handle:
        report = handle.read()
    where = lake_location(store, directory)
    about = (f"Select vs project (cosine) for {lineage.get('model')} @ {lineage.get('checkpoint')}, "
             f"dataset {lineage.get('dataset')} ({lineage.get('paradigm')}); report.html and the tables at {where}")
    key = artifact_key(directory)
    create_table_artifact(key=key, table=headline_records(results), description=about)
    markdown = artifact_markdown(report, lambda name: store.fs.cat_file(store.path(f"{directory}/plots/{name}")), where)
    create_markdown_artifact(key=f"{key}-report", description=about, markdown=markdown
                             + f"\n\nThe same report as one HTML file, plots inlined: `report.html` in {where}.\n")


@flow(name="evaluate-select-vs-project", log_prints=True,
      flow_run_name=named_by_model(EvaluationSpec, lambda s: f"{s.dataset} select-vs-project", "evaluate-select-vs-project"))
def evaluate(spec: EvaluationSpec) -> str:
    """Rank originals for each query variant by every tensor, layer group, the full gradient, projections and BM25."""
    directory = evaluate_task(spec)
    publish_headline(spec.lake, directory)
    get_run_logger().info("evaluation at %s/%s", spec.lake, directory)
    return directory
