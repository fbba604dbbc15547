"""The watcher's schedule on the Prefect server: on with validated parameters, or off with its waiting ticks gone.

Kept apart from `flows.watch` so that `gradlake watch --off` imports Prefect's client and nothing
of the pipeline (torch, the model code): the import, not the server, was its time.
"""

from __future__ import annotations

import datetime as dt
import time

from pydantic import BaseModel

WATCH_DEPLOYMENT = "watch-checkpoints/watch-checkpoints"


def set_watch_schedule(spec: BaseModel | None, interval: float, deployment: str = WATCH_DEPLOYMENT) -> str:
    """Give the watcher deployment these parameters (a `WatchSpec`) and one active interval schedule (None: turn it off)."""
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
                if schedule.active:
                    client.update_deployment_schedule(found.id, schedule.id, active=False)
            # The server's scheduler may be inserting ticks while the schedule goes off: drop until a pass finds none.
            dropped, passes = 0, 0
            while passes < 10:
                found_now = _drop_scheduled_ticks(client, found.id)
                dropped, passes = dropped + found_now, passes + 1
                if passes > 1 and not found_now:
                    break
                time.sleep(1)
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
    """Delete the schedule's runs that have not started yet (late ones too): 'off' means no further tick.

    Turning a schedule off makes the server delete its future runs; the ones already due (Late) stay
    until deleted here, in one filtered query."""
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
