"""Where a lake lives: an fsspec URL, its filesystem, and the Zarr root on it.

``file:///path`` (or a plain path) is the embedded default; ``s3://bucket/prefix``
reaches S3 or MinIO.  The S3 endpoint comes from ``storage_options`` or from the
environment (``GRADLAKE_S3_ENDPOINT_URL``, else ``AWS_ENDPOINT_URL_S3`` /
``AWS_ENDPOINT_URL``); credentials are left to s3fs, which reads the usual AWS
variables and files.  Nothing here ever writes a credential anywhere.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field
from functools import cached_property
from urllib.parse import urlparse

import fsspec
import zarr


class LakeError(ValueError):
    """A lake that cannot be used as asked, with what would be accepted."""


_ENDPOINT_VARS = ("GRADLAKE_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")


def default_lake() -> str:
    """The lake URL from ``GRADLAKE_LAKE``, else ``demo-lake`` in the working directory."""
    return os.environ.get("GRADLAKE_LAKE") or "demo-lake"


def storage_options_for(url: str, storage_options: dict | None = None) -> dict:
    """fsspec options for a lake URL: the caller's, plus the S3 endpoint from the environment."""
    options = dict(storage_options or {})
    if url.startswith(("s3://", "s3a://")) and "endpoint_url" not in options and "client_kwargs" not in options:
        endpoint = next((os.environ[v] for v in _ENDPOINT_VARS if os.environ.get(v)), None)
        if endpoint:
            options["endpoint_url"] = endpoint
    return options


def normalize_url(url: str) -> str:
    """A lake URL with a scheme: plain paths become absolute ``file://`` URLs."""
    if not url:
        raise LakeError("the lake URL is empty; pass file:///path/to/lake, a directory path, or s3://bucket/prefix")
    scheme = urlparse(url).scheme
    if scheme in ("", "file"):
        path = url[len("file://"):] if url.startswith("file://") else url
        return "file://" + os.path.abspath(os.path.expanduser(path))
    if scheme not in ("s3", "s3a"):
        raise LakeError(f"lake URL scheme {scheme!r} of {url!r} is not supported; use file:// or s3://")
    return url.rstrip("/")


@dataclass
class LakeStore:
    """A lake's filesystem and root, and the Zarr store over it."""

    url: str
    storage_options: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.url = normalize_url(self.url)
        self.storage_options = storage_options_for(self.url, self.storage_options)

    @property
    def is_local(self) -> bool:
        return self.url.startswith("file://")

    @cached_property
    def fs(self) -> fsspec.AbstractFileSystem:
        fs, _ = fsspec.core.url_to_fs(self.url, **self.storage_options)
        return fs

    @property
    def root(self) -> str:
        return self.url.split("://", 1)[1]

    def path(self, relative: str) -> str:
        """The filesystem path of a location inside the lake."""
        return f"{self.root}/{relative}".rstrip("/")

    def glob(self, pattern: str) -> list[str]:
        """Paths matching a pattern relative to the lake, listed afresh (s3fs caches listings, so a
        long-lived process would otherwise never see what other processes added)."""
        self.fs.invalidate_cache()
        return sorted(self.fs.glob(self.path(pattern)))

    @cached_property
    def zarr_store(self) -> zarr.abc.store.Store:
        if self.is_local:
            return zarr.storage.LocalStore(self.root)
        return zarr.storage.FsspecStore.from_url(self.url, storage_options=self.storage_options)

    def zarr_root(self, mode: str = "r") -> zarr.Group:
        return zarr.open_group(self.zarr_store, mode=mode, zarr_format=3)

    def check_writable(self) -> None:
        """Raise one clear error if the lake cannot be written; leaves nothing behind."""
        probe = self.path(f".gradlake-write-probe-{uuid.uuid4().hex}")
        try:
            if self.is_local:
                os.makedirs(self.root, exist_ok=True)
            self.fs.pipe_file(probe, b"")
            self.fs.rm_file(probe)
        except Exception as err:
            raise LakeError(f"lake {self.url!r} is not writable ({type(err).__name__}: {err}); "
                            "pass a directory you can write, or an s3:// URL with credentials in the environment") from err
