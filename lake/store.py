"""Where a lake lives: an fsspec URL, its filesystem, and the Zarr root on it.

``file:///path`` (or a plain path) is the embedded default; ``s3://bucket/prefix``
reaches S3 or MinIO.  The S3 endpoint comes from ``storage_options`` or from the
environment (``GRADLAKE_S3_ENDPOINT_URL``, else ``AWS_ENDPOINT_URL_S3`` /
``AWS_ENDPOINT_URL``); credentials are left to s3fs, which reads the usual AWS
variables and files.  Nothing here ever writes a credential anywhere.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cache, cached_property
from urllib.parse import urlparse, urlsplit, urlunsplit

import fsspec
import zarr

from gradlake.lake.layout import CHUNK_BYTES


class LakeError(ValueError):
    """A lake that cannot be used as asked, with what would be accepted."""


_ENDPOINT_VARS = ("GRADLAKE_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")


def default_lake() -> str:
    """The lake URL from ``GRADLAKE_LAKE``, else ``demo-lake`` in the working directory."""
    return os.environ.get("GRADLAKE_LAKE") or "demo-lake"


_RETRY_VARS = ("AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE")
# Connection resets are retried by botocore alone (s3fs retries only 503 SlowDown and closed
# connections, aiohttp resends an idempotent request once), so a profile with max_attempts = 1
# fails an extraction on the first reset; and botocore's default is set to change (legacy mode,
# 5 attempts, today; 'standard', 3 attempts, under AWS_NEW_RETRIES_2026).  Pinned here to what
# carries an extraction through 15-30% injected faults (tests/test_s3_faults.py): 5 attempts
# with standard backoff.  Not more: a dead endpoint is reported only after the last
# attempt (about 10 s with 5 attempts, a minute with 10); longer outages are the Prefect tasks' retries.
_RETRIES = {"total_max_attempts": 5, "mode": "standard"}


def storage_options_for(url: str, storage_options: dict | None = None) -> dict:
    """fsspec options for a lake URL: the caller's, plus the S3 endpoint from the environment and retries.

    Retries (see `_RETRIES`) are added unless the caller's ``config_kwargs`` name some, or
    ``AWS_MAX_ATTEMPTS`` / ``AWS_RETRY_MODE`` are set (then botocore's own choice stands).
    """
    options = dict(storage_options or {})
    if not url.startswith(("s3://", "s3a://")):
        return options
    if "endpoint_url" not in options and "client_kwargs" not in options:
        endpoint = next((os.environ[v] for v in _ENDPOINT_VARS if os.environ.get(v)), None)
        if endpoint:
            options["endpoint_url"] = endpoint
    config = dict(options.get("config_kwargs") or {})
    if "retries" not in config and not any(os.environ.get(v) for v in _RETRY_VARS):
        options["config_kwargs"] = {**config, "retries": dict(_RETRIES)}
    return options


def normalize_url(url: str) -> str:
    """A lake URL with a scheme: plain paths become absolute ``file://`` URLs."""
    if not url:
        raise LakeError("the lake URL is empty; pass file:///path/to/lake, a directory path, or s3://bucket/prefix")
    refuse_credentials(url, "lake URL")
    scheme = urlparse(url).scheme
    if scheme in ("", "file"):
        path = url[len("file://"):] if url.startswith("file://") else url
        return "file://" + os.path.abspath(os.path.expanduser(path))
    if scheme not in ("s3", "s3a"):
        raise LakeError(f"lake URL scheme {scheme!r} of {url!r} is not supported; use file:// or s3://")
    return url.rstrip("/")


def refuse_credentials(url: str, what: str, instead: str = "the credentials in the environment (AWS_ACCESS_KEY_ID "
                       "and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, for s3://)") -> str:
    """`url` unless it carries ``user:password@`` (a credential); then one LakeError that leaves it out.

    `instead`: where the credentials belong, said in the message."""
    if "://" in url and "@" in urlsplit(url).netloc:
        raise LakeError(f"{what} {public_url(url)!r} was given with credentials in it ('<user>:<secret>@', left out "
                        f"here): give the URL without them, and {instead}")
    return url


def public_url(url: str) -> str:
    """A URL fit for a message: any ``user:password@`` in it left out."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


_NO_CREDENTIALS = {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"}
_UNREACHABLE = {"EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError", "ConnectionError",
                "TimeoutError", "gaierror"}
_REFUSED_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken", "403"}


def error_chain(err: BaseException) -> list[BaseException]:
    """An exception and those it was raised from or during, outermost first; `raise ... from None` ends the chain."""
    seen: list[BaseException] = []
    while err is not None and all(err is not e for e in seen):
        seen.append(err)
        err = err.__cause__ or (None if err.__suppress_context__ else err.__context__)
    return seen


def storage_problem(err: BaseException, url: str | None, storage_options: dict | None = None,
                    writing: bool = False) -> str | None:
    """One line naming a storage failure the user can fix and what to check, or None for any other error.

    Covers an S3 endpoint that does not answer, missing or refused credentials, and a local directory
    without permission (`url` None: a lake not known here, so only what botocore raised is read).
    `writing`: the refused request was a write, so the credentials need write access, not only read.
    No credential is ever part of the line.
    """
    chain = error_chain(err)
    kinds = {cls.__name__ for e in chain for cls in type(e).__mro__}
    codes = {str(e.response.get("Error", {}).get("Code")) for e in chain if isinstance(getattr(e, "response", None), dict)}
    where = public_url(url) if url else "the lake"
    on_s3 = url.startswith(("s3://", "s3a://")) if url else any(type(e).__module__.startswith("botocore") for e in chain)
    if on_s3 and kinds & _NO_CREDENTIALS:
        return (f"no S3 credentials found for {where}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                "or AWS_PROFILE naming a profile in ~/.aws/credentials")
    if on_s3 and kinds & _UNREACHABLE:
        endpoint = _endpoint(storage_options or {}, chain)
        if "ConnectionRefusedError" in kinds:
            why = "connection refused"
        elif "gaierror" in kinds:
            why = "host name not found"
        elif kinds & {"TimeoutError", "ConnectTimeoutError"}:
            why = "timed out"
        else:
            why = type(chain[-1]).__name__
        source = next((v for v in _ENDPOINT_VARS if endpoint and os.environ.get(v) == endpoint), None)
        check = source or ("storage_options['endpoint_url']" if endpoint else "GRADLAKE_S3_ENDPOINT_URL (none is set)")
        return f"cannot reach the S3 endpoint {public_url(endpoint or 'of AWS')} for {where}: {why}; check {check}"
    if on_s3 and (codes & _REFUSED_CODES or "PermissionError" in kinds):
        code = min(codes & _REFUSED_CODES, default="access denied")
        return (f"S3 refused access to {where} ({code}); check that the credentials in AWS_ACCESS_KEY_ID / "
                f"AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) are current and may {'write to' if writing else 'read'} this bucket")
    if url and "PermissionError" in kinds:
        return f"permission denied on lake {where}; check the directory's owner and mode"
    return None


def _endpoint(storage_options: dict, chain: list[BaseException]) -> str | None:
    """The S3 endpoint in use: from the options, else scheme and host of the URL the failed request went to."""
    endpoint = storage_options.get("endpoint_url") or storage_options.get("client_kwargs", {}).get("endpoint_url")
    if endpoint:
        return endpoint
    for e in chain:
        sent = getattr(e, "kwargs", {}).get("endpoint_url") if isinstance(getattr(e, "kwargs", None), dict) else None
        if sent:
            parts = urlsplit(sent)
            return f"{parts.scheme}://{parts.netloc}"
    return None


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8
_CHUNK_BUFFERS = 2 * CHUNK_BYTES  # above a chunk object and its checksum


@cache
def keep_chunk_buffers() -> bool:
    """Let freed chunk-sized buffers be reused instead of returned to the OS; True when the allocator was tuned.

    Every chunk read allocates a 16 MiB buffer for the object's bytes, on whichever thread the
    read runs.  glibc serves that from mmap, or from a per-thread arena of at most 64 MiB, and
    gives it back to the OS when freed, so the next chunk touches fresh pages: with zarr's ten
    reads at a time a whole-array read from S3 spent more time in page faults than in moving bytes
    (118,000 faults for 512 MiB, at 0.4x the rate of the same chunks read a row-chunk at a time).
    One arena, chunk-sized allocations kept in it and up to 512 MiB of free memory kept for reuse
    make that 800 faults (on a local lake 57,600 become 24,600; benchmarks/io.py).  tests/test_io.py
    checks that such a buffer comes from the heap.  Process-wide, so done once; skipped off glibc, when
    the process sets any MALLOC_* variable itself, or with GRADLAKE_MALLOC=default.
    Arenas made before this call keep their own limits, so it runs as the first lake is opened.
    """
    if not sys.platform.startswith("linux") or os.environ.get("GRADLAKE_MALLOC") == "default":
        return False
    if any(name.startswith("MALLOC_") or name.startswith("GLIBC_TUNABLES") for name in os.environ):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # musl and others: no mallopt
        return False
    return all(mallopt(param, value) == 1 for param, value in
               ((_M_ARENA_MAX, 1), (_M_MMAP_THRESHOLD, _CHUNK_BUFFERS), (_M_TRIM_THRESHOLD, 512 << 20)))


@dataclass
class LakeStore:
    """A lake's filesystem and root, and the Zarr store over it."""

    url: str
    storage_options: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.url = normalize_url(self.url)
        self.storage_options = storage_options_for(self.url, self.storage_options)
        keep_chunk_buffers()

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
        with self.explained_errors():
            self.fs.invalidate_cache()
            return sorted(self.fs.glob(self.path(pattern)))

    @contextmanager
    def explained_errors(self) -> Iterator[None]:
        """Storage failures inside the block become one LakeError saying what failed and what to check."""
        try:
            yield
        except LakeError:
            raise
        except Exception as err:
            problem = storage_problem(err, self.url, self.storage_options)
            if problem is None:
                raise
            raise LakeError(problem) from None  # the library's own traceback would bury the one line

    def check_exists(self) -> None:
        """One LakeError unless the lake's root is there to be read: a directory, or an existing bucket."""
        if self.is_local:
            if not os.path.exists(self.root):
                raise LakeError(f"lake {self.root} holds nothing: the directory does not exist")
            if not os.path.isdir(self.root):
                raise LakeError(f"lake {self.root} holds nothing: it is a file, not a directory")
            return
        bucket = self.root.split("/", 1)[0]
        with self.explained_errors():
            try:
                self.fs.info(bucket)
            except FileNotFoundError:
                endpoint = _endpoint(self.storage_options, []) or "AWS"
                raise LakeError(f"lake {public_url(self.url)} holds nothing: the bucket {bucket!r} does not exist at "
                                f"{public_url(endpoint)}; check the bucket name and the S3 endpoint") from None
            except PermissionError:
                pass  # keys may be allowed their prefix and not the bucket; then an empty listing is the answer

    @cached_property
    def zarr_store(self) -> zarr.abc.store.Store:
        if self.is_local:
            return zarr.storage.LocalStore(self.root)
        return zarr.storage.FsspecStore.from_url(self.url, storage_options=self.storage_options)

    def zarr_root(self, mode: str = "r") -> zarr.Group:
        return zarr.open_group(self.zarr_store, mode=mode, zarr_format=3)

    def check_links(self) -> None:
        """One LakeError naming the first link inside a local lake that leads out of it (writes would follow it).

        Links that stay inside the lake are allowed; an S3 lake has no links."""
        if not self.is_local or not os.path.isdir(self.root):
            return
        inside, pending = os.path.realpath(self.root), [self.root]
        while pending:  # scandir's entry types need no stat per file: 100,000 chunk files in about 0.2 s
            try:
                entries = list(os.scandir(pending.pop()))
            except FileNotFoundError:  # removed meanwhile by another run (a released lease, a cleared claim)
                continue
            for item in entries:
                if not item.is_symlink():
                    if item.is_dir(follow_symlinks=False):
                        pending.append(item.path)
                    continue
                path, target = item.path, os.path.realpath(item.path)  # a link is looked at, never entered
                if os.path.commonpath([inside, target]) != inside:
                    raise LakeError(f"{path} in lake {self.root} is a link to {target}, outside the lake: "
                                    "gradlake would write through it; replace the link by a directory (or copy) "
                                    "inside the lake, or use the target as a lake of its own")

    def check_writable(self) -> None:
        """Raise one clear error if the lake cannot be written, or a link in it leads out; leaves nothing behind."""
        self.check_links()
        probe = self.path(f".gradlake-write-probe-{uuid.uuid4().hex}")
        try:
            if self.is_local:
                os.makedirs(self.root, exist_ok=True)
            self.fs.pipe_file(probe, b"")
            self.fs.rm_file(probe)
        except Exception as err:
            problem = storage_problem(err, self.url, self.storage_options, writing=True)
            if problem:
                raise LakeError(f"lake {public_url(self.url)!r} is not writable: {problem}") from None
            raise LakeError(f"lake {public_url(self.url)!r} is not writable ({type(err).__name__}: {err}); "
                            "pass a directory you can write, or an s3:// URL with credentials in the environment") from err


class DamagedMetadata(LakeError):
    """A metadata file in the lake that is there but cannot be read as JSON."""


def read_json(store: LakeStore, relative: str) -> dict | None:
    """A JSON metadata file of the lake, or None where there is none; a damaged one is one error naming it."""
    with store.explained_errors():
        try:
            raw = store.fs.cat_file(store.path(relative))
        except FileNotFoundError:
            return None
    try:
        record = json.loads(raw)
    except ValueError as err:  # JSONDecodeError and UnicodeDecodeError alike
        raise DamagedMetadata(
            f"damaged metadata: {public_url(store.url)}/{relative} is not valid JSON ({err}); "
            "run `gradlake verify` to list what is damaged, then restore the file or remove what holds it and rerun"
        ) from None
    if not isinstance(record, dict):
        raise DamagedMetadata(f"damaged metadata: {public_url(store.url)}/{relative} holds {type(record).__name__}, "
                              "not a JSON object")
    return record


def read_json_attrs(store: LakeStore, relative: str) -> dict | None:
    """The attributes in a Zarr v3 `zarr.json`, or None where there is no such file."""
    record = read_json(store, relative)
    return None if record is None else dict(record.get("attributes") or {})


def scan_json(store: LakeStore, pattern: str) -> Iterator[tuple[str, dict | None, str | None]]:
    """(directory relative to the lake, its JSON record, None) for each file matching `pattern` (relative to
    the lake), or (directory, None, the one-line reason) for a damaged one: one bad file never hides the rest."""
    for path in store.glob(pattern):
        relative = path[len(store.root) + 1:]
        directory = relative.rsplit("/", 1)[0]
        try:
            yield directory, read_json(store, relative), None
        except DamagedMetadata as err:
            yield directory, None, str(err)
