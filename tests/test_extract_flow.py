"""The extraction flow end to end: local and S3 lakes, read back by open_lake and plain xarray."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import xarray as xr
import zarr
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import write_probe
from gradlake.flows.extract import extract_gradients
from gradlake.lake import open_lake
from gradlake.lake.gradient_plan import NOT_GRADIENTS
from gradlake.lake.store import LakeError
from gradlake.tasks.gradients.plan import ExtractionSpec
from gradlake.tasks.common.loss import encode_sample
from gradlake.tasks.common.model import ModelSpec

N = 10  # samples; with shards of 4 the last shard is short


def spec_for(model_dir, lake, **kw) -> ExtractionSpec:
    defaults = dict(dataset="probe", variant="original", shard_size=4, batch_size=2, max_length=256)
    return ExtractionSpec(model=ModelSpec(model=str(model_dir), checkpoint=kw.pop("checkpoint", "checkpoint-1")),
                          lake=lake, **{**defaults, **kw})


@pytest.fixture
def local_lake(tmp_path):
    url = f"file://{tmp_path / 'lake'}"
    write_probe(url, N)
    return url


@pytest.mark.parametrize("arch,paradigm", [("olmo", "sft"), ("olmo2", "sft"), ("olmo2", "pre")])
def test_stored_gradients_match_per_sample_backward(tiny_models, probe_chats, local_lake, arch, paradigm):
    spec = spec_for(tiny_models[arch], local_lake, paradigm=paradigm)
    extract_gradients(spec)
    ds = open_lake(local_lake).gradients(dataset="probe", variant="original", paradigm=paradigm)
    assert list(ds["sample"].values) == [f"probe-{i:04d}" for i in range(1, N + 1)]

    path = tiny_models[arch] / "checkpoint-1"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    names = [n for n, _ in model.named_parameters()]
    assert sorted(names) == sorted(ds.attrs["gradlake"]["lineage"]["layers"])
    for i in range(N):
        # The stored tokens are the chat as the tokenizer renders it, and the mask is the paradigm's.
        e = encode_sample(tokenizer, probe_chats[i], paradigm, 256)
        n_tok = int(ds["n_tokens"][i])
        assert ds["input_ids"][i, :n_tok].values.tolist() == e.input_ids
        assert ds["label_mask"][i, :n_tok].values.tolist() == e.label_mask
        model.zero_grad(set_to_none=True)
        model(input_ids=torch.tensor([e.input_ids]), labels=torch.tensor([e.labels()])).loss.backward()
        for name, p in model.named_parameters():
            stored = torch.from_numpy(ds[name][i].values)
            err = ((stored - p.grad.flatten()).norm() / p.grad.norm()).item()
            assert err < 1e-5, f"sample {i} {name}: relative error {err:.2e}"


def test_s3_lake_round_trip_equals_local(tiny_models, local_lake, s3_endpoint):
    s3 = "s3://lake/run-s3"
    write_probe(s3, N)
    layers = ["model.layers.*.mlp.down_proj.weight", "lm_head.weight"]
    local_path = extract_gradients(spec_for(tiny_models["olmo2"], local_lake, layers=layers))
    s3_path = extract_gradients(spec_for(tiny_models["olmo2"], s3, layers=layers))
    assert local_path == s3_path

    lake = open_lake(s3)
    row = lake.catalog().query("kind == 'gradients'").iloc[0]
    # the catalog counts row-chunks (of batch_size 2 samples), the unit of completion
    assert row["complete"] and row["chunks_done"] == row["chunks_total"] == 5 and row["n_samples"] == N
    from_api = lake.gradients(variant="original")
    # Plain xarray + zarr, no gradlake code: what an analyst's notebook does.
    plain = xr.open_zarr(zarr.storage.FsspecStore.from_url(
        f"{s3}/{s3_path}", storage_options={"endpoint_url": s3_endpoint}), consolidated=False)
    local = xr.open_zarr(f"{local_lake[len('file://'):]}/{local_path}", consolidated=False)
    assert set(from_api.data_vars) >= {"model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight", "lm_head.weight"}
    assert "model.embed_tokens.weight" not in from_api
    for name in ("model.layers.1.mlp.down_proj.weight", "lm_head.weight"):
        np.testing.assert_array_equal(from_api[name].values, local[name].values)
        np.testing.assert_array_equal(plain[name].values, local[name].values)
    assert from_api[name].dims == ("sample", f"{name}.flat")
    assert "AWS" not in str(from_api.attrs) and "testing" not in str(from_api.attrs)


def test_rerun_skips_finished_shards(tiny_models, local_lake):
    spec = spec_for(tiny_models["olmo"], local_lake, layers=["model.layers.0.*"])
    path = extract_gradients(spec)
    root = local_lake[len("file://"):] + "/" + path
    chunks = sorted(p for p in __import__("pathlib").Path(root).rglob("c/*/*"))
    before = {p: p.stat().st_mtime_ns for p in chunks}
    assert before, "expected chunk files"
    extract_gradients(spec)
    assert {p: p.stat().st_mtime_ns for p in chunks} == before, "a finished shard was rewritten"


def test_changed_settings_do_not_overwrite_a_group(tiny_models, local_lake):
    first = extract_gradients(spec_for(tiny_models["olmo"], local_lake, layers=["model.layers.0.*"]))
    # Other layers are another extraction: a group of its own beside the first, named by its settings.
    second = extract_gradients(spec_for(tiny_models["olmo"], local_lake, layers=["model.layers.1.*"]))
    assert first != second and first.rsplit("/", 1)[0] == second.rsplit("/", 1)[0]
    # What does not name a group (here max_length) is refused where the group of that name is another extraction.
    with pytest.raises(LakeError, match="already holds a different extraction"):
        extract_gradients(spec_for(tiny_models["olmo"], local_lake, layers=["model.layers.1.*"], max_length=200))


def test_mean_modes_equal_direct_means(tiny_models, local_lake):
    layers = ["model.layers.1.self_attn.*", "model.norm.weight"]
    extract_gradients(spec_for(tiny_models["olmo2"], local_lake, layers=layers))
    extract_gradients(spec_for(tiny_models["olmo2"], local_lake, layers=layers, mode="mean"))
    extract_gradients(spec_for(tiny_models["olmo2"], local_lake, layers=layers, mode="mean_normalized"))
    lake = open_lake(local_lake)
    full = lake.gradients(mode="store")
    mean = lake.gradients(mode="mean")
    normalized = lake.gradients(mode="mean_normalized")
    for name in full.data_vars:
        if name in NOT_GRADIENTS:
            continue
        g = full[name].values.astype(np.float64)
        np.testing.assert_allclose(mean[name].values, g.mean(axis=0), rtol=1e-5, atol=1e-8)
        unit = g / np.linalg.norm(g, axis=1, keepdims=True)
        np.testing.assert_allclose(normalized[name].values, unit.mean(axis=0), rtol=1e-5, atol=1e-8)
    assert lake.catalog().query("kind == 'gradients'")["complete"].all()


def test_two_checkpoints_are_separate_groups(tiny_models, local_lake):
    for checkpoint in ("checkpoint-0", "checkpoint-1"):
        extract_gradients(spec_for(tiny_models["olmo2"], local_lake, checkpoint=checkpoint, layers=["lm_head.weight"]))
    lake = open_lake(local_lake)
    rows = lake.catalog().query("kind == 'gradients'")
    assert sorted(rows["checkpoint"]) == ["checkpoint-0", "checkpoint-1"]
    assert rows["lineage.resolved_commit"].nunique() == 2
    g0 = lake.gradients(checkpoint="checkpoint-0")["lm_head.weight"].values
    g1 = lake.gradients(checkpoint="checkpoint-1")["lm_head.weight"].values
    assert not np.array_equal(g0, g1)
    with pytest.raises(LakeError, match="2 gradient groups match"):
        lake.gradients(dataset="probe")
