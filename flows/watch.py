"""The checkpoint watcher: start the pipeline exactly once for every new checkpoint of the watched models."""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.deployments import run_deployment
from pydantic import BaseModel, ConfigDict, Field

from gradlake.lake.store import LakeStore, default_lake
from gradlake.tasks.checkpoints import WatchedModel, list_checkpoints
from gradlake.tasks.evaluate import lake_keys
from gradlake.tasks.model import ModelSpec

PIPELINE_DEPLOYMENT = "gradlake-pipeline/gradlake-pipeline"


class WatchSpec(BaseModel):
    """Which models to watch and how their new checkpoints are processed."""

    model_config = ConfigDict(extra="forbid")

    models: list[WatchedModel] = Field(description="Watched models (hub repositories or checkpoint directories).")
    pipeline: dict = Field(default_factory=dict, description="Pipeline parameters (PipelineSpec fields) for every new checkpoint; model and lake are filled in.")
    pipeline_deployment: str = Field(default=PIPELINE_DEPLOYMENT, description="The pipeline deployment to start ('flow/deployment').")
    lake: str = Field(default_factory=default_lake, description="Lake URL.")


def held_checkpoints(store: LakeStore, model: ModelSpec) -> set[str]:
    """Checkpoint keys the lake already holds gradients for (any variant) for this model."""
    model_key, _ = lake_keys(model)
    return {p.rstrip("/").rsplit("/", 1)[-1] for p in store.glob(f"gradients/{model_key}/*")}


@flow(name="watch-checkpoints", log_prints=True)
def watch_checkpoints(spec: WatchSpec) -> list[str]:
    """One tick: list checkpoints, skip those the lake holds, start the pipeline once for each new one."""
    from gradlake.flows.pipeline import PipelineSpec
    from gradlake.lake import layout

    import datetime as dt

    log = get_run_logger()
    tick = dt.datetime.now(dt.timezone.utc)
    store = LakeStore(spec.lake)
    started = []
    for watched in spec.models:
        checkpoints = list_checkpoints(watched)
        held = held_checkpoints(store, ModelSpec(model=watched.model))
        for checkpoint in checkpoints:
            model = ModelSpec(model=watched.model, checkpoint=checkpoint)
            if layout.key(checkpoint) in held:
                continue
            params = PipelineSpec(**{**spec.pipeline, "model": {**spec.pipeline.get("model", {}), **model.model_dump()},
                                     "lake": spec.lake})
            # The key makes a second tick (or a retried one) return the same run instead of a new one.
            run = run_deployment(spec.pipeline_deployment, parameters={"spec": params.model_dump(mode="json")}, timeout=0,
                                 idempotency_key=f"gradlake-watch:{lake_keys(model)[0]}@{checkpoint}:{spec.lake}",
                                 flow_run_name=f"{lake_keys(model)[0]}@{checkpoint}", as_subflow=False)
            if run.created is not None and run.created < tick:
                log.info("checkpoint %s of %s: pipeline run %s already started", checkpoint, watched.model, run.id)
                continue
            log.info("new checkpoint %s of %s: pipeline run %s", checkpoint, watched.model, run.id)
            started.append(checkpoint)
        log.info("%s: %d checkpoints, %d held, %d started", watched.model, len(checkpoints), len(held), len(started))
    return started
