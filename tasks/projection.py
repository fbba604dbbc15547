"""Random projections of gradients: which projector, how dimensions are shared, and the math.

Projectors (chosen automatically, recorded with every projected array):

- ``traker.cuda``: TRAK's ``CudaProjector`` (the ``fast_jl`` kernel) on a GPU that has it;
- ``gradlake.block`` with the matrix cached: when the whole matrix fits the memory
  budget.  It is generated once, tile by tile from ``(seed, stream, row block, column
  block)`` alone, and reused for every batch; TRAK's ``BasicProjector`` regenerates its
  matrix on every call, which on a CPU costs far more than the product itself;
- ``traker.basic``: TRAK's ``BasicProjector`` when the whole matrix does not fit but its
  working block (gradient size x 100 columns) does;
- ``gradlake.block`` streaming: beyond that, one tile in memory at a time; the result is
  the same however the work is cut.

``backend="traker"`` forces TRAK's projector (the reference in tests and benchmarks).

Entries are iid N(0, 1) (``gaussian``) or +-1 (``rademacher``), unscaled as in TRAK: inner
products grow by the dimension, cosines are preserved.  ``sparse`` is a sparse JL transform
(Kane and Nelson, 2014): each input coordinate lands in ``SPARSE_NONZEROS`` output
coordinates with random signs.  It costs a few additions per gradient entry whatever the
output dimension, which makes projections such as 2,048,000 dimensions of a layer of
several million parameters possible on a CPU, where a dense matrix would not even fit
on disk.  (Dense kinds stream through tiles in bounded memory too, but generating
trillions of random entries on a CPU takes hours; on a GPU TRAK's kernel does it.)

Scopes: ``per_tensor`` projects every parameter tensor to ``dim``; ``proportional`` gives
each tensor a share of ``dim`` proportional to its size, rounded to a multiple of 512 (at
least 512), as the "Select or Project?" thesis allocated; ``flat`` projects the
concatenation of all tensors to ``dim`` without building it: the product with a tall
matrix is the sum of the products of its row blocks, one per tensor.
"""

from __future__ import annotations

import hashlib
import math
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

MEMORY_BUDGET = 1 << 30  # bytes a projector may hold for its matrix
TILE_ROWS = 1 << 16
TILE_COLS = 1 << 12
ROUND_TO = 512
SPARSE_NONZEROS = 4


class ProjectionError(ValueError):
    """Projection settings that cannot work, with what would be accepted."""


class ProjectionSpec(BaseModel):
    """One random projection setting."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["rademacher", "gaussian", "sparse"] = Field(default="rademacher", description="Entries of the random matrix: +-1 (rademacher), N(0,1) (gaussian), or a sparse JL transform with a few +-1 per input coordinate (sparse; for very large dimensions on a CPU).")
    dim: int = Field(description="Output dimension: per tensor for scope 'per_tensor', in total for 'proportional' and 'flat'.")
    seed: int = Field(default=0, ge=0, description="Seed; the same seed gives the same matrix in any process.")
    scope: Literal["per_tensor", "proportional", "flat"] = Field(default="per_tensor", description="'per_tensor': each tensor to dim; 'proportional': dim shared by tensor size (multiples of 512); 'flat': all tensors together to dim.")


def check_projection(spec: ProjectionSpec, sizes: dict[str, int]) -> dict[str, int]:
    """The output dimension of every tensor, or one clear error; nothing is computed."""
    if spec.dim < 1:
        raise ProjectionError(f"projection dimension {spec.dim} must be at least 1")
    if not sizes:
        raise ProjectionError("no tensor to project")
    total = sum(sizes.values())
    if spec.scope == "per_tensor":
        too_big = {n: s for n, s in sizes.items() if spec.dim > s}
        if too_big:
            name, size = next(iter(too_big.items()))
            raise ProjectionError(
                f"projection dimension {spec.dim} exceeds the size of {len(too_big)} tensors (e.g. {name!r}: {size}); "
                "a projection to more dimensions than the gradient has only adds noise. Use a smaller dim, "
                "select larger tensors, or scope 'proportional'/'flat'")
        return {n: spec.dim for n in sizes}
    if spec.dim > total:
        raise ProjectionError(f"projection dimension {spec.dim} exceeds the gradient size {total}; use at most {total}")
    if spec.scope == "flat":
        return {n: spec.dim for n in sizes}
    if spec.dim < ROUND_TO * len(sizes):
        raise ProjectionError(f"scope 'proportional' gives every tensor a multiple of {ROUND_TO} dimensions; "
                              f"{len(sizes)} tensors need dim >= {ROUND_TO * len(sizes)}, not {spec.dim}")
    return {n: max(ROUND_TO, round(spec.dim * s / total / ROUND_TO) * ROUND_TO) for n, s in sizes.items()}


def stream_seed(seed: int, stream: str, *indices: int) -> int:
    """A 63-bit seed for one stream (a tensor's name) and tile, from the user's seed alone."""
    text = f"{seed}|{stream}|" + ",".join(str(i) for i in indices)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def _fill(tile: torch.Tensor, kind: str, generator: torch.Generator) -> torch.Tensor:
    if kind == "gaussian":
        return tile.normal_(generator=generator)
    # Random bits as int8 are drawn about 3x faster than bernoulli_ samples on a CPU.
    bits = torch.randint(0, 2, tile.shape, generator=generator, dtype=torch.int8)
    return tile.copy_(bits).mul_(2).sub_(1)


class BlockProjector:
    """gradlake's projector: the (n x k) matrix in tiles generated from the seed, cached when it fits."""

    name = "gradlake.block"

    def __init__(self, n: int, k: int, kind: str, seed: int, stream: str, device="cpu",
                 memory_budget: int = MEMORY_BUDGET):
        self.n, self.k, self.kind, self.seed, self.stream = n, k, kind, seed, stream
        self.device = torch.device(device)
        self.cached = n * k * 4 <= memory_budget
        self._matrix = self._build() if self.cached else None

    def _tile(self, i: int, j: int) -> torch.Tensor:
        rows = min(TILE_ROWS, self.n - i * TILE_ROWS)
        cols = min(TILE_COLS, self.k - j * TILE_COLS)
        generator = torch.Generator(device="cpu").manual_seed(stream_seed(self.seed, self.stream, i, j))
        return _fill(torch.empty(rows, cols), self.kind, generator).to(self.device)

    def _build(self) -> torch.Tensor:
        matrix = torch.empty(self.n, self.k, device=self.device)
        for i in range(math.ceil(self.n / TILE_ROWS)):
            for j in range(math.ceil(self.k / TILE_COLS)):
                matrix[i * TILE_ROWS:(i + 1) * TILE_ROWS, j * TILE_COLS:(j + 1) * TILE_COLS] = self._tile(i, j)
        return matrix

    def project(self, grads: torch.Tensor) -> torch.Tensor:
        """(batch, n) -> (batch, k) in float32."""
        grads = grads.to(self.device, torch.float32)
        if self._matrix is not None:
            return grads @ self._matrix
        out = torch.zeros(grads.shape[0], self.k, device=self.device)
        for j in range(math.ceil(self.k / TILE_COLS)):
            cols = slice(j * TILE_COLS, (j + 1) * TILE_COLS)
            for i in range(math.ceil(self.n / TILE_ROWS)):
                out[:, cols] += grads[:, i * TILE_ROWS:(i + 1) * TILE_ROWS] @ self._tile(i, j)
        return out


class SparseProjector:
    """A sparse JL transform: input coordinate r adds sign[r, j] * x_r to output idx[r, j], j < SPARSE_NONZEROS."""

    name = "gradlake.sparse"

    def __init__(self, n: int, k: int, seed: int, stream: str, device="cpu"):
        self.n, self.k, self.seed, self.stream = n, k, seed, stream
        self.device = torch.device(device)

    def _tile(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = min(TILE_ROWS, self.n - i * TILE_ROWS)
        generator = torch.Generator(device="cpu").manual_seed(stream_seed(self.seed, self.stream, i))
        index = torch.randint(0, self.k, (rows, SPARSE_NONZEROS), generator=generator)
        sign = torch.randint(0, 2, (rows, SPARSE_NONZEROS), generator=generator).mul_(2).sub_(1).float()
        return index.to(self.device), sign.to(self.device)

    def project(self, grads: torch.Tensor) -> torch.Tensor:
        """(batch, n) -> (batch, k) in float32, one tile of input coordinates at a time."""
        grads = grads.to(self.device, torch.float32)
        out = torch.zeros(grads.shape[0], self.k, device=self.device)
        for i in range(math.ceil(self.n / TILE_ROWS)):
            index, sign = self._tile(i)
            part = grads[:, i * TILE_ROWS:(i + 1) * TILE_ROWS, None] * sign  # (batch, rows, nonzeros)
            out.index_add_(1, index.flatten(), part.reshape(grads.shape[0], -1))
        return out


class TrakProjector:
    """TRAK's own projectors (``traker``): BasicProjector on CPU, CudaProjector with fast_jl on a GPU."""

    def __init__(self, n: int, k: int, kind: str, seed: int, stream: str, device="cpu", max_batch_size: int = 32):
        from trak.projectors import BasicProjector, ProjectionType

        self.n, self.k = n, k
        self.seed = stream_seed(seed, stream) % (2**31 - 10**7)  # traker adds offsets to a 32-bit seed
        kind_ = ProjectionType.rademacher if kind == "rademacher" else ProjectionType.normal
        device = torch.device(device)
        if device.type == "cuda" and _fast_jl_available():
            from trak.projectors import CudaProjector

            self.name = "traker.cuda"
            self._projector = CudaProjector(n, k, self.seed, kind_, device, max_batch_size)
        else:
            self.name = "traker.basic"
            self._projector = BasicProjector(n, k, self.seed, kind_, device)

    def project(self, grads: torch.Tensor) -> torch.Tensor:
        return self._projector.project(grads.float(), model_id=0).float()


def _fast_jl_available() -> bool:
    try:
        import fast_jl  # noqa: F401
    except ImportError:
        return False
    return True


def make_projector(n: int, k: int, kind: str, seed: int, stream: str, device="cpu",
                   memory_budget: int = MEMORY_BUDGET, backend: str = "auto"):
    """The projector for an (n -> k) projection: TRAK's where it serves, gradlake's beyond that."""
    if backend not in ("auto", "traker", "gradlake"):
        raise ProjectionError(f"projector backend {backend!r} is not known; use 'auto', 'traker' or 'gradlake'")
    device = torch.device(device)
    if kind == "sparse":
        return SparseProjector(n, k, seed, stream, device)
    if backend == "gradlake":
        return BlockProjector(n, k, kind, seed, stream, device, memory_budget)
    fits_whole = n * k * 4 <= memory_budget
    fits_traker_block = n * min(k, 100) * 4 <= memory_budget
    gpu_kernel = device.type == "cuda" and _fast_jl_available()
    if backend == "traker" or gpu_kernel or (fits_traker_block and not fits_whole):
        return TrakProjector(n, k, kind, seed, stream, device)
    return BlockProjector(n, k, kind, seed, stream, device, memory_budget)


def project_tensors(grads: dict[str, torch.Tensor], dims: dict[str, int], projectors: dict) -> dict[str, torch.Tensor]:
    """Project each tensor's (batch, numel) gradients with its projector: {name: (batch, dim)}."""
    return {name: projectors[name].project(g) for name, g in grads.items() if name in dims}


def project_flat(grads: dict[str, torch.Tensor], projectors: dict) -> torch.Tensor:
    """The projection of the concatenated gradient: the sum of each tensor's row block's product."""
    total = None
    for name, g in grads.items():
        part = projectors[name].project(g)
        total = part if total is None else total + part
    return total
