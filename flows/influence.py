"""The influence flow: Kronfluence factors and pairwise scores for one model, training set and query set, into the lake."""

from __future__ import annotations

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from gradlake.flows.run_names import named_by_model
from gradlake.lake.scores import ScoreGroup
from gradlake.lake.store import LakeStore
from gradlake.tasks.influence.spec import InfluenceSpec
from gradlake.tasks.influence.compute import influence_task, plan_influence_task


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
