"""The offline demo: tiny OLMo and OLMo-2 models, the bundled probe set, a local lake."""

from __future__ import annotations

import os
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE

from flows.extract import extract_gradients
from tasks.extract import ExtractionSpec
from tasks.model import ModelSpec
from tasks.probes import load_probe_set, probe_variant, store_probe_set

REPO = Path(__file__).resolve().parents[1]


def default_model_dir() -> Path:
    return Path(os.environ.get("GRADLAKE_DEMO_MODELS", REPO / "build" / "tiny-models"))


@task(name="build-tiny-models", cache_policy=NONE)
def build_tiny_models_task(model_dir: str) -> dict[str, str]:
    """Tiny random-weight OLMo (AMD-OLMo-1B's architecture) and OLMo-2 models, two checkpoints each."""
    from tasks.tiny import build_tiny_model

    chats = list(probe_variant(load_probe_set(), "original")["messages"])
    built = {}
    for arch in ("olmo", "olmo2"):
        target = Path(model_dir) / f"tiny-{arch}"
        if not (target / "checkpoint-1" / "config.json").is_file():
            build_tiny_model(target, arch, chats)
        built[arch] = str(target)
    return built


store_probe_set_task = task(store_probe_set, name="store-probe-set", cache_policy=NONE)


@flow(name="gradlake-demo", log_prints=True)
def demo_pipeline(lake: str, model_dir: str | None = None) -> list[str]:
    """Build tiny models, store the probe set, extract gradients for both architectures."""
    models = build_tiny_models_task(str(model_dir or default_model_dir()))
    variants = store_probe_set_task(lake)
    paths = []
    for arch, checkpoint in (("olmo2", "checkpoint-0"), ("olmo2", "checkpoint-1"), ("olmo", "checkpoint-1")):
        for variant in variants:
            spec = ExtractionSpec(model=ModelSpec(model=models[arch], checkpoint=checkpoint), dataset="probe",
                                  variant=variant, paradigm="sft", shard_size=32, batch_size=8, lake=lake)
            paths.append(extract_gradients(spec))
    get_run_logger().info("demo lake at %s holds %d gradient groups", lake, len(paths))
    return paths
