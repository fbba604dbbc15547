"""What every stage writes into the lake to say how a result was made: gradlake's version and the model's keys."""

from __future__ import annotations

from importlib import metadata

from gradlake.lake import layout
from gradlake.tasks.common.model import ModelSpec, lake_names


def gradlake_version() -> str:
    """The installed gradlake's version ('0+unknown' when run from a tree that was never installed)."""
    try:
        return metadata.version("gradlake")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def lake_keys(model: ModelSpec) -> tuple[str, str]:
    """The model's and checkpoint's path keys in the lake, as the extraction wrote them."""
    name, checkpoint = lake_names(model)
    return layout.model_key(name, model.resolved().is_local), layout.key(checkpoint)
