"""Flow run names a person can tell apart: the model and checkpoint under study first, as the lake keys them."""

from __future__ import annotations

from typing import Callable

from prefect import runtime
from pydantic import BaseModel

from gradlake.tasks.common.lineage import lake_keys
from gradlake.tasks.common.model import ModelSpec


def run_label(model: ModelSpec, what: str) -> str:
    """'<model key>@<checkpoint key> <what>', e.g. 'tiny-olmo2-b5d6f1a0@checkpoint-1 paraphrased shards 3'."""
    model_key, checkpoint_key = lake_keys(model)
    return f"{model_key}@{checkpoint_key} {what}"


def named_by_model(spec_class: type[BaseModel], describe: Callable, fallback: str) -> Callable[[], str]:
    """A `flow_run_name` for a flow whose one parameter `spec` has a `model`: run_label(spec.model, describe(spec))."""

    def name() -> str:
        spec = runtime.flow_run.parameters.get("spec")
        try:
            spec = spec if isinstance(spec, spec_class) else spec_class.model_validate(spec)
            return run_label(spec.model, describe(spec))
        except Exception:  # a bad spec fails in the flow with its own message; the name is not the place
            return fallback

    return name
