"""The gradient extraction flow: validate and create the group, run its shards, finalize."""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import create_progress_artifact, update_progress_artifact

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


if __name__ == "__main__":
    extract_gradients.serve(name="extract-gradients")
