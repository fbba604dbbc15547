"""Checkpoints of watched models: which exist, which are completely written, which the lake already holds.

A watched model is a Hugging Face repository (its branches and tags, filtered by a
pattern) or an fsspec prefix (local or ``s3://``) whose subdirectories are checkpoints.
A directory counts as a finished checkpoint only when its ``config.json`` is there and
every weight file is whole: a safetensors file declares its own length in its header,
so one still being written is recognised and left for the next tick; a sharded
checkpoint needs every shard its index lists.  A trainer may also write a marker file
(``marker``) last, and the watcher then waits for it.
"""

from __future__ import annotations

import json
import re
import struct
from typing import Literal

import fsspec
from pydantic import BaseModel, ConfigDict, Field


class WatchedModel(BaseModel):
    """One model whose new checkpoints start the pipeline."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="Hugging Face repository id, or a directory / s3:// prefix whose subdirectories are checkpoints.")
    pattern: str = Field(default=".*", description="Regular expression a checkpoint name must match in full (e.g. 'step\\\\d+').")
    marker: str | None = Field(default=None, description="File a trainer writes last into a finished checkpoint directory; none: config.json and whole weight files.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(default="float32", description="Dtype the pipeline loads each checkpoint in.")
    device: str = Field(default="auto", description="'auto' (CUDA when available, else CPU), 'cpu', 'cuda' or 'cuda:N'.")
    storage_options: dict = Field(default={}, description="fsspec options for an s3:// prefix (no credentials: those come from the environment).")


def safetensors_header(fs, path: str) -> dict:
    """The JSON header of a whole safetensors file (tensor name -> dtype, shape, data_offsets).

    Only the head of the file is read, by two ranged reads: its 8-byte little-endian header
    length, then the header.  A file shorter or longer than its header says (one still being
    written, or truncated) is a ValueError whose text completes "weight file <path> ...".
    """
    size = fs.size(path)
    if size < 8:
        raise ValueError(f"is {size} bytes, too short for a safetensors header")
    (header_len,) = struct.unpack("<Q", fs.cat_file(path, start=0, end=8))
    if not 0 < header_len <= size - 8:
        raise ValueError(f"is {size} bytes, less than the {header_len}-byte header its first 8 bytes announce: "
                         "truncated, or not a safetensors file")
    try:
        header = json.loads(fs.cat_file(path, start=8, end=8 + header_len))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as err:
        raise ValueError(f"has no valid safetensors header ({type(err).__name__}: {err})") from None
    if size != 8 + header_len + end:
        state = "truncated" if size < 8 + header_len + end else "longer than its tensors"
        raise ValueError(f"is {size} bytes, but its header says {8 + header_len + end}: {state}")
    return header


def safetensors_whole(fs, path: str) -> bool:
    """True when a safetensors file is as long as its header says (a file still being written is shorter)."""
    try:
        safetensors_header(fs, path)
    except (OSError, ValueError):
        return False
    return True


def checkpoint_complete(fs, directory: str, marker: str | None = None) -> bool:
    """Is this directory a fully written checkpoint?"""
    names = {p.rsplit("/", 1)[-1] for p in fs.ls(directory, detail=False)}
    if "config.json" not in names or (marker and marker not in names):
        return False
    if "model.safetensors.index.json" in names:
        index = json.loads(fs.cat_file(f"{directory}/model.safetensors.index.json"))
        shards = set(index.get("weight_map", {}).values())
        return bool(shards) and all(s in names and safetensors_whole(fs, f"{directory}/{s}") for s in shards)
    if "model.safetensors" in names:
        return safetensors_whole(fs, f"{directory}/model.safetensors")
    return bool(marker) and any(n.endswith((".bin", ".pt")) for n in names)


def is_hub_id(model: str) -> bool:
    return "://" not in model and not model.startswith(("/", ".", "~")) and model.count("/") == 1 and not fsspec.filesystem("file").exists(model)


def list_checkpoints(watched: WatchedModel, unfinished: list[str] | None = None) -> list[str]:
    """Finished checkpoints of a watched model, in name order; those still being written go to `unfinished`."""
    pattern = re.compile(watched.pattern)
    if is_hub_id(watched.model):
        from huggingface_hub import list_repo_refs

        refs = list_repo_refs(watched.model)
        names = [r.name for r in [*refs.branches, *refs.tags]]
        return sorted(n for n in names if pattern.fullmatch(n))
    from gradlake.lake.store import storage_options_for

    fs, root = fsspec.core.url_to_fs(watched.model, **storage_options_for(watched.model, watched.storage_options))
    if not fs.isdir(root):
        raise ValueError(f"watched directory {watched.model!r} does not exist")
    found = []
    for path in fs.ls(root, detail=False):
        name = path.rstrip("/").rsplit("/", 1)[-1]
        if name.startswith("."):  # a trainer's staging directory (e.g. gradlake's .checkpoint-000100.partial)
            continue
        if pattern.fullmatch(name) and fs.isdir(path):
            if checkpoint_complete(fs, path, watched.marker):
                found.append(name)
            elif unfinished is not None:
                unfinished.append(name)
    return sorted(found)
