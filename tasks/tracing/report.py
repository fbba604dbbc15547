"""The tracing stage's report: its plots, a Markdown and a self-contained HTML page, and the summary over candidates."""

from __future__ import annotations

import base64
import html

import pandas as pd

from gradlake.tasks.common.render import figure_png, html_table, lineage_html, markdown_table


READING = (
    ("verdict", "'derived' when the deciding test's p-value is below 0.01; 'undecided' when the permutations asked "
                "for cannot reach 0.01 at all; otherwise 'no evidence of derivation'."),
    ("cos / emb", "mean cosine similarity of the weight matrices / of each token's input embedding. Unaligned, the "
                  "p-value compares the candidate with randomly permuted copies of itself: a fine-tune keeps the "
                  "base's order of units, a permuted or independent model does not."),
    ("aligned", "the candidate's residual dimensions and MLP units matched back onto the base's first (Hungarian "
                "algorithm). An aligned statistic takes the matching test's p-value."),
    ("matching", "per layer, the MLP units matched from the gate projection alone and from the up projection alone; "
                 "the share of units on which the two matchings agree (1 for a fine-tune, about 1/units for an "
                 "independent model). No relabelling of the candidate's units changes it. Per layer it is compared "
                 "with the candidate's up units shuffled against its gate units; the layers' p-values are combined "
                 "with Fisher's method."),
    ("mode", "the loss barrier along the straight line from the base to the candidate (no p-value)."),
)


def _p(value) -> str:
    return "" if value is None or pd.isna(value) else f"{value:.2g}"


def _shown(frame: pd.DataFrame) -> pd.DataFrame:
    """p-values in two significant digits (the tables' 3 decimals would print 1e-5 as 0.000)."""
    frame = frame.copy()
    if "p_value" in frame:
        frame["p_value"] = [_p(v) for v in frame["p_value"]]
    return frame


def _title(lineage: dict) -> str:
    base, candidate = lineage["base"], lineage["candidate"]
    return (f"Model tracing: {candidate['model']}@{candidate['checkpoint']} against "
            f"{base['model']}@{base['checkpoint']}")


def lineage_order(lineage: dict) -> list[tuple[str, object]]:
    """The models first, then what the result was computed on and with, the settings last."""
    first = ("base", "candidate", "permute_seed", "architecture", "dataset", "variant", "dataset_version", "dataset_hash",
             "test_seed", "gradlake_version", "created_at")
    items = [(k, lineage[k]) for k in first if k in lineage]
    items += [(k, v) for k, v in lineage.items() if k not in first and k != "settings"]
    items = [(k, "none (not a control)" if k == "permute_seed" and v is None else v) for k, v in items]
    return items + ([("settings", lineage["settings"])] if "settings" in lineage else [])


def facts(meta: dict) -> list[tuple[str, str]]:
    """What a reader needs beside the verdict: the p-value, its test, the permutations, their reach, the control."""
    summary, seed = meta["summary"], meta["lineage"].get("permute_seed")
    return [("p-value", f"{_p(summary['p_value']) or 'none'}" + (f" ({summary['test']} test)" if summary["test"] else "")),
            ("permutations", str(summary["permutations"])),
            ("smallest reachable p", _p(summary.get("smallest_p")) or "none (no test decides)"),
            ("candidate permuted first (control)", "no" if seed is None else f"yes, seed {seed}")]


def path_plot(curve: pd.DataFrame) -> bytes:
    """The loss along the line from the base to the candidate, unaligned and aligned."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for is_aligned, part in curve.groupby("aligned"):
        ax.plot(part["alpha"], part["loss"], marker="o", label="aligned" if is_aligned else "unaligned")
    ax.set_xlabel("alpha (0: base, 1: candidate)")
    ax.set_ylabel("mean token loss")
    ax.set_title("Loss along the straight line between the models")
    ax.legend()
    return figure_png(fig)


def layers_plot(layers: pd.DataFrame) -> bytes:
    """Per layer: the matching test's agreements against its null (when run), and the mean weight cosine."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    matching = "agreements" in layers
    fig, axes = plt.subplots(1, 2 if matching else 1, figsize=(11 if matching else 5.5, 4), squeeze=False)
    x = layers["layer"]
    if matching:
        ax = axes[0][0]
        ax.bar(x, layers["null_max"], color="0.8", width=0.6, label="null: largest draw")
        ax.plot(x, layers["null_mean"], "_", color="0.3", markersize=18, mew=2, label="null: mean")
        ax.plot(x, layers["agreements"], "o", color="C3", label="observed")
        ax.axhline(int(layers["units"].iloc[0]), color="C3", linewidth=0.8, linestyle=":", label="every unit")
        ax.set_yscale("symlog", linthresh=1)
        ax.set_ylim(0, int(layers["units"].iloc[0]) * 1.5)
        ax.set_ylabel("units on which the gate and up matchings agree")
        ax.set_title("Matching test per layer (against the candidate's\nup units shuffled against its gate units)",
                     fontsize=10)
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=4)
    ax = axes[0][-1]
    ax.plot(x, layers["cos"], "o-", label="unaligned")
    if "cos_aligned" in layers:
        ax.plot(x, layers["cos_aligned"], "s--", label="aligned")
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_ylim(min(-0.1, float(layers[["cos"]].min().min()) - 0.05), 1.05)
    ax.set_ylabel("mean cosine of the layer's weight matrices")
    ax.set_title("Weight cosine per layer", fontsize=10)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)
    for ax in axes[0]:
        ax.set_xlabel("layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    return figure_png(fig)


def tracing_figures(tables: dict[str, pd.DataFrame]) -> dict[str, bytes]:
    """``layers.png`` always, ``loss_path.png`` when the mode statistic was computed."""
    figures = {"layers.png": layers_plot(tables["layers"])}
    if len(tables["path"]):
        figures["loss_path.png"] = path_plot(tables["path"])
    return figures


def tracing_markdown(meta: dict, tables: dict[str, pd.DataFrame], figures: list[str]) -> str:
    """``report.md``: the verdict, the facts beside it, the statistics and per-layer tables, links to the plots."""
    seed = meta["lineage"].get("permute_seed")
    lines = [f"# {_title(meta['lineage'])}", "", f"**Verdict: {meta['verdict']}**", "",
             *[f"- {name}: {value}" for name, value in facts(meta)], "",
             *([f"**This is a control: candidate permuted with seed {seed}** before tracing (the unaligned "
                "statistics should be fooled, the aligned ones and the matching test not).", ""] if seed is not None else []),
             *[f"- `{name}`: {text}" for name, text in READING], "",
             "## Statistics", "", markdown_table(_shown(tables["results"])), "",
             "## Per layer", "", markdown_table(_shown(tables["layers"])), ""]
    lines += [f"![{name}](plots/{name})" for name in figures]
    lines += ["", f"gradlake {meta['lineage'].get('gradlake_version', '?')}; the lineage is in meta.json.", ""]
    return "\n".join(lines)


def tracing_html(meta: dict, tables: dict[str, pd.DataFrame], figures: dict[str, bytes]) -> str:
    """``report.html``: the Markdown report's content as one self-contained page (plots inlined), with the lineage."""
    title = _title(meta["lineage"])
    seed = meta["lineage"].get("permute_seed")
    derived = meta["summary"]["derived"]
    tone = "derived" if derived else "undecided" if meta["verdict"].startswith("undecided") else "none"
    images = "".join(f'<figure><img src="data:image/png;base64,{base64.b64encode(png).decode()}" alt="{html.escape(name)}">'
                     f"<figcaption>{html.escape(name)}</figcaption></figure>" for name, png in figures.items())
    facts_html = "".join(f"<li><b>{html.escape(k)}</b>: {html.escape(v)}</li>" for k, v in facts(meta))
    reading = "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd>" for k, v in READING)
    control = ("" if seed is None else
               f"<p class='control'>This is a control: the candidate was permuted with seed {seed} before tracing "
               "(a function-preserving relabelling of its units). The unaligned statistics should be fooled; the "
               "aligned ones and the matching test should not.</p>")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            "<style>body{font-family:sans-serif;max-width:1100px;margin:auto;padding:0 12px}"
            "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px}img{max-width:100%}"
            ".verdict{font-size:1.2em;padding:8px 12px;border-left:6px solid}.derived{border-color:#c0392b;background:#fbeeee}"
            ".none{border-color:#2e7d32;background:#eef7ee}.undecided{border-color:#b8860b;background:#fdf6e3}"
            ".control{padding:6px 12px;background:#eef2fb;border-left:6px solid #3556a8}"
            "dt{font-weight:bold}dd{margin:0 0 6px 20px}</style></head><body>"
            f"<h1>{html.escape(title)}</h1><p class='verdict {tone}'><b>Verdict:</b> {html.escape(meta['verdict'])}</p>"
            f"<ul>{facts_html}</ul>{control}"
            f"<h2>Statistics</h2>{html_table(_shown(tables['results']))}"
            f"<h2>Per layer</h2>{html_table(_shown(tables['layers']))}"
            + (f"<h2>Plots</h2>{images}" if images else "")
            + f"<h2>How to read it</h2><dl>{reading}</dl>"
            f"<h2>Lineage</h2>{lineage_html(lineage_order(meta['lineage']))}</body></html>")


SUMMARY_COLUMNS = ("candidate", "checkpoint", "control", "permuted_seed", "verdict", "p_value", "cos", "cos_aligned", "emb",
                   "emb_aligned", "matching_aligned", "mode", "mode_aligned", "perplexity:candidate")


def summary_texts(title: str, table: pd.DataFrame) -> dict[str, str]:
    """``summary.md`` and ``summary.html`` over the candidates traced against one base."""
    shown = _shown(table[[c for c in SUMMARY_COLUMNS if c in table.columns]])
    if len(shown):  # the verdict's first words: its p-value, test and control flag have columns of their own
        shown["verdict"] = [v.split(" (")[0].split(";")[0] for v in shown["verdict"]]
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            "<style>body{font-family:sans-serif;max-width:1400px;margin:auto;padding:0 12px}"
            "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px}</style></head><body>"
            f"<h1>{html.escape(title)}</h1><p>One row per result; a control (candidate permuted first) is a row of its "
            f"own. Each result's report.html, in its directory, gives the whole verdict.</p>{html_table(shown)}"
            "</body></html>")
    return {"summary.md": f"# {title}\n\n{markdown_table(shown)}\n", "summary.html": page}
