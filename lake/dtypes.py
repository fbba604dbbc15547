"""Storage dtypes of gradients: float32, float16, and bfloat16 kept as its raw 16 bits.

Zarr has no bfloat16 data type, and numpy none either.  A bfloat16 array is stored as
``uint16`` holding the upper half of each float32's bits, with the array attribute
``{"gradlake_dtype": "bfloat16"}``; gradlake's readers (`decode`, `open_lake`) give it back
as float32, exactly.  With plain numpy or xarray the recipe is one shift::

    raw = zarr.open_array(...)[:]                          # uint16
    values = (raw.astype("uint32") << 16).view("float32")  # exact

Rounding to bfloat16 is to nearest, ties to even (as torch does); NaN stays NaN.  A missing
chunk reads as the fill value 0x7FC0, bfloat16's NaN, so it is never taken for zeros.
"""

from __future__ import annotations

import numpy as np

STORE_DTYPES = ("float32", "float16", "bfloat16")
BFLOAT16 = "bfloat16"
DTYPE_ATTR = "gradlake_dtype"
BF16_NAN = 0x7FC0


def zarr_dtype(dtype: str) -> str:
    """The Zarr data type that holds values of storage dtype `dtype`."""
    return "uint16" if dtype == BFLOAT16 else dtype


def fill_value(dtype: str, nan: bool):
    """The fill value of a data array: NaN in the storage dtype (a missing chunk must not read as zeros), else 0."""
    if not nan:
        return 0
    return BF16_NAN if dtype == BFLOAT16 else np.nan


def array_attrs(dtype: str) -> dict:
    """Attributes that tell a reader how to decode an array of storage dtype `dtype`."""
    return {DTYPE_ATTR: BFLOAT16} if dtype == BFLOAT16 else {}


def to_bfloat16_bits(values: np.ndarray) -> np.ndarray:
    """float values -> bfloat16 bits (uint16), rounded to nearest, ties to even; NaN kept NaN."""
    f = np.ascontiguousarray(values, dtype=np.float32)
    bits = f.view(np.uint32)
    rounded = ((bits + (0x7FFF + ((bits >> 16) & 1))) >> 16).astype(np.uint16)
    nan = np.isnan(f)
    if nan.any():  # rounding could carry a NaN's payload into the infinities
        rounded[nan] = (bits[nan] >> 16).astype(np.uint16) | 0x0040
    return rounded


def from_bfloat16_bits(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bits (uint16) -> float32, exactly."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


class Bits(np.ndarray):
    """A uint16 array already holding bfloat16 bits (from a torch bfloat16 tensor): `encode` passes it through."""


def encode(values: np.ndarray, dtype: str) -> np.ndarray:
    """Values as stored for storage dtype `dtype` (contiguous)."""
    if dtype != BFLOAT16:
        return np.ascontiguousarray(values, dtype=dtype)
    if isinstance(values, Bits):
        return np.ascontiguousarray(values.view(np.ndarray))
    return to_bfloat16_bits(values)


def decode(values: np.ndarray, attrs) -> np.ndarray:
    """Stored values as numbers: bfloat16 bits as float32, everything else unchanged."""
    if attrs.get(DTYPE_ATTR) == BFLOAT16:
        return from_bfloat16_bits(values)
    return values


def is_bfloat16(array) -> bool:
    """Whether a Zarr array holds bfloat16 bits."""
    return array.attrs.get(DTYPE_ATTR) == BFLOAT16


def tensor_to_host(tensor, dtype: str) -> np.ndarray:
    """A torch tensor as a host numpy array of its own, ready for `encode`; cast on its device first (less to copy).

    Never a view of `tensor` (whose buffer the next batch reuses).  bfloat16 comes back as
    `Bits`: its raw 16 bits, not rounded a second time."""
    import torch

    cast = tensor.detach().to(torch.bfloat16 if dtype == BFLOAT16 else getattr(torch, dtype))
    host = cast.cpu()
    if host.data_ptr() == tensor.data_ptr():
        host = host.clone()
    if dtype == BFLOAT16:
        return host.view(torch.int16).numpy().view(np.uint16).view(Bits)
    return host.numpy()


def host_rows(shape: tuple[int, ...], dtype: str) -> np.ndarray:
    """An empty host array of `shape` holding values as stored for storage dtype `dtype` (bfloat16: `Bits`)."""
    out = np.empty(shape, dtype=zarr_dtype(dtype))
    return out.view(Bits) if dtype == BFLOAT16 else out


def copy_rows(out: np.ndarray, offsets: np.ndarray, tensor, positions: np.ndarray, dtype: str) -> None:
    """Copy rows `positions` of the torch tensor `tensor` (samples, ...) into rows `offsets` of `out` (`host_rows`).

    Cast to storage dtype `dtype` in the same pass, row by row, with no intermediate copy; on another
    device the rows are gathered and cast there first, then moved in one transfer.  The values are
    those of `tensor_to_host`, bit for bit."""
    import torch

    target = torch.from_numpy(np.asarray(out).view(np.int16)).view(torch.bfloat16) if dtype == BFLOAT16 \
        else torch.from_numpy(np.asarray(out))
    source = tensor.detach()
    if source.device.type != "cpu":
        index = torch.as_tensor(np.asarray(positions), device=source.device)
        source, positions = source.index_select(0, index).to(target.dtype).cpu(), range(len(positions))
    for o, p in zip(np.asarray(offsets).tolist(), list(positions)):
        target[o].copy_(source[p])
