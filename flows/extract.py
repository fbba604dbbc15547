"""The gradient extraction flow: validate and create the group, run its shards, finalize."""

from __future__ import annotations

from prefect import flow, get_run_logger

from gradlake.tasks.extract import ExtractionSpec, extract_shard_task, finalize_task, group_paths, prepare_extraction_task


@flow(name="extract-gradients", log_prints=True)
def extract_gradients(spec: ExtractionSpec) -> str:
    """Per-sample gradients of `spec.model` on a lake dataset, into one Zarr group; returns its path."""
    path, pending = prepare_extraction_task(spec)
    for shard in pending:
        extract_shard_task(spec, path, shard)
    finalize_task(spec.lake, group_paths(spec, path))
    get_run_logger().info("gradients complete at %s/%s", spec.lake, path)
    return path


if __name__ == "__main__":
    extract_gradients.serve(name="extract-gradients")
