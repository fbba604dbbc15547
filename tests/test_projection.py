"""Random projections: JL on real stored gradients, reproducible from the seed, agree with TRAK, bounded memory."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from conftest import REPO, write_probe
from gradlake.flows.extract import extract_gradients
from gradlake.flows.project import project_gradients
from gradlake.lake import layout, open_lake
from gradlake.tasks.gradients.plan import ExtractionSpec
from gradlake.tasks.common.model import ModelSpec
from gradlake.tasks.projection.stored import ProjectSpec
from gradlake.tasks.projection.projectors import BlockProjector, TrakProjector, make_projector
from gradlake.tasks.projection.spec import ProjectionError, ProjectionSpec, check_projection, parse_projection

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
    sizes = {n: (full[n].shape[1],) for n in full.attrs["gradlake"]["lineage"]["layers"]}
    big = {n: s for n, s in sizes.items() if s[0] >= 4096}
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
        "from gradlake.lake import open_lake\n"
        "from gradlake.tasks.projection.projectors import ProjectionSpec, project_batch, projectors_for\n"
        "lake, spec = sys.argv[1], ProjectionSpec(**json.loads(sys.argv[2]))\n"
        "full = open_lake(lake).gradients(dataset='probe')\n"
        "names = full.attrs['gradlake']['lineage']['layers']\n"
        "grads = {n: torch.from_numpy(full[n].values) for n in names}\n"
        "shapes = {n: (g.shape[1],) for n, g in grads.items()}\n"
        "out = project_batch(spec, grads, projectors_for(spec, shapes))['flat']\n"
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
        "from gradlake.tasks.projection.projectors import make_projector\n"
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


def _sparse_formula(grads: torch.Tensor, k: int, seed: int, stream: str) -> torch.Tensor:
    """The sparse JL transform as first written: every tile's indices and signs drawn afresh, index_add_ tile by tile."""
    from gradlake.tasks.projection.projectors import SPARSE_NONZEROS, TILE_ROWS, stream_seed

    out = torch.zeros(grads.shape[0], k)
    for i in range(math.ceil(grads.shape[1] / TILE_ROWS)):
        rows = min(TILE_ROWS, grads.shape[1] - i * TILE_ROWS)
        generator = torch.Generator().manual_seed(stream_seed(seed, stream, i))
        index = torch.randint(0, k, (rows, SPARSE_NONZEROS), generator=generator)
        sign = torch.randint(0, 2, (rows, SPARSE_NONZEROS), generator=generator).mul_(2).sub_(1).float()
        part = grads[:, i * TILE_ROWS:(i + 1) * TILE_ROWS, None] * sign
        out.index_add_(1, index.flatten(), part.reshape(grads.shape[0], -1))
    return out


def test_sparse_projector_draws_once_and_gives_the_same_result_whatever_its_cache(monkeypatch):
    """Cached, partly cached and uncached blocks give the same output bit for bit, the formula's to float rounding
    (sums run block by block); cached tiles are never redrawn, uncached ones once per call."""
    from gradlake.tasks.projection import projectors as projection
    from gradlake.tasks.projection.projectors import (SPARSE_BYTES_PER_COORDINATE, TILE_ROWS, SparseProjector,
        sparse_block_rows, sparse_cache_plan)

    n, k = 2 * TILE_ROWS + 1234, 3000  # a ragged last tile and block
    grads = torch.randn(3, n, generator=torch.Generator().manual_seed(1))
    want = _sparse_formula(grads, k, 4, "w")
    rows = sparse_block_rows(k)
    blocks = math.ceil(n / rows)
    block_bytes = sparse_cache_plan(rows, k, 1 << 30)[1]
    first = None
    for budget, cached in ((1 << 30, blocks), (5 * block_bytes + 1, 5), (0, 0)):
        projector = SparseProjector(n, k, 4, "w", memory_budget=budget)
        assert projector.cached_blocks == cached
        draws = []
        monkeypatch.setattr(projector, "_draw", lambda i, f=projector._draw: draws.append(i) or f(i))
        for _ in range(2):  # the second call reuses the buffers of the first
            got = projector.project(grads)
            first = got if first is None else first
            assert torch.equal(got, first), f"budget {budget}: max difference {(got - first).abs().max():.3g}"
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
        redrawn = sorted({b * rows // TILE_ROWS for b in range(cached, blocks)})
        assert draws == redrawn * 2, "a cached tile was drawn again, or an uncached one more than once per call"
    assert SparseProjector(n, k, 4, "w").cached_bytes == n * SPARSE_BYTES_PER_COORDINATE + blocks * (k + 1) * 4
    assert not torch.allclose(SparseProjector(n, k, 5, "w").project(grads), want)  # another seed, another matrix
    # one projection's tensors share SPARSE_CACHE_BUDGET, in tensor order
    small = sparse_cache_plan(sparse_block_rows(64), 64, 1 << 30)[1]
    monkeypatch.setattr(projection, "SPARSE_CACHE_BUDGET", 10 * small)
    shapes = {"a": (2, TILE_ROWS), "b": (2, TILE_ROWS), "c": (TILE_ROWS,)}
    built = projection._projectors(ProjectionSpec(kind="sparse", dim=64, scope="flat"), tuple(shapes.items()), "cpu")
    assert [p.cached_blocks for _, p in built] == [8, 2, 0]


def _sparse_matrix(n: int, k: int, seed: int, stream: str) -> torch.Tensor:
    """The sparse JL matrix itself, (n, k) in float64 (a sparse COO tensor), drawn as the projector draws it."""
    from gradlake.tasks.projection.projectors import SPARSE_NONZEROS, TILE_ROWS, stream_seed

    index, sign = [], []
    for i in range(math.ceil(n / TILE_ROWS)):
        rows = min(TILE_ROWS, n - i * TILE_ROWS)
        generator = torch.Generator().manual_seed(stream_seed(seed, stream, i))
        index.append(torch.randint(0, k, (rows, SPARSE_NONZEROS), generator=generator))
        sign.append(torch.randint(0, 2, (rows, SPARSE_NONZEROS), generator=generator).mul_(2).sub_(1))
    index, sign = torch.cat(index), torch.cat(sign)
    rows = torch.arange(n)[:, None].expand_as(index)
    return torch.sparse_coo_tensor(torch.stack([rows.flatten(), index.flatten()]), sign.flatten().double(), (n, k),
                                   check_invariants=True)


@pytest.mark.parametrize("k", [3000, 40_000, 70_000])  # blocks of 16384, 65536 and 131072 (two tiles) input rows
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_projection_equals_the_product_with_its_matrix(k, dtype):
    """The block-wise bag sums equal grads @ S with S the (n, k) matrix of the same indices and signs, cached or not."""
    from gradlake.tasks.projection.projectors import TILE_ROWS, SparseProjector

    n = 2 * TILE_ROWS + 1234
    grads = torch.randn(4, n, generator=torch.Generator().manual_seed(2)).to(dtype)
    want = (_sparse_matrix(n, k, 7, "w").t() @ grads.double().t()).t()
    scale = float(want.abs().max())
    for budget in (1 << 30, 0):
        got = SparseProjector(n, k, 7, "w", memory_budget=budget).project(grads)
        assert got.dtype == torch.float32 and got.shape == (4, k)
        assert float((got.double() - want).abs().max()) <= 1e-6 * scale


# AMD-OLMo-1B's and a 7B model's weights as shapes alone (no model is built)
def _shapes(layers: int, width: int, mlp: int, vocab: int) -> dict[str, tuple[int, int]]:
    shapes = {"model.embed_tokens.weight": (vocab, width)}
    for i in range(layers):
        shapes |= {f"model.layers.{i}.self_attn.{p}_proj.weight": (width, width) for p in "qkvo"}
        shapes |= {f"model.layers.{i}.mlp.{p}_proj.weight": (mlp, width) for p in ("gate", "up")}
        shapes[f"model.layers.{i}.mlp.down_proj.weight"] = (width, mlp)
    return shapes | {"lm_head.weight": (vocab, width)}


def test_dense_projections_that_would_take_hours_per_batch_on_a_cpu_are_refused_at_plan_time():
    from gradlake.tasks.projection.projectors import (NS_PER_DENSE_ENTRY, REGENERATION_LIMIT_CPU_HOURS, plan_projectors,
        projector_choices, regeneration_cpu_hours)

    olmo_1b, olmo_7b = _shapes(16, 2048, 8192, 50304), _shapes(32, 4096, 11008, 50304)
    for shapes, spec in ((olmo_1b, ProjectionSpec(kind="rademacher", dim=8192, scope="flat")),
                         (olmo_7b, ProjectionSpec(kind="gaussian", dim=4096, scope="per_tensor"))):
        with pytest.raises(ProjectionError) as refused:
            projector_choices(spec, shapes, "cpu")
        message = str(refused.value)
        params = sum(math.prod(s) for s in shapes.values())
        hours = params * spec.dim * NS_PER_DENSE_ENTRY / 3.6e12
        assert f"{len(shapes)} tensors of {params:,} parameters" in message and f"{hours:,.1f} CPU-hours per batch" in message
        assert "'kronecker" in message and f"'sparse:{spec.scope}:{spec.dim}'" in message and "fast_jl" in message
        # the alternatives named are accepted at the same shape
        for other in (ProjectionSpec(kind="kronecker", dim=4096), spec.model_copy(update={"kind": "sparse"})):
            assert len(projector_choices(other, shapes, "cpu")) == len(shapes)
        assert len(projector_choices(spec, shapes, "cuda")) == len(shapes)  # on a GPU the matrix is drawn there
    # the threshold itself: just under the limit passes, just over is refused
    width = 4096
    for rows, refused in ((1, False), (2, True)):
        shapes = {"w": (rows * 1_000_000, width)}
        spec = ProjectionSpec(kind="rademacher", dim=int(REGENERATION_LIMIT_CPU_HOURS * 3.6e12 / NS_PER_DENSE_ENTRY
                                                         / (1.5 * 1_000_000 * width)), scope="flat")
        hours = rows * 1_000_000 * width * spec.dim * NS_PER_DENSE_ENTRY / 3.6e12
        if refused:
            with pytest.raises(ProjectionError, match="CPU-hours per batch"):
                plan_projectors(spec, shapes, "cpu")
        else:
            assert regeneration_cpu_hours(plan_projectors(spec, shapes, "cpu")) == pytest.approx(hours)
    # a matrix that fits the cache is drawn once and never refused
    assert projector_choices(ProjectionSpec(kind="rademacher", dim=16, scope="flat"), {"w": (4096, 4096)}, "cpu") == {"w": "gradlake.block"}


def test_fast_jl_wiring_selects_traker_cuda_on_a_gpu(monkeypatch):
    """Where fast_jl imports and the device is a GPU, dense kinds go to TRAK's CudaProjector (the kernel itself is not run)."""
    import types

    import trak.projectors

    from gradlake.tasks.projection import projectors as projection
    from gradlake.tasks.projection.projectors import choose_projector, projector_choices

    monkeypatch.setitem(sys.modules, "fast_jl", None)  # an import that fails
    assert not projection._fast_jl_available()
    assert choose_projector(10**6, 4096, "rademacher", "cuda") == "traker.basic"
    monkeypatch.setitem(sys.modules, "fast_jl", types.ModuleType("fast_jl"))
    assert projection._fast_jl_available()
    for kind in ("rademacher", "gaussian"):
        assert choose_projector(10**6, 4096, kind, "cuda") == "traker.cuda"
        assert choose_projector(10**6, 4096, kind, "cpu") != "traker.cuda"
    assert choose_projector(10**6, 4096, "sparse", "cuda") == "gradlake.sparse"
    made = []

    class FakeCudaProjector:
        def __init__(self, *args):
            made.append(args)

    monkeypatch.setattr(trak.projectors, "CudaProjector", FakeCudaProjector)
    olmo_1b = _shapes(16, 2048, 8192, 50304)
    spec = ProjectionSpec(kind="rademacher", dim=8192, scope="flat")
    assert set(projector_choices(spec, olmo_1b, "cuda").values()) == {"traker.cuda"}  # not refused: the kernel serves
    projector = make_projector(3000, 512, "rademacher", 3, "layer", device="cuda")
    assert isinstance(projector, TrakProjector) and projector.name == "traker.cuda"
    n, k, seed, kind, device, batch = made[0]
    assert (n, k, seed, kind.value, str(device)) == (3000, 512, projector.seed, "rademacher", "cuda")


def test_bad_settings_fail_before_any_work(stored):
    lake, path = stored
    with pytest.raises(ProjectionError, match="at least 1"):
        check_projection(ProjectionSpec(dim=0), {"w": (10,)})
    with pytest.raises(ProjectionError, match="exceeds the gradient size 10"):
        check_projection(ProjectionSpec(dim=11, scope="flat"), {"w": (10,)})
    with pytest.raises(ValidationError, match="rademacher"):
        ProjectionSpec(kind="fourier", dim=8)
    assert parse_projection("gaussian:proportional:16384:3") == ProjectionSpec(kind="gaussian", scope="proportional", dim=16384, seed=3)
    assert parse_projection("kronecker:64x32") == ProjectionSpec(kind="kronecker", dim=2048, factors=(64, 32))
    for text, message in (("fourier:flat:8", "kind"), ("rademacher:flat:lots", "not valid"), ("rademacher:8192", "KIND:SCOPE:DIM")):
        with pytest.raises(ProjectionError, match=message):
            parse_projection(text)
    state = project_gradients(ProjectSpec(gradients=path, projection=ProjectionSpec(dim=10**9, scope="flat"), lake=lake),
                              return_state=True)
    assert state.is_failed() and "exceeds the gradient size" in str(state.result(raise_on_failure=False))
    assert "d1000000000" not in open_lake(lake).catalog()["path"].str.cat()


# -- projections made during the backward pass -----------------------------------------------------

def _tied_model_and_batch(tiny_models, probe_chats):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gradlake.tasks.common.loss import encode_sample, pad_batch
    from gradlake.tasks.training.tiny import tiny_config

    tokenizer = AutoTokenizer.from_pretrained(tiny_models["olmo2"] / "checkpoint-0")
    torch.manual_seed(2)
    model = AutoModelForCausalLM.from_config(tiny_config("olmo2", tokenizer, tie_word_embeddings=True)).float().eval()
    encoded = [encode_sample(tokenizer, c, "sft", 256) for c in probe_chats[30:34]]
    return model, encoded, pad_batch(encoded, tokenizer.pad_token_id)


def _reference(model, encoded) -> dict[str, torch.Tensor]:
    """Per-sample gradients from one plain loss.backward() per sample: {name: (batch, numel)}."""
    rows = []
    for e in encoded:
        model.zero_grad(set_to_none=True)
        model(input_ids=torch.tensor([e.input_ids]), labels=torch.tensor([e.labels()])).loss.backward()
        rows.append({n: p.grad.flatten().clone() for n, p in model.named_parameters()})
    return {n: torch.stack([r[n] for r in rows]) for n in rows[0]}


def test_kronecker_projection_equals_explicit_projection_of_the_gradient(tiny_models, probe_chats):
    """The factored projection, made in the hooks without forming any gradient, equals vec(G) @ kron(P_out, P_in)."""
    from gradlake.tasks.gradients.engine import PerSampleGradients, Projection
    from gradlake.tasks.projection.projectors import KroneckerProjector, projectors_for
    from gradlake.tasks.projection.spec import output_key

    model, encoded, (ids, labels) = _tied_model_and_batch(tiny_models, probe_chats)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters() if p.dim() == 2}
    assert "model.embed_tokens.weight" in shapes and "lm_head.weight" not in shapes  # tied: both uses count
    spec = ProjectionSpec(kind="kronecker", dim=96, factors=(12, 8), seed=5)
    projectors = projectors_for(spec, shapes)
    with PerSampleGradients(model, [], [Projection(projectors, key=lambda n: output_key(spec, n))]) as engine:
        engine(ids, labels)
        got = engine.projected[0]
        assert not engine._buffers and engine._scratch is None, "a factored projection must not form the gradient"
    reference = _reference(model, encoded)
    for name, shape in shapes.items():
        projector = projectors[name]
        assert isinstance(projector, KroneckerProjector)
        p_out, p_in = projector.factors
        assert p_out.shape == (shape[0], 12) and p_in.shape == (shape[1], 8)
        explicit = reference[name].double() @ torch.kron(p_out.double(), p_in.double())
        assert got[name].shape == (len(encoded), 96)
        error = (got[name].double() - explicit).norm() / explicit.norm()
        assert error < 1e-5, f"{name}: relative error {error:.2e}"
        # the post-hoc path (materialised gradient through the same projector) agrees too
        torch.testing.assert_close(projector.project(reference[name]).double(), explicit, rtol=1e-4, atol=1e-4 * explicit.abs().max().item())


def test_dense_projections_in_the_backward_equal_projections_of_the_gradients(tiny_models, probe_chats):
    """Kept and not-kept tensors, flat and per-tensor outputs, a tied embedding: all equal projecting the reference."""
    from gradlake.tasks.gradients.engine import PerSampleGradients, Projection
    from gradlake.tasks.projection.spec import output_key
    from gradlake.tasks.projection.projectors import project_batch, projectors_for

    model, encoded, (ids, labels) = _tied_model_and_batch(tiny_models, probe_chats)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    kept = [n for n in shapes if ".layers.0." in n]
    specs = [ProjectionSpec(kind="rademacher", dim=256, scope="flat", seed=1),
             ProjectionSpec(kind="gaussian", dim=32, scope="per_tensor", seed=2)]
    sets = [projectors_for(s, shapes) for s in specs]
    projections = [Projection(p, key=lambda n, s=s: output_key(s, n)) for s, p in zip(specs, sets)]
    with PerSampleGradients(model, kept, projections) as engine:
        grads = engine(ids, labels)
        outputs = engine.projected
        largest = max(math.prod(s) for n, s in shapes.items() if n not in kept)
        assert set(engine._buffers) == set(kept) and engine._scratch.numel() == len(encoded) * largest
    reference = _reference(model, encoded)
    for name in kept:
        torch.testing.assert_close(grads[name], reference[name], rtol=1e-4, atol=1e-6)
    for spec, projectors, got in zip(specs, sets, outputs):
        want = project_batch(spec, reference, projectors)
        assert set(got) == set(want)
        for key in want:
            error = (got[key] - want[key]).norm() / want[key].norm()
            assert error < 1e-5, f"{spec.label} {key}: relative error {error:.2e}"


@pytest.fixture(scope="module")
def on_the_fly(tiny_models, tmp_path_factory):
    """The same extraction twice: projections on the fly without keeping gradients, and full gradients kept."""
    root = tmp_path_factory.mktemp("onthefly")
    model = ModelSpec(model=str(tiny_models["olmo2"]), checkpoint="checkpoint-1")
    layers = ["model.embed_tokens.weight", "model.layers.*.mlp.*_proj.weight", "lm_head.weight"]
    specs = [ProjectionSpec(kind="kronecker", dim=64, seed=3),
             ProjectionSpec(kind="rademacher", dim=4096, scope="proportional", seed=4),
             ProjectionSpec(kind="gaussian", dim=256, scope="flat", seed=5)]
    lakes = {}
    for name, keep in (("fly", False), ("kept", True)):
        lake = f"file://{root / name}"
        write_probe(lake, N)
        extraction = ExtractionSpec(model=model, layers=layers, shard_size=8, batch_size=4, max_length=256, lake=lake,
                                    keep_gradients=keep, projections=specs if not keep else specs[:1])
        lakes[name] = (lake, extract_gradients(extraction), extraction)
    return lakes, specs


def test_on_the_fly_and_post_hoc_projections_agree(on_the_fly):
    lakes, specs = on_the_fly
    fly_lake, fly_path, _ = lakes["fly"]
    kept_lake, kept_path, _ = lakes["kept"]
    catalog = open_lake(fly_lake).catalog().set_index("path")
    assert catalog.loc[fly_path, "n_parameters"] == 0 and catalog.loc[fly_path, "lineage.gradients_kept"] is False
    for spec in specs:
        # post hoc from the kept gradients; the first was already made on the fly there and is recognised
        post = project_gradients(ProjectSpec(gradients=kept_path, projection=spec, lake=kept_lake))
        assert post == layout.projection_group_path(kept_path, spec.label) and post.endswith(f"-proj-{spec.label}")
        a = open_lake(fly_lake).projections(kind=spec.kind, dim=spec.dim, seed=spec.seed)
        b = open_lake(kept_lake).projections(kind=spec.kind, dim=spec.dim, seed=spec.seed)
        assert a.attrs["gradlake"]["fingerprint"] == b.attrs["gradlake"]["fingerprint"]
        assert a.attrs["gradlake"]["lineage"]["projection"]["projectors"] == b.attrs["gradlake"]["lineage"]["projection"]["projectors"]
        assert sorted(a.data_vars) == sorted(b.data_vars) and list(a["sample"].values) == list(b["sample"].values)
        dims = a.attrs["gradlake"]["lineage"]["projection"]["dims"]
        assert len(dims) == (1 if spec.scope == "flat" else 8) and all(a[k].shape == (N, d) for k, d in dims.items())
        for key in dims:
            x, y = a[key].values, b[key].values
            assert np.abs(x).max() > 0
            np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-4 * np.abs(y).max(), err_msg=f"{spec.label} {key}")
    with pytest.raises(Exception, match="kept no gradients"):
        project_gradients(ProjectSpec(gradients=fly_path, projection=specs[2], lake=fly_lake))


def test_interrupted_projection_group_is_redone_on_rerun(on_the_fly):
    """A shard complete in the gradient group but not in one projection group is recomputed there."""
    import zarr

    lakes, specs = on_the_fly
    lake, path, extraction = lakes["fly"]
    target = layout.projection_group_path(path, specs[1].label)
    group = zarr.open_group(lake[len("file://"):], path=target, mode="r+")
    before = {k: group[k][:] for k in group.array_keys() if k.startswith("model.")}
    rows = group["shard_complete"].attrs["chunk_rows"]  # one flag per row-chunk
    group["shard_complete"][8 // rows:16 // rows] = 0
    for key in before:
        group[key][8:16] = 0
    assert extract_gradients(extraction) == path
    assert group["shard_complete"][:].all()
    for key, values in before.items():
        np.testing.assert_array_equal(group[key][:], values)


def test_bad_on_the_fly_settings_fail_before_anything_is_written(tiny_models, tmp_path):
    from gradlake.tasks.gradients.plan import plan_extraction

    lake = f"file://{tmp_path / 'lake'}"
    write_probe(lake, 8)
    model = ModelSpec(model=str(tiny_models["olmo2"]), checkpoint="checkpoint-1")
    cases = [
        (dict(projections=[ProjectionSpec(kind="kronecker", dim=64)]), "2-D weights"),
        (dict(layers=["model.layers.*.mlp.*_proj.weight"], projections=[ProjectionSpec(kind="kronecker", dim=50)]), "not a square"),
        (dict(layers=["model.layers.*.mlp.*_proj.weight"], projections=[ProjectionSpec(kind="kronecker", dim=64 * 256, factors=(64, 256))]), "exceed the"),
        (dict(projections=[ProjectionSpec(dim=64, scope="flat", factors=(8, 8))]), "factors are for kind 'kronecker'"),
        (dict(keep_gradients=False), "nothing would be stored"),
        (dict(mode="mean", projections=[ProjectionSpec(dim=64, scope="flat")]), "need mode 'store'"),
        (dict(projections=[ProjectionSpec(dim=64, scope="flat")] * 2), "asked for twice"),
        (dict(projections=[ProjectionSpec(dim=0, scope="flat")]), "at least 1"),
    ]
    for overrides, message in cases:
        spec = ExtractionSpec(model=model, shard_size=8, batch_size=4, lake=lake, **overrides)
        with pytest.raises(ValueError, match=message):
            plan_extraction(spec)
    assert open_lake(lake).catalog().query("kind == 'gradients'").empty


def test_refused_extraction_writes_no_projection_group(on_the_fly):
    """An extraction that differs from the group of its name (in a setting that does not name the group, such as the
    token limit) is refused before any projection group is created."""
    from gradlake.lake.store import LakeError
    from gradlake.tasks.gradients.plan import create_group, plan_extraction

    lakes, _ = on_the_fly
    lake, path, extraction = lakes["kept"]
    changed = extraction.model_copy(update={"max_length": extraction.max_length // 2,
                                            "projections": [ProjectionSpec(kind="sparse", dim=128, scope="flat", seed=9)]})
    before = sorted(open_lake(lake).catalog()["path"])
    with pytest.raises(LakeError, match="differs in .*max_length"):
        create_group(plan_extraction(changed))
    assert sorted(open_lake(lake).catalog()["path"]) == before
    assert not any("sparse" in p for p in before)


def test_redraw_estimate_of_a_post_hoc_projection_counts_every_uncached_matrix():
    from gradlake.tasks.projection.projectors import NS_PER_DENSE_ENTRY, regeneration_seconds

    # AMD-OLMo-1B's 16 down_proj weights, proportional to 16384: 1024 dimensions each, none cached.
    shapes = {f"model.layers.{i}.mlp.down_proj.weight": (2048, 8192) for i in range(16)}
    spec = ProjectionSpec(kind="rademacher", scope="proportional", dim=16384)
    per_call = regeneration_seconds(spec, shapes, "cpu")
    assert set(per_call) == set(shapes)
    assert sum(per_call.values()) == pytest.approx(16 * 2048 * 8192 * 1024 * NS_PER_DENSE_ENTRY * 1e-9)
    # A cached matrix, a sparse or kronecker projection, or a GPU redraw nothing.
    assert regeneration_seconds(ProjectionSpec(kind="rademacher", scope="per_tensor", dim=16), {"w": (64, 64)}, "cpu") == {"w": 0.0}
    assert set(regeneration_seconds(ProjectionSpec(kind="sparse", scope="flat", dim=8192), shapes, "cpu").values()) == {0.0}
    assert set(regeneration_seconds(spec, shapes, "cuda").values()) == {0.0}
