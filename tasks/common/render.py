"""Rendering shared by every report: tables as Markdown and HTML, lineage records, figures as PNG bytes."""

from __future__ import annotations

import html
import io

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


def markdown_table(frame: pd.DataFrame) -> str:
    """A pipe table; floats to 3 decimals, missing values as empty cells."""
    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(table_cell(v).replace("|", "\\|") for v in row) + " |" for row in frame.itertuples(index=False)]
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
            lines.append(f"{indent}- **{key}**: {_scalar(value)}" if not indent else f"{indent}- {key}: {_scalar(value)}")
    return lines


def lineage_html(items) -> str:
    parts = []
    for key, value in items:
        inner = lineage_html(value.items()) if isinstance(value, dict) else html.escape(_scalar(value))
        parts.append(f"<li><b>{html.escape(str(key))}</b>: {inner}</li>")
    return "<ul>" + "".join(parts) + "</ul>"
