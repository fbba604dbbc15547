"""The lake's on-disk layout: every path and chunk shape is decided here and only here.

```
<lake>/
  datasets/<dataset>/<variant>/data.parquet         probe sets (one row per sample)
  datasets/<dataset>/<variant>/meta.json            their lineage and content hash
  gradients/<model>/<checkpoint>/<dataset>/<variant>/<paradigm>-<mode>/
                                                    one Zarr v3 group per extraction
```

See ``docs/lake.md`` for the arrays inside a gradient group.
"""

from __future__ import annotations

import hashlib
import math
import re

CHUNK_BYTES = 16 << 20  # one chunk object is at most this size: large enough for S3, small enough for RAM


def key(text: str) -> str:
    """A path-safe key for a model id, path or checkpoint name ('amd/AMD-OLMo-1B-SFT' -> 'amd--AMD-OLMo-1B-SFT')."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "--", text.strip("/")).strip("-.")
    if not slug:
        raise ValueError(f"{text!r} gives an empty lake key")
    return slug


def model_key(model: str, local: bool) -> str:
    """A lake key for a model: hub ids keep their name, local paths add a short hash of the path."""
    if not local:
        return key(model)
    name = model.rstrip("/").rsplit("/", 1)[-1]
    return f"{key(name)}-{hashlib.sha256(model.encode()).hexdigest()[:8]}"


def name_key(kind: str, value: str) -> str:
    """Validate a user-chosen name (dataset, variant) that becomes a path component."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", value or ""):
        raise ValueError(f"{kind} {value!r} is not a valid name; use letters, digits, '.', '_' or '-'")
    return value


def gradient_group_path(model: str, checkpoint: str, dataset: str, variant: str, paradigm: str, mode: str) -> str:
    return f"gradients/{model}/{checkpoint}/{dataset}/{variant}/{paradigm}-{mode}"


def dataset_dir(dataset: str, variant: str) -> str:
    return f"datasets/{dataset}/{variant}"


def column_chunk(rows: int, numel: int, itemsize: int) -> int:
    """Columns per chunk so that a chunk of `rows` samples stays under CHUNK_BYTES."""
    return max(1, min(numel, CHUNK_BYTES // max(1, rows * itemsize)))


def n_shards(n_samples: int, shard_size: int) -> int:
    return math.ceil(n_samples / shard_size)


def shard_bounds(index: int, n_samples: int, shard_size: int) -> tuple[int, int]:
    """Samples [start, stop) of shard `index`; the last shard may be short, none is empty."""
    start = index * shard_size
    if index < 0 or start >= n_samples:
        raise IndexError(f"shard {index} is out of range for {n_samples} samples in shards of {shard_size}")
    return start, min(start + shard_size, n_samples)
