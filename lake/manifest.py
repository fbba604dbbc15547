"""Digest manifests: what a directory held when it was written, so that any later change to it is named.

A directory written whole (a result, a set of influence factors, a training checkpoint) ends with
``manifest.json``, written last:

```
{"format": 1, "files": {"<name relative to the directory>": {"bytes": 1234, "sha256": "<hex>"}, ...}}
```

Reading a file through `read_checked` compares it with its entry; `check_directory` compares every
entry (a file missing, cut short, or changed is one problem naming it).  Names in a manifest are
plain relative paths: an absolute name, or one that climbs out with ``..``, is refused wherever it
is read, so a tampered manifest can never point a reader or a copy outside its directory.

The functions take an fsspec filesystem and a path on it, so a lake (`LakeStore.fs`,
`LakeStore.path`) and a training output directory use them alike.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import uuid

import fsspec

from gradlake.lake.store import LakeError

MANIFEST = "manifest.json"
FORMAT = 1
_BLOCK = 8 << 20


class DamagedFile(LakeError):
    """A file whose bytes differ from what its directory's manifest recorded (or the manifest itself is damaged)."""


def safe_name(name: str, where: str = "") -> str:
    """`name` if it is a plain relative path inside its directory; else one LakeError naming it."""
    parts = name.replace("\\", "/").split("/") if isinstance(name, str) else []
    if (not isinstance(name, str) or not name or name.startswith(("/", "\\")) or "\\" in name or ":" in name
            or any(part in ("", ".", "..") for part in parts)):
        raise LakeError(f"file name {name!r}{f' in {where}' if where else ''} is not a plain relative path inside "
                        "its directory (no leading '/', no '..', no ':' or '\\'); the manifest naming it was changed "
                        "after it was written: run `gradlake verify` and write that directory again")
    return name


def entry(data: bytes) -> dict:
    """The manifest entry of bytes about to be written."""
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def file_entry(fs: fsspec.AbstractFileSystem, path: str) -> dict:
    """The manifest entry of a file already written (read in blocks: checkpoints are many GB)."""
    digest, size = hashlib.sha256(), 0
    with fs.open(path, "rb") as handle:
        while block := handle.read(_BLOCK):
            digest.update(block)
            size += len(block)
    return {"bytes": size, "sha256": digest.hexdigest()}


def local_entries(directory: str, names: list[str] | None = None) -> dict[str, dict]:
    """Entries of the files under a local `directory` (all of them, or `names`), keyed by relative POSIX name."""
    fs = fsspec.filesystem("file")
    if names is None:
        names = sorted(posixpath.relpath(p, directory.replace(os.sep, "/"))
                       for p in fs.find(directory) if not p.endswith(MANIFEST))
    return {safe_name(name): file_entry(fs, f"{directory}/{name}") for name in names}


def write_manifest(fs: fsspec.AbstractFileSystem, directory: str, files: dict[str, dict]) -> None:
    """Write ``<directory>/manifest.json`` for `files` (name -> entry); call it after every file is written."""
    record = json.dumps({"format": FORMAT, "files": {safe_name(n): files[n] for n in sorted(files)}},
                        indent=1).encode()
    write_whole(fs, f"{directory}/{MANIFEST}", record)


def write_whole(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write `data` at `path` so that no reader ever sees it half written (locally: a temporary name renamed
    into place; an object store's object is whole or absent anyway)."""
    if isinstance(fs, fsspec.implementations.local.LocalFileSystem):
        temporary = f"{path}.{uuid.uuid4().hex}.tmp"
        with open(temporary, "wb") as handle:
            handle.write(data)
        os.replace(temporary, path)
    else:
        fs.pipe_file(path, data)


def read_manifest(fs: fsspec.AbstractFileSystem, directory: str) -> dict[str, dict] | None:
    """The entries of ``<directory>/manifest.json``; None where there is none; DamagedFile if it is not readable."""
    path = f"{directory}/{MANIFEST}"
    try:
        raw = fs.cat_file(path)
    except FileNotFoundError:
        return None
    try:
        record = json.loads(raw)
        files = record["files"]
        if not isinstance(files, dict) or not all(isinstance(e, dict) and isinstance(e.get("bytes"), int)
                                                  and isinstance(e.get("sha256"), str) for e in files.values()):
            raise ValueError("entries are not {bytes, sha256}")
    except (ValueError, KeyError, TypeError) as err:
        raise DamagedFile(f"{path} is damaged ({type(err).__name__}: {str(err)[:80]}); write that directory again "
                          "(run the stage that made it)") from None
    for name in files:
        safe_name(name, path)
    return files


def entry_problem(path: str, data_entry: dict, recorded: dict) -> str | None:
    """How the file at `path`, whose entry is `data_entry`, differs from its `recorded` entry; None when it does not."""
    if data_entry["bytes"] != recorded["bytes"]:
        return f"{path} holds {data_entry['bytes']} bytes, {recorded['bytes']} were written"
    if data_entry["sha256"] != recorded["sha256"]:
        return f"{path} differs from what was written (its sha256 changed)"
    return None


def check_directory(fs: fsspec.AbstractFileSystem, directory: str, required: bool = True) -> list[str]:
    """Problems of a directory against its manifest, one line each (empty: every file is as written).

    With `required`, a directory without a manifest is one problem (it was never finished, or is older)."""
    try:
        files = read_manifest(fs, directory)
    except LakeError as err:
        return [str(err)]
    if files is None:
        return [f"{directory} has no {MANIFEST}: it was not written to the end"] if required else []
    problems = []
    for name, recorded in files.items():
        path = f"{directory}/{name}"
        try:
            problem = entry_problem(path, file_entry(fs, path), recorded)
        except FileNotFoundError:
            problem = f"{path} is missing"
        if problem:
            problems.append(problem)
    return problems


def listing_problems(fs: fsspec.AbstractFileSystem, directory: str, files: dict[str, dict],
                     others: tuple[str, ...] = (MANIFEST,)) -> list[str]:
    """Problems seen in the listing of `directory` alone, no file read: a file of `files` (name -> entry) missing or
    of another size, and a file that neither `files` nor `others` names (it was added after the directory was
    written).  One line each; sha256 is compared only where a file is read (`check_directory`, `read_checked`)."""
    fs.invalidate_cache(directory)  # s3fs keeps listings; another process may have changed the directory since
    try:
        listed = fs.find(directory, detail=True)
    except FileNotFoundError:
        listed = {}
    sizes = {posixpath.relpath(path, directory): info.get("size") for path, info in listed.items()
             if info.get("type") != "directory"}
    problems = []
    for name, recorded in files.items():
        if name not in sizes:
            problems.append(f"{directory}/{name} is missing")
        elif sizes[name] != recorded["bytes"]:
            problems.append(f"{directory}/{name} holds {sizes[name]} bytes, {recorded['bytes']} were written")
    problems += [f"{directory}/{name} was added after the directory was written (its record does not list it)"
                 for name in sorted(set(sizes) - set(files) - set(others))]
    return problems


def read_checked(fs: fsspec.AbstractFileSystem, directory: str, name: str, files: dict[str, dict] | None = None) -> bytes:
    """The bytes of ``<directory>/<name>``, checked against the manifest; one DamagedFile naming it otherwise.

    A directory without a manifest (written before manifests existed) is read unchecked."""
    safe_name(name, directory)
    files = read_manifest(fs, directory) if files is None else files
    path = f"{directory}/{name}"
    try:
        data = fs.cat_file(path)
    except FileNotFoundError:
        if files is not None and name in files:
            raise DamagedFile(f"{path} is missing; run `gradlake verify`, then the stage that wrote it again") from None
        raise
    if files is not None and name in files:
        problem = entry_problem(path, entry(data), files[name])
        if problem:
            raise DamagedFile(f"{problem}; run `gradlake verify`, then the stage that wrote it again")
    return data


__all__ = ["MANIFEST", "DamagedFile", "safe_name", "entry", "file_entry", "local_entries", "write_manifest", "write_whole",
           "read_manifest", "entry_problem", "check_directory", "listing_problems", "read_checked"]
