"""Rendering shared by every report: tables as Markdown and HTML, lineage records, figures as PNG bytes."""

from __future__ import annotations

import base64
import html
import io
import re
from collections.abc import Callable

import numpy as np
import pandas as pd


def is_missing(value) -> bool:
    return value is None or (np.isscalar(value) and bool(pd.isna(value))) or value is pd.NA


def table_cell(value) -> str:
    if is_missing(value):
        return ""
    if isinstance(value, (float, np.floating)):
        return f"{value:.3f}"
    return str(value)


_CODE_SPAN = re.compile(r"(`+)(?:.+?)\1", re.DOTALL)


def markdown_text(text: str) -> str:
    """Text with its '<' and '>' escaped outside code spans, so that a placeholder such as 'dense:<model>' shows
    as written: Markdown renderers (the Prefect UI's, GitHub's) take '<model>' for an HTML tag and drop it."""
    out, last = [], 0
    for span in _CODE_SPAN.finditer(text):
        out += [text[last:span.start()].replace("<", "&lt;").replace(">", "&gt;"), span.group(0)]
        last = span.end()
    out.append(text[last:].replace("<", "&lt;").replace(">", "&gt;"))
    return "".join(out)


def markdown_image(name: str, png: bytes) -> str:
    """A PNG inside the Markdown itself (a data URI), for a page that cannot read the file: the Prefect UI shows it."""
    return f"![{name}](data:image/png;base64,{base64.b64encode(png).decode()})"


def markdown_table(frame: pd.DataFrame) -> str:
    """A pipe table; floats to 3 decimals, missing values as empty cells, '<' and '>' escaped."""
    def cell(text: str) -> str:
        return markdown_text(text).replace("|", "\\|")

    lines = ["| " + " | ".join(cell(str(c)) for c in frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(table_cell(v)) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def html_table(frame: pd.DataFrame) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(table_cell(v))}</td>" for v in row) + "</tr>"
                   for row in frame.itertuples(index=False))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def figure_png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def lineage_items(lineage: dict) -> list[tuple[str, object]]:
    order = ("model", "checkpoint", "resolved_commit", "dataset", "paradigm", "queries", "gradient_groups", "projections",
             "settings", "created_at")
    return [(k, lineage[k]) for k in order if k in lineage] + [(k, v) for k, v in lineage.items() if k not in order]


def _scalar(value) -> str:
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value)) if value else "none"
    return table_cell(value)


def lineage_markdown(items, indent: str = "") -> list[str]:
    lines = []
    for key, value in items:
        if isinstance(value, dict):
            lines.append(f"{indent}- **{key}**:" if not indent else f"{indent}- {key}:")
            lines += lineage_markdown(value.items(), indent + "  ")
        else:
            text = markdown_text(_scalar(value))
            lines.append(f"{indent}- **{key}**: {text}" if not indent else f"{indent}- {key}: {text}")
    return lines


def lineage_html(items) -> str:
    parts = []
    for key, value in items:
        inner = lineage_html(value.items()) if isinstance(value, dict) else html.escape(_scalar(value))
        parts.append(f"<li><b>{html.escape(str(key))}</b>: {inner}</li>")
    return "<ul>" + "".join(parts) + "</ul>"


def lake_location(store, directory: str) -> str:
    """Where a directory of a lake (a `LakeStore`) lies, for a page that cannot open it (the Prefect UI): a path in
    a code span, not a link."""
    from gradlake.lake.store import public_url

    if store.is_local:
        return f"`{store.path(directory)}` on the workers' storage"
    return f"`{public_url(store.url)}/{directory}`"


_PLOT_LINE = re.compile(r"!\[([^\]]*)\]\(plots/([^)]+)\)")
PLOT_BUDGET = 8_000_000  # PNG bytes embedded in one artifact at most; beyond, a plot is named with where it lies


def artifact_markdown(report: str, read_plot: Callable[[str], bytes], where: str, budget: int = PLOT_BUDGET) -> str:
    """A stored Markdown report as a Prefect artifact: plots linked by relative path (`plots/<name>`) embedded
    (the UI cannot read the lake's files), '<' and '>' escaped.  `read_plot(name)` gives a plot's bytes; `where`
    says where the report's directory lies, for the plots over `budget` bytes."""
    lines, spent = [], 0
    for line in report.splitlines():
        plot = _PLOT_LINE.fullmatch(line.strip())
        if plot is None:
            lines.append(markdown_text(line))
            continue
        png = read_plot(plot.group(2))
        spent += len(png)
        lines.append(markdown_image(plot.group(1), png) if spent <= budget else
                     f"- {markdown_text(plot.group(1))}: too large to embed here; `plots/{plot.group(2)}` in {where}")
    return "\n".join(lines)
