"""One results writer: tables, plots and texts under the names given, meta.json removed first and written last
(manifest.json just before it),
on a local lake and on S3 (moto on loopback); a writer that fails part-way leaves no result that looks complete."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from gradlake.lake import layout, open_lake
from gradlake.lake.evaluations import list_evaluations, read_evaluation, write_evaluation
from gradlake.lake.results import (complete_results, read_result_meta, read_result_table, result_complete,
                                   write_result)
from gradlake.lake.store import LakeError, LakeStore

DIRECTORY = "tracing/base/main/candidate/step10"
PNG = b"\x89PNG\r\n\x1a\n-not-really-a-plot"


@pytest.fixture
def store(lake_store) -> LakeStore:
    return lake_store


def tables(scale: float = 1.0) -> dict[str, pd.DataFrame]:
    return {"results": pd.DataFrame({"statistic": ["cos", "emb"], "value": [0.5 * scale, 0.25 * scale]}),
            "path": pd.DataFrame({"alpha": np.linspace(0, 1, 3), "loss": [1.0, 2.0 * scale, 1.5]})}


def write(store: LakeStore, scale: float = 1.0, **extra) -> None:
    write_result(store, DIRECTORY, tables=tables(scale), plots={"loss_path.png": PNG},
                 texts={"report.md": f"# Verdict {scale}\n"}, meta={"verdict": scale, **extra})


def names(store: LakeStore, directory: str = DIRECTORY) -> set[str]:
    root = store.path(directory) + "/"
    return {p[len(root):] for p in store.fs.find(store.path(directory))}


def test_files_are_named_as_given_and_read_back(store):
    assert not result_complete(store, DIRECTORY)
    with pytest.raises(LakeError, match="no complete tracing result at"):
        read_result_table(store, DIRECTORY, "results", what="tracing result")
    write(store)
    assert names(store) == {"results.parquet", "path.parquet", "plots/loss_path.png", "report.md", "manifest.json",
                            "meta.json"}
    assert result_complete(store, DIRECTORY)
    pd.testing.assert_frame_equal(read_result_table(store, DIRECTORY, "path"), tables()["path"])
    assert read_result_meta(store, DIRECTORY) == {"verdict": 1.0}
    assert store.fs.cat_file(store.path(f"{DIRECTORY}/plots/loss_path.png")) == PNG
    assert store.fs.cat_file(store.path(f"{DIRECTORY}/report.md")).decode() == "# Verdict 1.0\n"
    assert complete_results(store, layout.TRACING) == [(DIRECTORY, {"verdict": 1.0})]
    with pytest.raises(LakeError, match=r"has no table 'greedy'; it has \['path', 'results'\]"):
        read_result_table(store, DIRECTORY, "greedy")
    # a plain reader needs no gradlake: Parquet and JSON where the names say
    raw = json.loads(store.fs.cat_file(store.path(f"{DIRECTORY}/meta.json")))
    assert raw == {"verdict": 1.0}


def test_a_rerun_is_never_seen_complete_until_its_meta_is_written(store, monkeypatch):
    write(store, 1.0)
    seen = []
    pipe_file = store.fs.pipe_file

    def watched(path, data, **kwargs):
        if "/.gradlake/" not in path:  # the writer's claim (lake.claims) is taken first, outside the result
            seen.append((path.rsplit("/", 1)[-1], result_complete(store, DIRECTORY)))
        return pipe_file(path, data, **kwargs)

    monkeypatch.setattr(store.fs, "pipe_file", watched)
    write(store, 2.0)
    monkeypatch.undo()
    written = [name for name, _ in seen]
    assert {"results.parquet", "path.parquet", "loss_path.png", "report.md"} <= set(written)
    # while any file of the rerun was written, the result did not count as complete (the old meta.json was gone) ...
    assert not any(complete for _, complete in seen), seen
    # ... and meta.json came last, just after manifest.json (on S3 by the same call; on a local lake both are
    # renamed into place after them)
    assert "meta.json" not in written[:-1] and "manifest.json" not in written[:-2]
    assert read_result_meta(store, DIRECTORY) == {"verdict": 2.0}
    assert read_result_table(store, DIRECTORY, "results")["value"].tolist() == [1.0, 0.5]


def test_a_writer_that_fails_part_way_leaves_no_meta(store, monkeypatch):
    write(store, 1.0)
    pipe_file = store.fs.pipe_file
    calls = []

    def failing(path, data, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("the lake went away after the first table")
        return pipe_file(path, data, **kwargs)

    monkeypatch.setattr(store.fs, "pipe_file", failing)
    with pytest.raises(OSError, match="went away"):
        write(store, 2.0)
    monkeypatch.undo()
    assert not store.fs.exists(store.path(f"{DIRECTORY}/meta.json"))
    assert not result_complete(store, DIRECTORY)
    assert complete_results(store, layout.TRACING) == []
    with pytest.raises(LakeError, match="no complete result"):
        read_result_table(store, DIRECTORY, "results")
    write(store, 3.0)  # the next run completes it
    assert read_result_meta(store, DIRECTORY) == {"verdict": 3.0}


def test_what_cannot_be_encoded_leaves_the_previous_result_whole(store):
    write(store, 1.0)
    bad = {"results": pd.DataFrame({"value": [1, "one"]})}  # mixed types: no Parquet column holds them
    with pytest.raises(Exception):
        write_result(store, DIRECTORY, tables=bad, meta={"verdict": 2.0})
    assert read_result_meta(store, DIRECTORY) == {"verdict": 1.0}
    assert read_result_table(store, DIRECTORY, "results")["value"].tolist() == [0.5, 0.25]


@pytest.mark.parametrize("kind, name", [("plot", "../escape.png"), ("text", "meta.json"), ("table", "a/b"),
                                        ("text", "results.parquet"), ("text", "manifest.json")])
def test_names_that_are_not_plain_files_are_refused(tmp_path, kind, name):
    store = LakeStore(f"file://{tmp_path}/lake")
    given = {"tables": {"results": tables()["results"]}, "plots": {}, "texts": {}}
    given[f"{kind}s"] = {**given[f"{kind}s"], name: tables()["path"] if kind == "table" else ("x" if kind == "text" else PNG)}
    with pytest.raises(LakeError, match="name|overwrite"):
        write_result(store, DIRECTORY, meta={}, **given)
    assert not result_complete(store, DIRECTORY)


def test_an_evaluation_keeps_its_file_names_and_meta(tmp_path):
    """write_evaluation through the one writer: the files a lake of earlier versions holds, read back the same."""
    store = LakeStore(f"file://{tmp_path}/lake")
    directory = layout.evaluation_dir("m", "main", "probe", "sft")
    frames = {"results": pd.DataFrame({"vectors": ["full"], "top1": [0.5]}),
              "self_similarity": pd.DataFrame({"sample": ["a"], "self_cosine": [0.9]}),
              "greedy": pd.DataFrame({"step": [1], "accuracy": [0.5]})}
    write_evaluation(store, directory, frames, {"accuracy.png": PNG}, {"report.md": "# r", "report.html": "<p>r</p>"},
                     {"model": "m", "paradigm": "sft"})
    assert names(store, directory) == {"results.parquet", "self_similarity.parquet", "greedy.parquet",
                                       "plots/accuracy.png", "report.md", "report.html", "manifest.json", "meta.json"}
    assert read_result_meta(store, directory) == {"lineage": {"model": "m", "paradigm": "sft"},
                                                  "tables": ["greedy", "results", "self_similarity"],
                                                  "plots": ["accuracy.png"], "reports": ["report.html", "report.md"]}
    assert list_evaluations(store) == [(directory, read_result_meta(store, directory))]
    pd.testing.assert_frame_equal(read_evaluation(store, directory, "greedy"), frames["greedy"])
    pd.testing.assert_frame_equal(open_lake(store.url).evaluation(paradigm="sft"), frames["results"])
    with pytest.raises(LakeError, match="evaluation table 'curve' is not known"):
        read_evaluation(store, directory, "curve")
