"""Plots and the report of one evaluation: PNG bytes and a Markdown / self-contained HTML document."""

from __future__ import annotations

import base64
import html
import io

import numpy as np
import pandas as pd

HEADLINE_COLUMNS = ["query", "vectors", "n_values", "top1", "recall@5", "mrr", "bm25_top5_accuracy"]


def headline(results: pd.DataFrame) -> pd.DataFrame:
    """Per query variant: the best single tensor, the full gradient, each projection, and the text baselines (cosine)."""
    rows = []
    cos = results[results["similarity"].isin(["cosine", "bm25"])]
    for query, part in cos.groupby("query", sort=False):
        tensors = part[part["kind"] == "tensor"]
        if not tensors.empty:
            best = tensors.sort_values(["top1", "mrr"], ascending=False).iloc[0].copy()
            best["vectors"] = f"best layer: {best['vectors']}"
            rows.append(best)
        for kind in ("full", "projection", "text"):
            rows += [r for _, r in part[part["kind"] == kind].sort_values("n_values", na_position="last").iterrows()]
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    frame = frame.reindex(columns=HEADLINE_COLUMNS).reset_index(drop=True)
    frame["n_values"] = pd.to_numeric(frame["n_values"]).astype("Int64")
    return frame


def markdown_table(frame: pd.DataFrame) -> str:
    """A pipe table; floats to 3 decimals."""
    def cell(v) -> str:
        if isinstance(v, float):
            return "" if np.isnan(v) else f"{v:.3f}"
        return "" if v is None else str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def _finish(fig, ax, xlabel: str, ylabel: str, title: str) -> bytes:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1, 0.5))
    return _png(fig)


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buffer.getvalue()


def plots(results: pd.DataFrame, selfsim: pd.DataFrame, greedy: pd.DataFrame) -> dict[str, bytes]:
    """The evaluation's figures as PNG bytes, by file name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out: dict[str, bytes] = {}
    cos = results[results["similarity"] == "cosine"]
    tensors = cos[cos["kind"] == "tensor"]
    if not tensors.empty:
        for style in ("line", "bar"):
            fig, ax = plt.subplots(figsize=(max(6, 0.25 * tensors["vectors"].nunique()), 4))
            for query, part in tensors.groupby("query", sort=False):
                x = np.arange(len(part))
                if style == "line":
                    ax.plot(x, part["top1"], marker="o", label=query)
                else:
                    width = 0.8 / tensors["query"].nunique()
                    offset = list(tensors["query"].unique()).index(query) * width
                    ax.bar(x + offset, part["top1"], width=width, label=query)
            labels = tensors.drop_duplicates("vectors")["vectors"].str.replace("model.", "", regex=False)
            ax.set_xticks(np.arange(len(labels)), labels, rotation=90, fontsize=7)
            ax.set_ylabel("top-1 accuracy (cosine)")
            ax.set_title("Accuracy per parameter tensor")
            ax.legend(loc="center left", bbox_to_anchor=(1, 0.5))
            out[f"accuracy_per_layer_{style}.png"] = _png(fig)
    groups = cos[(cos["kind"] == "group") & cos["vectors"].str.startswith("block")]
    if not groups.empty:
        fig, ax = plt.subplots(figsize=(6, 4))
        for (query, part), frame in groups.groupby(["query", "part"], sort=False):
            ax.plot(frame["block"], frame["top1"], marker="o", label=f"{query}: {part}")
        out["attention_vs_mlp.png"] = _finish(fig, ax, "block", "top-1 accuracy (cosine)", "Attention vs MLP, per block")
    if not selfsim.empty:
        tensor_self = selfsim[selfsim["kind"] == "tensor"]
        if not tensor_self.empty:
            fig, ax = plt.subplots(figsize=(max(6, 0.25 * tensor_self["vectors"].nunique()), 4))
            names = list(dict.fromkeys(tensor_self["vectors"]))
            for i, (query, part) in enumerate(tensor_self.groupby("query", sort=False)):
                data = [part.loc[part["vectors"] == n, "self_cosine"].to_numpy() for n in names]
                ax.boxplot(data, positions=np.arange(len(names)) + 0.35 * i, widths=0.3, showfliers=False)
            ax.set_xticks(np.arange(len(names)), [n.replace("model.", "") for n in names], rotation=90, fontsize=7)
            ax.set_ylabel("cosine with own original")
            ax.set_title("Self-similarity per tensor (" + ", ".join(tensor_self["query"].unique()) + ")")
            out["self_similarity_box.png"] = _png(fig)
    projections = cos[cos["kind"] == "projection"]
    if not projections.empty:
        fig, ax = plt.subplots(figsize=(6, 4))
        colors = {}
        for (query, kind), frame in projections.groupby(["query", "projection_kind"], sort=False):
            frame = frame.sort_values("n_values")
            line, = ax.plot(frame["n_values"], frame["top1"], marker="o", label=f"{query}: {kind}")
            colors.setdefault(query, line.get_color())
        for query, color in colors.items():
            part = results[results["query"] == query]
            for name, style in (("full", "--"), ("bm25", ":")):
                ref = part[(part["vectors"] == name) & part["similarity"].isin(["cosine", "bm25"])]
                if not ref.empty:
                    ax.axhline(ref["top1"].iloc[0], linestyle=style, color=color, label=f"{query}: {name}")
        ax.set_xscale("log")
        out["accuracy_vs_dimension.png"] = _finish(fig, ax, "projection dimension", "top-1 accuracy (cosine)",
                                                   "Accuracy against projection dimension")
    if not greedy.empty:
        fig, ax = plt.subplots(figsize=(6, 4))
        for query, frame in greedy.groupby("query", sort=False):
            ax.plot(frame["step"], frame["accuracy"], marker="o", label=query)
        out["greedy_selection.png"] = _finish(fig, ax, "tensors selected (greedy)", "accuracy on BM25 top-5 candidates",
                                              "Greedy layer selection")
    return out


def markdown(title: str, lineage: dict, results: pd.DataFrame, greedy: pd.DataFrame, figures: list[str]) -> str:
    """The report as Markdown, figures linked by relative path."""
    lines = [f"# {title}", "", _lineage_text(lineage), "", "## Headline (cosine)", "", markdown_table(headline(results)),
             "", "## Greedy layer selection (accuracy on BM25 top-5 candidates)", "",
             markdown_table(greedy) if not greedy.empty else "(no per-tensor gradients)", ""]
    lines += [f"![{name}](plots/{name})" for name in figures]
    return "\n".join(lines) + "\n"


def html_report(title: str, lineage: dict, results: pd.DataFrame, greedy: pd.DataFrame, figures: dict[str, bytes]) -> str:
    """The report as one self-contained HTML file (figures inlined)."""
    images = "".join(f'<figure><img src="data:image/png;base64,{base64.b64encode(png).decode()}" alt="{html.escape(name)}">'
                     f"<figcaption>{html.escape(name)}</figcaption></figure>" for name, png in figures.items())
    table = headline(results).to_html(index=False, float_format="%.3f")
    greedy_table = greedy.to_html(index=False, float_format="%.3f") if not greedy.empty else ""
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:2px 6px}img{max-width:100%}</style></head><body>"
            f"<h1>{html.escape(title)}</h1><p>{html.escape(_lineage_text(lineage))}</p><h2>Headline (cosine)</h2>{table}"
            f"<h2>Greedy layer selection</h2>{greedy_table}{images}</body></html>")


def _lineage_text(lineage: dict) -> str:
    keys = ("model", "checkpoint", "resolved_commit", "dataset", "paradigm", "queries", "created_at")
    return "; ".join(f"{k}: {lineage[k]}" for k in keys if k in lineage)
