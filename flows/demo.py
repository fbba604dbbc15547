"""The offline demo: tiny OLMo and OLMo-2 models, the bundled probe set, a local lake."""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE

from gradlake.flows.dataset import DatasetSpec, create_dataset
from gradlake.flows.evaluate import evaluate
from gradlake.flows.extract import extract_gradients
from gradlake.flows.project import project_gradients
from gradlake.tasks.evaluate import EvaluationSpec
from gradlake.tasks.extract import ExtractionSpec
from gradlake.tasks.model import ModelSpec
from gradlake.tasks.paraphrase import ParaphraseSpec
from gradlake.tasks.probes import PROBE_FILE, load_probe_set, probe_variant
from gradlake.tasks.project import ProjectSpec
from gradlake.tasks.projection import ProjectionSpec
from gradlake.tasks.sources import SourceSpec

REPO = Path(__file__).resolve().parents[1]
DEMO_PROJECTIONS = [ProjectionSpec(kind="rademacher", dim=1024, scope="flat")]
POST_HOC_PROJECTION = ProjectionSpec(kind="sparse", dim=8192, scope="flat")


def default_model_dir() -> Path:
    return Path(os.environ.get("GRADLAKE_DEMO_MODELS", REPO / "build" / "tiny-models"))


@task(name="build-tiny-models", cache_policy=NONE)
def build_tiny_models_task(model_dir: str) -> dict[str, str]:
    """Tiny random-weight OLMo (AMD-OLMo-1B's architecture) and OLMo-2 models, two checkpoints each."""
    from gradlake.tasks.tiny import build_tiny_model

    chats = list(probe_variant(load_probe_set(), "original")["messages"])
    built = {}
    for arch in ("olmo", "olmo2"):
        target = Path(model_dir) / f"tiny-{arch}"
        if not (target / "checkpoint-1" / "config.json").is_file():
            build_tiny_model(target, arch, chats)
        built[arch] = str(target)
    return built


def probe_dataset_spec(lake: str, model_dir: str) -> DatasetSpec:
    """The demo's probe set: the bundled file, paraphrased by an API when one is configured, else by its own column."""
    source = SourceSpec(source=str(resources.files("gradlake.tasks") / PROBE_FILE))
    generate = [ModelSpec(model=str(Path(model_dir) / "tiny-olmo2"), checkpoint="checkpoint-1")]
    if os.environ.get("OPENAI_API_KEY"):
        paraphrase = ParaphraseSpec(model=os.environ.get("GRADLAKE_PARAPHRASE_MODEL", "gpt-4o-mini"),
                                    base_url=os.environ.get("OPENAI_BASE_URL"))
        return DatasetSpec(name="probe", source=source, paraphrase=paraphrase, generate=generate, max_new_tokens=48, lake=lake)
    return DatasetSpec(name="probe", source=source, paraphrase_column="paraphrase", generate=generate,
                       max_new_tokens=48, lake=lake)


@flow(name="gradlake-demo", log_prints=True)
def demo_pipeline(lake: str, model_dir: str | None = None) -> list[str]:
    """Build tiny models, create the probe set's variants, extract and project gradients, evaluate select vs project."""
    models = build_tiny_models_task(str(model_dir or default_model_dir()))
    versions = create_dataset(probe_dataset_spec(lake, str(Path(models["olmo2"]).parent)))
    generated = next(v for v in versions if v.startswith("model_generated."))
    runs = [("olmo2", "checkpoint-1", v) for v in ("original", "paraphrased", generated)]
    runs += [("olmo2", "checkpoint-0", v) for v in ("original", "paraphrased")]
    runs += [("olmo", "checkpoint-1", v) for v in ("original", "paraphrased")]
    paths = []
    for arch, checkpoint, variant in runs:
        # Projected on the fly for the checkpoint the evaluation compares, and afterwards from the stored gradients.
        on_the_fly = DEMO_PROJECTIONS if (arch, checkpoint) == ("olmo2", "checkpoint-1") else []
        spec = ExtractionSpec(model=ModelSpec(model=models[arch], checkpoint=checkpoint), dataset="probe",
                              variant=variant, paradigm="sft", shard_size=32, batch_size=8, lake=lake,
                              projections=on_the_fly)
        paths.append(extract_gradients(spec))
        if on_the_fly:
            project_gradients(ProjectSpec(gradients=paths[-1], projection=POST_HOC_PROJECTION, lake=lake))
    get_run_logger().info("demo lake at %s holds %d gradient groups and their projections", lake, len(paths))
    evaluation = evaluate(EvaluationSpec(model=ModelSpec(model=models["olmo2"], checkpoint="checkpoint-1"),
                                         dataset="probe", queries=["paraphrased", "model_generated"], lake=lake))
    return [*paths, evaluation]
