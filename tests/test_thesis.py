"""Reproducing the "Select or Project?" thesis: its pipeline rebuilt by hand for a handful of samples
against gradlake's `chat_template=tulu, labels=last_assistant, bm25=thesis`.

Nothing of gradlake's rendering, masking, gradients or BM25 is used for the reference: the tulu
format is written out with string concatenation, the loss span is located as open-instruct does
(the tokens of the text up to the last "<|assistant|>\\n" are masked), each sample's gradient
comes from its own `loss.backward()` with transformers' loss, and BM25 is `rank_bm25`'s Okapi
on the first message split at single spaces, candidates from `np.argsort`, the truth forced
into the last place when missed, ties in the final choice to the candidate ranked first.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import thesis_choice
from gradlake.flows.extract import extract_gradients
from gradlake.lake import open_lake
from gradlake.lake.datasets import write_dataset
from gradlake.lake.store import LakeStore
from gradlake.tasks.evaluate.spec import EvaluationSpec
from gradlake.tasks.evaluate.evaluation import run_evaluation
from gradlake.tasks.gradients.plan import ExtractionSpec
from gradlake.tasks.common.loss import encode_sample
from gradlake.tasks.common.model import ModelSpec
from gradlake.tasks.data.probes import load_probe_set, probe_variant

N = 12
SYSTEM = "You are a helpful assistant."


def thesis_chats() -> dict[str, list[list[dict]]]:
    """Both variants of N probe samples, some with a system prompt (the same one: BM25 ties on the first
    message, so that the tie rules decide) and some with an earlier exchange (so that only the last answer
    carries loss)."""
    frame = load_probe_set()
    rest = frame.iloc[N:]
    shortest = rest.index[(rest["instruction"].str.len() + rest["answer"].str.len()).argmin()]
    frame = pd.concat([frame.head(N), frame.loc[[shortest]]])  # the tiny models take 512 tokens at most
    out = {}
    for variant in ("original", "paraphrased"):
        chats = list(probe_variant(frame, variant)["messages"])
        earlier = chats[N]  # a short sample outside the set, as the first exchange of a two-turn chat
        made = []
        for i, chat in enumerate(chats[:N]):
            chat = [dict(m) for m in chat]
            if variant == "paraphrased":  # a shorter answer too, so that the gradients do not find every original
                chat[-1]["content"] = chat[-1]["content"].split(". ")[0] + "."
            if i % 3 == 1 or (i == 0 and variant == "original"):  # sample 0's original ties too, its query not
                chat = [{"role": "system", "content": SYSTEM}, *chat]
            elif i % 3 == 2:
                chat = [dict(m) for m in earlier] + chat
            made.append(chat)
        out[variant] = made
    return out


def tulu_by_hand(chat: list[dict], eos: str) -> tuple[str, str]:
    """(whole text, text before the last answer) in open-instruct's tulu format."""
    text, before_last = "", ""
    last = max(i for i, m in enumerate(chat) if m["role"] == "assistant")
    for i, m in enumerate(chat):
        if m["role"] in ("system", "user"):
            text += f"<|{m['role']}|>\n{m['content']}\n"
        else:
            text += "<|assistant|>\n"
            if i == last:
                before_last = text
            text += m["content"] + eos + ("\n" if i < len(chat) - 1 else "")
    return text, before_last


def thesis_accuracies(model, tokenizer, chats: dict[str, list[list[dict]]]) -> tuple[pd.Series, dict]:
    """The thesis's per-tensor candidate accuracy (and BM25's own), computed by hand."""
    from rank_bm25 import BM25Okapi

    tokens, grads = {}, {}
    for variant, variant_chats in chats.items():
        tokens[variant], grads[variant] = [], []
        for chat in variant_chats:
            text, before = tulu_by_hand(chat, tokenizer.eos_token)
            ids = tokenizer(text, add_special_tokens=False).input_ids
            start = len(tokenizer(before, add_special_tokens=False).input_ids)
            labels = [-100] * start + ids[start:]
            tokens[variant].append((ids, [lab != -100 for lab in labels]))
            model.zero_grad(set_to_none=True)
            model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss.backward()
            grads[variant].append({n: p.grad.detach().flatten().double().clone() for n, p in model.named_parameters()})
    docs = [c[0]["content"] for c in chats["original"]]
    index = BM25Okapi([d.split(" ") for d in docs])
    hits: dict[str, list[bool]] = {n: [] for n, _ in model.named_parameters()} | {"bm25": []}
    for row, chat in enumerate(chats["paraphrased"]):
        scores = index.get_scores(chat[0]["content"].split(" "))
        candidates = np.argsort(-scores)[:5]
        if row not in candidates:
            candidates[-1] = row
        hits["bm25"].append(candidates[thesis_choice([scores[j] for j in candidates])] == row)
        for name in hits:
            if name == "bm25":
                continue
            q = grads["paraphrased"][row][name]
            cosines = [float(q @ grads["original"][j][name] / (q.norm() * grads["original"][j][name].norm()))
                       for j in candidates]
            hits[name].append(candidates[thesis_choice(cosines)] == row)
    return pd.Series({name: float(np.mean(h)) for name, h in hits.items()}), tokens


def test_thesis_settings_reproduce_the_thesis_pipeline_by_hand(tiny_models, tmp_path):
    lake = f"file://{tmp_path / 'lake'}"
    chats = thesis_chats()
    store = LakeStore(lake)
    for variant, variant_chats in chats.items():
        ids = [f"s{i:02d}" for i in range(N)]
        write_dataset(store, "thesis", variant, pd.DataFrame({"id": ids, "messages": variant_chats}))
    checkpoint = tiny_models["olmo2"] / "checkpoint-1"
    model_spec = ModelSpec(model=str(tiny_models["olmo2"]), checkpoint="checkpoint-1")
    for variant in chats:
        extract_gradients(ExtractionSpec(model=model_spec, dataset="thesis", variant=variant, chat_template="tulu",
                                         labels="last_assistant", shard_size=4, batch_size=2, max_length=512, lake=lake))
    spec = EvaluationSpec(model=model_spec, dataset="thesis", queries=["paraphrased"], bm25="thesis", dense_baseline=False,
                          greedy_steps=0, lake=lake)
    _, results = run_evaluation(spec, log=lambda *_: None)

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    want, tokens = thesis_accuracies(model, tokenizer, chats)

    # The inputs: the stored tokens and loss positions are the hand-rendered ones, and differ from the defaults.
    opened = open_lake(lake)
    changed = 0
    for variant in chats:
        group = opened.gradients(dataset="thesis", variant=variant)
        for row, (ids, mask) in enumerate(tokens[variant]):
            n = int(group["n_tokens"][row])
            assert group["input_ids"][row, :n].values.tolist() == ids, (variant, row)
            assert group["label_mask"][row, :n].values.tolist() == mask, (variant, row)
            default = encode_sample(tokenizer, chats[variant][row], "sft", 512)
            changed += (default.input_ids, default.label_mask) != (ids, mask)
    assert changed == 2 * N, "the tulu rendering and last-answer loss should change every sample here"

    # The table: every tensor's candidate accuracy, and BM25's, equal the hand-built pipeline's.
    tensors = results[(results["kind"] == "tensor") & (results["similarity"] == "cosine")].set_index("vectors")
    assert set(tensors.index) == set(want.index) - {"bm25"}
    got = pd.concat([tensors["bm25_top5_accuracy"], results[results["vectors"] == "bm25"].set_index("vectors")["bm25_top5_accuracy"]])
    pd.testing.assert_series_equal(got.sort_index(), want.sort_index(), check_names=False)
    assert want.nunique() > 1, "a table where every vector set scores alike could not tell a wrong candidate apart"
    assert not math.isclose(want["bm25"], 1.0), "BM25 should miss some truths here (forced into the candidates)"
