"""A bad model or bad dataset metadata fails at once, in one line, before anything is written.

Each damaged model is a copy of the tiny OLMo-2's checkpoint-1, broken the way a hostile
tester broke real ones: truncated safetensors, no weights, a shard missing, a config
whose shapes disagree with the weights, pickled weights, a device that is not there.
`plan_extraction` must refuse each before it touches the lake and before a weight is
loaded; before these checks each ended in a traceback from the shard that loaded the
model, about 90 s later, with the gradient group already created.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from conftest import write_probe
from gradlake.flows.cli import app
from gradlake.lake.datasets import dataset_meta, list_datasets, list_versions, read_dataset
from gradlake.lake.store import LakeError, LakeStore
from gradlake.tasks.gradients.plan import ExtractionSpec, create_group, plan_extraction
from gradlake.tasks.gradients.extract import extract_shard
from gradlake.tasks.common.model import ModelError, ModelSpec, check_model, load_model
from gradlake.tasks.common.weights import check_weights

N = 2
LAYERS = ["lm_head.weight", "model.layers.1.mlp.down_proj.weight"]
QUICK = 10.0  # seconds: a plan reads configs and headers, never weights (the old failures took ~90 s)


def files(root: Path) -> set[str] | None:
    """Everything under a lake directory; None when there is no such directory."""
    return {str(p.relative_to(root)) for p in root.rglob("*")} if root.exists() else None


def spec_for(model: Path, lake: Path, **model_options) -> ExtractionSpec:
    return ExtractionSpec(model=ModelSpec(model=str(model), **model_options), layers=LAYERS, shard_size=N, batch_size=N,
                          max_length=128, lake=str(lake))


@pytest.fixture
def lake(tmp_path) -> Path:
    path = tmp_path / "lake"
    write_probe(str(path), N)
    return path


@pytest.fixture
def copy_model(tiny_models, tmp_path):
    """A fresh copy of the tiny OLMo-2's checkpoint-1, to damage."""
    def make(name: str) -> Path:
        target = tmp_path / name
        shutil.copytree(tiny_models["olmo2"] / "checkpoint-1", target)
        return target
    return make


def refused(spec: ExtractionSpec, lake: Path, error=ModelError) -> str:
    """The one-line error `plan_extraction` raises at once, with the lake left exactly as it was."""
    before = files(lake)
    began = time.monotonic()
    with pytest.raises(error) as caught:
        plan_extraction(spec)
    assert time.monotonic() - began < QUICK
    text = str(caught.value)
    assert "\n" not in text, text
    assert files(lake) == before, "nothing may be written before the checks"
    return text


def truncate(model: Path) -> str:
    weights = model / "model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as handle:
        handle.truncate(size // 2)
    return f"{size // 2} bytes, but its header says {size}"


def remove_weights(model: Path) -> str:
    (model / "model.safetensors").unlink()
    return "has no weights"


def lose_a_shard(model: Path) -> str:
    """A sharded checkpoint whose index names a second shard that is not there."""
    names = list(load_file(model / "model.safetensors"))
    (model / "model.safetensors").rename(model / "model-00001-of-00002.safetensors")
    weight_map = {n: "model-00001-of-00002.safetensors" for n in names} | {names[-1]: "model-00002-of-00002.safetensors"}
    (model / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return "1 of them missing (['model-00002-of-00002.safetensors'])"


def change_intermediate_size(model: Path) -> str:
    config = json.loads((model / "config.json").read_text())
    config["intermediate_size"] = 96  # the weights were saved with 128
    (model / "config.json").write_text(json.dumps(config))
    return "model.layers.0.mlp.gate_proj.weight is [128, 64] in model.safetensors, the config makes it [96, 64]"


def pickle_weights(model: Path) -> str:
    torch.save(load_file(model / "model.safetensors"), model / "pytorch_model.bin")
    (model / "model.safetensors").unlink()
    return "only pickled weights (pytorch_model.bin)"


@pytest.mark.parametrize("damage", [truncate, remove_weights, lose_a_shard, change_intermediate_size, pickle_weights])
def test_damaged_model_is_refused_by_the_plan(copy_model, lake, tmp_path, damage):
    model = copy_model(damage.__name__)
    expected = damage(model)
    text = refused(spec_for(model, lake), lake)
    assert expected in text and str(model) in text
    unborn = tmp_path / "no-lake-yet"  # refused before the lake is created (checking it is writable creates it)
    assert refused(spec_for(model, unborn), unborn) == text


def drop_tensor(model: Path, name: str, tie: bool) -> None:
    """Leave tensor `name` out of the weights, with the embeddings tied or not."""
    tensors = load_file(model / "model.safetensors")
    del tensors[name]
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps(config | {"tie_word_embeddings": tie}))


def test_tied_embeddings_are_in_the_file_once(copy_model, lake):
    """Tied, the embedding and lm_head are one tensor, stored under either name (transformers writes the
    embedding's; loading takes either); untied, each must be there."""
    for name in ("lm_head.weight", "model.embed_tokens.weight"):
        tied = copy_model(f"tied-without-{name}")
        drop_tensor(tied, name, tie=True)
        spec = ModelSpec(model=str(tied))
        check_weights(spec, check_model(spec))
    untied = copy_model("untied")
    drop_tensor(untied, "lm_head.weight", tie=False)
    text = refused(spec_for(untied, lake), lake)
    assert "lack 1 parameters the config defines (first: ['lm_head.weight'])" in text


def test_missing_weights_name_what_the_directory_holds(copy_model, lake):
    model = copy_model("empty")
    remove_weights(model)
    text = refused(spec_for(model, lake), lake)
    assert "config.json" in text and "tokenizer.json" in text


def test_pickled_weights_say_how_to_allow_or_convert_them(copy_model, lake):
    model = copy_model("pickled")
    pickle_weights(model)
    text = refused(spec_for(model, lake), lake)
    assert "allow_pickled_weights=True" in text and "model.safetensors" in text


@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_missing_device_is_refused_by_the_plan(tiny_models, lake, tmp_path, device):
    if torch.cuda.device_count() > int(device.partition(":")[2] or 0):
        pytest.skip(f"{device} exists here")
    for where in (lake, tmp_path / "no-lake-yet"):
        text = refused(spec_for(tiny_models["olmo2"], where, checkpoint="checkpoint-1", device=device), where)
        assert f"device {device!r} is not available" in text and "use 'auto' or 'cpu'" in text


def gradients(spec: ExtractionSpec) -> dict[str, np.ndarray]:
    """Extract every sample of `spec` (one shard) without Prefect; the stored per-sample gradients."""
    group = create_group(plan_extraction(spec))
    extract_shard(spec, group, 0, log=lambda *_: None)
    assert group.finalize()
    stored = zarr.open_group(spec.lake, path=group.path, mode="r")
    return {name: stored[name][:] for name in LAYERS}


@pytest.fixture(scope="module")
def extracted(tiny_models, tmp_path_factory) -> tuple[Path, Path, dict[str, np.ndarray]]:
    """(model copy, lake, its gradients): N originals extracted from checkpoint-1's safetensors, complete."""
    root = tmp_path_factory.mktemp("extracted")
    model, lake = root / "safetensors", root / "lake"
    shutil.copytree(tiny_models["olmo2"] / "checkpoint-1", model)
    write_probe(str(lake), N)
    return model, lake, gradients(spec_for(model, lake))


def test_allowed_pickled_weights_give_the_same_gradients(copy_model, extracted, tmp_path):
    _, _, reference = extracted
    model = copy_model("pickled")
    pickle_weights(model)
    lake = tmp_path / "pickled-lake"
    write_probe(str(lake), N)
    got = gradients(spec_for(model, lake, allow_pickled_weights=True))
    assert got.keys() == reference.keys()
    for name in LAYERS:
        assert np.array_equal(got[name], reference[name]) and got[name].any(), name


class _Payload:
    """Pickled, it calls open(path, 'w'): code that a pickle of weights must never get to run."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


def test_allowed_pickled_weights_are_read_by_the_restricted_unpickler(copy_model, tmp_path):
    model = copy_model("hostile")
    marker = tmp_path / "ran"
    torch.save({**load_file(model / "model.safetensors"), "payload": _Payload(marker)}, model / "pytorch_model.bin")
    (model / "model.safetensors").unlink()
    spec = ModelSpec(model=str(model), allow_pickled_weights=True)
    with pytest.raises(Exception, match="(?i)weights.only"):
        load_model(spec)
    assert not marker.exists(), "unpickling the weights ran code"


def test_pickled_hub_weights_are_refused_when_loaded(copy_model, tmp_path, monkeypatch):
    """A hub id's files are not listed by the plan (that needs the network); loading refuses its pickles instead."""
    model = copy_model("pickled")
    pickle_weights(model)
    repo, commit = tmp_path / "hub" / "models--gradlake-test--pickled", "0" * 40  # a hub cache, as the client lays it out
    shutil.copytree(model, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    spec = ModelSpec(model="gradlake-test/pickled")
    check_weights(spec, check_model(spec))
    with pytest.raises(OSError, match="safetensors"):
        load_model(spec)
    assert load_model(spec.model_copy(update={"allow_pickled_weights": True})).config.model_type == "olmo2"


def test_url_checkpoint_is_checked_by_its_headers_alone(s3_endpoint, copy_model, monkeypatch, tmp_path):
    """On s3:// only listings and header bytes are read: a truncated file is refused and nothing is downloaded."""
    import fsspec

    cache = tmp_path / "model-cache"
    monkeypatch.setenv("GRADLAKE_MODEL_CACHE", str(cache))
    fs = fsspec.filesystem("s3", endpoint_url=s3_endpoint)
    for name, damage in (("whole", None), ("truncated", truncate)):
        model = copy_model(name)
        if damage:
            damage(model)
        fs.put(str(model), f"lake/models/{name}/checkpoint-1", recursive=True)
    url = "s3://lake/models"
    good = ModelSpec(model=f"{url}/whole", checkpoint="checkpoint-1")
    check_weights(good, check_model(good))
    bad = ModelSpec(model=f"{url}/truncated", checkpoint="checkpoint-1")
    with pytest.raises(ModelError, match=r"s3://lake/models/truncated/checkpoint-1/model.safetensors is \d+ bytes, but its header"):
        check_weights(bad, check_model(bad))
    assert not cache.exists(), "checking a URL's weights must not download them"


# -- damaged dataset metadata ----------------------------------------------------------------

def test_damaged_latest_json_is_one_line_naming_it(tiny_models, lake):
    (lake / "datasets/probe/original/latest.json").write_text('{"dataset": "probe", "vari')  # cut short
    text = refused(spec_for(tiny_models["olmo2"], lake, checkpoint="checkpoint-1"), lake, LakeError)
    assert text.startswith(f"damaged metadata: file://{lake}/datasets/probe/original/latest.json is not valid JSON (Unterminated")
    assert "restore the file" in text and "writing dataset 'probe' again (`gradlake dataset create --name probe" in text
    with pytest.raises(LakeError, match="^damaged metadata: .*/datasets/probe/original/latest.json"):
        dataset_meta(LakeStore(str(lake)), "probe", "original")


def test_damaged_meta_json_is_one_line_naming_it(lake):
    store = LakeStore(str(lake))
    version = dataset_meta(store, "probe", "original")["version"]
    (lake / f"datasets/probe/original/{version}/meta.json").write_text("")
    for read in (lambda: read_dataset(store, "probe", "original", version), lambda: list_versions(store, "probe", "original")):
        with pytest.raises(LakeError) as caught:
            read()
        text = str(caught.value)
        assert text.startswith(f"damaged metadata: file://{lake}/datasets/probe/original/{version}/meta.json is not valid JSON")
        assert "\n" not in text and "writing dataset 'probe' again" in text


@pytest.mark.parametrize("content, reason", [("", "is not valid JSON"), ('{"dataset": "probe"}', "is not a dataset meta record (no 'variant'")])
def test_listing_marks_a_damaged_variant_and_keeps_the_others(lake, content, reason):
    (lake / "datasets/probe/paraphrased/latest.json").write_text(content)
    listed = {m["variant"]: m for m in list_datasets(LakeStore(str(lake)))}
    assert listed["original"]["n_samples"] == N and "damaged" not in listed["original"]
    damaged = listed["paraphrased"]
    assert damaged["dataset"] == "probe" and damaged["path"] == "datasets/probe/paraphrased/latest.json"
    assert damaged["damaged"].startswith(f"damaged metadata: file://{lake}/datasets/probe/paraphrased/latest.json {reason}")
    assert "\n" not in damaged["damaged"]
    with pytest.raises(LakeError, match=reason.replace("(", r"\(")):
        dataset_meta(LakeStore(str(lake)), "probe", "paraphrased")


# -- evaluate --------------------------------------------------------------------------------

@pytest.mark.parametrize("option", ["--query", "--queries"])
def test_evaluate_original_as_query_is_one_line_at_once(extracted, option):
    """The originals' group opens fine as a query, so this was found only inside the Prefect run."""
    model, lake, _ = extracted
    before = files(lake)
    began = time.monotonic()
    result = CliRunner().invoke(app, ["evaluate", "--model", str(model), option, "original", "--lake", str(lake)])
    assert time.monotonic() - began < QUICK
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "'original' is what queries are compared against" in lines[0], result.output
    assert files(lake) == before
