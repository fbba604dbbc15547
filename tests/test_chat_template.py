"""Chat templates and loss labels: the thesis's tulu rendering and last-answer labels, against chats rendered by hand."""

from __future__ import annotations

import hashlib

import pytest
from transformers import AutoTokenizer

from conftest import write_probe
from gradlake.tasks.gradients.plan import ExtractionSpec, plan_extraction
from gradlake.tasks.common.loss import TULU, encode_sample
from gradlake.tasks.common.model import ModelSpec

CHATS = [
    [{"role": "user", "content": "How do I boil an egg?"}, {"role": "assistant", "content": "Put it in boiling water."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."},
     {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another?"},
     {"role": "assistant", "content": "Green."}],
]


def by_hand(chat: list[dict], eos: str) -> tuple[str, list[tuple[str, str]]]:
    """The tulu text of a chat, and for each assistant turn (text before its answer, text through its answer)."""
    text, spans = "", []
    for i, message in enumerate(chat):
        if message["role"] == "assistant":
            before = text + "<|assistant|>\n"
            text = before + message["content"] + eos
            spans.append((before, text))
            if i < len(chat) - 1:
                text += "\n"
        else:
            text += f"<|{message['role']}|>\n{message['content']}\n"
    return text, spans


@pytest.fixture(scope="module")
def tokenizer(tiny_models):
    return AutoTokenizer.from_pretrained(tiny_models["olmo2"] / "checkpoint-1")


@pytest.mark.parametrize("labels", ["assistant", "last_assistant"])
def test_tulu_rendering_and_labels_equal_chats_rendered_by_hand(tokenizer, labels):
    ids = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    for chat in CHATS:
        text, spans = by_hand(chat, tokenizer.eos_token)
        got = encode_sample(tokenizer, chat, "sft", 4096, TULU, labels)
        assert got.input_ids == ids(text)
        want = [False] * len(got.input_ids)
        for before, through in spans[-1:] if labels == "last_assistant" else spans:
            for t in range(len(ids(before)), len(ids(through))):
                want[t] = True
        assert got.label_mask == want
        assert got.input_ids[len(ids(spans[-1][1])) - 1] == tokenizer.eos_token_id  # the answer ends in eos, nothing after
        assert len(got.input_ids) == len(ids(spans[-1][1]))
    own = encode_sample(tokenizer, CHATS[0], "sft", 4096)
    assert own.input_ids != encode_sample(tokenizer, CHATS[0], "sft", 4096, TULU).input_ids
    with pytest.raises(ValueError, match="labels 'final' is not known"):
        encode_sample(tokenizer, CHATS[0], "sft", 4096, TULU, "final")


def test_template_and_labels_are_in_the_lineage_and_a_bad_template_is_refused(tiny_models, tmp_path):
    lake = f"file://{tmp_path / 'lake'}"
    write_probe(lake, 4)
    model = ModelSpec(model=str(tiny_models["olmo2"]), checkpoint="checkpoint-1")
    spec = ExtractionSpec(model=model, lake=lake, shard_size=4, batch_size=4, max_length=256)
    default = plan_extraction(spec)
    assert "chat_template" not in default.lineage and "labels" not in default.lineage  # older groups keep their fingerprint
    thesis = plan_extraction(spec.model_copy(update={"chat_template": "tulu", "labels": "last_assistant"}))
    digest = hashlib.sha256(TULU.encode()).hexdigest()
    assert thesis.lineage["chat_template"] == {"name": "tulu", "sha256": digest}
    assert thesis.lineage["labels"] == "last_assistant"
    assert thesis.path == default.path and (thesis.input_ids != default.input_ids).any()
    # the same template from a file: the same text, so the same digest
    path = tmp_path / "tulu.jinja"
    path.write_text(TULU)
    from_file = plan_extraction(spec.model_copy(update={"chat_template": str(path), "labels": "last_assistant"}))
    assert from_file.lineage["chat_template"] == {"name": "tulu.jinja", "sha256": digest}
    assert (from_file.input_ids == thesis.input_ids).all()
    with pytest.raises(ValueError, match=r"chat template '.*nowhere.jinja' is neither 'tokenizer', a built-in \(\['text', 'tulu'\]\)"):
        plan_extraction(spec.model_copy(update={"chat_template": str(tmp_path / "nowhere.jinja")}))


def test_evaluation_refuses_variants_rendered_differently(tiny_models, tmp_path):
    from gradlake.lake.store import LakeError
    from gradlake.tasks.evaluate.evaluation import Evaluation
    from gradlake.tasks.evaluate.spec import EvaluationSpec
    from test_batching import run

    model = ModelSpec(model=str(tiny_models["olmo2"]), checkpoint="checkpoint-1")
    thesis = {"chat_template": "tulu", "labels": "last_assistant"}
    for name, query_settings in (("mixed", {}), ("same", thesis)):
        lake = f"file://{tmp_path / name}"
        write_probe(lake, 4)
        for variant, settings in (("original", thesis), ("paraphrased", query_settings)):
            run(ExtractionSpec(model=model, lake=lake, variant=variant, shard_size=4, batch_size=4, max_length=256, **settings))
        spec = EvaluationSpec(model=model, queries=["paraphrased"], lake=lake, dense_baseline=False)
        if name == "mixed":
            with pytest.raises(LakeError, match=r"rendered differently \(chat_template tulu \(sha256 \w{12}\), labels "
                                                r"last_assistant vs chat_template tokenizer \(sha256 -\), labels assistant\)"):
                Evaluation(spec, "paraphrased")
        else:
            assert len(Evaluation(spec, "paraphrased").query_ids) == 4
