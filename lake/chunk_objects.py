"""A row-chunk's objects encoded as Zarr encodes them and put in one batch (S3 requests, or local files).

Zarr's own write of a plain chunk (its values' bytes, then a CRC32C) copies it three times (the
slice, the checksum appended, the bytes handed to the request), scans it for the fill value first,
and writes each array's chunks apart from the others'.  Here each chunk is copied once, into a
buffer that ends with room for its checksum, and every object of a row-chunk, of every array, goes
out in one batch (as s3fs alone would put them, with at most `WINDOW` encoded and not yet sent, so
that a wide row-chunk is not copied whole first): the same bytes in the same objects, so Zarr reads
them as its own.  Only arrays whose objects are that simple qualify (`plain`): no shards,
no compression, little-endian; the rest are written by Zarr.
"""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import Executor, wait

import fsspec
import google_crc32c
import numpy as np
import zarr
from zarr.codecs import BytesCodec, Crc32cCodec

WINDOW = 16  # objects encoded and in flight at once: above botocore's 10 connections, 256 MiB of 16 MiB chunks
Pending = tuple[str, Callable[[], bytearray]]  # an object's path and what encodes it


def plain(array: zarr.Array) -> bool:
    """True when `array`'s chunk objects are its values' little-endian bytes, optionally followed by their CRC32C."""
    codecs = array.metadata.codecs
    if array.shards is not None or not codecs or not isinstance(codecs[0], BytesCodec):
        return False
    if codecs[0].endian is not None and codecs[0].endian.value != sys.byteorder:
        return False
    return all(isinstance(c, Crc32cCodec) for c in codecs[1:]) and len(codecs) <= 2


def encoded_chunk(array: zarr.Array, block: np.ndarray) -> bytearray:
    """The object of one chunk of a `plain` array holding `block` (its top-left corner; the rest of the chunk, past
    the array's edge, is the fill value, as Zarr pads an edge chunk)."""
    chunk = array.chunks
    dtype = np.dtype(array.dtype)
    checked = len(array.metadata.codecs) == 2
    size = int(np.prod(chunk)) * dtype.itemsize
    out = bytearray(size + 4 * checked)
    values = np.frombuffer(out, dtype=np.uint8, count=size).view(dtype).reshape(chunk)
    if block.shape != tuple(chunk):
        values[...] = array.fill_value
    values[tuple(slice(0, n) for n in block.shape)] = block
    if checked:
        data = np.frombuffer(out, dtype=np.uint8, count=size)
        data.flags.writeable = False  # google_crc32c takes read-only buffers only
        out[size:] = np.uint32(google_crc32c.value(data)).tobytes()
    return out


def row_chunk_objects(array: zarr.Array, root: str, index: int, rows: np.ndarray) -> list[Pending]:
    """Every object of row-chunk `index` of a 2-D `plain` array (`rows`: its values) under `root`, encoded when put."""
    width = array.chunks[1]
    return [(f"{root}/{array.path}/{array.metadata.encode_chunk_key((index, j))}",
             lambda c0=c0: encoded_chunk(array, rows[:, c0:c0 + width]))
            for j, c0 in enumerate(range(0, array.shape[1], width))]


def element_object(array: zarr.Array, root: str, index: int, value) -> Pending:
    """The object of element `index` of a 1-D `plain` array in chunks of one (a flag, a digest), holding `value`."""
    return (f"{root}/{array.path}/{array.metadata.encode_chunk_key((index,))}",
            lambda: encoded_chunk(array, np.asarray([value], dtype=array.dtype)))


def put_objects(fs: fsspec.AbstractFileSystem, objects: Iterable[Pending], threads: Executor,
                window: int = WINDOW) -> None:
    """Put every object, each encoded just before it is sent: on an async filesystem (S3) `window` requests at a
    time, on a local one as files written on `threads`; the first failure is raised (the rest are cancelled)."""
    if not getattr(fs, "async_impl", False):
        futures = [threads.submit(put_file, path, encode) for path, encode in objects]
        try:
            for future in futures:
                future.result()
        finally:
            for future in futures:
                future.cancel()
            wait(futures)  # none still writing when the caller goes on
        return

    async def put_all() -> None:
        pending: set[asyncio.Future] = set()
        try:
            for path, encode in objects:
                while len(pending) >= window:
                    done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                    for task in done:
                        task.result()
                pending.add(asyncio.ensure_future(fs._pipe_file(path, encode())))
            await asyncio.gather(*pending)
        finally:
            for task in pending:
                task.cancel()

    fsspec.asyn.sync(fs.loop, put_all)


def put_file(path: str, encode: Callable[[], bytearray]) -> None:
    """Write one local object as Zarr's LocalStore does: into a partial file beside it, then renamed over it."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    partial = f"{path}.{uuid.uuid4().hex}.partial"
    try:
        with open(partial, "wb") as f:
            f.write(encode())
        os.replace(partial, path)
    except BaseException:
        if os.path.exists(partial):
            os.unlink(partial)
        raise
