"""The checkpoint watcher: start the pipeline exactly once for every new checkpoint of the watched models."""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.deployments import run_deployment
from pydantic import BaseModel, ConfigDict, Field

from gradlake.flows.pipeline import PipelineSettings, PipelineSpec
from gradlake.flows.run_names import run_label
from gradlake.lake import layout
from gradlake.lake.store import LakeStore
from gradlake.tasks.common.checkpoints import WatchedModel, list_checkpoints
from gradlake.tasks.common.lineage import lake_keys
from gradlake.tasks.common.model import ModelSpec


PIPELINE_DEPLOYMENT = "gradlake-pipeline/gradlake-pipeline"
WATCH_DEPLOYMENT = "watch-checkpoints/watch-checkpoints"


class WatchSpec(BaseModel):
    """Which models to watch, and how the pipeline processes each new checkpoint."""

    model_config = ConfigDict(extra="forbid")

    models: list[WatchedModel] = Field(title="Watched models", description="Hub repositories or checkpoint directories (local or s3://) to watch.")
    pipeline: PipelineSettings = Field(default=PipelineSettings(), title="Pipeline settings", description="How every new checkpoint goes through the pipeline (the pipeline's own form; the model, checkpoint and lake are filled in).")
    pipeline_deployment: str = Field(default=PIPELINE_DEPLOYMENT, title="Pipeline deployment", description="The pipeline deployment to start ('flow/deployment').")
    lake: str = Field(title="Lake", description="Lake URL the pipeline writes to: s3://bucket/prefix, or file:///path on storage every worker shares.")


def held_checkpoints(store: LakeStore, model: ModelSpec) -> set[str]:
    """Checkpoint keys for which the lake holds at least one gradient group of this model (any variant)."""
    model_key, _ = lake_keys(model)
    groups = store.glob(f"{layout.model_gradient_groups(model_key)}/zarr.json")
    base = store.path(layout.gradients_dir(model_key)) + "/"  # store.path drops the trailing slash
    return {p[len(base):].split("/", 1)[0] for p in groups}


@flow(name="watch-checkpoints", log_prints=True)
def watch_checkpoints(spec: WatchSpec) -> list[str]:
    """One tick: list checkpoints, skip those the lake holds, start the pipeline once for each new one."""
    import datetime as dt

    log = get_run_logger()
    tick = dt.datetime.now(dt.timezone.utc)
    store = LakeStore(spec.lake)
    started = []
    for watched in spec.models:
        unfinished: list[str] = []
        checkpoints = list_checkpoints(watched, unfinished)
        held = held_checkpoints(store, ModelSpec(model=watched.model))
        new = already = 0
        for checkpoint in checkpoints:
            model = ModelSpec(model=watched.model, checkpoint=checkpoint, dtype=watched.dtype, device=watched.device)
            if layout.key(checkpoint) in held:
                continue
            params = PipelineSpec(**spec.pipeline.model_dump(), model=model, lake=spec.lake)
            # The key makes a second tick (or a retried one) return the same run instead of a new one.
            run = run_deployment(spec.pipeline_deployment, parameters={"spec": params.model_dump(mode="json")}, timeout=0,
                                 idempotency_key=f"gradlake-watch:{lake_keys(model)[0]}@{checkpoint}:{spec.lake}",
                                 flow_run_name=run_label(model, spec.pipeline.dataset),
                                 as_subflow=False)
            if run.created is not None and run.created < tick:
                log.info("checkpoint %s of %s: pipeline run %s was started by an earlier tick", checkpoint, watched.model, run.id)
                already += 1
                continue
            log.info("new checkpoint %s of %s: pipeline run %s", checkpoint, watched.model, run.id)
            started.append(checkpoint)
            new += 1
        in_lake = sum(layout.key(c) in held for c in checkpoints)
        log.info("%s: %d finished checkpoints (%d already in the lake, %d started earlier, %d started now)%s",
                 watched.model, len(checkpoints), in_lake, already, new,
                 f"; {len(unfinished)} still being written: {unfinished}" if unfinished else "")
    return started


def set_watch_schedule(spec: WatchSpec | None, interval: float, deployment: str = WATCH_DEPLOYMENT) -> str:
    """Give the watcher deployment these parameters and one active interval schedule (spec None: turn it off)."""
    import datetime as dt

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import DeploymentUpdate
    from prefect.client.schemas.schedules import IntervalSchedule
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            found = client.read_deployment_by_name(deployment)
        except ObjectNotFound:
            raise LookupError(f"deployment {deployment!r} is not on the Prefect server; deploy it first: "
                              "prefect deploy --all --prefect-file deployments/prefect.yaml") from None
        schedules = client.read_deployment_schedules(found.id)
        if spec is None:
            for schedule in schedules:
                client.update_deployment_schedule(found.id, schedule.id, active=False)
            dropped = _drop_scheduled_ticks(client, found.id)
            return f"{deployment}: schedule off" + (f"; {dropped} ticks that had not started removed" if dropped else "")
        client.update_deployment(found.id, DeploymentUpdate(parameters={"spec": spec.model_dump(mode="json")}))
        every = IntervalSchedule(interval=dt.timedelta(seconds=interval))
        if schedules:
            client.update_deployment_schedule(found.id, schedules[0].id, active=True, schedule=every)
            for extra in schedules[1:]:
                client.delete_deployment_schedule(found.id, extra.id)
        else:
            client.create_deployment_schedules(found.id, [(every, True)])
    models = ", ".join(m.model for m in spec.models)
    return f"{deployment}: watching {models} every {interval:g}s into {spec.lake}"


def _drop_scheduled_ticks(client, deployment_id) -> int:
    """Delete the schedule's runs that have not started yet: 'off' means no further tick."""
    from prefect.client.schemas.filters import (DeploymentFilter, DeploymentFilterId, FlowRunFilter, FlowRunFilterState,
                                                FlowRunFilterStateType)
    from prefect.client.schemas.objects import StateType

    waiting = client.read_flow_runs(
        deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
        flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED]))))
    ticks = [run for run in waiting if run.auto_scheduled]
    for run in ticks:
        client.delete_flow_run(run.id)
    return len(ticks)
