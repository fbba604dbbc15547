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

``kronecker`` is the structured projection of LoGra (Choe et al., 2024) for the weights of
linear and embedding layers: the (out x in) gradient ``G`` goes to ``P_out^T G P_in`` with
+-1 factors ``P_out`` (out x k_out) and ``P_in`` (in x k_in), which is the projection of
the row-major flattened gradient by ``kron(P_out, P_in)``.  Since a linear layer's
gradient is a sum over tokens of outer products ``g_t a_t^T``, the extractor applies the
two factors to ``g_t`` and ``a_t`` and never forms ``G`` (tasks/gradients/engine.py).

Entries are iid N(0, 1) (``gaussian``) or +-1 (``rademacher``), unscaled as in TRAK: inner
products grow by the dimension, cosines are preserved.  ``sparse`` is a sparse JL transform
(Kane and Nelson, 2014): each input coordinate lands in ``SPARSE_NONZEROS`` output
coordinates with random signs.  It costs a few additions per gradient entry whatever the
output dimension, which makes projections such as 2,048,000 dimensions of a layer of
several million parameters possible on a CPU, where a dense matrix would not even fit
on disk.  Its indices and signs are drawn once per tensor and seed and kept on the
device, grouped by output coordinate (20 bytes per gradient coordinate, within
``SPARSE_CACHE_BUDGET`` per projection; beyond it, tiles are drawn again on every call,
with the same result bit for bit); each output coordinate then gathers its inputs
block by block (``embedding_bag``), which costs about a third of a scatter.

Dense kinds stream through tiles in bounded memory too, but drawing their entries on a
CPU costs ``NS_PER_DENSE_ENTRY`` (5.86 ns) each, for every batch when the matrix is not
cached: about 17 CPU-hours per batch for AMD-OLMo-1B flat to 8192.  On a CPU, a
projection whose uncached matrices cost more than ``REGENERATION_LIMIT_CPU_HOURS`` (1) per
batch is refused when it is planned, before anything is written, pointing to
``kronecker`` or ``sparse``; on a GPU, TRAK's kernel (``fast_jl``, the ``cuda`` extra)
never stores the matrix at all.  Even cached, a dense projection costs ``2 k`` FLOPs per
gradient entry and sample, which outweighs extracting the gradient once ``k`` exceeds a
few hundred: dense kinds suit small ``k`` or a GPU.

Scopes: ``per_tensor`` projects every parameter tensor to ``dim``; ``proportional`` gives
each tensor a share of ``dim`` proportional to its size, rounded to a multiple of 512 (at
least 512), as the "Select or Project?" thesis allocated; ``flat`` projects the
concatenation of all tensors to ``dim`` without building it: the product with a tall
matrix is the sum of the products of its row blocks, one per tensor.
"""

from __future__ import annotations

import hashlib
import math
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from gradlake.tasks.projection.spec import ProjectionError, ProjectionSpec, check_projection, output_key


MEMORY_BUDGET = 1 << 30  # bytes a projector may hold for its matrix
TILE_ROWS = 1 << 16
TILE_COLS = 1 << 12
# CPU time to draw one entry of a dense random matrix (torch's CPU generator, rademacher or
# gaussian, one thread of an AMD EPYC): the cost of a projection whose matrix cannot be cached.
NS_PER_DENSE_ENTRY = 5.86
# A dense projection on a CPU costing more than this per batch to redraw is refused at plan time
# (e.g. a 100M-parameter model flat to 8192: 1.3 CPU-hours; AMD-OLMo-1B: 17).
REGENERATION_LIMIT_CPU_HOURS = 1.0
SPARSE_NONZEROS = 4
# Input coordinates per block of a sparse projection (more when k is larger): a block's gradient columns,
# 16384 x batch float32 values, stay in a core's L2 cache while every output coordinate gathers from them.
SPARSE_BLOCK_ROWS = 1 << 14
SPARSE_BYTES_PER_COORDINATE = SPARSE_NONZEROS * (4 + 1)  # cached int32 input row + int8 sign per nonzero
SPARSE_CACHE_BUDGET = 2 << 30  # bytes of cached sparse indices and signs, shared by the tensors of one projection


def sparse_block_rows(k: int) -> int:
    """Input coordinates per block of a sparse projection to k: at least k, so that each output sums 4 on average."""
    return max(SPARSE_BLOCK_ROWS, 1 << (max(k, 2) - 1).bit_length())


def sparse_cache_plan(n: int, k: int, budget: int) -> tuple[int, int]:
    """(blocks, bytes): how many leading blocks of an (n -> k) sparse projection are cached within `budget` bytes.

    A cached block holds each nonzero's input row (int32) and sign (int8), ``SPARSE_BYTES_PER_COORDINATE`` per
    input coordinate, and its k + 1 output offsets (int32).
    """
    rows = sparse_block_rows(k)
    blocks = used = 0
    for start in range(0, n, rows):
        size = min(rows, n - start) * SPARSE_BYTES_PER_COORDINATE + (k + 1) * 4
        if used + size > max(0, budget):
            break
        blocks, used = blocks + 1, used + size
    return blocks, used


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
    """A sparse JL transform: input coordinate r adds sign[r, j] * x_r to output idx[r, j], j < SPARSE_NONZEROS.

    Indices and signs are drawn tile by tile from ``(seed, stream, tile)`` (``TILE_ROWS``
    input coordinates per tile).  The sums run block by block (``sparse_block_rows(k)``
    input coordinates each): a block's gradient columns are copied once into a
    (rows, batch) buffer small enough for the CPU's cache, each output coordinate sums
    its inputs of the block in input order (an ``embedding_bag``, one bag per output
    coordinate, the signs as per-sample weights: no product per nonzero is
    materialised and no scatter runs), and the blocks' sums are added in order.  A
    block is kept in that form (its inputs grouped by output, ``sparse_block_bytes``)
    while ``memory_budget`` allows; blocks beyond it are drawn again on every call and
    summed by a scatter (``index_add_``) in the same order, so the result is the same,
    bit for bit, whatever the budget.
    """

    name = "gradlake.sparse"

    def __init__(self, n: int, k: int, seed: int, stream: str, device="cpu", memory_budget: int = SPARSE_CACHE_BUDGET):
        self.n, self.k, self.seed, self.stream = n, k, seed, stream
        self.device = torch.device(device)
        self.block_rows = sparse_block_rows(k)
        self.cached_blocks, _ = sparse_cache_plan(n, k, memory_budget)
        self._drawn: tuple | None = None  # (tile, index, sign): the last tile drawn, for the next block in it
        self._cache = [self._bags(*self._rows(b)) for b in range(self.cached_blocks)]
        self._drawn = None
        self._buffers: dict[str, torch.Tensor] = {}  # reused: fresh multi-megabyte tensors per block cost page faults

    @property
    def cached_bytes(self) -> int:
        """Bytes the cached blocks hold."""
        return sum(t.numel() * t.element_size() for block in self._cache for t in block)

    def _draw(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Tile i's (rows, nonzeros) output indices and +-1 signs (int64, on the CPU), from the seed alone."""
        rows = min(TILE_ROWS, self.n - i * TILE_ROWS)
        generator = torch.Generator(device="cpu").manual_seed(stream_seed(self.seed, self.stream, i))
        index = torch.randint(0, self.k, (rows, SPARSE_NONZEROS), generator=generator)
        sign = torch.randint(0, 2, (rows, SPARSE_NONZEROS), generator=generator).mul_(2).sub_(1)
        return index, sign

    def _rows(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Block b's (rows, nonzeros) indices and signs, from the tiles that cover it (each drawn once per pass)."""
        start, stop = b * self.block_rows, min(self.n, (b + 1) * self.block_rows)
        parts = []
        for i in range(start // TILE_ROWS, (stop - 1) // TILE_ROWS + 1):
            if self._drawn is None or self._drawn[0] != i:
                self._drawn = (i, *self._draw(i))
            lo, hi = max(start, i * TILE_ROWS) - i * TILE_ROWS, min(stop, (i + 1) * TILE_ROWS) - i * TILE_ROWS
            parts.append((self._drawn[1][lo:hi], self._drawn[2][lo:hi]))
        if len(parts) == 1:
            return parts[0]
        return torch.cat([index for index, _ in parts]), torch.cat([sign for _, sign in parts])

    def _bags(self, index: torch.Tensor, sign: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A block's nonzeros grouped by output coordinate, in input order: (input rows, signs, k + 1 offsets)."""
        flat = index.flatten()
        if self.k <= 1 << 16:  # numpy sorts 16-bit keys stably by radix, 3x faster than torch.sort
            order = torch.from_numpy(np.argsort(flat.numpy().astype(np.uint16), kind="stable"))
        else:
            order = torch.sort(flat, stable=True).indices
        offsets = torch.zeros(self.k + 1, dtype=torch.int32)
        offsets[1:] = torch.bincount(flat, minlength=self.k).cumsum(0)
        rows = (order // SPARSE_NONZEROS).to(self.device, torch.int32)  # int32 lookups: embedding_bag reads them as they are
        return rows, sign.flatten()[order].to(self.device, torch.int8), offsets.to(self.device)

    def _buffer(self, name: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < numel or buf.dtype != dtype or buf.device != self.device:
            buf = self._buffers[name] = torch.empty(numel, dtype=dtype, device=self.device)
        return buf[:numel]

    def _bag_sums(self, block: torch.Tensor, rows: torch.Tensor, signs: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """(k, batch) sums of a cached block: the gradient's columns gathered bag by bag."""
        columns = self._buffer("columns", block.numel(), torch.float32).view(block.shape[1], block.shape[0])
        columns.copy_(block.t())  # one row per input coordinate: each gather reads `batch` adjacent values
        weights = self._buffer("signs", signs.numel(), torch.float32).copy_(signs)
        return F.embedding_bag(rows, columns, offsets, mode="sum", per_sample_weights=weights, include_last_offset=True)

    def _scatter_sums(self, block: torch.Tensor, index: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
        """(k, batch) sums of a block drawn again: the same sums as ``_bag_sums``, in the same order."""
        batch = block.shape[0]
        part = block.to(self.device, torch.float32)[:, :, None] * sign.to(self.device, torch.float32)
        sums = self._buffer("sums", batch * self.k, torch.float32).view(batch, self.k).zero_()
        return sums.index_add_(1, index.to(self.device).flatten(), part.view(batch, -1)).t()

    def project(self, grads: torch.Tensor) -> torch.Tensor:
        """(batch, n) -> (batch, k) in float32, block by block of input coordinates."""
        grads = grads.to(self.device)
        out = torch.zeros(self.k, grads.shape[0], device=self.device)
        for b in range(math.ceil(self.n / self.block_rows)):
            block = grads[:, b * self.block_rows:(b + 1) * self.block_rows]
            out.add_(self._bag_sums(block, *self._cache[b]) if b < self.cached_blocks
                     else self._scatter_sums(block, *self._rows(b)))
        self._drawn = None
        return out.t().contiguous()


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


class KroneckerProjector:
    """LoGra's structured projection of an (out x in) weight gradient: ``P_out^T G P_in``, flattened row-major.

    Equal to projecting the flattened gradient with ``kron(P_out, P_in)``.  ``factors``
    are the two +-1 matrices, each generated from the seed and the tensor's name.
    """

    name = "gradlake.kronecker"

    def __init__(self, shape: tuple[int, int], factors: tuple[int, int], seed: int, stream: str, device="cpu"):
        (self.rows, self.cols), (self.k_out, self.k_in) = shape, factors
        self.factors = tuple(BlockProjector(n, k, "rademacher", seed, f"{stream}|{side}", device, memory_budget=1 << 62)._matrix
                             for n, k, side in ((self.rows, self.k_out, "out"), (self.cols, self.k_in, "in")))

    def project(self, grads: torch.Tensor) -> torch.Tensor:
        """(batch, out * in) -> (batch, k_out * k_in) in float32."""
        p_out, p_in = self.factors
        g = grads.to(p_in.device, torch.float32).view(-1, self.rows, self.cols)
        return (p_out.T @ (g @ p_in)).reshape(g.shape[0], -1)


def choose_projector(n: int, k: int, kind: str, device="cpu", memory_budget: int = MEMORY_BUDGET,
                     backend: str = "auto") -> str:
    """Which projector serves an (n -> k) projection (its name, as recorded in attrs); builds nothing."""
    if backend not in ("auto", "traker", "gradlake"):
        raise ProjectionError(f"projector backend {backend!r} is not known; use 'auto', 'traker' or 'gradlake'")
    if kind == "sparse":
        return SparseProjector.name
    if kind == "kronecker":
        return KroneckerProjector.name
    if backend == "gradlake":
        return BlockProjector.name
    gpu_kernel = torch.device(device).type == "cuda" and _fast_jl_available()
    if gpu_kernel:
        return "traker.cuda"
    fits_whole = n * k * 4 <= memory_budget
    fits_traker_block = n * min(k, 100) * 4 <= memory_budget
    if backend == "traker" or (fits_traker_block and not fits_whole):
        return "traker.basic"
    return BlockProjector.name


def make_projector(n: int, k: int, kind: str, seed: int, stream: str, device="cpu",
                   memory_budget: int = MEMORY_BUDGET, backend: str = "auto"):
    """The projector for an (n -> k) projection of dense kinds: TRAK's where it serves, gradlake's beyond that."""
    choice = choose_projector(n, k, kind, device, memory_budget, backend)
    if choice == SparseProjector.name:
        return SparseProjector(n, k, seed, stream, device, memory_budget)
    if choice.startswith("traker."):
        return TrakProjector(n, k, kind, seed, stream, device)
    return BlockProjector(n, k, kind, seed, stream, device, memory_budget)


# -- a projection setting applied to a set of tensors ----------------------------------------------


def plan_projectors(spec: ProjectionSpec, shapes: dict[str, tuple[int, ...]], device, check_cost: bool = True) -> list[tuple[str, int, int, str, int]]:
    """(tensor, n, k, projector, its memory budget) in tensor order, or one clear error.

    Cached dense matrices share MEMORY_BUDGET, cached sparse indices SPARSE_CACHE_BUDGET.
    On a CPU, a dense projection whose matrix must be drawn again for every batch
    (too large to cache) is refused when that costs more than
    ``REGENERATION_LIMIT_CPU_HOURS`` per batch.
    """
    dims = check_projection(spec, shapes)
    planned, budget, sparse_budget = [], MEMORY_BUDGET, SPARSE_CACHE_BUDGET
    for name, shape in shapes.items():
        n, k = math.prod(shape), dims[name]
        choice = choose_projector(n, k, spec.kind, device, budget)
        if choice == SparseProjector.name:
            planned.append((name, n, k, choice, sparse_budget))
            sparse_budget -= sparse_cache_plan(n, k, sparse_budget)[1]
            continue
        planned.append((name, n, k, choice, budget))
        if choice == BlockProjector.name and n * k * 4 <= budget:
            budget -= n * k * 4
    if check_cost:
        _refuse_regeneration(spec, planned, device)
    return planned


def regeneration_cpu_hours(planned: list[tuple[str, int, int, str, int]]) -> float:
    """Estimated CPU-hours per batch (per ``project`` call) spent drawing dense matrices that are not cached."""
    entries = sum(n * k for _, n, k, choice, budget in planned if _regenerates(choice, n, k, budget))
    return entries * NS_PER_DENSE_ENTRY / 3.6e12


def regeneration_seconds(spec: ProjectionSpec, shapes: dict[str, tuple[int, ...]], device="cpu") -> dict[str, float]:
    """Tensor -> estimated CPU seconds spent drawing its dense matrix again on every ``project`` call (0 when it
    is cached, sparse, kronecker, or on a GPU); builds nothing."""
    if torch.device(device).type != "cpu":
        return {name: 0.0 for name in shapes}
    return {name: n * k * NS_PER_DENSE_ENTRY * 1e-9 if _regenerates(choice, n, k, budget) else 0.0
            for name, n, k, choice, budget in plan_projectors(spec, shapes, device, check_cost=False)}


def _regenerates(choice: str, n: int, k: int, budget: int) -> bool:
    return choice == "traker.basic" or (choice == BlockProjector.name and n * k * 4 > budget)


def _refuse_regeneration(spec: ProjectionSpec, planned: list, device) -> None:
    if torch.device(device).type != "cpu":
        return  # on a GPU, traker draws its matrices on the device (or fast_jl never stores them)
    hours = regeneration_cpu_hours(planned)
    if hours <= REGENERATION_LIMIT_CPU_HOURS:
        return
    slow = [(name, n) for name, n, k, choice, budget in planned if _regenerates(choice, n, k, budget)]
    params = sum(n for _, n in slow)
    k = max(k for _, _, k, _, _ in planned)
    raise ProjectionError(
        f"projection {spec.label} on the CPU would draw its dense random matrix again for every batch: "
        f"{len(slow)} tensors of {params:,} parameters (the largest {max(slow, key=lambda s: s[1])[0]!r}) to "
        f"{k:,} dimensions, about {hours:,.1f} CPU-hours per batch at {NS_PER_DENSE_ENTRY} ns per matrix entry "
        f"(the limit is {REGENERATION_LIMIT_CPU_HOURS:g}; only {MEMORY_BUDGET >> 20} MiB of matrix is cached). "
        f"Use kind 'kronecker' for linear and embedding weights (e.g. 'kronecker:64x64') or kind 'sparse' "
        f"(e.g. 'sparse:{spec.scope}:{spec.dim}'), which cost a few operations per gradient entry; or fewer "
        f"tensors or a smaller dim; or a GPU with fast_jl (pip install 'gradlake[cuda]')")


def projector_choices(spec: ProjectionSpec, shapes: dict[str, tuple[int, ...]], device="cpu",
                      check_cost: bool = True) -> dict[str, str]:
    """Tensor -> the name of the projector that will serve it (recorded in the group's attrs); builds nothing."""
    return {name: choice for name, _, _, choice, _ in plan_projectors(spec, shapes, device, check_cost)}


def projectors_for(spec: ProjectionSpec, shapes: dict[str, tuple[int, ...]], device="cpu") -> dict:
    """One projector per tensor, each from the seed and the tensor's name alone; kept for the next batch or shard."""
    return dict(_projectors(spec, tuple((n, tuple(s)) for n, s in shapes.items()), str(device)))


@lru_cache(maxsize=4)
def _projectors(spec: ProjectionSpec, shapes: tuple[tuple[str, tuple[int, ...]], ...], device: str) -> tuple:
    shapes_ = dict(shapes)
    out = []
    for name, n, k, choice, budget in plan_projectors(spec, shapes_, device):
        if choice == KroneckerProjector.name:
            projector = KroneckerProjector(shapes_[name], spec.kronecker_factors(), spec.seed, name, device)
        else:
            projector = make_projector(n, k, spec.kind, spec.seed, name, device, memory_budget=budget,
                                       backend="traker" if choice.startswith("traker.") else "gradlake")
        out.append((name, projector))
    return tuple(out)


def project_batch(spec: ProjectionSpec, grads: dict[str, torch.Tensor], projectors: dict) -> dict[str, torch.Tensor]:
    """Project one batch of per-tensor (batch, numel) gradients: {output array: (batch, dim)}."""
    out: dict[str, torch.Tensor] = {}
    for name, g in grads.items():
        key, part = output_key(spec, name), projectors[name].project(g)
        out[key] = out[key] + part if key in out else part
    return out
