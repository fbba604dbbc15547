"""The training curve: what a model learned along its checkpoints, retrieval and ground truth side by side.

Stored in `layout.training_curve_dir` as ``curve.parquet`` and ``curve.png``, then a digest manifest
(lake.manifest) of both, so that `gradlake verify` checks them and `read_training_curve` names a
damaged table in one line.
"""

from __future__ import annotations

import io

import pandas as pd
from prefect import task
from prefect.cache_policies import NONE

from gradlake.lake import layout
from gradlake.lake.manifest import entry, write_manifest
from gradlake.lake.results import read_checked_file, read_parquet_bytes
from gradlake.lake.store import LakeError, LakeStore, public_url
from gradlake.tasks.common.model import ModelSpec
from gradlake.tasks.common.render import figure_png
from gradlake.tasks.training.spec import TrainSpec

CURVE = "curve.parquet"


def training_curve_png(curve: pd.DataFrame) -> bytes:
    """Paraphrase top-1 (left) and held-out LDS with the method names (right) against the training step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for column in [c for c in curve.columns if c.startswith("top1 ")]:
        left.plot(curve["step"], curve[column], marker="o", label=column[len("top1 "):])
    left.set_xlabel("training step")
    left.set_ylabel("paraphrase top-1")
    left.set_ylim(-0.02, 1.02)
    left.set_title("Retrieval: the paraphrase finds its original")
    trained = curve[curve["step"] > 0]
    lds_columns = [c for c in curve.columns if c.startswith("lds ")]
    colors = plt.get_cmap("tab20").colors
    ordered = sorted(lds_columns, key=lambda c: -float(trained[c].mean()) if trained[c].notna().any() else 0.0)
    for index, column in enumerate(c for c in ordered if c not in ("lds random", "lds source oracle")):
        right.plot(trained["step"], trained[column], marker="o", color=colors[index % len(colors)],
                   label=column[len("lds "):])
    if "lds random" in curve:
        right.plot(trained["step"], trained["lds random"], marker="x", color="black", linestyle="--",
                   label="random scores (reference)")
    right.axhline(0, color="black", linewidth=0.8)
    right.set_xlabel("training step")
    right.set_ylabel("LDS (Spearman)")
    right.set_title("Ground truth: LDS on held-out queries (intervals: each report)")
    right.legend(fontsize=7, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.2))
    left.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2)
    fig.tight_layout()
    return figure_png(fig)


@task(name="training-curve", cache_policy=NONE)
def training_curve(lake: str, run: TrainSpec, rows: list[dict]) -> str:
    """Top-1 and LDS against the training step: a table and a plot next to the final checkpoint's benchmark."""
    from gradlake.tasks.common.lineage import lake_keys
    from gradlake.tasks.training.report import training_curve_png

    frame = pd.DataFrame(rows)
    model_key, _ = lake_keys(ModelSpec(model=run.output, checkpoint=frame["checkpoint"].iloc[-1]))
    directory = layout.training_curve_dir(model_key, run.dataset)
    write_training_curve(LakeStore(lake), directory, frame, training_curve_png(frame))
    return directory


def write_training_curve(store: LakeStore, directory: str, frame: pd.DataFrame, png: bytes) -> None:
    """Store the curve's table and plot, then their manifest (written last)."""
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    files = {CURVE: buffer.getvalue(), "curve.png": png}
    store.fs.makedirs(store.path(directory), exist_ok=True)
    for name, data in files.items():
        store.fs.pipe_file(store.path(f"{directory}/{name}"), data)
    write_manifest(store.fs, store.path(directory), {name: entry(data) for name, data in files.items()})


def read_training_curve(store: LakeStore, directory: str) -> pd.DataFrame:
    """The curve's table at `directory`, checked against its manifest; one LakeError naming it if damaged or absent."""
    raw = read_checked_file(store, directory, CURVE)
    if raw is None:
        raise LakeError(f"no training curve at {public_url(store.url)}/{directory}: run the demo (or its training) again")
    return read_parquet_bytes(store, f"{directory}/{CURVE}", raw)
