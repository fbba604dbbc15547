"""Integrity of stored chunks: the digest recorded when a row-chunk is written, and reads that name damage.

Every chunk object of a checked group carries a CRC32C (Zarr's crc32c codec), which catches a
damaged object on any read.  What a codec cannot see (an object missing, which Zarr reads as the
fill value; two valid objects swapped) the digest of each row-chunk's values catches.

The row-chunk digest is a CRC32C (`CHUNK_DIGEST`, named in the ``chunk_digest`` array's attrs):
hardware-accelerated in google_crc32c (which Zarr's codec uses too), about 10 GB/s against zlib's
CRC32 at about 2 GB/s.  Groups written before it record no algorithm: theirs is CRC32, still verified.
"""

from __future__ import annotations

import zlib

import google_crc32c
import numpy as np
import zarr

from gradlake.lake.dtypes import decode
from gradlake.lake.store import LakeError


# The row-chunk digest of new groups: CRC32C where google_crc32c has its C build, else zlib's CRC32.
CHUNK_DIGEST = "crc32c" if google_crc32c.implementation == "c" else "crc32"
DIGESTS = ("crc32", "crc32c")


def digest(values, algorithm: str = "crc32") -> int:
    """CRC32 (or CRC32C) of arrays' bytes, one after the other: what a row-chunk (or a group's token array) held
    when written.

    Text (sample ids) is taken as its UTF-8 characters, each value ended by a NUL: the same whichever
    string dtype it is read back as."""
    if algorithm not in DIGESTS:
        raise LakeError(f"digest algorithm {algorithm!r} is not known (a newer gradlake wrote it?); known: {DIGESTS}")
    crc = 0
    for value in values:
        value = np.asarray(value)
        if value.dtype.kind in "OTU":
            data = b"".join(str(v).encode("utf-8", "surrogatepass") + b"\0" for v in value.ravel())
        else:
            data = np.ascontiguousarray(value).reshape(-1).view(np.uint8)
            data.flags.writeable = False  # google_crc32c takes read-only buffers only (a view: nothing copied)
        crc = zlib.crc32(data, crc) if algorithm == "crc32" else google_crc32c.extend(crc, data)
    return crc


def damaged_chunk(array: zarr.Array, rows: slice, err: Exception) -> str:
    """Which chunk object of `array` among rows `rows` cannot be decoded, and why (read again chunk by chunk)."""
    grid = array.shards or array.chunks  # the objects: shards where the array has them
    height = grid[0]
    first, last = (rows.start or 0) // height, -(-(array.shape[0] if rows.stop is None else rows.stop) // height)
    columns = range(-(-array.shape[1] // grid[1])) if array.ndim == 2 else [None]
    for k in range(first, last):
        for j in columns:
            key = (k,) if j is None else (k, j)
            try:
                array.get_block_selection(key)
            except Exception as inner:
                what = ("its checksum does not match" if "checksum" in str(inner).lower()
                        else f"{type(inner).__name__}: {inner}")
                return f"chunk object {array.name.lstrip('/').rsplit('/', 1)[-1]}/c/{'/'.join(map(str, key))} is damaged ({what})"
    return f"cannot be read ({type(err).__name__}: {err})"


def read_checked(array: zarr.Array, selection, dtype=None, nan_ok: bool = False) -> np.ndarray:
    """`array[selection]`, or one LakeError naming the group, array and chunk object that is damaged.

    A missing chunk of a checked group reads as NaN (its fill value); gradients and scores never
    are, so NaN is reported the same way (unless `nan_ok`: the caller names the block itself).  bfloat16 arrays come back as float32 (see `lake.dtypes`).
    """
    try:
        values = np.asarray(decode(array[selection], array.attrs), dtype=dtype)
    except Exception as err:
        rows = selection[0] if isinstance(selection, tuple) else selection
        rows = rows if isinstance(rows, slice) else slice(rows, rows + 1)
        raise LakeError(f"damaged data in {array.name.lstrip('/')}: {damaged_chunk(array, rows, err)}; run "
                        "`gradlake verify --repair` on the lake, then the stage that wrote it again") from None
    if not nan_ok and values.dtype.kind == "f" and np.isnan(values).any():
        rows = np.flatnonzero(np.isnan(values).reshape(values.shape[0], -1).any(axis=1)) if values.ndim else [0]
        raise LakeError(f"{array.name.lstrip('/')} holds NaN (rows {list(rows[:5])} of the selection): a chunk "
                        "object is missing or a value was NaN when written; run `gradlake verify` on the lake")
    return values
