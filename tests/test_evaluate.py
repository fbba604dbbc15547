"""Select vs project: metrics on known rankings, the BM25-candidate protocol, block-wise = in memory, the flow's outputs."""

from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd
import pytest
import zarr

from conftest import thesis_choice, write_probe
from gradlake.flows.evaluate import artifact_key, evaluate
from gradlake.flows.extract import extract_gradients
from gradlake.lake import open_lake
from gradlake.lake.store import LakeError
from gradlake.tasks.evaluate.spec import EvaluationSpec
from gradlake.tasks.evaluate.groups import layer_groups
from gradlake.tasks.evaluate.evaluation import run_evaluation
from gradlake.tasks.gradients.plan import ExtractionSpec
from gradlake.tasks.evaluate.metrics import (bm25_candidates, bm25_scores, bm25_tokens, candidate_correct, cosine_from_parts,
    rank_metrics, thesis_bm25_scores, thesis_candidates, top_k, true_ranks)
from gradlake.tasks.common.model import ModelSpec
from gradlake.tasks.projection.spec import ProjectionSpec
from gradlake.tasks.evaluate.similarity import array_dots, blocks

N = 24


def test_metrics_on_a_known_ranking():
    # query i's true original is column i; the truth is placed at ranks 1, 2, 5 and 11 (a tie counts half)
    scores = np.zeros((4, 12))
    scores[0] = np.linspace(0, -1, 12)                                  # truth (col 0) highest
    scores[1] = -np.arange(12.0)                                        # col 0 first, truth (col 1) second
    scores[2] = -np.arange(12.0)
    scores[2, 2], scores[2, 4] = -4.0, -2.0                             # 4 above the truth: rank 5
    scores[3] = np.arange(12.0)[::-1]
    scores[3, 3] = -1.0                                                 # below all others ...
    scores[3, 11] = -1.0                                                # ... but tied with one: rank 11.5
    ranks = true_ranks(scores, np.arange(4))
    np.testing.assert_array_equal(ranks, [1, 2, 5, 11.5])
    m = rank_metrics(ranks)
    assert m["top1"] == 0.25 and m["recall@1"] == 0.25 and m["recall@5"] == 0.75 and m["recall@10"] == 0.75
    assert math.isclose(m["mrr"], (1 + 1 / 2 + 1 / 5 + 1 / 11.5) / 4)
    assert math.isclose(m["mean_rank"], (1 + 2 + 5 + 11.5) / 4)
    index, values = top_k(scores, 3)
    np.testing.assert_array_equal(index[1], [0, 1, 2])
    assert (np.diff(values, axis=1) <= 0).all()
    # a constant similarity must not look perfect
    assert rank_metrics(true_ranks(np.ones((5, 5)), np.arange(5)))["top1"] == 0


def test_cosine_from_parts_equals_cosine_of_concatenation():
    rng = np.random.default_rng(0)
    parts_q = [rng.normal(size=(6, d)) for d in (3, 7, 2)]
    parts_d = [rng.normal(size=(9, d)) for d in (3, 7, 2)]
    dots = sum(q @ d.T for q, d in zip(parts_q, parts_d))
    q_sq = sum((q ** 2).sum(1) for q in parts_q)
    d_sq = sum((d ** 2).sum(1) for d in parts_d)
    Q, D = np.hstack(parts_q), np.hstack(parts_d)
    want = (Q / np.linalg.norm(Q, axis=1, keepdims=True)) @ (D / np.linalg.norm(D, axis=1, keepdims=True)).T
    np.testing.assert_allclose(cosine_from_parts(dots, q_sq, d_sq), want, rtol=1e-12)


def _direct_bm25(query: str, docs: list[str], k1=1.5, b=0.75) -> np.ndarray:
    """Lucene's BM25 written out: sum over query words (repeats count again, as in bm25s) of idf * tf / (tf + k1 (1 - b + b dl / avgdl)),
    idf = ln(1 + (N - df + 0.5) / (df + 0.5)) (Lucene dropped the constant (k1 + 1) factor; rankings are the same)."""
    corpus = [bm25_tokens(d) for d in docs]
    avgdl = sum(map(len, corpus)) / len(corpus)
    out = np.zeros(len(docs))
    for term in bm25_tokens(query):
        df = sum(term in doc for doc in corpus)
        if df == 0:
            continue
        idf = math.log(1 + (len(docs) - df + 0.5) / (df + 0.5))
        for j, doc in enumerate(corpus):
            tf = doc.count(term)
            out[j] += idf * tf / (tf + k1 * (1 - b + b * len(doc) / avgdl))
    return out


def test_bm25_tokens_are_unicode_words_and_unchanged_on_ascii():
    assert bm25_tokens("Как приготовить БОРЩ?") == ["как", "приготовить", "борщ"]
    assert bm25_tokens("如何做红烧肉？") == ["如", "何", "做", "红", "烧", "肉"]  # no spaces: one token per ideograph
    composed, decomposed = "Crème brûlée", "Cre\u0300me bru\u0302le\u0301e"
    assert bm25_tokens(composed) == bm25_tokens(decomposed) == ["crème", "brûlée"]
    assert bm25_tokens("STRASSE straße") == ["strasse", "strasse"]  # case folded, not only lower-cased
    rng = np.random.default_rng(0)
    alphabet = [chr(c) for c in range(32, 127)]
    for _ in range(200):  # on ASCII text: the lower-cased [a-z0-9] runs, as before
        text = "".join(rng.choice(alphabet, size=int(rng.integers(0, 60))))
        assert bm25_tokens(text) == re.findall(r"[a-z0-9]+", text.lower()), text


def test_bm25_finds_queries_in_other_scripts():
    docs = ["Как приготовить борщ с говядиной", "Как починить велосипед дома", "如何做红烧肉", "如何学习游泳",
            "Recette de la crème brûlée", "Recette de la tarte aux pommes"]
    queries = ["рецепт борща с говядиной как приготовить", "红烧肉怎么做", "crème brûlée facile"]
    scores = bm25_scores(queries, docs)
    np.testing.assert_allclose(scores, np.stack([_direct_bm25(q, docs) for q in queries]), rtol=1e-5, atol=1e-6)
    assert list(scores.argmax(axis=1)) == [0, 2, 4]
    assert (scores.max(axis=1) > 0).all()


def test_bm25_candidate_protocol_against_a_direct_implementation():
    from gradlake.tasks.data.probes import load_probe_set

    frame = load_probe_set().head(40)
    docs, queries = list(frame["instruction"]), list(frame["paraphrase"])
    truth = np.arange(len(queries))
    scores = bm25_scores(queries, docs)
    direct = np.stack([_direct_bm25(q, docs) for q in queries])
    np.testing.assert_allclose(scores, direct, rtol=1e-5, atol=1e-6)
    index, position = bm25_candidates(scores, truth)
    forced = 0
    for row in range(len(queries)):
        order = sorted(range(len(docs)), key=lambda j: (-direct[row, j], j))[:5]
        if row not in order:
            order[-1] = row
            forced += 1
        assert list(index[row]) == order and index[row, position[row]] == row
    assert 0 < forced < len(queries), "the sample should exercise both cases"
    # accuracy: truth strictly best among its candidates
    rng = np.random.default_rng(1)
    sims = rng.normal(size=(len(queries), len(docs)))
    got = candidate_correct(np.take_along_axis(sims, index, axis=1), position)
    want = [sims[r, r] > max(sims[r, j] for j in index[r] if j != r) for r in range(len(queries))]
    np.testing.assert_array_equal(got, want)


def test_thesis_bm25_protocol_against_its_rules_written_out():
    from rank_bm25 import BM25Okapi

    from gradlake.tasks.data.probes import load_probe_set, probe_variant

    originals = probe_variant(load_probe_set(), "original").head(40)
    paraphrased = probe_variant(load_probe_set(), "paraphrased").head(40)
    docs = [m[0]["content"] for m in originals["messages"]]
    queries = [m[0]["content"] for m in paraphrased["messages"]]
    truth = np.arange(len(queries))
    scores = thesis_bm25_scores(queries, docs)
    index = BM25Okapi([d.split(" ") for d in docs])
    np.testing.assert_array_equal(scores, np.stack([index.get_scores(q.split(" ")) for q in queries]))
    cand, pos = thesis_candidates(scores, truth)
    forced = 0
    for row in range(len(queries)):
        want = np.argsort(-index.get_scores(queries[row].split(" ")))[:5]
        if row not in want:
            want[-1] = row
            forced += 1
        assert list(cand[row]) == list(want) and cand[row, pos[row]] == row
    assert 0 < forced < len(queries), "the sample should exercise both cases"
    # ties: the thesis counts a tie won by the truth when it comes first in BM25's order; gradlake's default never
    rng = np.random.default_rng(3)
    sims = rng.integers(0, 3, size=(len(queries), 5)).astype(float)  # many ties
    first = candidate_correct(sims, pos, "first")
    assert list(first) == [thesis_choice(list(s)) == p for s, p in zip(sims, pos)]
    strict = candidate_correct(sims, pos)
    assert (strict <= first).all() and (strict < first).any()
    with pytest.raises(ValueError, match="tie rule 'loose' is not known"):
        candidate_correct(sims, pos, "loose")


def test_blockwise_dots_equal_in_memory(tmp_path):
    rng = np.random.default_rng(2)
    q, d = rng.normal(size=(37, 1000)).astype(np.float32), rng.normal(size=(53, 1000)).astype(np.float32)
    root = zarr.open_group(str(tmp_path / "z"), mode="w")
    root.create_array("q", data=q, chunks=(8, 128))
    root.create_array("d", data=d, chunks=(8, 128))
    budget = 4 * 1000 * 16  # far less than either matrix: many slabs and query blocks
    dots, q_sq, d_sq = array_dots(root["q"], root["d"], 5, 30, budget)
    np.testing.assert_allclose(dots, q[5:30].astype(np.float64) @ d.T.astype(np.float64), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(q_sq, (q[5:30].astype(np.float64) ** 2).sum(1), rtol=1e-5)
    np.testing.assert_allclose(d_sq, (d.astype(np.float64) ** 2).sum(1), rtol=1e-5)
    seen = [(q0, q1) for q0, q1, *_ in blocks(root, root, ["q"], 3, budget=1 << 20)]
    assert len(seen) == 1
    small = [(q0, q1) for q0, q1, *_ in blocks(root, root, ["q"], 3, budget=8 * 37 * 5 * 2 * 4)]
    assert len(small) > 1 and small[0][0] == 0 and small[-1][1] == 37


def test_blockwise_dots_are_the_same_whatever_the_budget(tmp_path):
    """The budget shapes the blocks, never a score: every budget gives the same bits (a matrix product's rounding
    depends on its shape, so blocks shaped by the budget differed by up to 9e-5 here and split exact ties)."""
    rng = np.random.default_rng(2)
    q, d = rng.normal(size=(37, 1000)).astype(np.float32), rng.normal(size=(53, 1000)).astype(np.float32)
    d[7] = q[3] = d[40]  # a duplicated original: query 3 ties between originals 7 and 40
    root = zarr.open_group(str(tmp_path / "z"), mode="w")
    root.create_array("q", data=q, chunks=(8, 128), shards=(8, 512))
    root.create_array("d", data=d, chunks=(8, 128))
    parts = {}
    for budget in (1, 4 * 1000 * 16, 8 * 37 * 5 * 2 * 4, 1 << 20, 1 << 30):
        got = list(blocks({"x": root["q"]}, {"x": root["d"]}, ["x"], 3, budget))
        parts[budget] = [np.concatenate([g[k] for g in got]) for k in (3, 4)] + [got[-1][5]]
    reference = parts[1 << 30]
    for budget, part in parts.items():
        for got, want in zip(part, reference):
            assert np.array_equal(got, want), budget
    assert reference[0][3, 7] == reference[0][3, 40]


def _direct_greedy(q_vectors: dict, d_vectors: dict, steps: int) -> tuple[list[str], list[float], str]:
    """Greedy selection written out on the raw vectors: q_vectors[name] is (queries x n), d_vectors[name] is
    (queries x 5 candidates x n) with the true original at candidate 0; concatenate, take cosines, count a query
    correct when its own original scores strictly highest; stop at the first step that does not improve."""
    chosen, accuracies = [], []
    while len(chosen) < len(q_vectors):
        if len(chosen) == steps:
            return chosen, accuracies, "greedy_steps reached"
        best = None
        for name in q_vectors:  # model order: the first of equals wins
            if name in chosen:
                continue
            members = chosen + [name]
            correct = 0
            for row in range(len(q_vectors[name])):
                q = np.concatenate([q_vectors[m][row] for m in members])
                cosines = []
                for cand in range(5):
                    d = np.concatenate([d_vectors[m][row, cand] for m in members])
                    cosines.append(float(q @ d / (np.linalg.norm(q) * np.linalg.norm(d))))
                correct += all(cosines[0] > c for c in cosines[1:])
            accuracy = correct / len(q_vectors[name])
            if best is None or accuracy > best[1]:
                best = (name, accuracy)
        if accuracies and best[1] <= accuracies[-1]:
            return chosen, accuracies, "no gain"
        chosen.append(best[0])
        accuracies.append(best[1])
    return chosen, accuracies, "every tensor selected"


def test_greedy_selection_stops_when_accuracy_stops_rising():
    from gradlake.tasks.evaluate.evaluation import greedy_selection

    rng = np.random.default_rng(0)
    n_queries, names = 40, [f"t{i}" for i in range(6)]
    sizes = {name: 3 + i for i, name in enumerate(names)}
    # each query is a noisy copy of its true candidate (candidate 0), tensor i less so the later it comes:
    # the first tensors add signal, then the next best one lowers the accuracy (0.45, 0.6, 0.65, 0.675, then 0.65)
    q_vectors, d_vectors = {}, {}
    for i, name in enumerate(names):
        d_vectors[name] = rng.normal(size=(n_queries, 5, sizes[name]))
        q_vectors[name] = 0.5 * (1 - i / 6) * d_vectors[name][:, 0] + rng.normal(size=(n_queries, sizes[name]))
    candidates = {n: {"dots": np.einsum("qn,qcn->qc", q_vectors[n], d_vectors[n]), "q_sq": (q_vectors[n] ** 2).sum(1),
                      "d_sq": (d_vectors[n] ** 2).sum(2)} for n in names}
    truth_position = np.zeros(n_queries, dtype=int)
    for steps in (len(names), 2, 1):
        got = greedy_selection(candidates, truth_position, steps, sizes)
        chosen, accuracies, reason = _direct_greedy(q_vectors, d_vectors, steps)
        assert list(got["added"]) == chosen and list(got["step"]) == list(range(1, len(chosen) + 1))
        np.testing.assert_allclose(got["accuracy"], accuracies)
        assert list(got["n_values"]) == list(np.cumsum([sizes[n] for n in chosen]))
        assert got["stop_reason"].iloc[-1].startswith(reason) and got["stop_reason"].iloc[:-1].isna().all()
        assert (np.diff(got["accuracy"]) > 0).all()
    full = greedy_selection(candidates, truth_position, len(names), sizes)
    assert 1 < len(full) < len(names) and full["stop_reason"].iloc[-1].startswith("no gain"), "the case must stop early"
    assert greedy_selection(candidates, truth_position, 0, sizes).empty


@pytest.fixture(scope="module")
def evaluated(tiny_models, tmp_path_factory):
    """Original and paraphrased gradients of N probe samples with a projection, and their evaluation."""
    lake = f"file://{tmp_path_factory.mktemp('eval') / 'lake'}"
    write_probe(lake, N)
    model = ModelSpec(model=str(tiny_models["olmo2"]), checkpoint="checkpoint-1")
    for variant in ("original", "paraphrased"):
        extract_gradients(ExtractionSpec(model=model, variant=variant, shard_size=8, batch_size=4, max_length=256, lake=lake,
                                         projections=[ProjectionSpec(kind="rademacher", dim=512, scope="flat")]))
    spec = EvaluationSpec(model=model, queries=["paraphrased"], lake=lake, dense_baseline=False, greedy_steps=4)
    directory = evaluate(spec)
    return lake, spec, directory


def test_evaluation_equals_direct_computation(evaluated):
    lake, spec, directory = evaluated
    opened = open_lake(lake)
    results = opened.evaluation(dataset="probe")
    originals = opened.gradients(dataset="probe", variant="original")
    queries = opened.gradients(dataset="probe", variant="paraphrased")
    names = originals.attrs["gradlake"]["lineage"]["layers"]
    truth = np.arange(N)  # the probe variants share ids, in order
    assert list(queries["sample"].values) == list(originals["sample"].values)

    def metrics_of(q: np.ndarray, d: np.ndarray) -> dict:
        cos = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ (d / np.linalg.norm(d, axis=1, keepdims=True)).T
        self_cosine = {"self_cosine_mean": float(np.mean(np.diag(cos)))}
        return {"cosine": rank_metrics(true_ranks(cos, truth)) | self_cosine,
                "dot": rank_metrics(true_ranks(q @ d.T, truth)) | self_cosine}

    def check(vectors: str, members: list[str], source_q, source_d):
        q = np.hstack([source_q[n].values.astype(np.float64) for n in members])
        d = np.hstack([source_d[n].values.astype(np.float64) for n in members])
        want = metrics_of(q, d)
        for sim in ("cosine", "dot"):
            row = results[(results["vectors"] == vectors) & (results["similarity"] == sim)].iloc[0]
            for metric, value in want[sim].items():
                assert math.isclose(row[metric], value, rel_tol=1e-6, abs_tol=1e-9), (vectors, sim, metric, row[metric], value)

    check("full", names, queries, originals)
    check("mlp", layer_groups(names)["mlp"], queries, originals)
    check("model.layers.1.self_attn.v_proj.weight", ["model.layers.1.self_attn.v_proj.weight"], queries, originals)
    proj_q = opened.projections(dataset="probe", variant="paraphrased", kind="rademacher", dim=512)
    proj_d = opened.projections(dataset="probe", variant="original", kind="rademacher", dim=512)
    check("proj:rademacher-flat-d512-s0", ["flat"], proj_q, proj_d)
    bm25 = results[results["vectors"] == "bm25"].iloc[0]
    texts = opened.dataset("probe", "original")
    paraphrases = opened.dataset("probe", "paraphrased")
    direct = np.stack([_direct_bm25(m[0]["content"], [o[0]["content"] for o in texts["messages"]]) for m in paraphrases["messages"]])
    assert math.isclose(bm25["top1"], rank_metrics(true_ranks(direct, truth))["top1"])
    greedy = opened.evaluation(dataset="probe", table="greedy")
    tensors = results[(results["kind"] == "tensor") & (results["similarity"] == "cosine")]
    assert math.isclose(greedy["accuracy"].iloc[0], tensors["bm25_top5_accuracy"].max())
    kinds = set(results["kind"])
    assert {"tensor", "group", "full", "projection", "text"} <= kinds
    assert len(results[results["kind"] == "tensor"]) == 2 * len(names)


def test_greedy_selection_in_the_lake_equals_a_direct_loop(evaluated):
    """The stored greedy table against greedy selection done by hand on the stored gradients and BM25's candidates."""
    lake, spec, _ = evaluated
    opened = open_lake(lake)
    originals = opened.gradients(dataset="probe", variant="original")
    queries = opened.gradients(dataset="probe", variant="paraphrased")
    names = list(originals.attrs["gradlake"]["plan"]["parameters"])  # model order: ties go to the first

    def user_turns(frame):
        return [" ".join(m["content"] for m in chat if m["role"] == "user") for chat in frame["messages"]]

    truth = np.arange(N)
    index, position = bm25_candidates(bm25_scores(user_turns(opened.dataset("probe", "paraphrased")),
                                                  user_turns(opened.dataset("probe", "original"))), truth)
    # each query's candidates with its own original first
    order = np.array([[index[r, position[r]]] + [index[r, j] for j in range(5) if j != position[r]] for r in range(N)])
    q_vectors = {n: queries[n].values.astype(np.float64) for n in names}
    d_vectors = {n: originals[n].values.astype(np.float64)[order] for n in names}
    chosen, accuracies, reason = _direct_greedy(q_vectors, d_vectors, spec.greedy_steps)
    greedy = opened.evaluation(dataset="probe", table="greedy")
    assert list(greedy["added"]) == chosen and list(greedy["step"]) == list(range(1, len(chosen) + 1))
    np.testing.assert_allclose(greedy["accuracy"], accuracies, rtol=1e-12)
    assert greedy["stop_reason"].iloc[-1].startswith(reason)
    assert len(greedy) <= spec.greedy_steps and (np.diff(greedy["accuracy"]) > 0).all()


def test_blockwise_evaluation_in_a_small_budget_gives_the_same_table(evaluated):
    lake, spec, _ = evaluated
    small = spec.model_copy(update={"memory_budget": 1 << 20, "lake": lake})  # the least allowed: several query blocks and slabs
    _, results = run_evaluation(small, log=lambda *_: None)
    reference = open_lake(lake).evaluation(dataset="probe")
    pd.testing.assert_frame_equal(results.reset_index(drop=True), reference.reset_index(drop=True), check_exact=True)


def test_thesis_protocol_evaluation_beside_the_default_one(evaluated, tmp_path):
    """bm25: thesis scores every vector set on the thesis's candidates with its tie rule, in <paradigm>-thesis."""
    import shutil

    from rank_bm25 import BM25Okapi

    lake, spec, directory = evaluated
    copy = tmp_path / "lake"
    shutil.copytree(lake[len("file://"):], copy)
    url = f"file://{copy}"
    default_meta = (copy / directory / "meta.json").read_bytes()
    written, results = run_evaluation(spec.model_copy(update={"bm25": "thesis", "lake": url}), log=lambda *_: None)
    assert written == directory + "-thesis" and (copy / directory / "meta.json").read_bytes() == default_meta
    opened = open_lake(url)
    with pytest.raises(LakeError, match="paradigm"):  # two evaluations of the same groups: the protocol tells them apart
        opened.evaluation(dataset="probe")
    stored = opened.evaluation(dataset="probe", paradigm="sft-thesis")
    pd.testing.assert_frame_equal(stored, results)

    docs = [m[0]["content"] for m in opened.dataset("probe", "original")["messages"]]
    queries = [m[0]["content"] for m in opened.dataset("probe", "paraphrased")["messages"]]
    index = BM25Okapi([d.split(" ") for d in docs])
    name = "model.layers.1.mlp.down_proj.weight"
    q = opened.gradients(dataset="probe", variant="paraphrased")[name].values.astype(np.float64)
    d = opened.gradients(dataset="probe", variant="original")[name].values.astype(np.float64)
    hits = {"bm25": [], name: []}
    for row, text in enumerate(queries):  # the thesis's loop, written out
        scores = index.get_scores(text.split(" "))
        cand = np.argsort(-scores)[:5]
        if row not in cand:
            cand[-1] = row
        cosines = [float(q[row] @ d[j] / np.linalg.norm(q[row]) / np.linalg.norm(d[j])) for j in cand]
        hits[name].append(cand[thesis_choice(cosines)] == row)
        hits["bm25"].append(cand[thesis_choice([scores[j] for j in cand])] == row)
    for vectors, correct in hits.items():
        row = results[(results["vectors"] == vectors) & (results["similarity"].isin(["cosine", "bm25"]))].iloc[0]
        assert math.isclose(row["bm25_top5_accuracy"], np.mean(correct)), (vectors, row["bm25_top5_accuracy"], np.mean(correct))
    assert open_lake(url).catalog().query("kind == 'evaluation'")["path"].str.endswith("-thesis").sum() == 1


def test_outputs_in_the_lake_and_as_artifacts(evaluated, prefect_server):
    from prefect.client.orchestration import get_client

    lake, spec, directory = evaluated
    opened = open_lake(lake)
    fs, root = opened.store.fs, opened.store.root
    for name in ("results.parquet", "self_similarity.parquet", "greedy.parquet", "report.md", "report.html", "meta.json"):
        assert fs.exists(f"{root}/{directory}/{name}"), name
    plots = fs.ls(f"{root}/{directory}/plots")
    assert {p.rsplit("/", 1)[1] for p in plots} >= {"accuracy_per_layer_line.png", "accuracy_per_layer_bar.png",
                                                     "attention_vs_mlp.png", "self_similarity_box.png",
                                                     "accuracy_vs_dimension.png", "greedy_selection.png"}
    assert all(fs.cat_file(p)[:8] == b"\x89PNG\r\n\x1a\n" for p in plots)
    html = fs.cat_file(f"{root}/{directory}/report.html").decode()
    assert html.count("data:image/png;base64,") == len(plots) and "proj:rademacher-flat-d512-s0" in html
    greedy = opened.evaluation(dataset="probe", table="greedy")
    assert 1 <= len(greedy) <= spec.greedy_steps and greedy["added"].is_unique
    catalog = opened.catalog()
    assert directory in set(catalog.loc[catalog["kind"] == "evaluation", "path"])

    import asyncio

    async def artifacts():
        async with get_client() as client:
            return await client.read_artifacts()

    found = {a.key: a for a in asyncio.run(artifacts())}
    key = artifact_key(directory)
    assert key.startswith("svp-tiny-olmo2-") and "-checkpoint-1-probe-sft" in key
    table, report = found[key], found[f"{key}-report"]
    assert table.type == "table" and "proj:rademacher-flat-d512-s0" in str(table.data)
    assert "top-1" in str(table.data) and "BM25 top-5" in str(table.data)  # short: the UI cuts a wide table
    assert spec.model.model in table.description and "checkpoint-1" in table.description
    assert "probe" in table.description
    assert report.type == "markdown" and "## Metrics" in report.data
    # the plots inside the artifact: the UI cannot read the lake's files
    assert report.data.count("](data:image/png;base64,") == len(plots) and "](plots/" not in report.data
    assert "select-vs-project" not in found, "the shared key of every model and checkpoint is gone"


def test_bad_evaluation_settings_fail_before_any_work(evaluated, tiny_models):
    lake, spec, _ = evaluated
    for queries, message in ((["paraphrased", "paraphrased"], "distinct"), (["original"], "cannot be a query"),
                             (["rephrased"], "no group at")):
        with pytest.raises((ValueError, LakeError), match=message):
            run_evaluation(spec.model_copy(update={"queries": queries}), log=lambda *_: None)
    other = ModelSpec(model=str(tiny_models["olmo2"]), checkpoint="checkpoint-0")
    with pytest.raises(LakeError, match="no group at"):
        run_evaluation(spec.model_copy(update={"model": other}), log=lambda *_: None)
    assert len(open_lake(lake).catalog().query("kind == 'evaluation'")) == 1
