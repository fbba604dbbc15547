"""The published protocol (Kronfluence's GPT-2 / WikiText-2 example) as a spec, and the same spec shape run end to end
on a tiny GPT-2 and a small local text corpus: text cut into token blocks, plain-text rendering, training, EK-FAC and
identity influence on the converted Conv1D layers, the benchmark with held-out validation blocks as queries."""

from __future__ import annotations

import json

import pytest

from conftest import REPO
from gradlake.lake.store import LakeStore

PROTOCOL = REPO / "protocols" / "kronfluence-gpt2-wikitext2.json"


def test_the_protocol_file_is_kronfluences_published_setup():
    from gradlake.tasks.attribution.protocol import ProtocolSpec

    spec = ProtocolSpec.model_validate(json.loads(PROTOCOL.read_text()))
    train = spec.attribution.train
    assert train.model.model == "openai-community/gpt2" and train.model.dtype == "float32"
    assert (train.epochs, train.batch_size, train.learning_rate, train.schedule, train.weight_decay, train.seed,
            train.max_grad_norm) == (3, 8, 3e-5, "constant", 0.01, 1004, None)
    assert (train.paradigm, train.chat_template, train.max_length) == ("pre", "text", 512)
    assert [d.source.blocks.block_tokens for d in spec.datasets] == [512, 512]
    assert [d.source.split for d in spec.datasets] == ["train", "validation"]
    assert spec.attribution.query_dataset == "wikitext2-valid"
    assert (spec.attribution.n_subsets, spec.attribution.retrain_seeds, spec.attribution.fraction) == (100, 5, 0.5)
    assert [i.strategy for i in spec.influence] == ["ekfac", "identity"]
    assert all(i.damping == "kronfluence" and i.lake == spec.lake and i.dataset == "wikitext2" for i in spec.influence)
    # the tracked modules, on GPT-2 small's architecture built from its config: blocks 0-10, attention and MLP
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config

    from gradlake.tasks.influence.kronfluence import linear_from_conv1d, tracked_modules

    with torch.device("meta"):
        gpt2 = AutoModelForCausalLM.from_config(GPT2Config())  # GPT-2 small's shape: 12 blocks of 768
    linear_from_conv1d(gpt2)
    tracked = tracked_modules(gpt2, spec.influence[0].layers)
    assert tracked == [f"transformer.h.{b}.{m}" for b in range(11)
                       for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    # the cost in docs/attribution.md: 6 x parameters x tokens, per full run 4,656 blocks x 512 x 3 epochs; the training run, 100 x 5
    # retrainings on half the blocks, 2 influence runs of 3 passes; at 50 TFLOP/s
    params = sum(p.numel() for p in gpt2.parameters())
    flops = 6 * params * 4656 * 512 * 3 * (1 + 100 * 5 * 0.5 + 2 * 3)
    assert params == 124_439_808 and flops == pytest.approx(1.37e18, rel=0.01)
    assert flops / (spec.sustained_tflops * 1e12) / 3600 == pytest.approx(7.6, abs=0.05)


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory, probe_chats):
    from gradlake.tasks.training.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("protocol") / "tiny-gpt2", "gpt2", probe_chats)


def _corpus(path, rows: list[str]) -> str:
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in rows))
    return str(path)


def small_protocol(tmp_path, tiny_gpt2, probe_chats, **changes) -> dict:
    """The protocol file with only what a tiny run needs changed: model, sources, sizes, where things go."""
    document = json.loads(PROTOCOL.read_text())
    texts = [" ".join(m["content"] for m in chat) + "\n" for chat in probe_chats]
    sources = [_corpus(tmp_path / "train.jsonl", texts[:100]), _corpus(tmp_path / "valid.jsonl", texts[100:130])]
    document["lake"] = str(tmp_path / "lake")
    for dataset, source in zip(document["datasets"], sources):
        dataset["source"] = {"source": source, "blocks": {"tokenizer": str(tiny_gpt2), "revision": "checkpoint-0",
                                                          "block_tokens": 64}}
    attribution = document["attribution"]
    attribution["train"].update(model={"model": str(tiny_gpt2), "checkpoint": "checkpoint-0", "device": "cpu"},
                                max_length=64, epochs=2, learning_rate=1e-3, output=str(tmp_path / "run"))
    attribution.update(n_subsets=4, retrain_seeds=2, retrain_prefix=str(tmp_path / "retrain"), train_deployment=None,
                       max_queries=6)
    for influence in document["influence"]:  # every block but the last, as the protocol tracks 0-10 of GPT-2's 12
        influence.update(layers=["transformer.h.0.attn.c_*.weight", "transformer.h.0.mlp.c_*.weight"], max_length=64,
                         train_batch_size=16, query_batch_size=8, max_queries=6)
    for key, value in changes.items():
        document[key] = value
    return document


def test_the_protocol_runs_end_to_end_on_a_tiny_gpt2(tiny_gpt2, probe_chats, tmp_path):
    from gradlake.tasks.attribution.protocol import ProtocolSpec
    from gradlake.flows.protocol import run_protocol
    from gradlake.lake.datasets import dataset_meta, read_dataset
    from gradlake.lake.scores import ScoreGroup
    from gradlake.tasks.attribution.spec import method_path
    from gradlake.tasks.attribution.benchmark import read_benchmark

    spec = ProtocolSpec.model_validate(small_protocol(tmp_path, tiny_gpt2, probe_chats))
    result = run_protocol(spec)
    store = LakeStore(spec.lake)
    # blocks: 64 tokens each, rendered as plain text with every token in the loss
    meta = dataset_meta(store, "wikitext2", "original")
    blocks = meta["lineage"]["source"]["blocks"]
    train = read_dataset(store, "wikitext2", "original")
    assert blocks["blocks"] == len(train) > 8 and list(train["id"][:2]) == ["block-000000", "block-000001"]
    assert blocks["tokens"] == 64 * blocks["blocks"] + blocks["left_out_tokens"]
    table = read_benchmark(store, result["benchmark"]).set_index("method")
    assert {"influence-ekfac", "influence-identity", "bm25", "dense", "random", "source oracle"} <= set(table.index)
    bench_meta = json.loads(store.fs.cat_file(store.path(f"{result['benchmark']}/meta.json")))
    assert bench_meta["query_dataset"] == "wikitext2-valid" and bench_meta["queries_with_source"] == 0
    assert bench_meta["retrain_seeds"] == 2 and bench_meta["n_queries"] == 6
    retrained = sorted(p.name for p in (tmp_path / "retrain").glob("lds-*/*"))
    assert retrained == [f"subset-00{m}{s}" for m in range(4) for s in ("", "-seed1")]
    group = ScoreGroup.open(store, method_path(spec.attribution, "influence-ekfac"))
    assert group.meta["lineage"]["tracked_modules"] == ["transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj",
                                                        "transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj"]
    assert group.meta["lineage"]["damping_rule"] == "kronfluence" and group.meta["settings"]["chat_template"] == "text"
    cost = result["cost"]
    assert cost["retrainings"] == 8 and cost["gpu_hours"] > 0
    # 6 x parameters x tokens for each run: training once, 4 x 2 retrainings on half, 3 passes per influence run
    assert cost["total_flops"] == pytest.approx(6 * cost["parameters"] * cost["tokens_per_run"] * (1 + 4 + 6))


def test_layer_patterns_that_match_nothing_fail_before_any_training(tiny_gpt2, probe_chats, tmp_path):
    from gradlake.tasks.attribution.protocol import ProtocolSpec
    from gradlake.flows.protocol import run_protocol
    from gradlake.tasks.influence.spec import InfluenceError

    document = small_protocol(tmp_path, tiny_gpt2, probe_chats)
    for influence in document["influence"]:
        influence["layers"] = json.loads(PROTOCOL.read_text())["influence"][0]["layers"][1:2]  # block 10: GPT-2 small's
    with pytest.raises(InfluenceError, match=r"layer pattern 'transformer.h.10.attn.c_\*.weight' matches no nn.Linear"):
        run_protocol(ProtocolSpec.model_validate(document))
    assert not (tmp_path / "run").exists()
