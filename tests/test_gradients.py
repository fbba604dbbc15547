"""Per-sample gradients against a plain per-sample `loss.backward()` with transformers' own loss."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from gradlake.tasks.gradients.engine import PerSampleGradients, per_sample_gradients
from gradlake.tasks.common.loss import encode_sample, pad_batch, sample_losses

RTOL = 1e-5


def reference_gradients(model, encoded) -> list[dict[str, torch.Tensor]]:
    """One sample per backward, loss from transformers' `labels` path: the independent reference."""
    out = []
    for e in encoded:
        model.zero_grad(set_to_none=True)
        ids = torch.tensor([e.input_ids])
        labels = torch.tensor([e.labels()])
        model(input_ids=ids, labels=labels).loss.backward()
        out.append({n: p.grad.detach().flatten().clone() for n, p in model.named_parameters()})
    return out


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def load(path):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path)


@pytest.mark.parametrize("arch", ["olmo", "olmo2"])
@pytest.mark.parametrize("paradigm", ["sft", "pre"])
def test_batched_equals_per_sample_backward(tiny_models, probe_chats, arch, paradigm):
    model, tokenizer = load(tiny_models[arch] / "checkpoint-1")
    chats = [probe_chats[i] for i in (0, 5, 17, 3, 42)]
    encoded = [encode_sample(tokenizer, c, paradigm, max_length=256) for c in chats]
    lengths = {len(e.input_ids) for e in encoded}
    assert len(lengths) > 2, "the batch must mix sequence lengths"
    ids, labels = pad_batch(encoded, tokenizer.pad_token_id)
    names = [n for n, _ in model.named_parameters()]
    got = per_sample_gradients(model, ids, labels, names)
    want = reference_gradients(model, encoded)
    assert model.__class__.__name__ == {"olmo": "OlmoForCausalLM", "olmo2": "Olmo2ForCausalLM"}[arch]
    for i, ref in enumerate(want):
        for name in names:
            err = relative_error(got[name][i], ref[name])
            assert err < RTOL, f"{arch}/{paradigm} sample {i} {name}: relative error {err:.2e}"


def test_buffers_are_reused_without_leaking_between_batches(tiny_models, probe_chats):
    """A second, smaller batch through the same extractor gives that batch's gradients, not stale ones."""
    model, tokenizer = load(tiny_models["olmo2"] / "checkpoint-1")
    names = ["model.embed_tokens.weight", "model.layers.1.mlp.down_proj.weight", "model.norm.weight"]
    first = [encode_sample(tokenizer, c, "sft", 256) for c in probe_chats[:4]]
    second = [encode_sample(tokenizer, c, "sft", 256) for c in probe_chats[10:12]]
    with PerSampleGradients(model, names) as grads:
        grads(*pad_batch(first, tokenizer.pad_token_id))
        got = {n: g.clone() for n, g in grads(*pad_batch(second, tokenizer.pad_token_id)).items()}
    want = reference_gradients(model, second)
    for i in range(2):
        for n in names:
            assert relative_error(got[n][i], want[i][n]) < RTOL
    assert all(p.requires_grad for p in model.parameters()), "requires_grad must be restored"


def test_sample_losses_match_transformers(tiny_models, probe_chats):
    model, tokenizer = load(tiny_models["olmo"] / "checkpoint-1")
    encoded = [encode_sample(tokenizer, c, "sft", 256) for c in probe_chats[:3]]
    ids, labels = pad_batch(encoded, tokenizer.pad_token_id)
    with torch.no_grad():
        batched = sample_losses(model(input_ids=ids).logits, labels)
        for i, e in enumerate(encoded):
            alone = model(input_ids=torch.tensor([e.input_ids]), labels=torch.tensor([e.labels()])).loss
            assert abs(batched[i].item() - alone.item()) < 1e-5


def test_sft_labels_cover_exactly_the_assistant_turn(tiny_models, probe_chats):
    _, tokenizer = load(tiny_models["olmo2"] / "checkpoint-1")
    chat = probe_chats[7]
    e = encode_sample(tokenizer, chat, "sft", 512)
    assert e.input_ids == tokenizer.apply_chat_template(chat, tokenize=True, return_dict=True)["input_ids"]
    labelled = tokenizer.decode([t for t, m in zip(e.input_ids, e.label_mask) if m])
    unlabelled = tokenizer.decode([t for t, m in zip(e.input_ids, e.label_mask) if not m])
    assert chat[1]["content"] in labelled
    assert chat[0]["content"] in unlabelled and chat[0]["content"] not in labelled
    pre = encode_sample(tokenizer, chat, "pre", 512)
    assert all(pre.label_mask) and pre.input_ids == e.input_ids


def test_multi_turn_chat_labels_every_assistant_turn(tiny_models):
    _, tokenizer = load(tiny_models["olmo2"] / "checkpoint-1")
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a prime."},
            {"role": "assistant", "content": "Seven."}, {"role": "user", "content": "Another one?"},
            {"role": "assistant", "content": "Eleven."}]
    e = encode_sample(tokenizer, chat, "sft", 512)
    labelled = tokenizer.decode([t for t, m in zip(e.input_ids, e.label_mask) if m])
    assert "Seven." in labelled and "Eleven." in labelled and "prime" not in labelled and "brief" not in labelled


@pytest.mark.parametrize("arch", ["olmo", "olmo2"])
def test_tied_embeddings_collect_both_uses(tiny_models, probe_chats, arch):
    """With lm_head tied to the embedding, one parameter gets the sum of both uses' gradients."""
    from gradlake.tasks.training.tiny import tiny_config

    _, tokenizer = load(tiny_models[arch] / "checkpoint-0")
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, tokenizer, tie_word_embeddings=True)).float().eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    encoded = [encode_sample(tokenizer, c, "sft", 256) for c in probe_chats[20:23]]
    names = [n for n, _ in model.named_parameters()]
    assert "lm_head.weight" not in names
    got = per_sample_gradients(model, *pad_batch(encoded, tokenizer.pad_token_id), names)
    for i, ref in enumerate(reference_gradients(model, encoded)):
        for name in names:
            assert relative_error(got[name][i], ref[name]) < RTOL, name


def reference_embeds_gradients(model, encoded) -> list[torch.Tensor]:
    """d loss / d inputs_embeds of each sample alone, through the model's `inputs_embeds` input."""
    out = []
    for e in encoded:
        embeds = model.get_input_embeddings()(torch.tensor([e.input_ids])).detach().requires_grad_(True)
        logits = model(inputs_embeds=embeds).logits
        loss = sample_losses(logits, torch.tensor([e.labels()]))[0]
        out.append(torch.autograd.grad(loss, embeds)[0][0])
    return out


@pytest.mark.parametrize("arch", ["olmo", "olmo2"])
def test_input_embedding_gradients_equal_autograd_per_sample(tiny_models, probe_chats, arch):
    """Per token (zero past each sample's end, up to max_tokens) and mean-pooled, beside a weight."""
    model, tokenizer = load(tiny_models[arch] / "checkpoint-1")
    encoded = [encode_sample(tokenizer, probe_chats[i], "sft", max_length=256) for i in (2, 9, 30)]
    lengths = torch.tensor([len(e.input_ids) for e in encoded])
    assert len(set(lengths.tolist())) == 3, "the batch must mix sequence lengths"
    ids, labels = pad_batch(encoded, tokenizer.pad_token_id)
    want = reference_embeds_gradients(model, encoded)
    weights = reference_gradients(model, encoded)
    weight = "model.layers.0.self_attn.q_proj.weight"
    max_tokens = int(lengths.max()) + 7
    hidden = model.config.hidden_size
    with PerSampleGradients(model, ["inputs_embeds", weight], max_tokens=max_tokens) as grads:
        got = grads(ids, labels, lengths)
        per_token = got["inputs_embeds"].view(len(encoded), max_tokens, hidden)
        for i, ref in enumerate(want):
            n = len(encoded[i].input_ids)
            assert ref.abs().max() > 0
            assert relative_error(per_token[i, :n], ref) < RTOL, f"{arch} sample {i}"
            assert per_token[i, n:].abs().max() == 0, "positions past the sample's end must be zero"
            assert relative_error(got[weight][i], weights[i][weight]) < RTOL
    with PerSampleGradients(model, ["inputs_embeds"], embeds_pooling="mean") as grads:
        pooled = grads(ids, labels, lengths)["inputs_embeds"]
        assert pooled.shape == (len(encoded), hidden)
        for i, ref in enumerate(want):
            assert relative_error(pooled[i], ref.mean(dim=0)) < RTOL


def test_input_embedding_gradients_projected_during_backward(tiny_models, probe_chats):
    """Projected but not kept: the projection of the autograd reference, through the shared scratch buffer."""
    from gradlake.tasks.gradients.engine import Projection
    from gradlake.tasks.projection.spec import ProjectionSpec
    from gradlake.tasks.projection.projectors import projectors_for

    model, tokenizer = load(tiny_models["olmo2"] / "checkpoint-1")
    encoded = [encode_sample(tokenizer, probe_chats[i], "sft", max_length=256) for i in (4, 11)]
    lengths = torch.tensor([len(e.input_ids) for e in encoded])
    ids, labels = pad_batch(encoded, tokenizer.pad_token_id)
    max_tokens, hidden = 300, model.config.hidden_size
    spec = ProjectionSpec(kind="rademacher", dim=32, seed=3, scope="per_tensor")
    projectors = projectors_for(spec, {"inputs_embeds": (max_tokens, hidden)})
    with PerSampleGradients(model, [], [Projection(projectors)], max_tokens=max_tokens) as grads:
        assert grads(ids, labels, lengths) == {}
        got = grads.projected[0]["inputs_embeds"]
    for i, ref in enumerate(reference_embeds_gradients(model, encoded)):
        full = torch.zeros(max_tokens, hidden)
        full[: ref.shape[0]] = ref
        want = projectors["inputs_embeds"].project(full.reshape(1, -1))[0]
        assert relative_error(got[i], want) < 1e-4


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_rows_copied_into_chunks_equal_the_host_copy_bitwise(dtype):
    """Extraction copies a batch's rows from the engine's buffers straight into their chunks (cast on the way):
    the same bits as the whole-batch host copy it replaced, in any order of rows."""
    import numpy as np

    from gradlake.lake.dtypes import copy_rows, host_rows, tensor_to_host

    values = torch.randn(5, 7, 3) * torch.tensor([1e-30, 1.0, 3e4, 7e4, 1e39]).reshape(5, 1, 1)  # subnormal to Inf
    values[0, 0, 0] = float("nan")
    out = host_rows((4, 7, 3), dtype)
    positions, offsets = np.array([4, 0, 2, 3]), np.array([1, 3, 0, 2])
    copy_rows(out, offsets, values, positions, dtype)
    want = tensor_to_host(values, dtype)
    assert type(out) is type(want) and out.dtype == want.dtype
    np.testing.assert_array_equal(np.asarray(out)[offsets].view(np.uint8), np.asarray(want)[positions].view(np.uint8))


def test_finite_check_reads_sums_and_still_names_a_nan():
    """The batch's check sums each tensor once: finite values whose sum overflows pass (checked value by value),
    a NaN anywhere is named with its sample and tensor, before anything is written."""
    import numpy as np

    from gradlake.tasks.gradients.extract import NonFiniteError, check_finite

    class Group:
        def tokens(self, name):
            return np.array(["s0", "s1", "s2"])

    model = torch.nn.Linear(2, 2)
    model.dtype = torch.float32  # as a transformers model says it
    losses = torch.ones(3)
    huge = {"a.weight": torch.full((3, 4), 3e38), "b.weight": torch.zeros(3, 2)}
    check_finite(losses, huge, [], np.arange(3), Group(), "shard 0", model)
    nan = {"a.weight": torch.zeros(3, 4), "b.weight": torch.zeros(3, 2)}
    nan["b.weight"][2, 1] = float("nan")
    with pytest.raises(NonFiniteError, match=r"NaN or Inf in the gradients \(b.weight first\) of 1 samples \['s2'\]"):
        check_finite(losses, nan, [], np.arange(3), Group(), "shard 0", model)
    projected = [{"flat": torch.tensor([[1.0], [float("-inf")], [2.0]])}]
    with pytest.raises(NonFiniteError, match=r"flat \(projection\) first\) of 1 samples \['s1'\]"):
        check_finite(losses, {"b.weight": torch.zeros(3, 2)}, projected, np.arange(3), Group(), "shard 0", model)
