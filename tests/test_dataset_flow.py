"""The create-dataset flow: sources into versioned Parquet, model-generated answers per checkpoint."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from gradlake.tasks.data.dataset import DatasetSpec
from gradlake.flows.dataset import create_dataset
from gradlake.lake import open_lake
from gradlake.lake.store import LakeStore
from gradlake.tasks.data.generate import generate_answers
from gradlake.tasks.common.model import ModelSpec
from gradlake.tasks.data.sources import SourceError, SourceSpec


@pytest.fixture
def probe_file(tmp_path):
    """The bundled probe rows as a local JSONL source, plus two malformed rows."""
    from gradlake.tasks.data.probes import load_probe_set

    rows = load_probe_set().head(12)[["id", "instruction", "answer"]].to_dict(orient="records")
    rows.append({"id": "broken-1", "instruction": "", "answer": "nothing asked"})
    rows.append({"id": "broken-2", "instruction": "no answer"})
    path = tmp_path / "probes.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_original_variant_with_drop_report_and_versions(probe_file, tmp_path):
    lake = str(tmp_path / "lake")
    spec = DatasetSpec(name="mini", source=SourceSpec(source=str(probe_file), n=8, seed=3), lake=lake)
    versions = create_dataset(spec)
    assert list(versions) == ["original"]
    again = create_dataset(spec)
    assert again == versions, "the same content is the same version"
    opened = open_lake(lake)
    frame = opened.dataset("mini", "original")
    assert len(frame) == 8 and frame["id"].is_unique and not frame["id"].str.startswith("broken").any()
    row = opened.catalog().query("kind == 'dataset'").iloc[0]
    assert row["lineage.version"] == versions["original"]
    assert row["lineage.source"]["dropped_ids"] == ["broken-1", "broken-2"]
    assert row["lineage.source"]["dropped_by_reason"] == {"empty content": 1, "no messages, conversations or prompt/response columns": 1}
    assert row["lineage.source"]["n"] == 8 and row["lineage.source"]["seed"] == 3
    other = create_dataset(spec.model_copy(update={"source": SourceSpec(source=str(probe_file), n=8, seed=4)}))
    assert other["original"] != versions["original"]
    assert opened.dataset("mini", "original", version=versions["original"])["id"].tolist() == frame["id"].tolist()


def test_bad_requests_fail_before_anything_is_written(probe_file, tmp_path):
    lake = tmp_path / "lake"
    spec = DatasetSpec(name="mini", source=SourceSpec(source=str(probe_file), n=500), lake=str(lake))
    state = create_dataset(spec, return_state=True)
    assert state.is_failed()
    with pytest.raises(SourceError, match=r"n=500 is larger than the 12 usable rows"):
        state.result()
    assert not (lake / "datasets").exists()


def test_batched_generation_equals_one_prompt_at_a_time(tiny_models, probe_chats):
    path = tiny_models["olmo2"] / "checkpoint-1"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    frame = pd.DataFrame({"id": [f"s{i}" for i in range(7)], "messages": probe_chats[30:37]})
    batched = generate_answers(model, tokenizer, frame, max_new_tokens=12, batch_size=4, log=lambda *_: None)
    alone = generate_answers(model, tokenizer, frame, max_new_tokens=12, batch_size=1, log=lambda *_: None)
    assert batched["messages"].tolist() == alone["messages"].tolist()
    for chat, original in zip(batched["messages"], probe_chats[30:37]):
        assert chat[:-1] == original[:-1] and chat[-1]["role"] == "assistant"
    # The reference: plain greedy decoding, token by token, with no padding at all.
    prompt = tokenizer.apply_chat_template(probe_chats[30][:-1], tokenize=True, add_generation_prompt=True,
                                           return_dict=True)["input_ids"]
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(12):
            nxt = model(input_ids=ids).logits[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
            if nxt.item() == tokenizer.eos_token_id:
                break
    expected = tokenizer.decode(ids[0, len(prompt):], skip_special_tokens=True).strip()
    assert batched["messages"].iloc[0][-1]["content"] == expected


def test_model_generated_variants_per_checkpoint(tiny_models, probe_file, tmp_path):
    lake = str(tmp_path / "lake")
    models = [ModelSpec(model=str(tiny_models["olmo2"]), checkpoint=c) for c in ("checkpoint-0", "checkpoint-1")]
    spec = DatasetSpec(name="mini", source=SourceSpec(source=str(probe_file), n=6, seed=0), generate=models,
                       generate_from="original", max_new_tokens=8, generation_batch_size=4, lake=lake)
    versions = create_dataset(spec)
    generated = sorted(v for v in versions if v.startswith("model_generated."))
    assert len(generated) == 2 and generated[0].endswith(".checkpoint-0") and generated[1].endswith(".checkpoint-1")
    opened = open_lake(lake)
    rows = opened.catalog().query("kind == 'dataset'").set_index("variant")
    gens = [rows.loc[v, "lineage.generator"] for v in generated]
    assert [g["checkpoint"] for g in gens] == ["checkpoint-0", "checkpoint-1"]
    assert gens[0]["resolved_commit"] != gens[1]["resolved_commit"]
    assert all(g["decoding"] == "greedy" and g["max_new_tokens"] == 8 for g in gens)
    model_key = generated[0].split(".")[1]
    a = opened.dataset("mini", "model_generated", model=model_key, checkpoint="checkpoint-0")
    b = opened.dataset("mini", "model_generated", model=model_key, checkpoint="checkpoint-1")
    original = opened.dataset("mini", "original")
    assert a["id"].tolist() == b["id"].tolist() == original["id"].tolist()
    assert [m[0] for m in a["messages"]] == [m[0] for m in original["messages"]], "prompts are the originals'"
    assert [m[-1]["content"] for m in a["messages"]] != [m[-1]["content"] for m in b["messages"]]
    assert LakeStore(lake).fs.exists(LakeStore(lake).path(f"datasets/mini/{generated[1]}/latest.json"))


def test_paraphrase_then_generate_through_the_flow(tiny_models, probe_file, tmp_path, openai_server):
    """The whole flow over HTTP: paraphrases from the API, answers to the paraphrased prompts, lineage cited."""
    from openai_server import paraphrase_of

    from gradlake.tasks.data.paraphrase import ParaphraseSpec

    lake = str(tmp_path / "lake")
    spec = DatasetSpec(name="mini", source=SourceSpec(source=str(probe_file), n=5, seed=1),
                       paraphrase=ParaphraseSpec(model=openai_server.models[0], base_url=openai_server.base_url, max_retries=2),
                       generate=[ModelSpec(model=str(tiny_models["olmo"]), checkpoint="checkpoint-1")],
                       max_new_tokens=6, lake=lake)
    versions = create_dataset(spec)
    assert len(openai_server.successes()) == 5
    opened = open_lake(lake)
    original, paraphrased = opened.dataset("mini", "original"), opened.dataset("mini", "paraphrased")
    assert paraphrased["id"].tolist() == original["id"].tolist()
    for o, p in zip(original["messages"], paraphrased["messages"]):
        assert p[0]["content"] == paraphrase_of(o[0]["content"]) and p[1] == o[1]
    generated_variant = next(v for v in versions if v.startswith("model_generated."))
    generated = opened.dataset("mini", generated_variant)
    assert [m[0] for m in generated["messages"]] == [m[0] for m in paraphrased["messages"]]
    rows = opened.catalog().query("kind == 'dataset'").set_index("variant")
    paraphraser = rows.loc["paraphrased", "lineage.paraphraser"]
    assert paraphraser["model"] == openai_server.models[0] and paraphraser["prompt_hash"].startswith("sha256:")
    assert openai_server.api_key not in json.dumps(rows.loc["paraphrased"].to_dict(), default=str)
    assert rows.loc[generated_variant, "lineage.from_version"] == versions["paraphrased"]
    create_dataset(spec)
    assert len(openai_server.successes()) == 5, "a rerun pays for nothing"


def test_a_refused_key_or_a_missing_one_writes_nothing(probe_file, tmp_path, openai_server, monkeypatch):
    """Every check of the flow, the API's acceptance of the key included, comes before the first write."""
    from gradlake.tasks.data.paraphrase import ParaphraseError, ParaphraseSpec

    lake = tmp_path / "lake"
    spec = DatasetSpec(name="mini", source=SourceSpec(source=str(probe_file), n=5, seed=1),
                       paraphrase=ParaphraseSpec(model=openai_server.models[0], base_url=openai_server.base_url,
                                                 max_retries=0),
                       lake=str(lake))
    monkeypatch.setenv("OPENAI_API_KEY", "sk-revoked")
    state = create_dataset(spec, return_state=True)
    with pytest.raises(ParaphraseError, match="rejected the key"):
        state.result()
    assert set(openai_server.statuses()) == {401}
    assert not any(lake.rglob("*")), sorted(lake.rglob("*"))
    monkeypatch.delenv("OPENAI_API_KEY")
    state = create_dataset(spec, return_state=True)
    with pytest.raises(ParaphraseError, match=r"\$OPENAI_API_KEY is unset"):
        state.result()
    assert not any(lake.rglob("*")), sorted(lake.rglob("*"))


def test_a_generator_without_a_chat_template_writes_nothing(tiny_models, probe_file, tmp_path):
    """Generation needs the tokenizer's chat template: a checkpoint without one is refused before the original is stored."""
    import shutil

    where = tmp_path / "no-template" / "checkpoint-1"
    shutil.copytree(tiny_models["olmo2"] / "checkpoint-1", where)
    (where / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((where / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (where / "tokenizer_config.json").write_text(json.dumps(config))
    assert AutoTokenizer.from_pretrained(where).chat_template is None
    lake = tmp_path / "lake"
    spec = DatasetSpec(name="mini", source=SourceSpec(source=str(probe_file), n=4, seed=0),
                       generate=[ModelSpec(model=str(where.parent), checkpoint="checkpoint-1")],
                       generate_from="original", max_new_tokens=4, lake=str(lake))
    state = create_dataset(spec, return_state=True)
    assert state.is_failed()
    with pytest.raises(ValueError, match="has no chat template, so its prompts cannot be rendered"):
        state.result()
    assert not (lake / "datasets").exists()


def test_bundled_source_makes_the_probe_sets_variants_with_nothing_else_given(tmp_path):
    """A recipe with every default makes 'original' and 'paraphrased' of the bundled probe set: the same versions
    (content) as `gradlake dataset probe` stores, so either way of making it gives the same gradients."""
    from gradlake.tasks.data.probes import store_probe_set

    lake = f"file://{tmp_path / 'lake'}"
    versions = create_dataset(DatasetSpec(name="probe", lake=lake))
    assert list(versions) == ["original", "paraphrased"]
    reference = f"file://{tmp_path / 'reference'}"
    store_probe_set(reference)
    for variant, version in versions.items():
        assert open_lake(reference).catalog().query(f"kind == 'dataset' and variant == '{variant}'")["lineage.version"].iloc[0] == version
    row = open_lake(lake).catalog().query("kind == 'dataset' and variant == 'paraphrased'").iloc[0]
    assert row["lineage.source"]["source"] == "bundled:probe", "lineage names the source, not a worker's path"
