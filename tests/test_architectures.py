"""Which models per-sample gradients are taken of, and the inputs that only the model can show to be bad.

Every supported architecture is checked against one plain ``loss.backward()`` per sample; any other is
refused when the extraction is planned.  NaN weights fail their shard without a chunk marked complete;
a max_length beyond the model's positions is capped when the extraction is planned.
"""

from __future__ import annotations

import shutil
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from conftest import write_probe
from gradlake.flows.cli import app
from gradlake.lake import open_lake
from gradlake.lake.datasets import write_dataset
from gradlake.lake.gradients import GradientGroup
from gradlake.lake.store import LakeStore
from gradlake.tasks.gradients.engine import INPUTS_EMBEDS, PerSampleGradients
from gradlake.tasks.common.loss import encode_sample, sample_losses
from gradlake.tasks.common.model import GRADIENT_ARCHITECTURES
from gradlake.tasks.training.tiny import build_tiny_model, tiny_config

runner = CliRunner()
VOCAB = 300


def configs() -> dict:
    from transformers import LlamaConfig, Qwen2Config

    small = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 vocab_size=VOCAB)
    return {"olmo": tiny_config("olmo", VOCAB), "olmo2": tiny_config("olmo2", VOCAB), "gpt2": tiny_config("gpt2", VOCAB),
            "llama": LlamaConfig(**small), "qwen2": Qwen2Config(**small)}


def test_the_tested_architectures_are_the_supported_ones():
    assert {c.model_type for c in configs().values()} == set(GRADIENT_ARCHITECTURES)


@pytest.mark.parametrize("model_type", sorted(GRADIENT_ARCHITECTURES))
def test_every_parameter_and_the_input_embeddings_equal_a_plain_backward(model_type):
    """Variable lengths in one right-padded batch; GPT-2 brings learned positions, Conv1D, LayerNorm biases, tied weights."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(configs()[model_type], dtype=torch.float64).eval()
    assert type(model).__name__ == GRADIENT_ARCHITECTURES[model_type]
    lengths = [12, 7, 9]
    ids = torch.full((3, 12), 1)
    labels = torch.full((3, 12), -100)
    for b, n in enumerate(lengths):
        ids[b, :n] = torch.randint(2, VOCAB, (n,))
        labels[b, 2:n] = ids[b, 2:n]
    names = [n for n, _ in model.named_parameters()]
    with PerSampleGradients(model, [*names, INPUTS_EMBEDS], max_tokens=12) as grads:
        got = {n: g.clone() for n, g in grads(ids, labels, torch.tensor(lengths)).items()}
    for b, n in enumerate(lengths):
        model.zero_grad(set_to_none=True)
        embeds = model.get_input_embeddings()(ids[b:b + 1, :n])  # in the graph: a tied embedding gets both uses
        embeds.retain_grad()
        sample_losses(model(inputs_embeds=embeds).logits, labels[b:b + 1, :n]).sum().backward()
        for name, p in model.named_parameters():
            want = p.grad.flatten() if p.grad is not None else torch.zeros(p.numel(), dtype=p.dtype)
            err = ((got[name][b] - want).norm() / want.norm().clamp_min(1e-30)).item()
            assert err < 1e-10, f"{model_type} sample {b} {name}: relative error {err:.1e}"
        want = torch.zeros(12, model.config.hidden_size, dtype=torch.float64)
        want[:n] = embeds.grad[0]
        assert torch.allclose(got[INPUTS_EMBEDS][b].view(12, -1), want, rtol=1e-10, atol=1e-14)


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory, probe_chats):
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-gpt2", "gpt2", probe_chats, train_steps=5)


def test_gpt2_extraction_stores_the_plain_backward(tiny_gpt2, probe_chats, tmp_path):
    """The extract command on GPT-2 (learned position embeddings, which used to receive no per-sample hook)."""
    lake = str(tmp_path / "lake")
    write_probe(lake, 4)
    result = runner.invoke(app, ["extract", "--model", str(tiny_gpt2), "--checkpoint", "checkpoint-1", "--shard-size", "4",
                                 "--batch-size", "2", "--max-length", "128", "--lake", lake,
                                 "--layers", "transformer.wpe.weight", "--layers", "transformer.wte.weight",
                                 "--layers", "transformer.h.1.*"])
    assert result.exit_code == 0, result.output
    ds = open_lake(lake).gradients(dataset="probe", variant="original")
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2 / "checkpoint-1", dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2 / "checkpoint-1")
    layers = ds.attrs["gradlake"]["lineage"]["layers"]
    assert "transformer.wpe.weight" in layers and "transformer.h.1.attn.c_attn.weight" in layers
    for i in range(4):
        e = encode_sample(tokenizer, probe_chats[i], "sft", 128)
        model.zero_grad(set_to_none=True)
        model(input_ids=torch.tensor([e.input_ids]), labels=torch.tensor([e.labels()])).loss.backward()
        grads = dict(model.named_parameters())
        for name in layers:
            want = grads[name].grad.flatten()
            err = ((torch.from_numpy(ds[name][i].values) - want).norm() / want.norm()).item()
            assert err < 1e-5, f"sample {i} {name}: relative error {err:.1e}"


def test_unsupported_architecture_is_refused_before_anything_is_written(tiny_gpt2, tmp_path):
    from transformers import GPTNeoXConfig

    config = GPTNeoXConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                           vocab_size=VOCAB, architectures=["GPTNeoXForCausalLM"])
    where = tmp_path / "neox"
    AutoModelForCausalLM.from_config(config).save_pretrained(where)
    AutoTokenizer.from_pretrained(tiny_gpt2 / "checkpoint-1").save_pretrained(where)
    lake = tmp_path / "lake"
    write_probe(str(lake), 2)
    result = runner.invoke(app, ["extract", "--model", str(where), "--lake", str(lake)])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert "GPTNeoXForCausalLM" in lines[0] and "GPT2LMHeadModel" in lines[0] and "Olmo2ForCausalLM" in lines[0]
    assert not (lake / "gradients").exists()


def poisoned_copy(tiny_models, tmp_path, name: str, value: float = float("nan"), scale: float | None = None) -> str:
    """The tiny OLMo-2 checkpoint with one `value` (NaN unless told) in `name`, or all of `name` times `scale`."""
    where = tmp_path / "poisoned" / "checkpoint-1"
    shutil.copytree(tiny_models["olmo2"] / "checkpoint-1", where)
    weights = load_file(where / "model.safetensors")
    if scale is None:
        weights[name].view(-1)[0] = value
    else:
        weights[name] = weights[name] * scale
    save_file(weights, where / "model.safetensors", metadata={"format": "pt"})
    return str(where.parent)


def test_nan_weights_fail_the_shard_naming_the_samples_and_the_tensor(tiny_models, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from gradlake.flows.extract import extract_gradients
    from gradlake.tasks.gradients.plan import ExtractionSpec, plan_extraction
    from gradlake.tasks.common.model import ModelSpec

    model = poisoned_copy(tiny_models, tmp_path, "model.layers.1.mlp.down_proj.weight")
    lake = str(tmp_path / "lake")
    write_probe(lake, 4)
    spec = ExtractionSpec(model=ModelSpec(model=model, checkpoint="checkpoint-1"), shard_size=4, batch_size=2,
                          max_length=128, layers=["model.layers.*.mlp.down_proj.weight"], lake=lake)
    state = extract_gradients(spec, return_state=True)
    assert state.is_failed()
    message = str(state.result(raise_on_failure=False))
    # The NaN reaches the loss, so every tensor's gradient: the first named is the first in the model's order.
    assert "NaN or Inf in the loss and the gradients (model.layers.0.mlp.down_proj.weight first)" in message, message
    assert "['probe-0001', 'probe-0002']" in message or "['probe-0003', 'probe-0004']" in message, message
    assert "weights hold NaN or Inf values (model.layers.1.mlp.down_proj.weight first)" in message, message
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
    shard_runs = [r.run_count for r in runs if r.name.startswith("extract-")]
    assert shard_runs == [1], "the same weights give the same NaN: no retry"
    group = GradientGroup.open(LakeStore(lake), plan_extraction(spec).path)  # made before the shard ran
    assert group.pending_chunks() == [0, 1] and not group.finalize(), "no chunk of NaN may be marked complete"
    # The command ends in that one line too, exit 2 (Prefect's own log of the failed task goes to the console).
    result = runner.invoke(app, ["extract", "--model", model, "--checkpoint", "checkpoint-1", "--shard-size", "4",
                                 "--batch-size", "2", "--max-length", "128", "--lake", lake,
                                 "--layers", "model.layers.*.mlp.down_proj.weight"])
    assert result.exit_code == 2 and result.output.startswith("error: original shard 0") and "NaN or Inf" in result.output


@pytest.mark.parametrize("case", ["inf-weight", "float16-overflow"])
def test_infinite_values_fail_the_shard_and_say_the_likely_cause(case, tiny_models, tmp_path):
    """An Inf weight is named like a NaN one; finite weights whose float16 logits overflow (65504) are told apart."""
    from gradlake.flows.extract import extract_gradients
    from gradlake.tasks.gradients.plan import ExtractionSpec, plan_extraction
    from gradlake.tasks.common.model import ModelSpec

    if case == "inf-weight":
        model, dtype = poisoned_copy(tiny_models, tmp_path, "model.layers.0.mlp.up_proj.weight", float("inf")), "float32"
        cause = "weights hold NaN or Inf values (model.layers.0.mlp.up_proj.weight first)"
    else:  # the final norm's scale times 2e4 is finite in float16, the logits it gives are not
        model, dtype = poisoned_copy(tiny_models, tmp_path, "model.norm.weight", scale=2e4), "float16"
        cause = "the weights are finite, so the float16 computation overflowed: try dtype float32"
    lake = str(tmp_path / "lake")
    write_probe(lake, 2)
    spec = ExtractionSpec(model=ModelSpec(model=model, checkpoint="checkpoint-1", dtype=dtype), shard_size=2,
                          batch_size=2, max_length=64, layers=["lm_head.weight"], lake=lake)
    state = extract_gradients(spec, return_state=True)
    assert state.is_failed()
    message = str(state.result(raise_on_failure=False))
    assert "NaN or Inf in the loss and the gradients (lm_head.weight first) of 2 samples ['probe-0001', 'probe-0002']" in message, message
    assert cause in message, message
    assert GradientGroup.open(LakeStore(lake), plan_extraction(spec).path).pending_chunks() == [0]


def test_max_length_beyond_the_positions_is_capped_and_said_once(tiny_models, tmp_path):
    from gradlake.tasks.gradients.plan import ExtractionSpec, plan_extraction
    from gradlake.tasks.common.model import ModelSpec

    lake = str(tmp_path / "lake")
    long_chat = [{"role": "user", "content": "Tell me everything."}, {"role": "assistant", "content": "word " * 20000}]
    short_chat = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]
    import pandas as pd

    write_dataset(LakeStore(lake), "long", "original", pd.DataFrame({"id": ["long", "short"],
                                                                      "messages": [long_chat, short_chat]}))
    model = tiny_models["olmo"]
    assert AutoModelForCausalLM.from_pretrained(model / "checkpoint-1").config.max_position_embeddings == 512
    spec = ExtractionSpec(model=ModelSpec(model=str(model), checkpoint="checkpoint-1"), dataset="long", max_length=1024,
                          shard_size=2, batch_size=2, target="inputs_embeds", lake=lake)
    planned = plan_extraction(spec)
    assert planned.input_ids.shape[1] == 512 and planned.lineage["max_length"] == 512
    assert planned.plan.parameters == {INPUTS_EMBEDS: [512, 64]}
    assert len(planned.notes) == 1 and "max_length 1024 is more than the 512 positions" in planned.notes[0]
    result = runner.invoke(app, ["extract", "--model", str(model), "--checkpoint", "checkpoint-1", "--dataset", "long",
                                 "--max-length", "1024", "--shard-size", "2", "--batch-size", "2",
                                 "--target", "inputs_embeds", "--lake", lake])
    assert result.exit_code == 0, result.output
    assert said(lake, "max_length 1024 is more than the 512 positions") == 1
    ds = open_lake(lake).gradients(dataset="long", variant="original", target="inputs_embeds")
    assert int(ds["n_tokens"].max()) == 512 and ds[INPUTS_EMBEDS].shape[1:] == (512 * 64,)
    assert np.isfinite(ds[INPUTS_EMBEDS].values).all()


def said(lake: str, text: str) -> int:
    """How many log lines of the extraction runs on `lake` hold `text` (read back from the Prefect server)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()  # run logs are shipped in batches, in the background
    with get_client(sync_client=True) as client:
        runs = [r.id for r in client.read_flow_runs(limit=200) if r.parameters.get("spec", {}).get("lake") == lake]
        assert runs, f"no flow run on {lake}"
        for _ in range(60):  # and written by the server after it answers
            logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=runs)), limit=200)
            if any(text in log.message for log in logs):
                break
            time.sleep(0.5)
    return sum(text in log.message for log in logs)
