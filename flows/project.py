"""The projection flow: project a stored gradient group, shard by shard, into a group of its own."""

from __future__ import annotations

from prefect import flow, get_run_logger

from gradlake.tasks.gradients.extract import finalize_task
from gradlake.tasks.projection.stored import ProjectSpec, create_projection_task, project_shard_task


@flow(name="project-gradients", log_prints=True)
def project_gradients(spec: ProjectSpec) -> str:
    """Random projections of stored per-sample gradients; returns the projection group's path."""
    path, pending = create_projection_task(spec)
    for shard in pending:
        project_shard_task(spec, path, shard)
    finalize_task(spec.lake, [path])
    get_run_logger().info("projections complete at %s/%s", spec.lake, path)
    return path
