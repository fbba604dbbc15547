"""Where the attribution stage's results lie in a given lake: today's layout, or an earlier lake's.

Lakes written before the stage kept everything under ``attribution/`` hold benchmarks at
``evaluations/.../attribution/<queries>`` and ground truth at ``groundtruth/.../<queries>``
(`layout.legacy_benchmark_dir`, `layout.legacy_ground_truth_dir`).  A stage that reads or
extends one asks here: it gets the earlier location where only that one exists, so a ground
truth whose retrained models' losses are already stored is resumed there, never recomputed;
otherwise today's location.  Once a lake holds a label's results in the earlier location,
every later run for that label finds them there and adds to them, so one label's results
never end up split between the two.
"""

from __future__ import annotations

from gradlake.lake import layout
from gradlake.lake.store import LakeStore


def _present(store: LakeStore, directory: str) -> bool:
    with store.explained_errors():
        store.fs.invalidate_cache()  # s3fs caches listings: another process may have written it since
        return store.fs.exists(store.path(directory))


def existing(store: LakeStore, current: str, legacy: str) -> str:
    """`legacy` where the lake holds something there and nothing at `current`; else `current`."""
    if not _present(store, current) and _present(store, legacy):
        return legacy
    return current


def resolve_benchmark_dir(store: LakeStore, model: str, checkpoint: str, train_dataset: str, label: str) -> str:
    """The attribution benchmark's directory in this lake (see `layout.benchmark_dir`): an earlier lake's if only it exists."""
    return existing(store, layout.benchmark_dir(model, checkpoint, train_dataset, label),
                    layout.legacy_benchmark_dir(model, checkpoint, train_dataset, label))


def resolve_ground_truth_dir(store: LakeStore, model: str, checkpoint: str, train_dataset: str, label: str) -> str:
    """The ground truth's directory in this lake (see `layout.ground_truth_dir`): an earlier lake's if only it exists,
    so that its stored losses are reused."""
    return existing(store, layout.ground_truth_dir(model, checkpoint, train_dataset, label),
                    layout.legacy_ground_truth_dir(model, checkpoint, train_dataset, label))
