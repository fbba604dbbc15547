"""The gradient extraction flows: a whole extraction in one run, and the pipeline's GPU stage (`extract_shards`).

The GPU stage lives here rather than beside the pipeline so that its flow runs import only what extraction needs:
the pipeline's module brings the dataset recipes (the paraphrasing client) and the evaluation, about 1.5 CPU-s of
imports in every GPU flow run's process start."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable

from prefect import flow, get_run_logger
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from pydantic import BaseModel, ConfigDict, Field

from gradlake.tasks.gradients.plan import ExtractionSpec, group_paths
from gradlake.tasks.common.progress import Progress
from gradlake.tasks.gradients.extract import extract_shard_task, finalize_task, prepare_extraction_task


@flow(name="extract-gradients", log_prints=True)
def extract_gradients(spec: ExtractionSpec) -> str:
    """Per-sample gradients of `spec.model` on a lake dataset, into one Zarr group; returns its path."""
    log = get_run_logger()
    path, pending = prepare_extraction_task(spec)
    # Overall progress across shards, in the log and on the run page (a progress artifact).
    progress = Progress(len(pending), "shards", log.info, every=0)
    artifact = create_progress_artifact(progress.percent, description=f"shards of {spec.variant} done, of {len(pending)} to do")
    samples = 0
    for shard in pending:
        samples += extract_shard_task(spec, path, shard)
        progress.add(1, f"{spec.variant}: ", f" ({samples} samples, {samples / max(progress.elapsed, 1e-9):.2f}/s)")
        update_progress_artifact(artifact, progress.percent)
    finalize_task(spec.lake, group_paths(spec, path))
    log.info("gradients complete at %s/%s", spec.lake, path)
    return path


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


if __name__ == "__main__":
    extract_gradients.serve(name="extract-gradients")
