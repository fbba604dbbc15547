"""The end-to-end pipeline for one model and checkpoint, and how it fans out to its GPU stage.

``gradlake-pipeline`` runs on the ``cpu`` pool: (optionally) dataset creation, then it plans
and creates the gradient group of every variant and sends their pending shards to the
``extract-shards`` deployment on the ``gpu`` pool (`gradlake.flows.extract:extract_shards`); then it finalizes the groups, evaluates
select vs project and puts the headline on its own run page.

The GPU stage is shared out by work stealing: one GPU flow run per worker polling the pool
(or `gpu_runs`), each given every pending shard of every variant and starting at a different
place in that list, so the variants are extracted together and a run's start-up (a process,
imports, the model load: tens of seconds) is paid once per worker, not once per shard.  A run
skips the shards whose chunks another live run is computing (chunk leases, `lake.leases`) and
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
import time
from collections.abc import Callable
from typing import Literal

import numpy as np
from prefect import flow, get_run_logger, runtime
from prefect.deployments import run_deployment
from pydantic import BaseModel, ConfigDict, Field

from gradlake.flows.dataset import create_dataset
from gradlake.flows.evaluate import evaluate, publish_headline
from gradlake.flows.extract import ShardWork, extract_shards, visit_shards  # extract_shards: the GPU stage's former entrypoint
from gradlake.flows.fanout import ShardRun, polling_workers, wait_for_shard_runs
from gradlake.flows.run_names import named_by_model, run_label
from gradlake.lake import layout
from gradlake.tasks.common.lineage import lake_keys
from gradlake.tasks.common.model import ModelSpec
from gradlake.tasks.data.dataset import DatasetRecipe, DatasetSpec
from gradlake.tasks.evaluate.spec import EvaluationSpec
from gradlake.tasks.gradients.extract import extract_shard_task, finalize_task, prepare_extraction_task
from gradlake.tasks.gradients.plan import ExtractionData, ExtractionSettings, ExtractionSpec, group_paths


SHARD_DEPLOYMENT = "extract-shards/extract-shards"


CREATE_TITLE = "Create the dataset first"


class _PipelineData(ExtractionData):  # the dataset, how it is made and which variants: first in the form
    create: DatasetRecipe | None = Field(default=None, title=CREATE_TITLE, description="Make (or update) the dataset from a source before extracting; stored under the dataset name above in this pipeline's lake. Set it (DatasetRecipe in the form, --create on the command line) with nothing else filled in for the probe set bundled with gradlake (source 'bundled:probe', its paraphrases included). Empty (None): the dataset is already in the lake.")
    variants: list[str] = Field(default=["original", "paraphrased"], title="Variants", description="Dataset variants to extract; 'model_generated' means this model and checkpoint's own answers. 'original' is needed for the evaluation.")


class PipelineSettings(ExtractionSettings, _PipelineData):
    """How a checkpoint goes through the pipeline: everything but the model and the lake (the watcher's form too).

    The extraction settings are `ExtractionSettings`' own; the pipeline always stores every sample's
    gradient (mode 'store') as float32."""

    model_config = ConfigDict(extra="forbid")

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
        """The extraction of one variant ('model_generated': this model and checkpoint's answers)."""
        name = layout.generated_variant(*lake_keys(self.model)) if variant == "model_generated" else variant
        shared = self.model_dump(include=set(ExtractionSettings.model_fields) | set(ExtractionData.model_fields))
        return ExtractionSpec(**shared, model=self.model, variant=name, lake=self.lake)


def require_dataset(spec: PipelineSpec) -> None:
    """One error that says how to make the dataset when a variant to extract is not in the lake (before any GPU run)."""
    from gradlake.lake.datasets import list_datasets
    from gradlake.lake.store import LakeError, LakeStore

    held = {(m["dataset"], m["variant"]) for m in list_datasets(LakeStore(spec.lake))}  # a damaged one counts as held
    wanted = [spec.extraction(v).variant for v in spec.variants]
    missing = [v for v in wanted if (spec.dataset, v) not in held]
    if not missing:
        return
    has = sorted(v for d, v in held if d == spec.dataset)
    where = (f"dataset {spec.dataset!r} has no variant {', '.join(map(repr, missing))} in lake {spec.lake} "
             f"(it has {', '.join(map(repr, has))})" if has else
             f"dataset {spec.dataset!r} is not in lake {spec.lake} (" +
             (f"it holds {', '.join(sorted({d for d, _ in held}))})" if held else "it holds no datasets yet)"))
    if not has and spec.create is None:
        shell = (f"`gradlake dataset probe --lake {spec.lake}`" if spec.dataset == "probe" else
                 f"`gradlake dataset create --name {spec.dataset} --source <hub id or file> --lake {spec.lake}`")
        raise LakeError(f"{where}. Create it first: in this run's form set '{CREATE_TITLE}' to DatasetRecipe (its source "
                        "defaults to 'bundled:probe', the probe set bundled with gradlake, paraphrases included; or name "
                        f"your own source there), or run {shell} once and start this run again")
    how = ("a paraphrase column or paraphrase settings for 'paraphrased', this model under 'Models that answer' for "
           "'model_generated'")
    if spec.create is not None:  # the recipe ran and did not make them
        raise LakeError(f"{where}: '{CREATE_TITLE}' made no such variant; give it {how}, or remove the variant from "
                        "'Variants'")
    raise LakeError(f"{where}: make it with '{CREATE_TITLE}' (the dataset's source again, with {how}), or remove it "
                    "from 'Variants'")


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


@flow(name="gradlake-pipeline", log_prints=True,
      flow_run_name=named_by_model(PipelineSpec, lambda s: s.dataset, "gradlake-pipeline"))
def pipeline(spec: PipelineSpec) -> list[str]:
    """Dataset, extraction (shared by GPU workers), projections and evaluation for one model and checkpoint."""
    log = get_run_logger()
    if spec.create is not None:
        create_dataset(spec.dataset_spec())
    require_dataset(spec)
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
        original = next(path for extraction, path, _ in planned if extraction.variant == "original")
        directory = evaluate(EvaluationSpec(model=spec.model, dataset=spec.dataset, queries=queries,
                                            paradigm=spec.paradigm, target=spec.target, bm25=spec.bm25, lake=spec.lake,
                                            extraction=original.rsplit("/", 1)[-1]))
        publish_headline(spec.lake, directory)  # the headline on the pipeline's own run page, too
        paths.append(directory)
    log.info("pipeline for %s done: %s", spec.model.model, paths)
    return paths
