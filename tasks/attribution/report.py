"""The attribution benchmark's report: its protocol and what its intervals support, plots, a self-contained HTML page."""

from __future__ import annotations

import base64
import html

import pandas as pd

from gradlake.tasks.common.render import figure_png, html_table, lineage_html, lineage_items


ATTRIBUTION_METRICS = (
    ("method", "where the scores come from: influence-<strategy> (Kronfluence), trak:<projection> (an ensemble over "
               "the run's checkpoints), grad-dot / grad-cosine (the full stored gradient), grad-cosine:best-tensor "
               "(the single tensor with the best LDS on the other folds of queries: cross-fitted), "
               "proj-cosine:<projection>, bm25 and dense (text of the user turns). References: random (normally "
               "distributed scores) and source oracle (1 for the training sample the query was made from, if any)."),
    ("lds", "linear datamodeling score: for each query, the Spearman correlation over the retrained subsets between "
            "the summed scores of each subset's samples and minus the query's loss under the model retrained on that "
            "subset (averaged over the retraining seeds); averaged over queries. 0 is chance, 1 a perfect ranking."),
    ("lds_ci_low / lds_ci_high", "95% interval of that mean with both sources of chance, the queries and the subsets "
                                 "they share: the between-query variance plus the common part a bootstrap over the "
                                 "subsets measures (t interval)."),
    ("vs_next_low / vs_next_high, separated_from_next", "the same interval for the per-query difference between this "
                                                         "row and the next (paired): the rows are told apart only when "
                                                         "it excludes 0."),
    ("lds_beyond_source, beyond_ci_low / beyond_ci_high", "for queries made from a training sample: the LDS computed "
                          "within the subsets that hold that sample and within those that lack it, averaged, with its "
                          "interval; what a method knows beyond finding the duplicate (the source oracle's is 0 in "
                          "expectation)."),
    ("top1_<queries>", "the share of queries made from a training sample whose highest-scored training sample is it."),
    ("lds_queries, beyond_queries, top1_<queries>_queries; ..._dropped", "how many queries each metric's mean rests on, "
     "and why it left the others out (e.g. 'the same summed score on every subset (constant scores) for 3 queries': "
     "no correlation exists for them; 'non-finite scores'); a metric that used no query is empty, never a number."),
    ("cf_loss_change", "counterfactual removal: mean increase of a query's loss after retraining on the run's samples "
                       "less the method's k highest-scored ones for it, with its interval; cf_vs_random: the increase "
                       "beyond removing k random samples (paired by query); cf_source_removed: how often the k held "
                       "the query's source; cf_queries and cf_source_queries: the queries these rest on."),
    ("compute_seconds / lake_bytes", "time to compute the scores (and factors) and what they occupy in the lake."),
)


def attribution_summary(table: pd.DataFrame, meta: dict) -> list[str]:
    """The benchmark's protocol in a few lines, then only what its intervals support."""
    with_source = meta.get("queries_with_source", 0)
    source = {"held_out": "held-out samples of the training dataset (never trained on)"}.get(
        meta["queries"], f"{meta.get('query_dataset', '')} {meta.get('query_variant', meta['queries'])}".strip())
    lines = [f"queries: {meta['n_queries']} {source}; {with_source} of them made from a training sample",
             f"ground truth: {meta['n_subsets']} subsets of {meta['n_train']} training samples (fraction "
             f"{meta['fraction']}) x {meta.get('retrain_seeds', 1)} retraining seed(s)"
             + (f"; counterfactual removal of k={meta['counterfactual_k']} with {meta['random_draws']} random draws"
                if meta.get("counterfactual_k") else ""),
             f"intervals: {meta.get('interval', '95%')}"]
    rows = table.reset_index(drop=True)
    oracle = rows[rows["method"] == "source oracle"]
    if with_source and not oracle.empty:
        lines.append(f"the source oracle reaches LDS {float(oracle['lds'].iloc[0]):.2f}: that much is duplicate "
                     "retrieval; lds_beyond_source shows what each method knows beyond it")
    elif not oracle.empty:
        lines.append("no query has a source training sample, so the source oracle is a second random reference")
    above = [r["method"] for _, r in rows.iterrows() if r["kind"] != "reference" and r["lds_ci_low"] > 0]
    lines.append(f"LDS above 0 (interval excludes 0): {', '.join(above) if above else 'no method'}")
    for _, r in rows.iterrows():
        left_out = [f"{c.removesuffix('_dropped')}: {r[c]}" for c in rows.columns if c.endswith("_dropped") and r[c]
                    and isinstance(r[c], str)]
        if left_out:
            lines.append(f"{r['method']} leaves queries out: " + "; ".join(left_out))
    if with_source and "beyond_ci_low" in rows:
        beyond = [r["method"] for _, r in rows.iterrows() if r["kind"] != "reference" and r["beyond_ci_low"] > 0]
        lines.append(f"LDS beyond the source above 0 (interval excludes 0): {', '.join(beyond) if beyond else 'no method'}")
    claims = []
    for i in range(len(rows) - 1):
        a, b = rows.loc[i], rows.loc[i + 1]
        if bool(a.get("separated_from_next")):
            claims.append(f"{a['method']} > {b['method']} (difference [{a['vs_next_low']:.2f}, {a['vs_next_high']:.2f}])")
    lines.append("ranking supported: " + ("; ".join(claims) if claims else
                                          "no two adjacent rows are told apart at this power"))
    return lines


def attribution_figures(table: pd.DataFrame, queries: str = "") -> dict[str, bytes]:
    """LDS with its interval per method; LDS against retrieval top-1; counterfactual loss change when measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = {}
    ordered = table.sort_values("lds", na_position="first")
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(ordered) + 1.2))
    low = (ordered["lds"] - ordered["lds_ci_low"]).fillna(0).clip(lower=0)
    high = (ordered["lds_ci_high"] - ordered["lds"]).fillna(0).clip(lower=0)
    colors = ["0.6" if k == "reference" else "C0" for k in ordered["kind"]]
    ax.barh(ordered["method"], ordered["lds"], xerr=[low, high], color=colors, capsize=3)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_xlabel("LDS (Spearman, mean over queries, 95% interval over queries and subsets)")
    ax.set_title(f"Linear datamodeling score per method{f', {queries} queries' if queries else ''} (grey: references)")
    figures["lds.png"] = figure_png(fig)
    top1 = next((c for c in table.columns if c.startswith("top1_") and not c.endswith(("_queries", "_dropped"))
                 and table[c].notna().any()), None)
    if top1 is not None:
        rows = table.dropna(subset=[top1, "lds"])
        fig, ax = plt.subplots(figsize=(6, 4.5))
        ax.scatter(rows[top1], rows["lds"])
        for _, row in rows.iterrows():
            ax.annotate(str(row["method"]), (row[top1], row["lds"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel(f"{top1}: the query's own training sample ranked first")
        ax.set_ylabel(f"LDS ({queries} queries)" if queries else "LDS")
        ax.set_title("Retrieval against ground truth")
        figures["lds_vs_top1.png"] = figure_png(fig)
    if "cf_loss_change" in table.columns and table["cf_loss_change"].notna().any():
        rows = table.dropna(subset=["cf_loss_change"]).sort_values("cf_loss_change")
        fig, ax = plt.subplots(figsize=(6, 0.4 * len(rows) + 1.2))
        low = (rows["cf_loss_change"] - rows["cf_ci_low"]).fillna(0).clip(lower=0)
        high = (rows["cf_ci_high"] - rows["cf_loss_change"]).fillna(0).clip(lower=0)
        ax.barh(rows["method"], rows["cf_loss_change"], xerr=[low, high], capsize=3,
                color=["0.6" if m == "random" else "C1" for m in rows["method"]])
        ax.axvline(0, color="black", linewidth=0.8)
        ax.set_xlabel("query loss increase after retraining without the top-k (95% interval)")
        ax.set_title("Counterfactual removal (grey: k random samples)")
        figures["counterfactual.png"] = figure_png(fig)
    return figures


def attribution_html(title: str, meta: dict, table: pd.DataFrame, figures: dict[str, bytes]) -> str:
    images = "".join(f'<figure><img src="data:image/png;base64,{base64.b64encode(png).decode()}" alt="{html.escape(name)}">'
                     f"<figcaption>{html.escape(name)}</figcaption></figure>" for name, png in figures.items())
    metrics = "".join(f"<dt>{html.escape(name)}</dt><dd>{html.escape(text)}</dd>" for name, text in ATTRIBUTION_METRICS)
    summary = "".join(f"<li>{html.escape(line)}</li>" for line in attribution_summary(table, meta))
    shown = table.sort_values("lds", ascending=False, na_position="last")
    lineage = {k: v for k, v in meta.items() if k not in ("query_ids", "best_tensor")}
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            "<style>body{font-family:sans-serif;max-width:1400px;margin:auto}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:2px 6px}img{max-width:100%}dt{font-weight:bold}dd{margin:0 0 6px 20px}"
            "</style></head><body>"
            f"<h1>{html.escape(title)}</h1><ul>{summary}</ul>"
            f"<h2>Methods, best LDS first</h2>{html_table(shown)}"
            f"<h2>Metrics</h2><dl>{metrics}</dl>" + (f"<h2>Plots</h2>{images}" if images else "")
            + f"<h2>Setting</h2>{lineage_html(lineage_items(lineage))}</body></html>")


def attribution_files(table: pd.DataFrame, meta: dict) -> tuple[dict[str, bytes], dict[str, str]]:
    """The benchmark's plots and its HTML report, as (plots, texts) for `lake.results.write_result`."""
    figures = attribution_figures(table, meta.get("queries", ""))
    title = f"Attribution benchmark: {meta['model']['model']} @ {meta['model'].get('checkpoint')}, queries {meta['queries']}"
    return figures, {"report.html": attribution_html(title, meta, table, figures)}
