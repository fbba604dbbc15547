"""A first pipeline on a fresh lake: with the form's defaults it fails at once with one instruction (the command and
the form field); with the form's 'Create the dataset first' set and nothing else filled in, it runs."""

from __future__ import annotations

import pytest

from gradlake.flows.pipeline import PipelineSpec, pipeline
from gradlake.lake import open_lake
from gradlake.lake.store import LakeError
from gradlake.tasks.common.model import ModelSpec

SMALL = {"shard_size": 8, "batch_size": 4, "max_length": 128, "shard_deployment": None, "evaluate": False}


def test_defaults_on_a_fresh_lake_say_how_to_create_the_dataset(tiny_models, tmp_path):
    lake = f"file://{tmp_path / 'fresh'}"
    spec = PipelineSpec(model=ModelSpec(model=str(tiny_models["olmo2"]), checkpoint="checkpoint-1"), lake=lake)
    state = pipeline(spec, return_state=True)
    assert state.is_failed()
    with pytest.raises(LakeError) as raised:
        state.result()
    message = str(raised.value)
    assert "dataset 'probe' is not in lake" in message and "holds no datasets" in message
    assert f"`gradlake dataset probe --lake {lake}`" in message, message
    assert "set 'Create the dataset first' to DatasetRecipe" in message and "'bundled:probe'" in message, message
    assert not (tmp_path / "fresh" / "gradients").exists(), "nothing is planned or sent before the dataset is there"

    # the command line says the same, before anything is planned
    from typer.testing import CliRunner

    from gradlake.flows.cli import app

    shown = CliRunner().invoke(app, ["pipeline", "--model", spec.model.model, "--checkpoint", "checkpoint-1",
                                     "--shard-deployment", "none", "--lake", lake], env={"COLUMNS": "300"})
    assert shown.exit_code != 0 and f"gradlake dataset probe --lake {lake}" in " ".join(shown.output.split()), shown.output
    assert not (tmp_path / "fresh" / "gradients").exists()

    # a dataset of another name: the create command with its name
    other = pipeline(spec.model_copy(update={"dataset": "lima"}), return_state=True)
    assert "`gradlake dataset create --name lima --source" in str(other.result(raise_on_failure=False))


def test_the_form_field_with_its_defaults_creates_the_bundled_probe_set_and_runs(tiny_models, tmp_path):
    """'Create the dataset first' with the form's defaults (the bundled probe set, its paraphrase column known)."""
    lake = f"file://{tmp_path / 'fresh'}"
    spec = PipelineSpec.model_validate({"model": {"model": str(tiny_models["olmo2"]), "checkpoint": "checkpoint-1"},
                                        "lake": lake, "create": {"source": {"n": 8, "sampling": "first"}}, **SMALL})
    assert spec.create.source.source == "bundled:probe" and spec.create.paraphrase_column == "paraphrase"
    paths = pipeline(spec)
    assert [p.split("/")[-2] for p in paths] == ["original", "paraphrased"]
    catalog = open_lake(lake).catalog()
    assert set(catalog.query("kind == 'dataset'")["variant"]) == {"original", "paraphrased"}
    assert catalog.query("kind == 'gradients'")["complete"].all()
