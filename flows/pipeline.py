"""The end-to-end pipeline for one model and checkpoint, and the GPU stage it fans out to.

``gradlake-pipeline`` runs on the ``cpu`` pool: (optionally) dataset creation, then for each
variant it plans and creates the gradient group and sends its shards to the
``extract-shards`` deployment on the ``gpu`` pool, one flow run per ``shards_per_run``
shards, so that N GPU workers share one extraction; then it finalizes the groups and
evaluates select vs project.  Every shard writes only its own chunks and its completion
flag, so a shard run that dies (a killed worker) is simply redone by the next pipeline
run; finished shards are skipped.
"""

from __future__ import annotations

import os
import socket

from prefect import flow, get_run_logger, runtime
from prefect.deployments import run_deployment
from pydantic import BaseModel, ConfigDict, Field

from gradlake.flows.dataset import DatasetSpec, create_dataset
from gradlake.flows.evaluate import evaluate
from gradlake.lake.store import default_lake
from gradlake.tasks.evaluate import EvaluationSpec
from gradlake.tasks.extract import ExtractionSpec, extract_shard_task, finalize_task, group_paths, prepare_extraction_task
from gradlake.tasks.model import ModelSpec
from gradlake.tasks.projection import ProjectionSpec

SHARD_DEPLOYMENT = "extract-shards/extract-shards"


class PipelineSpec(BaseModel):
    """One model and checkpoint through dataset creation, extraction, projection and evaluation."""

    model_config = ConfigDict(extra="forbid")

    model: ModelSpec = Field(description="The model under study and its checkpoint.")
    dataset: str = Field(default="probe", description="Dataset name in the lake.")
    create: DatasetSpec | None = Field(default=None, description="Create (or update) the dataset first; empty: it is already in the lake.")
    variants: list[str] = Field(default_factory=lambda: ["original", "paraphrased"], description="Variants to extract; 'model_generated' means this model and checkpoint's answers. 'original' is needed for the evaluation.")
    paradigm: str = Field(default="sft", description="'sft' or 'pre'.")
    layers: list[str] = Field(default_factory=list, description="Glob patterns over parameter names; empty selects every parameter.")
    shard_size: int = Field(default=64, ge=1, description="Samples per shard.")
    batch_size: int = Field(default=8, ge=1, description="Samples per backward pass.")
    max_length: int = Field(default=1024, ge=2, description="Tokens per sample at most.")
    projections: list[ProjectionSpec] = Field(default_factory=list, description="Projections made on the fly.")
    keep_gradients: bool = Field(default=True, description="Store the full gradients too.")
    evaluate: bool = Field(default=True, description="Evaluate select vs project at the end.")
    shard_deployment: str | None = Field(default=SHARD_DEPLOYMENT, description="Deployment that runs shards on the GPU pool ('flow/deployment'); empty runs them in this flow.")
    shards_per_run: int = Field(default=1, ge=1, description="Shards per GPU flow run.")
    shard_timeout_s: float = Field(default=6 * 3600, gt=0, description="How long to wait for one shard run before giving up (the next pipeline run resumes).")
    lake: str = Field(default_factory=default_lake, description="Lake URL.")

    def extraction(self, variant: str) -> ExtractionSpec:
        from gradlake.lake import layout
        from gradlake.tasks.evaluate import lake_keys

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


def _fan_out(spec: PipelineSpec, extraction: ExtractionSpec, path: str, pending: list[int]) -> None:
    """Send the shards to the GPU pool, one flow run per chunk of shards, and wait for all of them."""
    log = get_run_logger()
    chunks = [pending[i:i + spec.shards_per_run] for i in range(0, len(pending), spec.shards_per_run)]
    runs = []
    for shards in chunks:
        key = f"{runtime.flow_run.id}:{path}:{','.join(map(str, shards))}"  # a retried pipeline task does not duplicate
        runs.append((shards, run_deployment(spec.shard_deployment, parameters={"spec": extraction.model_dump(mode="json"),
                                                                              "path": path, "shards": shards},
                                            timeout=0, idempotency_key=key, flow_run_name=f"shards-{shards[0]}-{shards[-1]}")))
    log.info("%d shard runs submitted to %s for %s", len(runs), spec.shard_deployment, path)
    failed = []
    for shards, run in runs:
        state = wait_for_run(run.id, spec.shard_timeout_s)
        if state is None or not state.is_completed():
            failed.append((shards, state.name if state else "still running"))
    if failed:
        raise RuntimeError(f"shard runs did not complete: {failed}; rerun the pipeline to redo only those shards")


def wait_for_run(run_id, timeout: float, poll: float = 2.0):
    """The final state of a flow run, or None if it is not final within `timeout` seconds."""
    import time

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


@flow(name="gradlake-pipeline", log_prints=True)
def pipeline(spec: PipelineSpec) -> list[str]:
    """Dataset, extraction (fanned out over GPU workers), projections and evaluation for one model and checkpoint."""
    log = get_run_logger()
    if spec.create is not None:
        create_dataset(spec.create)
    paths = []
    for variant in spec.variants:
        extraction = spec.extraction(variant)
        path, pending = prepare_extraction_task(extraction)
        if pending and spec.shard_deployment:
            _fan_out(spec, extraction, path, pending)
        else:
            for shard in pending:
                extract_shard_task(extraction, path, shard)
        finalize_task(spec.lake, group_paths(extraction, path))
        paths.append(path)
    if spec.evaluate and "original" in spec.variants and len(spec.variants) > 1:
        queries = [v for v in spec.variants if v != "original"]
        paths.append(evaluate(EvaluationSpec(model=spec.model, dataset=spec.dataset, queries=queries,
                                             paradigm=spec.paradigm, lake=spec.lake)))
    log.info("pipeline for %s done: %s", spec.model.model, paths)
    return paths
