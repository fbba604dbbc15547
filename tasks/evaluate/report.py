"""Plots and the report of one evaluation: PNG bytes and a Markdown / self-contained HTML document."""

from __future__ import annotations

import base64
import html

import numpy as np
import pandas as pd

from gradlake.tasks.common.render import (figure_png, html_table, is_missing, lineage_html, lineage_items, lineage_markdown,
                                          markdown_image, markdown_table, markdown_text)


HEADLINE_COLUMNS = ["query", "vectors", "n_values", "top1", "recall@5", "mrr", "bm25_top5_accuracy"]
# Names for the Prefect table artifact: short, so that every metric fits the UI's page (its table is cut at the
# page's edge), the best layer's tensor last (the report artifact beside it names it too and defines each metric).
HEADLINE_LABELS = {"query": "query", "vectors": "vectors", "n_values": "n_values", "top1": "top-1", "recall@5": "recall@5",
                   "mrr": "MRR", "bm25_top5_accuracy": "BM25 top-5", "tensor": "tensor"}
GREEDY_COLUMNS = ["query", "step", "added", "accuracy", "n_values"]

METRICS = (
    ("vectors", "what is compared: one parameter tensor, a layer group (blockN.attention, blockN.mlp, attention, mlp, "
                "embeddings), the full gradient, a projection proj:<kind>-<scope>-d<dim>-s<seed>, or a text baseline "
                "(bm25, dense:<model>)."),
    ("n_values", "how many numbers each vector holds: a tensor's elements, the sum over a group's tensors, or a "
                 "projection's dimension; empty for the text baselines."),
    ("top1", "the share of queries whose own original scores highest among all originals (rank 1)."),
    ("recall@k", "the share of queries whose own original ranks among the first k of all originals."),
    ("mrr", "mean reciprocal rank: the mean over queries of 1 / (rank of the own original)."),
    ("mean_rank", "the mean rank of the own original, where a tie counts half: rank = 1 + (originals scoring higher) + "
                  "(others scoring equal) / 2, so a constant similarity puts the truth in the middle, not first."),
    ("bm25_top5_accuracy", "the candidate protocol: each query's candidates are the 5 originals BM25 ranks highest for "
                           "its user turn (the own original replaces the 5th when BM25 missed it), and a query counts "
                           "as correct when its own original scores strictly highest among them."),
    ("self-similarity", "the cosine between a query's vector and its own original's (self_cosine; "
                        "self_cosine_mean averages it over queries)."),
    ("best layer", "the single tensor with the highest top1 over all originals (ties: higher MRR, then model order)."),
    ("greedy selection", "starting from no tensor, each step adds the tensor whose concatenation with those chosen "
                         "gives the highest bm25_top5_accuracy (cosine), and stops at the first step that does not "
                         "raise it, after greedy_steps steps, or when every tensor is in."),
)


def headline(results: pd.DataFrame) -> pd.DataFrame:
    """Per query variant: the best single tensor, the full gradient, each projection, and the text baselines (cosine)."""
    rows = []
    cos = results[results["similarity"].isin(["cosine", "bm25"])]
    for query, part in cos.groupby("query", sort=False):
        best = best_tensor(part)
        if best is not None:
            best = best.copy()
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


def best_tensor(results: pd.DataFrame) -> pd.Series | None:
    """The cosine row of the tensor with the highest top-1 (ties: higher MRR, then model order), or None."""
    tensors = results[(results["kind"] == "tensor") & (results["similarity"] == "cosine")]
    if tensors.empty:
        return None
    return tensors.sort_values(["top1", "mrr"], ascending=False, kind="stable").iloc[0]


def headline_records(results: pd.DataFrame) -> list[dict]:
    """The headline as JSON-ready rows under short column names (a Prefect table artifact), the best layer's tensor
    in a last column of its own; missing values are None."""
    table = headline(results)
    if table.empty:
        return []
    best = table["vectors"].str.startswith("best layer: ")
    table["tensor"] = table["vectors"].where(best).str.removeprefix("best layer: ")
    table.loc[best, "vectors"] = "best layer"
    table = table.rename(columns=HEADLINE_LABELS)
    return [{k: (None if is_missing(v) else round(float(v), 4) if isinstance(v, float) else
                 int(v) if isinstance(v, (int, np.integer)) else v) for k, v in row.items()}
            for row in table.astype(object).to_dict("records")]


# -- plots ------------------------------------------------------------------------------------

_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
_LINESTYLES = ("-", "--", ":", "-.")


def _line_style(i: int, color: str) -> dict:
    """The i-th line of a plot: its own marker and dash, thinner and smaller than the lines drawn before it (under it),
    so lines with equal values stay visible."""
    return {"color": color, "marker": _MARKERS[i % len(_MARKERS)], "linestyle": _LINESTYLES[i % len(_LINESTYLES)],
            "markersize": max(3.0, 10.0 - 1.5 * i), "alpha": 0.85, "linewidth": max(0.8, 2.8 - 0.5 * i)}


def _colors(queries) -> dict[str, str]:
    """One color per query variant, the same in every plot."""
    return {q: f"C{i % 10}" for i, q in enumerate(dict.fromkeys(queries))}


def _short(name: str) -> str:
    return name.replace("model.", "", 1)


def _legend(ax) -> None:
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1, 0.5))


def plots(results: pd.DataFrame, selfsim: pd.DataFrame, greedy: pd.DataFrame) -> dict[str, bytes]:
    """The evaluation's figures as PNG bytes, by file name."""
    return {name: figure_png(fig) for name, fig in figures(results, selfsim, greedy).items()}


def figures(results: pd.DataFrame, selfsim: pd.DataFrame, greedy: pd.DataFrame) -> dict:
    """The evaluation's figures as matplotlib Figures, by file name (close them when done)."""
    import matplotlib

    matplotlib.use("Agg")
    colors = _colors(list(results["query"]) + list(selfsim.get("query", [])) + list(greedy.get("query", [])))
    cos = results[results["similarity"] == "cosine"]
    out = {}
    tensors = cos[cos["kind"] == "tensor"]
    if not tensors.empty:
        out["accuracy_per_layer_line.png"] = _per_tensor(tensors, colors, bars=False)
        out["accuracy_per_layer_bar.png"] = _per_tensor(tensors, colors, bars=True)
    groups = cos[(cos["kind"] == "group") & cos["vectors"].str.startswith("block")]
    if not groups.empty:
        out["attention_vs_mlp.png"] = _attention_vs_mlp(groups, colors)
    tensor_self = selfsim[selfsim["kind"] == "tensor"] if not selfsim.empty else selfsim
    if not tensor_self.empty:
        out["self_similarity_box.png"] = _self_similarity(tensor_self, colors)
    if not cos[cos["kind"] == "projection"].empty:
        out["accuracy_vs_dimension.png"] = _accuracy_vs_dimension(results, colors)
    if not greedy.empty:
        out["greedy_selection.png"] = _greedy(greedy, colors)
    return out


def _per_tensor(tensors: pd.DataFrame, colors: dict, bars: bool):
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(tensors["vectors"]))
    position = {n: i for i, n in enumerate(names)}
    queries = list(dict.fromkeys(tensors["query"]))
    fig, ax = plt.subplots(figsize=(max(6, 0.28 * len(names)), 4))
    width = 0.8 / len(queries)
    for i, (query, part) in enumerate(tensors.groupby("query", sort=False)):
        x = part["vectors"].map(position).to_numpy()
        if bars:
            ax.bar(x + (i - (len(queries) - 1) / 2) * width, part["top1"], width=width, color=colors[query], label=query)
        else:
            ax.plot(x, part["top1"], label=query, **_line_style(i, colors[query]))
    ax.set_xticks(np.arange(len(names)), [_short(n) for n in names], rotation=90, fontsize=7)
    ax.set_xlim(-0.6, len(names) - 0.4)
    ax.set_ylabel("top-1 accuracy (cosine)")
    ax.set_title("Accuracy per gradient tensor")
    _legend(ax)
    return fig


def _attention_vs_mlp(groups: pd.DataFrame, colors: dict):
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6, 4))
    cmap = plt.get_cmap("tab20")  # pairs of a dark and a light shade: the query's hue, one shade per part
    shades = {q: 2 * (int(c[1:]) % 10) for q, c in colors.items()}
    for i, ((query, part), frame) in enumerate(groups.groupby(["query", "part"], sort=False)):
        frame = frame.sort_values("block")
        color = cmap(shades[query] + (part != "attention"))
        ax.plot(frame["block"].astype(int), frame["top1"], label=f"{query}: {part}", **_line_style(i, color))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("block")
    ax.set_ylabel("top-1 accuracy (cosine)")
    ax.set_title("Attention vs MLP, per block")
    _legend(ax)
    return fig


def _self_similarity(tensor_self: pd.DataFrame, colors: dict):
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    names = list(dict.fromkeys(tensor_self["vectors"]))
    queries = list(dict.fromkeys(tensor_self["query"]))
    width = 0.8 / len(queries)
    fig, ax = plt.subplots(figsize=(min(14, max(6, 0.22 * len(names) * len(queries))), 4))
    for i, (query, part) in enumerate(tensor_self.groupby("query", sort=False)):
        data = [part.loc[part["vectors"] == n, "self_cosine"].to_numpy() for n in names]
        boxes = ax.boxplot(data, positions=np.arange(len(names)) + (i - (len(queries) - 1) / 2) * width,
                           widths=0.9 * width, showfliers=False, patch_artist=True, manage_ticks=False)
        for box in boxes["boxes"]:
            box.set(facecolor=colors[query], alpha=0.55, edgecolor=colors[query])
        for key in ("whiskers", "caps"):
            for line in boxes[key]:
                line.set(color=colors[query])
        for line in boxes["medians"]:
            line.set(color="black")
    ax.set_xticks(np.arange(len(names)), [_short(n) for n in names], rotation=90, fontsize=7)
    ax.set_xlim(-0.6, len(names) - 0.4)
    ax.set_ylabel("cosine with own original")
    ax.set_title("Self-similarity per tensor")
    ax.legend(handles=[Patch(facecolor=colors[q], alpha=0.55, label=q) for q in queries], fontsize=7,
              loc="center left", bbox_to_anchor=(1, 0.5))
    return fig


def _accuracy_vs_dimension(results: pd.DataFrame, colors: dict):
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullLocator

    fig, ax = plt.subplots(figsize=(7, 4.2))
    ticks: set[int] = set()
    projections = results[(results["similarity"] == "cosine") & (results["kind"] == "projection")]
    for i, ((query, kind), frame) in enumerate(projections.groupby(["query", "projection_kind"], sort=False)):
        frame = frame.sort_values("n_values")
        style = _line_style(i, colors[query])
        ticks.update(int(v) for v in frame["n_values"])
        if len(frame) == 1:  # one dimension: a point, not a line
            ax.plot(frame["n_values"], frame["top1"], label=f"{query}: {kind} (d={int(frame['n_values'].iloc[0])})",
                    **(style | {"linestyle": "none"}))
            ax.annotate(kind, (frame["n_values"].iloc[0], frame["top1"].iloc[0]), textcoords="offset points",
                        xytext=(7, 5), fontsize=7, color=colors[query])
        else:
            ax.plot(frame["n_values"], frame["top1"], label=f"{query}: {kind}", **style)
    queries = list(dict.fromkeys(projections["query"]))
    for j, query in enumerate(queries):
        part = results[results["query"] == query]
        full = part[(part["vectors"] == "full") & (part["similarity"] == "cosine")]
        if not full.empty:
            n, top1 = int(full["n_values"].iloc[0]), full["top1"].iloc[0]
            ticks.add(n)
            # the full gradient is a vector too: a star at its own size, and a line to compare against
            ax.plot([n], [top1], marker="*", markersize=max(6, 14 - 3 * j), linestyle="none", color=colors[query],
                    label=f"{query}: full gradient (n={n:,})")
            ax.axhline(top1, color=colors[query], linewidth=1, alpha=0.7, linestyle=_interleaved(j, len(queries), 6))
        bm25 = part[(part["vectors"] == "bm25")]
        if not bm25.empty:
            # dashes offset per query, so equal BM25 lines of two variants interleave instead of hiding each other
            ax.axhline(bm25["top1"].iloc[0], color=colors[query], linewidth=2, linestyle=_interleaved(j, len(queries), 2),
                       label=f"{query}: BM25 (text, {bm25['top1'].iloc[0]:.3f})")
    ax.set_xscale("log")
    ax.set_xticks(sorted(ticks), [f"{t:,}" for t in sorted(ticks)], rotation=30, fontsize=8)
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_ylim(-0.05, 1.1)
    ax.set_xlabel("values per vector (projection dimension; full gradient for reference)")
    ax.set_ylabel("top-1 accuracy (cosine)")
    ax.set_title("Accuracy against projection dimension")
    _legend(ax)
    return fig


def _interleaved(j: int, n: int, dash: float) -> tuple:
    """The j-th of n dash patterns that fill each other's gaps: equal lines of n variants show every color in turn."""
    return (j * dash, (dash, dash * max(n - 1, 1)))


def _greedy(greedy: pd.DataFrame, colors: dict):
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for i, (query, frame) in enumerate(greedy.groupby("query", sort=False)):
        ax.plot(frame["step"], frame["accuracy"], label=query, **_line_style(i, colors[query]))
        reason = _stop_reason(frame)
        if reason:
            ax.annotate("stop: " + reason.split(":")[0].split(" (")[0], (frame["step"].iloc[-1], frame["accuracy"].iloc[-1]),
                        textcoords="offset points", xytext=(0, 9 + 10 * i), ha="center", fontsize=7, color=colors[query])
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.margins(x=0.15, y=0.2)
    ax.set_xlabel("tensors selected (greedy step)")
    ax.set_ylabel("accuracy among BM25's 5 candidates")
    ax.set_title("Greedy layer selection")
    _legend(ax)
    return fig


def _stop_reason(frame: pd.DataFrame) -> str:
    if "stop_reason" not in frame or frame.empty or is_missing(frame["stop_reason"].iloc[-1]):
        return ""
    return str(frame["stop_reason"].iloc[-1])


# -- the report -------------------------------------------------------------------------------

def selection_notes(results: pd.DataFrame, greedy: pd.DataFrame) -> list[str]:
    """Per query variant: why greedy selection stopped, and why its first tensor is not the headline's best layer."""
    notes = []
    for query, part in results.groupby("query", sort=False):
        steps = greedy[greedy["query"] == query] if not greedy.empty else greedy
        if steps.empty:
            continue
        reason = _stop_reason(steps)
        if reason:
            notes.append(f"{query}: greedy selection stopped after step {int(steps['step'].iloc[-1])} ({reason}).")
        best, first = best_tensor(part), steps["added"].iloc[0]
        if best is None or best["vectors"] == first:
            continue
        tensors = part[(part["kind"] == "tensor") & (part["similarity"] == "cosine")].set_index("vectors")
        if first not in tensors.index:
            continue
        notes.append(f"{query}: the headline's best layer, {best['vectors']}, has the highest top-1 over all originals "
                     f"({best['top1']:.3f}; {tensors.loc[best['vectors'], 'bm25_top5_accuracy']:.3f} among BM25's 5 "
                     f"candidates), while greedy step 1 picks {first}, the highest accuracy among BM25's 5 candidates "
                     f"({steps['accuracy'].iloc[0]:.3f}; top-1 {tensors.loc[first, 'top1']:.3f}). The two measures rank "
                     "tensors differently, so the choices differ.")
    return notes


def _greedy_table(greedy: pd.DataFrame) -> pd.DataFrame:
    return greedy.reindex(columns=[c for c in GREEDY_COLUMNS if c in greedy.columns])


def markdown(title: str, lineage: dict, results: pd.DataFrame, greedy: pd.DataFrame, figures: list[str] | dict[str, bytes]) -> str:
    """The report as Markdown: figures linked by relative path (names, for the file beside its plots) or embedded
    (PNG bytes by name, for a page that cannot read the plots' files, as the Prefect UI)."""
    lines = [f"# {markdown_text(title)}", "", "## Lineage", "", *lineage_markdown(lineage_items(lineage)), "",
             "## Headline (cosine)", "", *headline_markdown(results), "",
             "## Greedy layer selection (accuracy among BM25's 5 candidates)", "",
             markdown_table(_greedy_table(greedy)) if not greedy.empty else "(no per-tensor gradients)", ""]
    notes = selection_notes(results, greedy)
    if notes:
        lines += [f"- {markdown_text(n)}" for n in notes] + [""]
    lines += ["## Metrics", "", *[f"- **{name}**: {markdown_text(text)}" for name, text in METRICS], ""]
    if figures:
        images = ([markdown_image(name, png) for name, png in figures.items()] if isinstance(figures, dict)
                  else [f"![{name}](plots/{name})" for name in figures])
        lines += ["## Plots", "", *images, ""]
    return "\n".join(lines)


def headline_markdown(results: pd.DataFrame) -> list[str]:
    """The headline as narrow Markdown tables, one per query variant, the variant and its best layer's name above
    the table, not in columns: a page as narrow as the Prefect UI's artifact view then shows every column."""
    table = headline(results)
    if table.empty:
        return ["(no results)"]
    lines = []
    for query, part in table.groupby("query", sort=False):
        part = part.drop(columns="query").copy()
        best = part["vectors"].str.startswith("best layer: ")
        heading = f"**{markdown_text(str(query))}**"
        if best.any():
            heading += f": best layer `{part.loc[best, 'vectors'].iloc[0].removeprefix('best layer: ')}`"
            part.loc[best, "vectors"] = "best layer"
        lines += [heading, "", markdown_table(part), ""]
    return lines[:-1]


def html_report(title: str, lineage: dict, results: pd.DataFrame, greedy: pd.DataFrame, figures: dict[str, bytes]) -> str:
    """The report as one self-contained HTML file (figures inlined)."""
    images = "".join(f'<figure><img src="data:image/png;base64,{base64.b64encode(png).decode()}" alt="{html.escape(name)}">'
                     f"<figcaption>{html.escape(name)}</figcaption></figure>" for name, png in figures.items())
    greedy_table = html_table(_greedy_table(greedy)) if not greedy.empty else "<p>(no per-tensor gradients)</p>"
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in selection_notes(results, greedy))
    metrics = "".join(f"<dt>{html.escape(name)}</dt><dd>{html.escape(text)}</dd>" for name, text in METRICS)
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:2px 6px}img{max-width:100%}dt{font-weight:bold}dd{margin:0 0 6px 20px}"
            "</style></head><body>"
            f"<h1>{html.escape(title)}</h1><h2>Lineage</h2>{lineage_html(lineage_items(lineage))}"
            f"<h2>Headline (cosine)</h2>{html_table(headline(results))}"
            f"<h2>Greedy layer selection (accuracy among BM25's 5 candidates)</h2>{greedy_table}"
            + (f"<ul>{notes}</ul>" if notes else "")
            + f"<h2>Metrics</h2><dl>{metrics}</dl>"
            + (f"<h2>Plots</h2>{images}" if images else "") + "</body></html>")


# -- the attribution benchmark ---------------------------------------------------------------
