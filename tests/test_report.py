"""The evaluation report and plots on small hand-made tables: readable text, the metrics defined, every figure drawn."""

from __future__ import annotations

import io
import json
import re

import matplotlib.image
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

from gradlake.flows.evaluate import artifact_key
from gradlake.tasks.evaluate.report import HEADLINE_LABELS, figures, headline, headline_records, html_report, markdown, plots

QUERIES = ("paraphrased", "model_generated")
TENSORS = ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.up_proj.weight",
           "model.layers.1.self_attn.q_proj.weight", "model.layers.1.mlp.up_proj.weight")
LINEAGE = {"model": "org/tiny", "checkpoint": "step-1", "dataset": "probe", "paradigm": "sft",
           "queries": {"paraphrased": "paraphrased", "model_generated": "model_generated.tiny.step-1"},
           "projections": ["proj:rademacher-flat-d512-s0"], "settings": {"greedy_steps": 3, "dense_baseline": False}}


def _row(query, vectors, kind, part, block, n_values, top1, mrr, bm25_acc, similarity="cosine", projection_kind=None):
    return {"query": query, "vectors": vectors, "kind": kind, "part": part, "block": block, "n_values": n_values,
            "similarity": similarity, "top1": top1, "recall@1": top1, "recall@5": min(1.0, top1 + 0.2),
            "recall@10": 1.0, "mrr": mrr, "mean_rank": 1 / mrr, "bm25_top5_accuracy": bm25_acc,
            "self_cosine_mean": 0.5, "projection_kind": projection_kind}


@pytest.fixture
def tables():
    """Both variants score the same (lines that would hide each other); the best-by-top-1 tensor
    (embed_tokens) is not the best among BM25's candidates (layers.1 q_proj); one projection kind, one dimension."""
    rows = []
    for query in QUERIES:
        for i, name in enumerate(TENSORS):
            block = None if i == 0 else (i - 1) // 2
            part = "embeddings" if i == 0 else ("attention" if "attn" in name else "mlp")
            rows.append(_row(query, name, "tensor", part, block, 4096, [0.9, 0.5, 0.4, 0.6, 0.3][i],
                             [0.95, 0.6, 0.5, 0.7, 0.4][i], [0.5, 0.6, 0.55, 0.8, 0.4][i]))
        for block in (0, 1):
            for part in ("attention", "mlp"):
                rows.append(_row(query, f"block{block}.{part}", "group", part, block, 4096, 0.5, 0.6, 0.6))
        rows.append(_row(query, "full", "full", "full", None, 20480, 0.7, 0.8, 0.7))
        rows.append(_row(query, "proj:rademacher-flat-d512-s0", "projection", "rademacher", None, 512, 0.6, 0.7, 0.65,
                         projection_kind="rademacher"))
        rows.append(_row(query, "bm25", "text", "bm25", None, None, 0.4, 0.5, 0.4, similarity="bm25"))
    results = pd.DataFrame(rows)
    rng = np.random.default_rng(0)
    selfsim = pd.DataFrame([{"query": q, "vectors": n, "kind": "tensor", "sample": str(s), "self_cosine": rng.uniform(-1, 1)}
                            for q in QUERIES for n in TENSORS for s in range(10)])
    greedy = pd.DataFrame([
        {"query": q, "step": step, "added": added, "accuracy": acc, "n_values": 4096 * step, "stop_reason": reason}
        for q in QUERIES for step, added, acc, reason in (
            (1, TENSORS[3], 0.8, None),
            (2, TENSORS[0], 0.85, f"no gain: the best next tensor, {TENSORS[1]}, gives 0.850, not above 0.850"))])
    return results, selfsim, greedy


def test_report_defines_its_metrics_and_prints_no_raw_values(tables):
    results, _, greedy = tables
    md = markdown("Select vs project: tiny", LINEAGE, results, greedy, ["a.png"])
    page = html_report("Select vs project: tiny", LINEAGE, results, greedy, {"a.png": b"\x89PNG"})
    for text in (md, page):
        assert "<NA>" not in text and "&lt;NA&gt;" not in text and "nan" not in text.lower().split()
        assert "{'" not in text and "{&#x27;" not in text, "the lineage is printed as a Python dict"
        for term in ("top1", "recall@k", "mrr", "mean_rank", "bm25_top5_accuracy", "self-similarity", "greedy selection",
                     "n_values", "best layer"):
            assert re.search(rf"(\*\*|<dt>){re.escape(term)}(\*\*|</dt>)", text), term
        assert "a tie counts half" in text and "strictly highest" in text
        # the headline's best layer and greedy step 1 differ here, and the report says why
        assert f"best layer, {TENSORS[0]}" in text and f"greedy step 1 picks {TENSORS[3]}" in text
        assert "stopped after step 2 (no gain" in text
    assert "- **model**: org/tiny" in md and "  - model_generated: model_generated.tiny.step-1" in md
    assert "<li><b>paraphrased</b>: paraphrased</li>" in page
    # text baselines have no n_values: an empty cell, not <NA>; one narrow table per variant, the variant above it
    assert "| bm25 |  | 0.400 |" in md and "**paraphrased**: best layer `model.embed_tokens.weight`" in md
    assert md.index("## Metrics") < md.index("![a.png](plots/a.png)")


def test_headline_records_are_readable_and_json_ready(tables):
    results, _, _ = tables
    records = headline_records(results)
    assert len(records) == len(headline(results)) == 2 * 4
    assert list(records[0]) == list(HEADLINE_LABELS.values())
    assert records[0]["vectors"] == "best layer" and records[0]["tensor"] == TENSORS[0] and records[0]["top-1"] == 0.9
    bm25 = next(r for r in records if r["vectors"] == "bm25")
    assert bm25["n_values"] is None and bm25["tensor"] is None
    json.dumps(records)  # numpy and pandas scalars would not serialise


def test_artifact_keys_are_valid_short_and_distinct():
    directories = [
        "evaluations/tiny-olmo2-0ce81724/checkpoint-1/probe/sft",
        "evaluations/tiny-olmo2-0ce81724/checkpoint-2/probe/sft",
        "evaluations/tiny-llama-1a2b3c4d/checkpoint-1/probe/sft",
        "evaluations/tiny-olmo2-0ce81724/checkpoint-1/other/sft",
        "evaluations/tiny-olmo2-0ce81724/checkpoint-1/probe/pre",
        "evaluations/amd--AMD-OLMo-1B-SFT/main/probe/sft",
        "evaluations/amd--amd-olmo-1b-sft/main/probe/sft",          # the same after lower-casing
        "evaluations/my_model/main/probe/sft",
        "evaluations/my-model/main/probe/sft",                      # the same after slugifying
        "evaluations/allenai--OLMo-2-1124-13B-Instruct/stage1-step928646-tokens3896B/probe/sft",
        "evaluations/allenai--OLMo-2-1124-13B-Instruct/stage1-step928647-tokens3896B/probe/sft",  # differs at the very end
    ]
    keys = [artifact_key(d) for d in directories]
    assert len(set(keys)) == len(keys)
    for key in keys:
        assert re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", key) and len(key) <= 56, key
        assert re.fullmatch(r"[a-z0-9-]+", key + "-report")
    assert keys[0] == "svp-tiny-olmo2-0ce81724-checkpoint-1-probe-sft"
    assert keys[-1].startswith("svp-allenai-olmo") and "stage1" in keys[-1]
    assert artifact_key(directories[0]) == keys[0], "keys must be stable across runs"


def test_plots_draw_every_figure_readably(tables):
    results, selfsim, greedy = tables
    pngs = plots(results, selfsim, greedy)
    assert set(pngs) == {"accuracy_per_layer_line.png", "accuracy_per_layer_bar.png", "attention_vs_mlp.png",
                         "self_similarity_box.png", "accuracy_vs_dimension.png", "greedy_selection.png"}
    for name, png in pngs.items():
        image = matplotlib.image.imread(io.BytesIO(png), format="png")
        assert image.shape[0] > 200 and image.shape[1] > 300, name
    drawn = figures(results, selfsim, greedy)
    try:
        # equal lines of the two variants: distinct markers, and the later one smaller, so both show
        lines = drawn["accuracy_per_layer_line.png"].axes[0].get_lines()
        assert len({line.get_marker() for line in lines}) == 2
        assert lines[0].get_markersize() > lines[1].get_markersize()
        # blocks are integers
        ax = drawn["attention_vs_mlp.png"].axes[0]
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks == [0.0, 1.0]
        # self-similarity: each variant's boxes beside the other's, in its own color, with a legend
        ax = drawn["self_similarity_box.png"].axes[0]
        assert [t.get_text() for t in ax.get_legend().get_texts()] == list(QUERIES)
        boxes = list(ax.patches)
        centres = {round(float(np.mean(b.get_path().vertices[:, 0])), 3) for b in boxes}
        assert len(boxes) == 2 * len(TENSORS) and len(centres) == len(boxes)
        assert len({b.get_facecolor() for b in boxes}) == 2
        # a projection kind with one dimension is a labelled point, not a line; the references are drawn
        ax = drawn["accuracy_vs_dimension.png"].axes[0]
        points = [line for line in ax.get_lines() if "rademacher" in line.get_label()]
        assert points and all(line.get_linestyle() == "None" and line.get_marker() not in (None, "None") for line in points)
        assert {t.get_text() for t in ax.texts} >= {"rademacher"}
        labels = [line.get_label() for line in ax.get_lines()]
        assert sum("full gradient" in label for label in labels) == 2 and sum("BM25" in label for label in labels) == 2
        # greedy selection: integer steps and where it stopped
        ax = drawn["greedy_selection.png"].axes[0]
        assert any(t.get_text().startswith("stop: no gain") for t in ax.texts)
    finally:
        for fig in drawn.values():
            plt.close(fig)


def test_markdown_escapes_placeholders_and_embeds_plots_when_asked(tables):
    """A Markdown renderer (the Prefect UI's, GitHub's) takes '<kind>' for an HTML tag and drops it: 'proj:--d-s'."""
    results, selfsim, greedy = tables
    pngs = plots(results, selfsim, greedy)
    md = markdown("Select vs project: <tiny>", LINEAGE, results, greedy, pngs)
    assert "proj:&lt;kind&gt;-&lt;scope&gt;-d&lt;dim&gt;-s&lt;seed&gt;" in md and "dense:&lt;model&gt;" in md
    assert not re.search(r"<[a-z_]+>", md), re.findall(r".{20}<[a-z_]+>.{20}", md)
    images = re.findall(r"!\[[^\]]*\]\(([^)]*)\)", md)
    assert len(images) == len(pngs) and all(i.startswith("data:image/png;base64,") for i in images)
    # the headline: no row wider than the variant's own columns (vectors, n_values and the four metrics)
    header = next(line for line in md.splitlines() if line.startswith("| vectors |"))
    assert header.count("|") == 7 and "query" not in header


def test_the_run_pages_artifacts_show_plots_and_placeholders_and_fit(tables, tmp_path):
    """publish_headline on a stored evaluation: what the Prefect UI is given has its plots inside (the UI cannot
    read the lake's files), no raw '<placeholder>', no file:// link, and a table of short columns."""
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    from gradlake.flows.evaluate import publish_headline
    from gradlake.lake.evaluations import write_evaluation
    from gradlake.lake.store import LakeStore

    results, selfsim, greedy = tables
    lake, directory = f"file://{tmp_path / 'lake'}", "evaluations/org--tiny/step-1/probe/sft"
    pngs = plots(results, selfsim, greedy)
    reports = {"report.md": markdown("Select vs project: tiny", LINEAGE, results, greedy, sorted(pngs)),
               "report.html": html_report("Select vs project: tiny", LINEAGE, results, greedy, pngs)}
    write_evaluation(LakeStore(lake), directory, {"results": results, "self_similarity": selfsim, "greedy": greedy},
                     pngs, reports, LINEAGE)

    @flow(name="publish-probe")
    def publish():
        publish_headline(lake, directory)

    state = publish(return_state=True)
    with get_client(sync_client=True) as client:
        run_id = state.state_details.flow_run_id
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])))
    report = next(a for a in artifacts if a.type == "markdown")
    text = report.data
    assert "proj:&lt;kind&gt;" in text and "dense:&lt;model&gt;" in text and not re.search(r"<[a-z_]+>", text)
    assert "file://" not in text + (report.description or ""), "the UI cannot open the worker's disk"
    images = re.findall(r"!\[[^\]]*\]\(([^)]*)\)", text)
    assert len(images) == len(pngs) and all(i.startswith("data:image/png;base64,") for i in images)
    assert str(tmp_path / "lake") in text, "where the HTML report lies is said, as a path"
    table = next(a for a in artifacts if a.type == "table")
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    # every metric before the one long cell (the best layer's tensor, last); the UI cuts a table at the page's edge
    assert list(rows[0])[-1] == "tensor" and sum(len(c) for c in rows[0]) <= 60, list(rows[0])
    assert max(len(str(r["vectors"])) for r in rows) <= len("proj:rademacher-flat-d512-s0")
