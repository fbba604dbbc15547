"""The influence flow: Kronfluence factors and pairwise scores for one model, training set and query set, into the lake."""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NONE

from gradlake.flows.run_names import named_by_model
from gradlake.lake.scores import ScoreGroup
from gradlake.lake.store import LakeStore
from gradlake.tasks.influence.compute import InfluenceSpec, compute_influence, plan_influence
from gradlake.tasks.common.retries import retry_unless_bad_input


@task(name="plan-influence", cache_policy=NONE)
def plan_influence_task(spec: InfluenceSpec) -> dict:
    """Model config, data, tracked modules: checked before any factor is fitted or anything written."""
    plan = plan_influence(spec)
    get_run_logger().info("%s influence: %d training samples x %d queries, %d tracked modules", spec.strategy,
                          plan["n_train"], plan["n_query"], len(plan["modules"]))
    return plan


@task(name="influence", cache_policy=NONE, retries=2, retry_delay_seconds=[10, 60],
      retry_condition_fn=retry_unless_bad_input)
def influence_task(spec: InfluenceSpec) -> str:
    """Fit or reuse the factors, score the blocks the lake lacks; a retry resumes at the first missing block."""
    return compute_influence(spec, log=get_run_logger().info)


@flow(name="compute-influence", log_prints=True,
      flow_run_name=named_by_model(InfluenceSpec, lambda s: f"influence {s.strategy} {s.dataset} <- {s.queries}",
                                   "compute-influence"))
def compute_influence_flow(spec: InfluenceSpec) -> str:
    """Influence scores of every training sample on every query; returns the score group's path in the lake."""
    plan_influence_task(spec)
    path = influence_task(spec)
    meta = ScoreGroup.open(LakeStore(spec.lake), path).meta
    create_markdown_artifact(
        f"**{meta['method']}** ({spec.strategy}) on `{spec.model.model}`: {len(meta['lineage']['tracked_modules'])} "
        f"modules, {meta['compute_seconds']:.1f} s, {meta['lake_bytes'] / 1e6:.1f} MB in the lake  \n"
        f"scores: `{spec.lake}/{path}`  \nfactors: `{spec.lake}/{meta['lineage']['factors']}`",
        description="influence scores")
    return path


if __name__ == "__main__":
    compute_influence_flow.serve(name="compute-influence")
