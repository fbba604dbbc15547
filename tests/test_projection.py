"""Random projections: JL on real stored gradients, reproducible from the seed, agree with TRAK, bounded memory."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from conftest import REPO, write_probe
from flows.extract import extract_gradients
from flows.project import project_gradients
from lake import open_lake
from tasks.extract import ExtractionSpec
from tasks.model import ModelSpec
from tasks.project import ProjectSpec
from tasks.projection import (BlockProjector, ProjectionError, ProjectionSpec, SparseProjector, TrakProjector,
                              check_projection, make_projector)

N = 24


def cosines(x: np.ndarray) -> np.ndarray:
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    return x @ x.T


@pytest.fixture(scope="module")
def stored(tiny_models, tmp_path_factory):
    """A lake with the tiny OLMo-2's per-sample gradients of N probe samples."""
    lake = f"file://{tmp_path_factory.mktemp('proj') / 'lake'}"
    write_probe(lake, N)
    path = extract_gradients(ExtractionSpec(model=ModelSpec(model=str(tiny_models["olmo2"]), checkpoint="checkpoint-1"),
                                            shard_size=8, batch_size=4, max_length=256, lake=lake))
    return lake, path


@pytest.mark.parametrize("kind", ["rademacher", "gaussian", "sparse"])
def test_flat_projection_preserves_cosines(stored, kind):
    lake, path = stored
    dim = 2048
    out = project_gradients(ProjectSpec(gradients=path, projection=ProjectionSpec(kind=kind, dim=dim, scope="flat"), lake=lake))
    opened = open_lake(lake)
    full = opened.gradients(dataset="probe")
    names = full.attrs["gradlake"]["lineage"]["layers"]
    concatenated = np.concatenate([full[n].values for n in names], axis=1).astype(np.float64)
    projected = opened.projections(kind=kind, dim=dim, scope="flat")["flat"].values.astype(np.float64)
    assert projected.shape == (N, dim)
    error = np.abs(cosines(projected) - cosines(concatenated))
    # JL: cosine errors shrink as 1/sqrt(dim); 5/sqrt(dim) bounds every pair with overwhelming probability.
    assert error.max() < 5 / np.sqrt(dim), f"max cosine error {error.max():.3f}"
    assert error.max() > 0, "a projection that changes nothing is not a projection"
    row = opened.catalog().set_index("path").loc[out]
    assert row["projection"] == f"{kind}/flat/d{dim}/s0" and row["complete"]


def test_per_tensor_and_proportional_scopes(stored):
    lake, path = stored
    opened = open_lake(lake)
    full = opened.gradients(dataset="probe")
    sizes = {n: full[n].shape[1] for n in full.attrs["gradlake"]["lineage"]["layers"]}
    big = {n: s for n, s in sizes.items() if s >= 4096}
    dims = check_projection(ProjectionSpec(dim=2048 * len(sizes), scope="proportional"), sizes)
    assert all(d % 512 == 0 and d >= 512 for d in dims.values())
    assert dims["model.embed_tokens.weight"] > dims["model.norm.weight"]
    with pytest.raises(ProjectionError, match="exceeds the size of"):
        check_projection(ProjectionSpec(dim=1024, scope="per_tensor"), sizes)
    assert check_projection(ProjectionSpec(dim=1024, scope="per_tensor"), big) == {n: 1024 for n in big}


def test_same_seed_same_projection_in_a_new_process(stored):
    lake, path = stored
    spec = ProjectionSpec(kind="rademacher", dim=300, seed=7, scope="flat")
    project_gradients(ProjectSpec(gradients=path, projection=spec, lake=lake))
    here = open_lake(lake).projections(seed=7, dim=300)["flat"].values
    code = (
        "import json, sys, numpy as np, torch\n"
        "from lake import open_lake\n"
        "from tasks.project import projectors_for, project_batch\n"
        "from tasks.projection import ProjectionSpec\n"
        "lake, spec = sys.argv[1], ProjectionSpec(**json.loads(sys.argv[2]))\n"
        "full = open_lake(lake).gradients(dataset='probe')\n"
        "names = full.attrs['gradlake']['lineage']['layers']\n"
        "grads = {n: torch.from_numpy(full[n].values) for n in names}\n"
        "sizes = {n: g.shape[1] for n, g in grads.items()}\n"
        "out = project_batch(spec, grads, projectors_for(spec, sizes))['flat']\n"
        "np.save(sys.argv[3], out.numpy())\n"
    )
    target = f"{lake[len('file://'):]}/../elsewhere.npy"
    subprocess.run([sys.executable, "-c", code, lake, json.dumps(spec.model_dump()), target], cwd=REPO, check=True)
    there = np.load(target)
    np.testing.assert_allclose(there, here, rtol=1e-5, atol=1e-5 * np.abs(here).max())
    other = open_lake(lake)  # a different seed is a different matrix
    project_gradients(ProjectSpec(gradients=path, projection=spec.model_copy(update={"seed": 8}), lake=lake))
    assert not np.allclose(other.projections(seed=8, dim=300)["flat"].values, here)


def test_traker_backed_projector_is_traker_basic_projector():
    from trak.projectors import BasicProjector, ProjectionType

    grads = torch.randn(5, 3000)
    ours = make_projector(3000, 256, "gaussian", 3, "layer", backend="traker")
    assert isinstance(ours, TrakProjector) and ours.name == "traker.basic"
    theirs = BasicProjector(3000, 256, ours.seed, ProjectionType.normal, torch.device("cpu"))
    np.testing.assert_array_equal(ours.project(grads).numpy(), theirs.project(grads, model_id=0).numpy())


def test_block_projector_streams_to_the_same_result():
    grads = torch.randn(3, 70_000)
    cached = BlockProjector(70_000, 5000, "rademacher", 1, "w", memory_budget=1 << 40)
    streamed = BlockProjector(70_000, 5000, "rademacher", 1, "w", memory_budget=0)
    assert cached.cached and not streamed.cached
    a, b = cached.project(grads), streamed.project(grads)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-3)
    corner = cached._matrix[:1000, :1000]
    assert bool((corner.abs() == 1).all()) and 0.45 < float((corner > 0).float().mean()) < 0.55


def test_huge_sparse_projection_runs_in_bounded_memory():
    """2,048,000 dimensions of a 4,194,304-parameter layer: the dense matrix would be 34 TB."""
    code = (
        "import torch\n"
        "from tasks.projection import make_projector\n"
        "p = make_projector(4_194_304, 2_048_000, 'sparse', 0, 'model.layers.0.mlp.up_proj.weight')\n"
        "g = torch.randn(2, 4_194_304, generator=torch.Generator().manual_seed(0))\n"
        "y = p.project(g)\n"
        "c = lambda a, b: float(a @ b / (a.norm() * b.norm()))\n"
        # VmHWM is this process's own peak; ru_maxrss would carry the parent's over exec.
        "peak = next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM'))\n"
        "print(y.shape[1], peak, c(g[0], g[1]), c(y[0], y[1]),"
        " float(y[0].norm() ** 2 / g[0].norm() ** 2))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, capture_output=True, text=True).stdout.split()
    dim, peak_kib, cos_in, cos_out, gain = int(out[0]), int(out[1]), *map(float, out[2:])
    assert dim == 2_048_000
    assert peak_kib < 2 * 1024 * 1024, f"peak memory {peak_kib / 1024:.0f} MiB"
    assert abs(cos_out - cos_in) < 0.01 and abs(gain / 4 - 1) < 0.01


def test_bad_settings_fail_before_any_work(stored):
    lake, path = stored
    with pytest.raises(ProjectionError, match="at least 1"):
        check_projection(ProjectionSpec(dim=0), {"w": 10})
    with pytest.raises(ProjectionError, match="exceeds the gradient size 10"):
        check_projection(ProjectionSpec(dim=11, scope="flat"), {"w": 10})
    with pytest.raises(ValidationError, match="rademacher"):
        ProjectionSpec(kind="fourier", dim=8)
    state = project_gradients(ProjectSpec(gradients=path, projection=ProjectionSpec(dim=10**9, scope="flat"), lake=lake),
                              return_state=True)
    assert state.is_failed() and "exceeds the gradient size" in str(state.result(raise_on_failure=False))
    assert "d1000000000" not in open_lake(lake).catalog()["path"].str.cat()
