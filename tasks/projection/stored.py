"""The projection stage: project stored per-tensor gradients into a group of their own, shard by shard.

A projection group sits beside the gradient group it was made from
(``<stem>-proj-<kind>-<scope>-d<dim>-s<seed>``, ``<group>-proj-...`` beside a group named by its
settings: ``lake.layout.projection_group_path``; for kind ``kronecker`` the scope
segment is ``<k_out>x<k_in>``), holds the same sample ids and
tokens, one array per tensor (or one ``flat`` array), and cites its source group and
projection settings in its lineage.  It resumes like a gradient group: per row-chunk,
whatever shard size the run that wrote a chunk used.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
from prefect import get_run_logger, task
from prefect.cache_policies import NONE
from pydantic import BaseModel, ConfigDict, Field

from gradlake.lake import layout
from gradlake.lake.assembly import ChunkRows
from gradlake.lake.gradients import GradientGroup
from gradlake.lake.gradient_plan import GradientPlan, check_shard_size, stored_chunk_rows
from gradlake.lake.integrity import read_checked
from gradlake.lake.store import LakeError, LakeStore, default_lake
from gradlake.tasks.common.retries import retry_unless_bad_input
from gradlake.tasks.projection.projectors import project_batch, projector_choices, projectors_for, regeneration_seconds
from gradlake.tasks.projection.spec import ProjectionSpec, output_dims


READ_BUDGET = 256 << 20  # bytes of stored gradients read and projected per call
SHARD_SAMPLES = 64  # default shard size, rounded up to whole chunks


class ProjectSpec(BaseModel):
    """Which stored gradients to project, and how."""

    model_config = ConfigDict(extra="forbid")

    gradients: str = Field(description="Path of a stored gradient group in the lake (mode 'store'), as the catalog lists it.")
    projection: ProjectionSpec = Field(description="Projection type, dimension, seed and scope.")
    device: str = Field(default="cpu", description="Where the projection runs: 'cpu' or 'cuda'.")
    shard_size: int | None = Field(default=None, ge=1, description="Samples per shard (the unit of retry); a multiple of the group's chunk height. Empty: the smallest such multiple of at least 64. A scheduling choice: changing it reuses finished projections.")
    lake: str = Field(default_factory=default_lake, description="Lake URL.")

    _gradients = layout.name_fields("gradients", relative=True)


def projection_path(gradient_path: str, spec: ProjectionSpec) -> str:
    """The projection group's path: a sibling of its gradient group, ``<stem>-proj-<setting>`` of a
    ``<stem>-store`` group, ``<group>-proj-<setting>`` of a named one (``lake.layout.projection_group_path``)."""
    return layout.projection_group_path(gradient_path, spec.label)


def projection_group_plan(source_path: str, source_plan: GradientPlan, source_lineage: dict,
                          shapes: dict[str, tuple[int, ...]], spec: ProjectionSpec,
                          device="cpu", check_cost: bool = True) -> tuple[str, GradientPlan, dict]:
    """Path, plan and lineage of the group holding `spec`'s projections of a gradient group.

    The same whether the projections are made on the fly during extraction or afterwards
    from stored gradients, so either run recognises the other's group.  Checks the
    settings (one clear error) and builds no matrix.  `check_cost` off: a plan made for other machines,
    whose cost there is not known here (the workers check it when they build the projectors).
    """
    dims = output_dims(spec, shapes)
    plan = GradientPlan(n_samples=source_plan.n_samples, parameters={n: [d] for n, d in dims.items()},
                        mode="store", dtype="float32", max_tokens=source_plan.max_tokens,
                        chunk_rows=source_plan.chunk_rows, object_bytes=source_plan.object_bytes)
    lineage = {k: v for k, v in source_lineage.items() if k not in ("created_at", "gradients_kept")}
    lineage["projection"] = {**spec.model_dump(), "dims": dims, "projectors": projector_choices(spec, shapes, device, check_cost),
                             "source_group": source_path}
    return projection_path(source_path, spec), plan, lineage


def create_projection_group(spec: ProjectSpec) -> GradientGroup:
    """Check the settings against the stored source group, then create (or reopen) the projection group."""
    store = LakeStore(spec.lake)
    source = GradientGroup.open(store, spec.gradients)
    if source.plan.mode != "store":
        raise LakeError(f"group {spec.gradients!r} holds mode {source.plan.mode!r}; only per-sample ('store') gradients can be projected")
    if source.lineage.get("projection"):
        raise LakeError(f"group {spec.gradients!r} is itself a projection; project the gradient group it was made from")
    if not source.plan.parameters:
        raise LakeError(f"group {spec.gradients!r} kept no gradients (they were projected on the fly); "
                        "re-extract with keep_gradients to project them afresh")
    shapes = {name: tuple(shape) for name, shape in source.plan.parameters.items()}
    path, plan, lineage = projection_group_plan(spec.gradients, source.plan, source.lineage, shapes, spec.projection,
                                                spec.device)
    shard_size(spec, stored_chunk_rows(store, path) or plan.chunk_rows, path)  # refused before anything is written
    # The tokens are copied checked against the digests recorded with them: damage is named, never carried over.
    return GradientGroup.create(store, path, plan, lineage, [str(s) for s in source.tokens("sample")],
                                source.tokens("input_ids"), source.tokens("label_mask"))


def shard_size(spec: ProjectSpec, chunk_rows: int, path: str) -> int:
    """The run's shard size: the one asked for (whole chunks), else the smallest multiple of the chunks of at least 64."""
    if spec.shard_size is None:
        return chunk_rows * max(1, -(-SHARD_SAMPLES // chunk_rows))
    check_shard_size(spec.shard_size, chunk_rows, path)
    return spec.shard_size


def _runs(chunks: list[int]) -> list[tuple[int, int]]:
    """Consecutive chunk indexes as [first, last] runs: [1, 2, 3, 7] -> [(1, 3), (7, 7)]."""
    runs: list[tuple[int, int]] = []
    for k in chunks:
        if runs and runs[-1][1] == k - 1:
            runs[-1] = (runs[-1][0], k)
        else:
            runs.append((k, k))
    return runs


def project_shard(spec: ProjectSpec, target: GradientGroup, shard: int, log=print) -> int:
    """Project one shard's unfinished chunks of the source group into the projection group; returns the samples projected."""
    store = LakeStore(spec.lake)
    source = GradientGroup.open(store, spec.gradients)
    shapes = {name: tuple(shape) for name, shape in source.plan.parameters.items()}
    size = shard_size(spec, target.plan.chunk_rows, target.path)
    start, stop = target.shard_bounds(shard, size)
    began = time.perf_counter()
    todo = target.pending_chunks(start, stop)
    projectors = projectors_for(spec.projection, shapes, spec.device) if todo else {}
    writer = ChunkRows(target, todo)
    projected = 0
    for first, last in _runs(todo):  # each run of unfinished chunks at once: finished ones are not redone
        lo, hi = target.plan.chunk_bounds(first)[0], target.plan.chunk_bounds(last)[1]
        out: dict[str, np.ndarray] = {}
        for name, shape in shapes.items():
            # As many rows per call as READ_BUDGET allows: a projector that regenerates its
            # matrix per call (traker.basic, streamed tiles) then pays for it once per run.
            rows = max(1, min(hi - lo, READ_BUDGET // (4 * math.prod(shape))))
            for offset in range(lo, hi, rows):
                end = min(offset + rows, hi)
                grads = torch.from_numpy(read_checked(source.group[name], slice(offset, end), np.float32))
                for key, part in project_batch(spec.projection, {name: grads}, projectors).items():
                    block = out.setdefault(key, np.zeros((hi - lo, part.shape[1]), dtype=np.float32))
                    block[offset - lo:end - lo] += part.cpu().numpy()
        writer.add(lo, hi, out)
        projected += hi - lo
    log(f"projected shard {shard} (samples {start}-{stop - 1}): {projected} samples in {time.perf_counter() - began:.1f}s"
        + ("" if projected else ", all were already done"))
    return projected


def redraw_hours(spec: ProjectSpec, group: GradientGroup, shard_samples: int, shards: int) -> float:
    """Estimated CPU-hours the pending shards spend drawing dense matrices that are not cached (0 on a GPU)."""
    shapes = {n: tuple(s) for n, s in GradientGroup.open(group.store, spec.gradients).plan.parameters.items()}
    seconds = 0.0
    for name, per_call in regeneration_seconds(spec.projection, shapes, spec.device).items():
        rows = max(1, READ_BUDGET // (4 * math.prod(shapes[name])))
        seconds += per_call * shards * math.ceil(shard_samples / rows)
    return seconds / 3600


@task(name="create-projection-group", cache_policy=NONE, retries=2, retry_delay_seconds=[5, 30],
      retry_condition_fn=retry_unless_bad_input)
def create_projection_task(spec: ProjectSpec) -> tuple[str, list[int]]:
    """Create (or reopen) the projection group; returns its path and the shards still to do."""
    group = create_projection_group(spec)
    size = shard_size(spec, group.plan.chunk_rows, group.path)
    pending = group.pending_shards(size)
    hours = redraw_hours(spec, group, size, len(pending))
    if hours > 0.1:  # allowed (each call stays under the per-batch limit), but the user should know now
        get_run_logger().warning(
            "projecting on %s redraws dense random matrices on every call of %d MiB of stored rows: about %.1f "
            "CPU-hours for the %d shards to do; kind 'kronecker' or 'sparse', or a GPU with fast_jl, costs far less",
            spec.device, READ_BUDGET >> 20, hours, len(pending))
    get_run_logger().info("projection group %s: %d/%d shards of %d samples to do", group.path, len(pending),
                          layout.n_shards(group.plan.n_samples, size), size)
    return group.path, pending


@task(name="project-shard", cache_policy=NONE, retries=2, retry_delay_seconds=[10, 60],
      retry_condition_fn=retry_unless_bad_input, task_run_name="project-{spec.projection.label}-shard-{shard}")
def project_shard_task(spec: ProjectSpec, path: str, shard: int) -> int:
    target = GradientGroup.open(LakeStore(spec.lake), path)
    return project_shard(spec, target, shard, log=get_run_logger().info)
