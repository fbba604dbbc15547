"""Sources are normalised to chats with stable ids; unusable rows are dropped and reported; bad requests fail early."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from gradlake.tasks.data.sources import SourceError, SourceSpec, load_source, normalise, sample

GOOD = [
    {"id": "a", "messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]},
    {"id": "b", "instruction": "Add 2 and 2.", "output": "4"},
    {"conversations": ["Name a colour.", "Blue.", "Another?", "Red."]},
    {"uid": 7, "prompt": "Capital of France?", "response": "Paris."},
]
BAD = [
    ("c", {"id": "c", "messages": [{"role": "user", "content": "Only a question"}]}, "no assistant turn"),
    ("d", {"id": "d", "messages": [{"role": "assistant", "content": "Only an answer"}]}, "no user turn"),
    ("e", {"id": "e", "instruction": "   ", "output": "x"}, "empty content"),
    ("f", {"id": "f", "instruction": 3, "output": "x"}, "instruction/output are not strings"),
    ("g", {"id": "g", "messages": [{"role": "robot", "content": "beep"}]}, "unknown role 'robot'"),
    ("a", {"id": "a", "instruction": "Duplicate id", "output": "x"}, "duplicate id"),
]


def write_jsonl(path, rows, broken_lines=()):
    lines = [json.dumps(r) for r in rows] + list(broken_lines)
    path.write_text("\n".join(lines) + "\n")
    return path


def test_local_jsonl_with_malformed_rows_reports_every_drop(tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", GOOD + [row for _, row, _ in BAD], broken_lines=["{not json"])
    frame, loaded = load_source(SourceSpec(source=str(path)))
    report = loaded.report()
    assert report["rows_read"] == len(GOOD) + len(BAD) + 1
    assert len(frame) == report["usable"] == len(GOOD)
    assert frame["id"].tolist()[:2] == ["a", "b"] and frame["id"].tolist()[3] == "7"
    assert frame["id"].iloc[2].startswith("h-"), "a row without id gets a content hash id"
    reasons = {d["id"]: d["reason"] for d in loaded.dropped}
    for sample_id, _, reason in BAD:
        assert reasons[sample_id] == reason
    assert "not valid JSON" in reasons.values()
    assert report["dropped"] == len(BAD) + 1
    assert frame["messages"].iloc[2] == [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."},
                                         {"role": "user", "content": "Another?"}, {"role": "assistant", "content": "Red."}]


def test_content_hash_ids_are_stable_under_reordering():
    rows = pd.DataFrame([{"prompt": f"q{i}", "response": f"a{i}"} for i in range(5)])
    forward = normalise(rows).frame
    backward = normalise(rows.iloc[::-1].reset_index(drop=True)).frame
    assert dict(zip(forward["id"], forward["messages"].map(str))) == dict(zip(backward["id"], backward["messages"].map(str)))


def test_parquet_and_arrow_sources(tmp_path):
    from datasets import Dataset

    frame = pd.DataFrame([{"id": f"s{i}", "prompt": f"Question {i}?", "response": f"Answer {i}."} for i in range(6)])
    frame.to_parquet(tmp_path / "d.parquet")
    Dataset.from_pandas(frame).save_to_disk(tmp_path / "arrow")
    arrow_file = next((tmp_path / "arrow").glob("*.arrow"))
    for source in (tmp_path / "d.parquet", arrow_file):
        got, _ = load_source(SourceSpec(source=str(source)))
        assert got["id"].tolist() == [f"s{i}" for i in range(6)]
        assert got["messages"].iloc[4][1]["content"] == "Answer 4."


def test_sampling_is_seeded_first_n_and_checked():
    rows = pd.DataFrame([{"id": f"r{i}", "prompt": f"q{i}", "response": f"a{i}"} for i in range(50)])
    loaded = normalise(rows)
    one = sample(loaded, SourceSpec(source="x.jsonl", n=10, seed=1))
    again = sample(loaded, SourceSpec(source="x.jsonl", n=10, seed=1))
    other = sample(loaded, SourceSpec(source="x.jsonl", n=10, seed=2))
    assert one["id"].tolist() == again["id"].tolist() != other["id"].tolist()
    assert len(set(one["id"])) == 10 and one["id"].tolist() == sorted(one["id"], key=lambda s: int(s[1:]))
    assert sample(loaded, SourceSpec(source="x.jsonl", n=3, sampling="first"))["id"].tolist() == ["r0", "r1", "r2"]
    with pytest.raises(SourceError, match=r"n=51 is larger than the 50 usable rows"):
        sample(loaded, SourceSpec(source="x.jsonl", n=51))


@pytest.fixture
def hub_style_dir(tmp_path):
    """A dataset directory as a hub repository lays it out (data/<split>-*.parquet), read by `load_dataset`."""
    data = tmp_path / "my-probes" / "data"
    data.mkdir(parents=True)
    for split, count in (("train", 8), ("test", 3)):
        pd.DataFrame([{"id": f"{split}-{i}", "messages": [{"role": "user", "content": f"Q{i}"},
                                                          {"role": "assistant", "content": f"A{i}"}]}
                      for i in range(count)]).to_parquet(data / f"{split}-00000-of-00001.parquet")
    return tmp_path / "my-probes"


def test_dataset_repository_splits(hub_style_dir):
    frame, _ = load_source(SourceSpec(source=str(hub_style_dir), split="test"))
    assert frame["id"].tolist() == ["test-0", "test-1", "test-2"]
    with pytest.raises(SourceError, match=r"has no split 'validation'"):
        load_source(SourceSpec(source=str(hub_style_dir), split="validation"))


def test_unknown_hub_dataset_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(SourceError, match=r"cannot load dataset 'gradlake-test/no-such-dataset'"):
        load_source(SourceSpec(source="gradlake-test/no-such-dataset"))


def test_missing_local_file():
    with pytest.raises(SourceError, match=r"source file '/no/such/file.jsonl' does not exist"):
        load_source(SourceSpec(source="/no/such/file.jsonl"))


def test_an_id_that_is_not_a_string_or_integer_drops_its_row_and_says_why(tmp_path):
    """The row's own id is unusable: it is reported, not silently replaced by a content hash."""
    import numpy as np

    rows = [{"id": "ok", "prompt": "Q?", "response": "A."},
            {"id": ["x", "y"], "prompt": "Listed?", "response": "Yes."},
            {"id": {"n": 1}, "prompt": "Mapped?", "response": "Yes."},
            {"id": True, "prompt": "Boolean?", "response": "Yes."},
            {"id": " ", "prompt": "Blank?", "response": "Yes."},
            {"id": 7, "prompt": "Numbered?", "response": "Yes."}]
    frame, loaded = load_source(SourceSpec(source=str(write_jsonl(tmp_path / "ids.jsonl", rows))))
    assert frame["id"].tolist() == ["ok", "7"], "no row is kept under an id its source did not give"
    report = loaded.report()
    assert report["dropped_by_reason"] == {"id is a list, not a string or integer": 1,
                                           "id is a dict, not a string or integer": 1,
                                           "id is a bool, not a string or integer": 1, "id is empty": 1}
    assert report["dropped_ids"] == ["row-1", "row-2", "row-3", "row-4"] and report["rows_read"] == 6
    # Parquet hands a list column over as numpy arrays: the same row, the same report.
    from_parquet = normalise(pd.DataFrame({"id": [np.array(["x", "y"]), "ok"], "prompt": ["Listed?", "Q?"],
                                           "response": ["Yes.", "A."]}))
    assert from_parquet.frame["id"].tolist() == ["ok"]
    assert from_parquet.report()["dropped_by_reason"] == {"id is a list, not a string or integer": 1}


def test_bundled_probe_set_is_a_named_source_with_its_paraphrases():
    """'bundled:probe' (the default) reads the probe set shipped with gradlake wherever it is installed: no path, no
    column to name; the Prefect form offers it as a choice."""
    from typing import get_args

    from gradlake.tasks.data.dataset import DatasetRecipe
    from gradlake.tasks.data.probes import load_probe_set, probe_variant
    from gradlake.tasks.data.sources import NAMED_SOURCES, NamedSourceName

    spec = SourceSpec()
    assert spec.source == "bundled:probe" and spec.keep_columns == ["topic", "paraphrase"]
    frame, loaded = load_source(spec)
    want = probe_variant(load_probe_set(), "original")
    assert loaded.report()["dropped"] == 0 and frame["id"].tolist() == want["id"].tolist()
    assert frame["messages"].tolist() == want["messages"].tolist()
    assert frame["paraphrase"].tolist() == load_probe_set()["paraphrase"].tolist()
    # the recipe knows the paraphrase column, unless an API is asked for
    assert DatasetRecipe().paraphrase_column == "paraphrase"
    assert DatasetRecipe(source={"source": "bundled:probe", "n": 4}).paraphrase_column == "paraphrase"
    assert DatasetRecipe(source={"source": "GAIR/lima"}).paraphrase_column is None
    # the form: a dropdown of the named sources beside free text (an enum, which the UI shows as a select)
    choices = SourceSpec.model_json_schema()["properties"]["source"]["anyOf"]
    assert {"enum": ["bundled:probe"], "title": "Named source", "type": "string"} in choices
    assert get_args(get_args(NamedSourceName)[0]) == tuple(NAMED_SOURCES)
    # a hub id or a path is what it was
    assert SourceSpec(source="GAIR/lima").keep_columns == []
