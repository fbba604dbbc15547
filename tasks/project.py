"""The projection stage: project stored per-tensor gradients into a group of their own, shard by shard.

A projection group sits beside the gradient group it was made from
(``<paradigm>-proj-<kind>-<scope>-d<dim>-s<seed>``), holds the same sample ids and
tokens, one array per tensor (or one ``flat`` array), and cites its source group and
projection settings in its lineage.  It resumes like a gradient group.
"""

from __future__ import annotations

import time
from functools import lru_cache

import numpy as np
import torch
from prefect import get_run_logger, task
from prefect.cache_policies import NONE
from pydantic import BaseModel, ConfigDict, Field

from lake.gradients import GradientGroup, GradientPlan
from lake.store import LakeError, LakeStore
from tasks.extract import default_lake, retry_unless_bad_input
from tasks.projection import MEMORY_BUDGET, ProjectionSpec, check_projection, make_projector

FLAT = "flat"


class ProjectSpec(BaseModel):
    """Which stored gradients to project, and how."""

    model_config = ConfigDict(extra="forbid")

    gradients: str = Field(description="Path of a stored gradient group in the lake (mode 'store'), as the catalog lists it.")
    projection: ProjectionSpec = Field(description="Projection type, dimension, seed and scope.")
    device: str = Field(default="cpu", description="Where the projection runs: 'cpu' or 'cuda'.")
    lake: str = Field(default_factory=default_lake, description="Lake URL.")


def projection_key(spec: ProjectionSpec) -> str:
    return f"proj-{spec.kind}-{spec.scope}-d{spec.dim}-s{spec.seed}"


def projection_path(gradient_path: str, spec: ProjectionSpec) -> str:
    """The projection group's path: a sibling of its gradient group."""
    parent, leaf = gradient_path.rsplit("/", 1)
    paradigm = leaf.split("-", 1)[0]
    return f"{parent}/{paradigm}-{projection_key(spec)}"


def output_dims(spec: ProjectionSpec, sizes: dict[str, int]) -> dict[str, int]:
    """Array name -> dimension of the projection group."""
    dims = check_projection(spec, sizes)
    return {FLAT: spec.dim} if spec.scope == "flat" else dims


def projectors_for(spec: ProjectionSpec, sizes: dict[str, int], device="cpu") -> dict:
    """One projector per tensor, each from the seed and the tensor's name alone; kept for the next shard."""
    return dict(_projectors(spec, tuple(sizes.items()), str(device)))


@lru_cache(maxsize=2)
def _projectors(spec: ProjectionSpec, sizes: tuple[tuple[str, int], ...], device: str) -> tuple:
    dims = check_projection(spec, dict(sizes))
    out, budget = [], MEMORY_BUDGET  # one budget for all tensors' cached matrices together
    for name, n in sizes:
        projector = make_projector(n, dims[name], spec.kind, spec.seed, name, device, memory_budget=budget)
        budget -= n * dims[name] * 4 if getattr(projector, "cached", False) else 0
        out.append((name, projector))
    return tuple(out)


def project_batch(spec: ProjectionSpec, grads: dict[str, torch.Tensor], projectors: dict) -> dict[str, torch.Tensor]:
    """Project one batch of per-tensor gradients: {array name: (batch, dim)}."""
    if spec.scope == "flat":
        total = None
        for name, g in grads.items():
            part = projectors[name].project(g)
            total = part if total is None else total + part
        return {FLAT: total}
    return {name: projectors[name].project(g) for name, g in grads.items()}


def create_projection_group(spec: ProjectSpec) -> GradientGroup:
    """Check the settings against the source group, then create (or reopen) the projection group."""
    store = LakeStore(spec.lake)
    source = GradientGroup.open(store, spec.gradients)
    if source.plan.mode != "store":
        raise LakeError(f"group {spec.gradients!r} holds mode {source.plan.mode!r}; only per-sample ('store') gradients can be projected")
    if source.lineage.get("projection"):
        raise LakeError(f"group {spec.gradients!r} is itself a projection; project the gradient group it was made from")
    sizes = {name: source.plan.numel(name) for name in source.plan.parameters}
    dims = output_dims(spec.projection, sizes)
    projectors = projectors_for(spec.projection, sizes, "cpu" if spec.device == "cpu" else spec.device)
    plan = GradientPlan(n_samples=source.plan.n_samples, shard_size=source.plan.shard_size,
                        batch_size=source.plan.batch_size, parameters={n: [d] for n, d in dims.items()},
                        mode="store", dtype="float32", max_tokens=source.plan.max_tokens)
    lineage = {**source.lineage, "projection": {**spec.projection.model_dump(), "dims": dims,
                                                "projectors": {n: p.name for n, p in projectors.items()},
                                                "source_group": spec.gradients}}
    lineage.pop("created_at", None)
    group = source.group
    return GradientGroup.create(store, projection_path(spec.gradients, spec.projection), plan, lineage,
                                [str(s) for s in group["sample"][:]], group["input_ids"][:], group["label_mask"][:])


def project_shard(spec: ProjectSpec, target: GradientGroup, shard: int, log=print) -> int:
    """Project one shard of the source group into the projection group, then flag it complete."""
    store = LakeStore(spec.lake)
    source = GradientGroup.open(store, spec.gradients)
    sizes = {name: source.plan.numel(name) for name in source.plan.parameters}
    projectors = projectors_for(spec.projection, sizes, spec.device)
    start, stop = target.shard_bounds(shard)
    began = time.perf_counter()
    for offset in range(start, stop, target.plan.batch_size):
        end = min(offset + target.plan.batch_size, stop)
        grads = {n: torch.from_numpy(np.asarray(source.group[n][offset:end], dtype=np.float32)) for n in sizes}
        projected = project_batch(spec.projection, grads, projectors)
        target.write_rows(offset, {n: p.cpu().numpy() for n, p in projected.items()})
    target.mark_complete(shard)
    log(f"projected shard {shard + 1}/{target.plan.n_shards} ({stop - start} samples) in {time.perf_counter() - began:.1f}s")
    return stop - start


@task(name="create-projection-group", cache_policy=NONE, retries=2, retry_delay_seconds=[5, 30],
      retry_condition_fn=retry_unless_bad_input)
def create_projection_task(spec: ProjectSpec) -> tuple[str, list[int]]:
    group = create_projection_group(spec)
    get_run_logger().info("projection group %s: %d shards to do", group.path, len(group.pending_shards()))
    return group.path, group.pending_shards()


@task(name="project-shard", cache_policy=NONE, retries=2, retry_delay_seconds=[10, 60],
      retry_condition_fn=retry_unless_bad_input, task_run_name="project-shard-{shard}")
def project_shard_task(spec: ProjectSpec, path: str, shard: int) -> int:
    target = GradientGroup.open(LakeStore(spec.lake), path)
    return project_shard(spec, target, shard, log=get_run_logger().info)
