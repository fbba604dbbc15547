"""The end-to-end pipeline for one model and checkpoint, and the GPU stage it fans out to.

``gradlake-pipeline`` runs on the ``cpu`` pool: (optionally) dataset creation, then it plans
and creates the gradient group of every variant and sends their pending shards to the
``extract-shards`` deployment on the ``gpu`` pool; then it finalizes the groups, evaluates
select vs project and puts the headline on its own run page.

The GPU stage is shared out by work stealing: one GPU flow run per worker polling the pool
(or `gpu_runs`), each given every pending shard of every variant and starting at a different
place in that list, so the variants are extracted together and a run's start-up (a process,
imports, the model load: tens of seconds) is paid once per worker, not once per shard.  A run
skips the shards whose chunks another live run is computing (chunk leases, `lake.claims`) and
comes back to them at the end, waiting for them; one completed run has therefore seen every
shard complete, and the pipeline then cancels the rest.  A run that dies (a killed worker)
leaves its leased chunks to run out (`LEASE_SECONDS`), and the other runs then compute them.
`shards_per_run` brings back the fixed split (one run per that many shards, each its own).

Every shard writes only its own chunks and their completion flags, so whatever a failed
pipeline leaves is resumed by the next run; finished chunks are never recomputed.  When the
pipeline gives up (no worker polls the pool; no chunk completes for `shard_timeout_s`; every
run ended without finishing the work) it cancels the GPU runs it submitted that are still
waiting or running, so none of them writes after it has failed.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Literal

import numpy as np
from prefect import flow, get_run_logger, runtime
from prefect.deployments import run_deployment
from pydantic import BaseModel, ConfigDict, Field

from gradlake.flows.dataset import DatasetRecipe, DatasetSpec, create_dataset
from gradlake.flows.evaluate import evaluate, publish_headline
from gradlake.flows.run_names import named_by_model, run_label
from gradlake.lake import layout
from gradlake.tasks.evaluate.evaluation import EvaluationSpec
from gradlake.tasks.common.lineage import lake_keys
from gradlake.tasks.gradients.extract import (DEFAULT_TOKEN_BUDGET, ExtractionSpec, extract_shard_task, finalize_task,
    group_paths, prepare_extraction_task)
from gradlake.tasks.common.model import ModelSpec
from gradlake.tasks.projection.projectors import ProjectionSpec

SHARD_DEPLOYMENT = "extract-shards/extract-shards"


class PipelineSettings(BaseModel):
    """How a checkpoint goes through the pipeline: everything but the model and the lake (the watcher's form too)."""

    model_config = ConfigDict(extra="forbid")

    dataset: str = Field(default="probe", title="Dataset", description="Dataset name in the lake.")
    create: DatasetRecipe | None = Field(default=None, title="Create the dataset first", description="Make (or update) the dataset from a source before extracting; stored under the dataset name above in this pipeline's lake. Empty: it is already in the lake.")
    variants: list[str] = Field(default=["original", "paraphrased"], title="Variants", description="Dataset variants to extract; 'model_generated' means this model and checkpoint's own answers. 'original' is needed for the evaluation.")
    paradigm: Literal["sft", "pre"] = Field(default="sft", title="Paradigm", description="'sft': loss on assistant tokens only; 'pre': loss on every token.")
    layers: list[str] = Field(default=[], title="Layers", description="Glob patterns over parameter names, e.g. 'model.layers.*.mlp.down_proj.weight'; empty selects every parameter.")
    chat_template: str = Field(default="tokenizer", title="Chat template", description="'tokenizer' (its own), 'tulu' (open-instruct's format, as the thesis used) or the path of a Jinja file readable where this flow runs.")
    labels: Literal["assistant", "last_assistant"] = Field(default="assistant", title="Loss on", description="Paradigm 'sft': every assistant turn, or the last one only (as the thesis).")
    target: Literal["parameters", "inputs_embeds", "inputs_embeds_mean"] = Field(default="parameters", title="Gradient with respect to", description="'parameters': the weights chosen by Layers. 'inputs_embeds': the input embeddings, per token (max length x hidden values a sample); 'inputs_embeds_mean': their mean over the sample's tokens. Each target has groups and evaluations of its own.")
    shard_size: int = Field(default=64, ge=1, title="Shard size", description="Samples per shard: the unit of retry, resume and sharing between GPU runs. A scheduling choice: changing it reuses finished gradients.")
    batch_size: int = Field(default=8, ge=1, title="Batch size", description="Samples per backward pass at most. A scheduling choice too.")
    token_budget: int | None = Field(default=DEFAULT_TOKEN_BUDGET, ge=1, title="Token budget", description="Tokens per backward pass at most, padding included: a shard's samples are sorted by length and packed. Empty: batches of the batch size in dataset order.")
    max_length: int = Field(default=1024, ge=2, title="Max length (tokens)", description="Tokens per sample at most; longer chats are cut on the right.")
    projections: list[ProjectionSpec] = Field(default=[], title="Projections", description="Random projections made on the fly, each stored in a group of its own.")
    keep_gradients: bool = Field(default=True, title="Keep gradients", description="Store the full per-sample gradients too (off: only the projections).")
    object_mb: int = Field(default=0, ge=0, title="Lake object size (MiB)", description="Gather a row-chunk's column chunks of a wide tensor into objects of up to this many MiB (Zarr shards): about 12x fewer S3 objects and requests at OLMo-2-7B with 256, less concurrency per array. 0: one object per 16 MiB chunk. Fixed by the run that creates a group.")
    evaluate: bool = Field(default=True, title="Evaluate", description="Evaluate select vs project at the end (needs 'original' and at least one other variant).")
    bm25: Literal["lucene", "thesis"] = Field(default="lucene", title="BM25 protocol", description="'lucene': bm25s over the user turns, Unicode words. 'thesis': the 'Select or Project?' thesis's Okapi over the first message, its sort and tie rules; results go beside the default ones (sft-thesis).")
    shard_deployment: str | None = Field(default=SHARD_DEPLOYMENT, title="Shard deployment", description="Deployment that runs shards on the GPU pool ('flow/deployment'); empty runs them inside this flow run.")
    gpu_runs: int | None = Field(default=None, ge=1, title="GPU runs", description="GPU flow runs that share the shards, each given every shard of every variant and loading the model once. Empty: one per worker polling the GPU pool when the shards are sent (at most the pool's concurrency limit).")
    shards_per_run: int | None = Field(default=None, ge=1, title="Shards per GPU run (fixed split)", description="Empty: the shards are shared by the GPU runs above. A number: instead one GPU run per this many shards of a variant, each computing only its own (a process start-up and model load per run).")
    shard_timeout_s: float = Field(default=6 * 3600, gt=0, title="Stall timeout (seconds)", description="Longest the GPU runs may go without completing a chunk once a worker has taken one; then they are cancelled and the pipeline fails (the next run resumes). Keep it above the chunk lease (600 s), after which the chunks of a run that died are computed by the others.")
    worker_wait_s: float = Field(default=900, gt=0, title="Wait for a worker (seconds)", description="How long GPU runs may wait while no worker polls their pool; then the pipeline cancels them and fails, naming the pool.")


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
                              chat_template=self.chat_template, labels=self.labels, target=self.target,
                              shard_size=self.shard_size, batch_size=self.batch_size, token_budget=self.token_budget,
                              max_length=self.max_length,
                              projections=self.projections, keep_gradients=self.keep_gradients, object_mb=self.object_mb,
                              lake=self.lake)


class ShardWork(BaseModel):
    """Shards of one extraction for a GPU run: the extraction, its gradient group (made by the plan) and which shards."""

    model_config = ConfigDict(extra="forbid")

    spec: ExtractionSpec = Field(title="Extraction", description="The extraction (one variant) the shards belong to.")
    path: str = Field(title="Gradient group", description="Path of the extraction's gradient group in the lake; the pipeline's plan created it.")
    shards: list[int] = Field(title="Shards", description="Indices of the shards (of the extraction's shard size) to compute.")


Unit = tuple[ExtractionSpec, str, int]  # an extraction, its group's path, one shard


def visit_shards(units: list[Unit], start: int, extract: Callable[[ExtractionSpec, str, int, bool], int | None]) -> int:
    """Compute every shard, from position `start` on and around, leaving those another live run is computing to the end.

    `extract(spec, path, shard, wait)` computes one shard's unfinished chunks and returns the samples
    computed; with `wait` off it returns None instead of waiting for chunks another live run holds.
    Shards left so are visited again at the end, waiting for them (or taking over a dead run's chunks
    once their leases run out), so every shard is complete when this returns.  Returns samples computed.
    """
    if not units:
        return 0
    start %= len(units)
    computed, left = 0, []
    for unit in units[start:] + units[:start]:
        samples = extract(*unit, False)
        if samples is None:
            left.append(unit)
        else:
            computed += samples
    for unit in left:
        computed += extract(*unit, True) or 0
    return computed


@flow(name="extract-shards", log_prints=True)
def extract_shards(work: list[ShardWork], start: int = 0) -> int:
    """The GPU stage: compute shards of existing gradient groups in one process, the model loaded once for all of them.

    Args:
        work: The shards to compute, one entry per extraction (variant); the pipeline gives every run all of them.
        start: Position in the list of all the shards where this run begins (runs given the same list begin apart).
    """
    worker = os.environ.get("PREFECT__WORKER_NAME", "in-process")
    units = [(item.spec, item.path, shard) for item in work for shard in item.shards]
    get_run_logger().info("%d shards of %s from position %d on worker %s (host %s)", len(units),
                          ", ".join(item.spec.variant for item in work), start, worker, socket.gethostname())
    return visit_shards(units, start, lambda spec, path, shard, wait: extract_shard_task(spec, path, shard, wait=wait))


@dataclass
class ShardRun:
    """One submitted flow run and what the pipeline knows of it; `shards` are the units of work it was given."""

    label: str
    shards: list[Hashable]
    run_id: object
    state: object = None
    started: float | None = None  # monotonic time the run was first seen taken by a worker
    problem: str | None = None


class ShardRunsFailed(RuntimeError):
    """GPU runs that did not finish their work; the next pipeline run redoes only what is left."""


def gpu_run_count(spec: PipelineSpec, client, pool: str, n_shards: int) -> int:
    """How many GPU runs share `n_shards`: `spec.gpu_runs`, else one per worker polling `pool` (within its limit); at least one."""
    wanted = spec.gpu_runs
    if wanted is None:
        wanted = len(polling_workers(client, pool))
        limit = client.read_work_pool(pool).concurrency_limit
        if limit is not None:
            wanted = min(wanted, limit)
    return max(1, min(wanted, n_shards))


def _submit(spec: PipelineSpec, work: list[tuple[ExtractionSpec, str, list[int]]], n_runs: int) -> list[ShardRun]:
    """Create the GPU runs: `n_runs` given every shard (each starting elsewhere), or the fixed split of `shards_per_run`."""
    batches = []  # (label, work, start)
    if spec.shards_per_run:
        for extraction, path, pending in work:
            for i in range(0, len(pending), spec.shards_per_run):
                shards = pending[i:i + spec.shards_per_run]
                span = f"{shards[0]}" if len(shards) == 1 else f"{shards[0]}-{shards[-1]}"
                batches.append((f"{extraction.variant} shards {span}", [(extraction, path, shards)], 0))
    else:
        n_shards = sum(len(pending) for _, _, pending in work)
        variants = "+".join(extraction.variant for extraction, _, _ in work)
        for i in range(n_runs):
            batches.append((f"{variants} run {i + 1}/{n_runs}", work, i * n_shards // n_runs))
    runs = []
    for what, given, start in batches:
        parameters = {"work": [ShardWork(spec=e, path=p, shards=s).model_dump(mode="json") for e, p, s in given], "start": start}
        # A retried pipeline with the same work gets the same run back instead of a duplicate.
        digest = hashlib.sha256(json.dumps(parameters, sort_keys=True).encode()).hexdigest()[:16]
        label = run_label(spec.model, what)
        run = run_deployment(spec.shard_deployment, timeout=0, idempotency_key=f"{runtime.flow_run.id}:{digest}",
                             flow_run_name=label, parameters=parameters)
        runs.append(ShardRun(label, [(p, shard) for _, p, s in given for shard in s], run.id))
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


def lake_progress(lake: str, work: list[tuple[ExtractionSpec, str, list[int]]], every: float = 10.0) -> Callable[[], tuple[int, int]]:
    """A function giving (row-chunks complete, row-chunks in all) over the groups of `work` (projection groups too).

    A completion flag is an object of its own, so only the flags not yet seen set are read, and at
    most every `every` seconds (in between the last count is returned).
    """
    from gradlake.lake.gradients import GradientGroup
    from gradlake.lake.store import LakeStore

    store = LakeStore(lake)
    groups = [GradientGroup.open(store, p) for extraction, path, _ in work for p in group_paths(extraction, path)]
    pending = [np.flatnonzero(~g.done_chunks()) for g in groups]
    total = sum(g.plan.n_chunks for g in groups)
    last = [float("-inf"), 0]

    def progress() -> tuple[int, int]:
        if time.monotonic() - last[0] >= every:
            for i, group in enumerate(groups):
                if len(pending[i]):
                    flags = group.group["shard_complete"].get_coordinate_selection(pending[i])
                    pending[i] = pending[i][~flags.astype(bool)]
            last[:] = [time.monotonic(), total - sum(len(p) for p in pending)]
        return last[1], total

    return progress


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
    last_done, last_rise, first_done = None, began, 0
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
                    first_done = done if last_done is None else first_done
                    last_done, last_rise = done, now
                open_runs = [r for r in runs if r.state is None or not r.state.is_final()]
                if covered >= units or not open_runs:
                    break
                taken = [r for r in open_runs if r.started is not None]
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
                    rate = (done - first_done) / (now - began)
                    eta = f", about {(total - done) / rate / 60:.1f} min left" if rate > 0 else ""
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


@flow(name="gradlake-pipeline", log_prints=True,
      flow_run_name=named_by_model(PipelineSpec, lambda s: s.dataset, "gradlake-pipeline"))
def pipeline(spec: PipelineSpec) -> list[str]:
    """Dataset, extraction (shared by GPU workers), projections and evaluation for one model and checkpoint."""
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
    n_shards = sum(len(pending) for _, _, pending in work)
    if work and spec.shard_deployment:
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            pool = client.read_deployment_by_name(spec.shard_deployment).work_pool_name
            n_runs = gpu_run_count(spec, client, pool, n_shards)
        runs = _submit(spec, work, n_runs)
        log.info("%d GPU runs (%d shards of %d variants%s) submitted to %s on pool %r", len(runs), n_shards, len(work),
                 ", each given all" if not spec.shards_per_run else "", spec.shard_deployment, pool)
        wait_for_shard_runs(runs, pool, spec.shard_timeout_s, spec.worker_wait_s, progress=lake_progress(spec.lake, work))
    elif work:
        units = [(extraction, path, shard) for extraction, path, pending in work for shard in pending]
        visit_shards(units, 0, lambda e, path, shard, wait: extract_shard_task(e, path, shard, wait=wait))
    paths = []
    for extraction, path, _ in planned:
        finalize_task(spec.lake, group_paths(extraction, path))
        paths.append(path)
    if spec.evaluate and "original" in spec.variants and len(spec.variants) > 1:
        queries = [v for v in spec.variants if v != "original"]
        directory = evaluate(EvaluationSpec(model=spec.model, dataset=spec.dataset, queries=queries,
                                            paradigm=spec.paradigm, target=spec.target, bm25=spec.bm25, lake=spec.lake))
        publish_headline(spec.lake, directory)  # the headline on the pipeline's own run page, too
        paths.append(directory)
    log.info("pipeline for %s done: %s", spec.model.model, paths)
    return paths
