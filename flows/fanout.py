"""Fan-out: runs sent to a deployment's work pool, waited on together (cancelled if the flow gives up), with what failed named.

Extraction shards, training retrainings, tracing candidates and protocol stages all go through it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass

from prefect import get_run_logger
from prefect.deployments import run_deployment


@dataclass
class ShardRun:
    """One submitted flow run and what the pipeline knows of it; `shards` are the units of work it was given."""

    label: str
    shards: list[Hashable]
    run_id: object
    state: object = None
    started: float | None = None  # monotonic time the run was first seen taken by a worker
    problem: str | None = None


@dataclass
class WorkRate:
    """Units done per second of work, where work is time some run was running: runs waiting for a worker or a
    slot (a training holding the only GPU) do nothing, so that wait never slows the rate or lengthens the ETA."""

    busy_s: float = 0.0
    first_done: int | None = None  # done when first seen: what earlier runs left complete is no part of the rate
    last: tuple[float, bool] | None = None  # (time, whether a run was running) at the previous look

    def observe(self, now: float, done: int, running: bool) -> None:
        """One look at the runs: the time since the last look counts as work if a run was running at either."""
        if self.first_done is None:
            self.first_done = done
        if self.last is not None and (running or self.last[1]):
            self.busy_s += now - self.last[0]
        self.last = (now, running)

    def seconds_left(self, done: int, total: int) -> float | None:
        """Seconds until `total` at the rate seen while runs ran; None before any unit was done while watched."""
        gained = done - (self.first_done if self.first_done is not None else done)
        if gained <= 0 or self.busy_s <= 0:
            return None
        return (total - done) * self.busy_s / gained


class ShardRunsFailed(RuntimeError):
    """GPU runs that did not finish their work; the next pipeline run redoes only what is left."""


def polling_workers(client, pool: str, now=None) -> list[str]:
    """Names of the workers that poll `pool` now (online, with a recent heartbeat)."""
    import datetime as dt

    now = now or dt.datetime.now(dt.timezone.utc)
    alive = []
    for worker in client.read_workers_for_work_pool(pool):
        beat = worker.last_heartbeat_time
        window = 3 * (worker.heartbeat_interval_seconds or 30)
        if str(getattr(worker.status, "value", worker.status)).upper() == "ONLINE" and beat and (now - beat).total_seconds() < window:
            alive.append(worker.name)
    return alive


def _cancel(client, runs: list[ShardRun], why: str) -> int:
    """Cancel the runs that are not final: waiting ones at once, running ones through their worker."""
    from prefect.states import Cancelled, Cancelling

    cancelled = 0
    for run in runs:
        state = run.state
        if state is not None and state.is_final():
            continue
        taken = state is not None and (state.is_running() or state.is_pending())  # its worker must stop it
        new = Cancelling(message=why) if taken else Cancelled(message=why)
        client.set_flow_run_state(run.run_id, new, force=True)
        cancelled += 1
    return cancelled


def wait_for_shard_runs(runs: list[ShardRun], pool: str, timeout_s: float, worker_wait_s: float, poll: float = 2.0,
                        log_every: float = 30.0, what: str = "shard", rerun: str = "rerun the pipeline to redo only their shards",
                        progress: Callable[[], tuple[int, int]] | None = None) -> None:
    """Wait until the runs have done their work; on no worker, a timeout or failed runs cancel the rest and raise.

    The work is done once the runs that completed cover every unit any run was given: every run
    when each has units of its own, any one when each was given all of them; runs still open then
    have nothing left to do and are cancelled.  Time is bounded by `worker_wait_s` while no worker
    polls the pool, and by `timeout_s`: without `progress`, per run once a worker has taken it; with
    `progress` (a function giving units done and in all, e.g. row-chunks in the lake), since the
    count last rose or a run was last taken.  Neither grows with the number of runs.
    `what` names a unit of work in messages ('shard', 'training'); `rerun` says how to finish.
    """
    from prefect.artifacts import create_progress_artifact, update_progress_artifact
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    log = get_run_logger()
    units = set().union(*(r.shards for r in runs))
    unit_name = "chunks" if progress else f"{what}s"
    began = time.monotonic()
    last_log = began
    no_worker_since = None
    last_done, last_rise = None, began
    rate = WorkRate()
    artifact = create_progress_artifact(progress=0.0, description=f"{unit_name} complete ({len(units)} {what}s, {len(runs)} runs on pool {pool})")
    with get_client(sync_client=True) as client:
        try:
            while True:
                now = time.monotonic()
                states = {}
                for i in range(0, len(runs), 200):  # the API returns at most 200 runs per call
                    ids = [r.run_id for r in runs[i:i + 200]]
                    states.update({r.id: r.state for r in client.read_flow_runs(
                        flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)), limit=200)})
                for run in runs:
                    run.state = states.get(run.run_id)
                    # started = taken by a worker (Pending or Running): a run whose process died while
                    # Pending never reports Running, so its timeout must count from here
                    if run.started is None and run.state is not None and not run.state.is_scheduled():
                        run.started = now
                covered = set().union(*(r.shards for r in runs if r.state is not None and r.state.is_completed()))
                done, total = progress() if progress else (len(covered), len(units))
                update_progress_artifact(artifact, progress=100.0 * done / max(total, 1))
                if done != last_done:
                    last_done, last_rise = done, now
                open_runs = [r for r in runs if r.state is None or not r.state.is_final()]
                if covered >= units or not open_runs:
                    break
                taken = [r for r in open_runs if r.started is not None]
                rate.observe(now, done, running=bool(taken))
                for run in taken:
                    since = max(last_rise, *(r.started for r in taken)) if progress else run.started
                    if now - since > timeout_s:
                        run.problem = (f"no chunk completed in {timeout_s:g}s (the stall timeout) while it ran" if progress else
                                       f"not finished {timeout_s:g}s (the run timeout) after a worker took it") + \
                                      f" ({run.state.name if run.state else 'unknown'})"
                if any(r.problem for r in runs):
                    break
                waiting = [r for r in open_runs if r.started is None]
                if waiting and not polling_workers(client, pool):
                    no_worker_since = no_worker_since or now
                    if now - no_worker_since > worker_wait_s:
                        why = (f"no worker is polling the {pool!r} work pool: {len(waiting)} {what} runs waited "
                               f"{now - no_worker_since:.0f}s (worker_wait_s={worker_wait_s:g}); start one with "
                               f"`prefect worker start --pool {pool}`, then {rerun.split(' to ')[0]}")
                        for run in waiting:
                            run.problem = "never started: no worker"
                        raise ShardRunsFailed(why)
                else:
                    no_worker_since = None
                if now - last_log >= log_every:
                    last_log = now
                    left = rate.seconds_left(done, total)
                    eta = f", about {left / 60:.1f} min left" if left is not None else ""
                    log.info("%d/%d %s complete, %d runs running, %d waiting%s%s", done, total, unit_name, len(taken),
                             len(waiting), " (no worker polls pool %r)" % pool if no_worker_since else "", eta)
                time.sleep(poll)
            if not covered >= units:
                failed = [r for r in runs if r.problem or not (r.state is not None and r.state.is_completed())]
                described = "; ".join(f"{r.label}: {r.problem or r.state.name}" for r in failed)
                raise ShardRunsFailed(f"{len(failed)} of {len(runs)} {what} runs did not complete ({described}); {rerun}")
        except BaseException as err:
            n = _cancel(client, runs, f"the flow gave up: {err}"[:400])
            if n:
                log.warning("cancelled %d %s runs that had not finished", n, what)
            raise
        ended = [r for r in runs if r.state is not None and r.state.is_final() and not r.state.is_completed()]
        if ended:
            log.warning("%s ended without finishing; the other runs did their work", ", ".join(f"{r.label} ({r.state.name})" for r in ended))
        n = _cancel(client, runs, f"not needed: the runs that completed did every {what}")
        if n:
            log.info("cancelled %d %s runs left with nothing to do", n, what)
    log.info("all %d %ss complete in %.0fs", len(units), what, time.monotonic() - began)


def run_each_on_pool(deployment: str, runs: list[tuple[str, dict, str]], timeout_s: float, worker_wait_s: float,
                     what: str, rerun: str) -> str:
    """One flow run of `deployment` per (run name, parameters, idempotency key), all sent at once and waited on
    together (`wait_for_shard_runs`: cancelled if they give up); returns the deployment's work pool."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        pool = client.read_deployment_by_name(deployment).work_pool_name
    submitted = []
    for index, (name, parameters, key) in enumerate(runs):
        flow_run = run_deployment(deployment, parameters=parameters, timeout=0, idempotency_key=key, flow_run_name=name,
                                  as_subflow=False)
        submitted.append(ShardRun(name, [index], flow_run.id))
    get_run_logger().info("%d %s runs sent to %s (pool %s)", len(submitted), what, deployment, pool)
    wait_for_shard_runs(submitted, pool, timeout_s, worker_wait_s, what=what, rerun=rerun)
    return pool


def wait_for_run(run_id, timeout: float, poll: float = 2.0):
    """The final state of a flow run, or None if it is not final within `timeout` seconds."""
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            state = client.read_flow_run(run_id).state
            if state is not None and state.is_final():
                return state
            if time.monotonic() > deadline:
                return None
            time.sleep(poll)
