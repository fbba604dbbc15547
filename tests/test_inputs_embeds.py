"""Input-embedding gradients as an extraction target: stored, projected, found by the catalog, evaluated."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import write_probe
from gradlake.flows.evaluate import evaluate
from gradlake.flows.extract import extract_gradients
from gradlake.lake import layout, open_lake
from gradlake.lake.store import LakeError
from gradlake.tasks.evaluate.spec import EvaluationSpec
from gradlake.tasks.gradients.plan import ExtractionSpec, plan_extraction
from gradlake.tasks.common.loss import encode_sample, sample_losses
from gradlake.tasks.evaluate.metrics import rank_metrics, true_ranks
from gradlake.tasks.common.model import ModelSpec
from gradlake.tasks.projection.spec import ProjectionSpec

N = 8
MAX_LENGTH = 320


@pytest.fixture(scope="module")
def embeds_lake(tiny_models, tmp_path_factory):
    """Both probe variants' input-embedding gradients per token (with a projection) and mean-pooled, beside weights."""
    lake = f"file://{tmp_path_factory.mktemp('embeds') / 'lake'}"
    write_probe(lake, N)
    model = ModelSpec(model=str(tiny_models["olmo"]), checkpoint="checkpoint-1")
    common = dict(model=model, shard_size=4, batch_size=2, max_length=MAX_LENGTH, lake=lake)
    for variant in ("original", "paraphrased"):
        extract_gradients(ExtractionSpec(variant=variant, target="inputs_embeds", **common,
                                         projections=[ProjectionSpec(kind="rademacher", dim=64, scope="per_tensor")]))
        extract_gradients(ExtractionSpec(variant=variant, target="inputs_embeds_mean", **common))
    extract_gradients(ExtractionSpec(variant="original", layers=["model.layers.0.mlp.down_proj.weight"], **common))
    return lake, model


def reference(model_dir, variant_chats):
    model = AutoModelForCausalLM.from_pretrained(model_dir / "checkpoint-1", dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir / "checkpoint-1")
    out = []
    for chat in variant_chats:
        e = encode_sample(tokenizer, chat, "sft", MAX_LENGTH)
        embeds = model.get_input_embeddings()(torch.tensor([e.input_ids])).detach().requires_grad_(True)
        loss = sample_losses(model(inputs_embeds=embeds).logits, torch.tensor([e.labels()]))[0]
        out.append(torch.autograd.grad(loss, embeds)[0][0].double().numpy())
    return out


def test_stored_input_embedding_gradients_equal_autograd(embeds_lake, tiny_models):
    lake, _ = embeds_lake
    opened = open_lake(lake)
    chats = opened.dataset("probe", "original")["messages"]
    want = reference(tiny_models["olmo"], list(chats))
    tokens = opened.gradients(dataset="probe", variant="original", target="inputs_embeds")
    pooled = opened.gradients(dataset="probe", variant="original", target="inputs_embeds_mean")
    hidden = want[0].shape[1]
    assert "inputs_embeds" in tokens.data_vars
    assert tokens.attrs["gradlake"]["plan"]["parameters"] == {"inputs_embeds": [MAX_LENGTH, hidden]}
    assert pooled.attrs["gradlake"]["plan"]["parameters"] == {"inputs_embeds": [hidden]}
    for i, ref in enumerate(want):
        row = tokens["inputs_embeds"][i].values.reshape(MAX_LENGTH, hidden)
        n = ref.shape[0]
        assert not np.any(row[n:])
        np.testing.assert_allclose(row[:n], ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())
        np.testing.assert_allclose(pooled["inputs_embeds"][i].values, ref.mean(axis=0), rtol=1e-4,
                                   atol=1e-5 * np.abs(ref).max())
    # Each target has its groups: the weights' group and the projections live apart, and the catalog tells them apart.
    paths = set(opened.catalog().query("kind == 'gradients'")["path"])
    leaves = {p.rsplit("/", 1)[-1] for p in paths if "/original/" in p}
    weights = "sft-store-" + layout.extraction_settings(["model.layers.0.mlp.down_proj.weight"])  # named by its layers
    assert leaves == {weights, "sft-inputs_embeds-store", "sft-inputs_embeds_mean-store",
                      "sft-inputs_embeds-proj-rademacher-per_tensor-d64-s0"}
    with pytest.raises(LakeError, match="target"):
        opened.gradients(dataset="probe", variant="original")
    # The projection made during the backward pass is the projector applied to the stored gradients.
    from gradlake.tasks.projection.projectors import projectors_for
    projected = opened.projections(dataset="probe", variant="original", kind="rademacher", dim=64, target="inputs_embeds")
    projector = projectors_for(ProjectionSpec(kind="rademacher", dim=64, scope="per_tensor"),
                               {"inputs_embeds": (MAX_LENGTH, hidden)})["inputs_embeds"]
    again = projector.project(torch.from_numpy(tokens["inputs_embeds"].values)).numpy()
    np.testing.assert_allclose(projected["inputs_embeds"].values, again, rtol=1e-4, atol=1e-4 * np.abs(again).max())


def test_evaluation_of_input_embedding_gradients_equals_direct_computation(embeds_lake):
    lake, model = embeds_lake
    for target in ("inputs_embeds", "inputs_embeds_mean"):
        directory = evaluate(EvaluationSpec(model=model, queries=["paraphrased"], target=target, dense_baseline=False,
                                            greedy_steps=0, lake=lake))
        assert directory.endswith(f"/probe/sft-{target}")
        opened = open_lake(lake)
        results = opened.evaluation(dataset="probe", paradigm=f"sft-{target}")
        q = opened.gradients(dataset="probe", variant="paraphrased", target=target)["inputs_embeds"].values.astype(np.float64)
        d = opened.gradients(dataset="probe", variant="original", target=target)["inputs_embeds"].values.astype(np.float64)
        cos = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ (d / np.linalg.norm(d, axis=1, keepdims=True)).T
        want = rank_metrics(true_ranks(cos, np.arange(N)))
        row = results[(results["vectors"] == "inputs_embeds") & (results["similarity"] == "cosine")].iloc[0]
        assert row["kind"] == "tensor" and row["part"] == "inputs_embeds"
        for metric, value in want.items():
            assert math.isclose(row[metric], value, rel_tol=1e-9), (target, metric, row[metric], value)
        if target == "inputs_embeds":
            assert (results["vectors"] == "proj:rademacher-per_tensor-d64-s0").any()


def test_target_settings_are_checked_before_any_work(embeds_lake):
    lake, model = embeds_lake
    with pytest.raises(ValueError, match=r"layers \['model.layers.0.mlp.down_proj.weight'\] choose weights, but target 'inputs_embeds'"):
        plan_extraction(ExtractionSpec(model=model, target="inputs_embeds", layers=["model.layers.0.mlp.down_proj.weight"], lake=lake))
    with pytest.raises(ValueError, match="target"):
        ExtractionSpec(model=model, target="hidden_states", lake=lake)
    with pytest.raises(LakeError, match="sft-inputs_embeds-store is not complete|sft-inputs_embeds-store"):
        # the weights' query group exists, but no input-embedding group of model_generated answers does
        from gradlake.tasks.evaluate.evaluation import Evaluation
        Evaluation(EvaluationSpec(model=model, queries=["model_generated"], target="inputs_embeds", lake=lake), "model_generated")
