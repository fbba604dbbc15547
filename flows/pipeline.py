"""The end-to-end pipeline for one model and checkpoint, and the GPU stage it fans out to.

``gradlake-pipeline`` runs on the ``cpu`` pool: (optionally) dataset creation, then it plans
and creates the gradient group of every variant and sends all their pending shards to the
``extract-shards`` deployment on the ``gpu`` pool, one flow run per ``shards_per_run``
shards, so that N GPU workers share the work; then it finalizes the groups, evaluates
select vs project and puts the headline on its own run page.  Every shard writes only its
own chunks and its completion flags, so a shard run that dies (a killed worker) is simply
redone by the next pipeline run; finished shards are skipped.  When the pipeline gives up
(no worker polls the pool, a shard run times out or fails) it cancels the shard runs it
submitted that are still waiting or running, so none of them writes after it has failed.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from typing import Literal

from prefect import flow, get_run_logger, runtime
from prefect.deployments import run_deployment
from pydantic import BaseModel, ConfigDict, Field

from gradlake.flows.dataset import DatasetRecipe, DatasetSpec, create_dataset
from gradlake.flows.evaluate import evaluate, publish_headline
from gradlake.flows.run_names import named_by_model, run_label
from gradlake.lake import layout
from gradlake.tasks.evaluate import EvaluationSpec, lake_keys
from gradlake.tasks.extract import ExtractionSpec, extract_shard_task, finalize_task, group_paths, prepare_extraction_task
from gradlake.tasks.model import ModelSpec
from gradlake.tasks.projection import ProjectionSpec

SHARD_DEPLOYMENT = "extract-shards/extract-shards"


class PipelineSettings(BaseModel):
    """How a checkpoint goes through the pipeline: everything but the model and the lake (the watcher's form too)."""

    model_config = ConfigDict(extra="forbid")

    dataset: str = Field(default="probe", title="Dataset", description="Dataset name in the lake.")
    create: DatasetRecipe | None = Field(default=None, title="Create the dataset first", description="Make (or update) the dataset from a source before extracting; stored under the dataset name above in this pipeline's lake. Empty: it is already in the lake.")
    variants: list[str] = Field(default=["original", "paraphrased"], title="Variants", description="Dataset variants to extract; 'model_generated' means this model and checkpoint's own answers. 'original' is needed for the evaluation.")
    paradigm: Literal["sft", "pre"] = Field(default="sft", title="Paradigm", description="'sft': loss on assistant tokens only; 'pre': loss on every token.")
    layers: list[str] = Field(default=[], title="Layers", description="Glob patterns over parameter names, e.g. 'model.layers.*.mlp.down_proj.weight'; empty selects every parameter.")
    shard_size: int = Field(default=64, ge=1, title="Shard size", description="Samples per shard: the unit of retry and resume. A scheduling choice: changing it reuses finished gradients.")
    batch_size: int = Field(default=8, ge=1, title="Batch size", description="Samples per backward pass. A scheduling choice too.")
    max_length: int = Field(default=1024, ge=2, title="Max length (tokens)", description="Tokens per sample at most; longer chats are cut on the right.")
    projections: list[ProjectionSpec] = Field(default=[], title="Projections", description="Random projections made on the fly, each stored in a group of its own.")
    keep_gradients: bool = Field(default=True, title="Keep gradients", description="Store the full per-sample gradients too (off: only the projections).")
    evaluate: bool = Field(default=True, title="Evaluate", description="Evaluate select vs project at the end (needs 'original' and at least one other variant).")
    shard_deployment: str | None = Field(default=SHARD_DEPLOYMENT, title="Shard deployment", description="Deployment that runs shards on the GPU pool ('flow/deployment'); empty runs them inside this flow run.")
    shards_per_run: int = Field(default=1, ge=1, title="Shards per GPU run", description="Shards per GPU flow run (more: less start-up cost per shard, coarser sharing between workers).")
    shard_timeout_s: float = Field(default=6 * 3600, gt=0, title="Shard run timeout (seconds)", description="Longest a shard run may take once a worker has taken it; then it is cancelled and the pipeline fails (the next run resumes).")
    worker_wait_s: float = Field(default=900, gt=0, title="Wait for a worker (seconds)", description="How long shard runs may wait while no worker polls their pool; then the pipeline cancels them and fails, naming the pool.")


class _Target(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: ModelSpec = Field(title="Model", description="The model under study and its checkpoint.")
    lake: str = Field(title="Lake", description="Lake URL every stage reads and writes: s3://bucket/prefix (endpoint from the workers' GRADLAKE_S3_ENDPOINT_URL) or file:///path on storage every worker shares.")


class PipelineSpec(PipelineSettings, _Target):
    """One model and checkpoint through dataset creation, extraction, projection and evaluation."""

    def dataset_spec(self) -> DatasetSpec | None:
        """The dataset to create first, in this pipeline's lake under its dataset name."""
        if self.create is None:
            return None
        return DatasetSpec(**self.create.model_dump(), name=self.dataset, lake=self.lake)

    def extraction(self, variant: str) -> ExtractionSpec:
        name = layout.generated_variant(*lake_keys(self.model)) if variant == "model_generated" else variant
        return ExtractionSpec(model=self.model, dataset=self.dataset, variant=name, paradigm=self.paradigm, layers=self.layers,
                              shard_size=self.shard_size, batch_size=self.batch_size, max_length=self.max_length,
                              projections=self.projections, keep_gradients=self.keep_gradients, lake=self.lake)


@flow(name="extract-shards", log_prints=True)
def extract_shards(spec: ExtractionSpec, path: str, shards: list[int]) -> int:
    """The GPU stage: compute and write the given shards of an existing gradient group."""
    worker = os.environ.get("PREFECT__WORKER_NAME", "in-process")
    get_run_logger().info("shards %s of %s on worker %s (host %s)", shards, path, worker, socket.gethostname())
    return sum(extract_shard_task(spec, path, shard) for shard in shards)


@dataclass
class ShardRun:
    """One submitted shard flow run and what the pipeline knows of it."""

    label: str
    shards: list[int]
    run_id: object
    state: object = None
    started: float | None = None  # monotonic time the run was first seen taken by a worker
    problem: str | None = None


class ShardRunsFailed(RuntimeError):
    """Shard runs that did not complete; the next pipeline run redoes only their shards."""


def _submit(spec: PipelineSpec, work: list[tuple[ExtractionSpec, str, list[int]]]) -> list[ShardRun]:
    runs = []
    for extraction, path, pending in work:
        for i in range(0, len(pending), spec.shards_per_run):
            shards = pending[i:i + spec.shards_per_run]
            span = f"{shards[0]}" if len(shards) == 1 else f"{shards[0]}-{shards[-1]}"
            label = run_label(spec.model, f"{extraction.variant} shards {span}")
            key = f"{runtime.flow_run.id}:{path}:{','.join(map(str, shards))}"  # a retried pipeline does not duplicate
            run = run_deployment(spec.shard_deployment, timeout=0, idempotency_key=key, flow_run_name=label,
                                 parameters={"spec": extraction.model_dump(mode="json"), "path": path, "shards": shards})
            runs.append(ShardRun(label, shards, run.id))
    return runs


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
                        log_every: float = 30.0, what: str = "shard", rerun: str = "rerun the pipeline to redo only their shards") -> None:
    """Wait for every submitted run together; on no worker, a timeout or a failure cancel the rest and raise.

    The time waited is bounded by `worker_wait_s` while no worker polls the pool, and by
    `timeout_s` per run once a worker has taken it: neither grows with the number of runs.
    `what` names a unit of work in messages ('shard', 'training'); `rerun` says how to finish.
    """
    from prefect.artifacts import create_progress_artifact, update_progress_artifact
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    log = get_run_logger()
    total = sum(len(r.shards) for r in runs)
    began = time.monotonic()
    last_log = began
    no_worker_since = None
    artifact = create_progress_artifact(progress=0.0, description=f"{what}s complete of {total} ({len(runs)} runs on pool {pool})")
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
                done = sum(len(r.shards) for r in runs if r.state is not None and r.state.is_completed())
                update_progress_artifact(artifact, progress=100.0 * done / total)
                open_runs = [r for r in runs if r.state is None or not r.state.is_final()]
                if not open_runs:
                    break
                for run in open_runs:
                    if run.started is not None and now - run.started > timeout_s:
                        run.problem = (f"not finished {timeout_s:g}s (the run timeout) after a worker "
                                       f"took it ({run.state.name if run.state else 'unknown'})")
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
                    running = sum(1 for r in open_runs if r.started is not None)
                    rate = done / (now - began)
                    eta = f", about {(total - done) / rate / 60:.1f} min left" if rate > 0 else ""
                    log.info("%ss %d/%d complete, %d runs running, %d waiting%s%s", what, done, total, running,
                             len(open_runs) - running, " (no worker polls pool %r)" % pool if no_worker_since else "", eta)
                time.sleep(poll)
            failed = [r for r in runs if r.problem or not (r.state is not None and r.state.is_completed())]
            if failed:
                described = "; ".join(f"{r.label}: {r.problem or r.state.name}" for r in failed)
                raise ShardRunsFailed(f"{len(failed)} of {len(runs)} {what} runs did not complete ({described}); {rerun}")
        except BaseException as err:
            n = _cancel(client, runs, f"the flow gave up: {err}"[:400])
            if n:
                log.warning("cancelled %d %s runs that had not finished", n, what)
            raise
    log.info("all %d %ss complete in %.0fs", total, what, time.monotonic() - began)


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


@flow(name="gradlake-pipeline", log_prints=True,
      flow_run_name=named_by_model(PipelineSpec, lambda s: s.dataset, "gradlake-pipeline"))
def pipeline(spec: PipelineSpec) -> list[str]:
    """Dataset, extraction (fanned out over GPU workers), projections and evaluation for one model and checkpoint."""
    log = get_run_logger()
    if spec.create is not None:
        create_dataset(spec.dataset_spec())
    planned = []
    for variant in spec.variants:
        extraction = spec.extraction(variant)
        # With a shard deployment the shards run on GPU workers, which check the device themselves.
        path, pending = prepare_extraction_task(extraction, device_here=not spec.shard_deployment)
        planned.append((extraction, path, pending))
    work = [item for item in planned if item[2]]
    if work and spec.shard_deployment:
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            pool = client.read_deployment_by_name(spec.shard_deployment).work_pool_name
        runs = _submit(spec, work)
        log.info("%d shard runs (%d shards of %d variants) submitted to %s on pool %r", len(runs),
                 sum(len(p) for _, _, p in work), len(work), spec.shard_deployment, pool)
        wait_for_shard_runs(runs, pool, spec.shard_timeout_s, spec.worker_wait_s)
    else:
        for extraction, path, pending in work:
            for shard in pending:
                extract_shard_task(extraction, path, shard)
    paths = []
    for extraction, path, _ in planned:
        finalize_task(spec.lake, group_paths(extraction, path))
        paths.append(path)
    if spec.evaluate and "original" in spec.variants and len(spec.variants) > 1:
        queries = [v for v in spec.variants if v != "original"]
        directory = evaluate(EvaluationSpec(model=spec.model, dataset=spec.dataset, queries=queries,
                                            paradigm=spec.paradigm, lake=spec.lake))
        publish_headline(spec.lake, directory)  # the headline on the pipeline's own run page, too
        paths.append(directory)
    log.info("pipeline for %s done: %s", spec.model.model, paths)
    return paths
