"""Results, ground-truth losses and trace-many summaries carry digest manifests: a damaged file is named in one line
by its readers and by `result_findings` (verify), a damaged meta.json is shown in the catalog, never dropped, and a
result killed part-way, or written by two runs at once, is never listed as a result."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pandas as pd
import pytest

from gradlake.lake import layout, open_lake
from gradlake.lake.evaluations import write_evaluation
from gradlake.lake.results import complete_results, read_result_meta, read_result_table, write_result
from gradlake.lake.store import LakeError, LakeStore
from gradlake.lake.verify_results import result_findings

PNG = b"\x89PNG\r\n\x1a\n-not-really-a-plot"
EVALUATION = layout.evaluation_dir("m", "main", "probe", "sft")
BENCHMARK = layout.benchmark_dir("m", "main", "probe", "held_out")
TRACING = layout.tracing_dir("base", "main", "m", "main")


def frames(scale: float = 1.0) -> dict[str, pd.DataFrame]:
    return {"results": pd.DataFrame({"vectors": ["full", "bm25"], "top1": [0.5 * scale, 0.25 * scale]}),
            "self_similarity": pd.DataFrame({"sample": ["a"], "self_cosine": [0.9 * scale]}),
            "greedy": pd.DataFrame({"step": [1], "accuracy": [0.5 * scale]})}


def write_all(store: LakeStore) -> None:
    """One result of each kind, as their stages write them."""
    write_evaluation(store, EVALUATION, frames(), {"accuracy.png": PNG}, {"report.md": "# r", "report.html": "<p>r</p>"},
                     {"model": "m", "checkpoint": "main", "dataset": "probe", "paradigm": "sft"})
    write_result(store, BENCHMARK, tables={"benchmark": pd.DataFrame({"method": ["gradient"], "lds": [0.1]}),
                                           "lds_per_query": pd.DataFrame({"query": ["q"], "lds": [0.1]})},
                 meta={"model": "m", "n_train": 8}, plots={"lds.png": PNG}, texts={"report.html": "<p>b</p>"})
    write_result(store, TRACING, tables={"results": pd.DataFrame({"statistic": ["cos"], "value": [0.5]})},
                 meta={"lineage": {"candidate": {"model": "m"}}, "verdict": "independent", "summary": {"p_value": 0.5}},
                 texts={"report.md": "# t"})


def damage(store: LakeStore, relative: str, data: bytes | None) -> None:
    """Overwrite a file of the lake with `data`, or delete it (None)."""
    path = store.path(relative)
    if data is None:
        store.fs.rm_file(path)
    else:
        store.fs.pipe_file(path, data)
    store.fs.invalidate_cache()


def findings(store: LakeStore) -> dict[str, tuple[str, list[str]]]:
    return {directory: (status, problems) for _, directory, status, problems in result_findings(store, log=lambda _: None)}


READERS = {EVALUATION: lambda lake: lake.evaluation(), BENCHMARK: lambda lake: lake.attribution(),
           TRACING: lambda lake: lake.tracing()}
TABLES = {EVALUATION: "results.parquet", BENCHMARK: "benchmark.parquet", TRACING: "results.parquet"}


@pytest.mark.parametrize("directory", [EVALUATION, BENCHMARK, TRACING], ids=["evaluation", "attribution", "tracing"])
def test_a_garbage_table_is_named_by_its_reader_and_by_verify(lake_store, directory):
    write_all(lake_store)
    damage(lake_store, f"{directory}/{TABLES[directory]}", b"PAR1 not parquet at all PAR1")
    with pytest.raises(LakeError) as told:  # was pyarrow's ArrowInvalid "magic bytes not found" (or the garbage read)
        READERS[directory](open_lake(lake_store.url))
    assert f"{directory}/{TABLES[directory]}" in str(told.value) and "\n" not in str(told.value)
    status, problems = findings(lake_store)[directory]
    assert status == "damaged" and TABLES[directory] in problems[0]
    assert {d: s for d, (s, _) in findings(lake_store).items() if d != directory} == {
        d: "ok" for d in READERS if d != directory}


@pytest.mark.parametrize("name", ["meta.json", "plots/accuracy.png", "report.html", "greedy.parquet"])
@pytest.mark.parametrize("how", ["truncated", "deleted"])
def test_every_file_of_a_result_is_covered(tmp_path, name, how):
    store = LakeStore(f"file://{tmp_path}/lake")
    write_all(store)
    relative = f"{EVALUATION}/{name}"
    data = store.fs.cat_file(store.path(relative))
    damage(store, relative, data[:len(data) // 2] if how == "truncated" else None)
    status, problems = findings(store)[EVALUATION]
    if name == "meta.json" and how == "deleted":  # no meta.json: a run that stopped before the end, not a result
        assert status == "damaged" and "stopped before the end" in problems[0]
        return
    assert status == "damaged" and any(name in p for p in problems), problems


def test_a_damaged_meta_is_shown_in_the_catalog_not_dropped(lake_store):
    """The catalog is the analyst's inventory: a truncated tracing meta.json (it used to vanish from the catalog) is a
    row saying it is damaged and what to do, and the other results are still listed."""
    write_all(lake_store)
    raw = lake_store.fs.cat_file(lake_store.path(f"{TRACING}/meta.json"))
    damage(lake_store, f"{TRACING}/meta.json", raw[:len(raw) // 2])
    catalog = open_lake(lake_store.url).catalog()
    row = catalog[catalog["path"] == TRACING]
    assert len(row) == 1, catalog[["kind", "path"]]
    assert row["kind"].item() == "tracing" and not row["complete"].item() and row["model"].item() == "m"
    assert f"{TRACING}/meta.json" in row["damaged"].item()
    assert set(catalog[catalog["complete"] == True]["path"]) >= {EVALUATION, BENCHMARK}  # noqa: E712
    with pytest.raises(LakeError, match=r"damaged, so not listed: .*tracing/base/main/m/main/meta\.json"):
        open_lake(lake_store.url).tracing()
    # valid JSON of the same size, changed after it was written, is caught by the manifest too
    assert json.loads(changed := raw.replace(b'"independent"', b'"derived"    '))["verdict"] == "derived"
    damage(lake_store, f"{TRACING}/meta.json", changed)
    with pytest.raises(LakeError, match="meta.json differs from what was written"):
        read_result_meta(lake_store, TRACING)
    assert findings(lake_store)[TRACING][0] == "damaged"


def test_a_result_written_before_manifests_is_read_and_unchecked(tmp_path):
    store = LakeStore(f"file://{tmp_path}/lake")
    write_all(store)
    damage(store, f"{EVALUATION}/manifest.json", None)
    pd.testing.assert_frame_equal(open_lake(store.url).evaluation(), frames()["results"])
    status, problems = findings(store)[EVALUATION]
    assert status == "unchecked" and "before manifests" in problems[0]
    damage(store, f"{EVALUATION}/greedy.parquet", b"garbage")
    status, problems = findings(store)[EVALUATION]
    assert status == "damaged" and "greedy.parquet cannot be read as Parquet" in problems[0]
    with pytest.raises(LakeError, match="greedy.parquet cannot be read as Parquet"):
        open_lake(store.url).evaluation(table="greedy")


def test_other_manifest_directories_and_trace_many_summaries_are_covered(tmp_path):
    from gradlake.lake.manifest import entry, write_manifest

    store = LakeStore(f"file://{tmp_path}/lake")
    checkpoint, summary = "runs/tiny/checkpoint-1", layout.tracing_base_dir("base", "main")
    store.fs.makedirs(store.path(checkpoint), exist_ok=True)
    store.fs.pipe_file(store.path(f"{checkpoint}/model.safetensors"), b"weights")
    write_manifest(store.fs, store.path(checkpoint), {"model.safetensors": entry(b"weights")})
    store.fs.makedirs(store.path(summary), exist_ok=True)
    store.fs.pipe_file(store.path(f"{summary}/summary.parquet"), b"an old summary, not parquet")
    got = {d: (k, s) for k, d, s, _ in result_findings(store, log=lambda _: None)}
    assert got == {checkpoint: ("checkpoint", "ok"), summary: ("tracing summary", "damaged")}
    damage(store, f"{checkpoint}/model.safetensors", b"weightz")
    status, problems = findings(store)[checkpoint]
    assert status == "damaged" and "model.safetensors differs" in problems[0]


def _writer_script(directory: str, kill_after: int, pause: str = "") -> str:
    """A writer of the result at `directory` that SIGKILLs itself right after its `kill_after`-th write (a file, the
    manifest or meta.json); with `pause`, it waits after its first file until that path exists."""
    return f"""
import os, signal, time, fsspec, pandas as pd
from gradlake.lake.store import LakeStore
from gradlake.lake.results import write_result
store = LakeStore(os.environ["LAKE_URL"])
writes = [0]
def after_write(path):
    if {directory!r} not in path or "/.gradlake/" in path:
        return
    writes[0] += 1
    if writes[0] == 1 and {pause!r}:
        open({pause!r} + ".paused", "w").close()
        while not os.path.exists({pause!r}):
            time.sleep(0.05)
    if writes[0] == {kill_after}:
        os.kill(os.getpid(), signal.SIGKILL)
pipe, replace = store.fs.pipe_file, os.replace
store.fs.pipe_file = lambda path, data, **kw: (pipe(path, data, **kw), after_write(path))
os.replace = lambda a, b: (replace(a, b), after_write(b))
write_result(store, {directory!r}, tables={{n: pd.DataFrame({{"value": [2.0, 2.0]}}) for n in ("a", "b", "c")}},
             meta={{"run": "killed"}}, texts={{"report.md": "killed"}})
"""


def _write(store: LakeStore, run: str) -> None:
    write_result(store, EVALUATION, tables={n: pd.DataFrame({"value": [1.0, 1.0]}) for n in ("a", "b", "c")},
                 meta={"run": run}, texts={"report.md": run})


def _run_writer(store: LakeStore, kill_after: int, pause: str = "") -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _writer_script(EVALUATION, kill_after, pause)],
                            env={**os.environ, "LAKE_URL": store.url, "OMP_NUM_THREADS": "1"})


def test_a_result_killed_at_any_write_is_never_listed_partial(lake_store):
    """SIGKILL right after each write of a rerun (3 tables, a text, the manifest, meta.json): the result is either
    not listed, or listed whole (every table the new run's, verify ok)."""
    listed = []
    for kill_after in range(1, 7):
        _write(lake_store, "earlier")
        assert _run_writer(lake_store, kill_after).wait(60) == -9
        found = complete_results(lake_store, layout.EVALUATIONS)
        if found:
            listed.append(kill_after)
            assert found == [(EVALUATION, {"run": "killed"})]
            assert all(read_result_table(lake_store, EVALUATION, n)["value"].tolist() == [2.0, 2.0] for n in "abc")
            assert findings(lake_store)[EVALUATION][0] == "ok"
        else:  # its manifest (this run's or the earlier one's) without a meta.json: verify says to run it again
            status, problems = findings(lake_store)[EVALUATION]
            assert status == "damaged" and "stopped before the end" in problems[0], (kill_after, problems)
    assert listed == [6]  # only once meta.json, the last write, was there


def test_two_writers_of_one_result_never_list_a_mixture(lake_store, tmp_path):
    """A run writes the result while another run writing it is midway (its first table written), and that other run
    is then SIGKILLed after its second table.  Before the write claim, the first run's meta.json and manifest were
    listed over the killed run's tables: a mixture read back as a complete result."""
    _write(lake_store, "earlier")
    go = str(tmp_path / "go")
    killed = _run_writer(lake_store, kill_after=2, pause=go)
    deadline = time.monotonic() + 60
    while not os.path.exists(go + ".paused"):
        assert time.monotonic() < deadline and killed.poll() is None
        time.sleep(0.05)
    # midway: not listed, and verify leaves a result a live run is writing alone
    assert complete_results(lake_store, layout.EVALUATIONS) == []
    assert findings(lake_store)[EVALUATION] == ("unchecked", ["being written by a live run now"])
    writer = threading.Thread(target=_write, args=(lake_store, "whole"))
    writer.start()
    time.sleep(1.5)  # the writer is waiting for the other run's claim (before: it wrote everything meanwhile)
    open(go, "w").close()
    assert killed.wait(60) == -9
    writer.join(60)
    assert not writer.is_alive()
    assert complete_results(lake_store, layout.EVALUATIONS) == [(EVALUATION, {"run": "whole"})]
    for name in "abc":
        assert read_result_table(lake_store, EVALUATION, name)["value"].tolist() == [1.0, 1.0], name
    assert findings(lake_store)[EVALUATION] == ("ok", [])


def test_ground_truth_losses_are_verified_and_a_damaged_one_recomputed_with_a_warning(tmp_path, tiny_models, capsys):
    from gradlake.tasks.attribution.retraining import stored_losses
    from gradlake.tasks.attribution.spec import AttributionSpec
    from gradlake.tasks.common.model import ModelSpec
    from gradlake.tasks.training.spec import TrainSpec

    store = LakeStore(f"file://{tmp_path}/lake")
    model = ModelSpec(model=str(tiny_models["olmo2"]), checkpoint="checkpoint-1", device="cpu")
    spec = AttributionSpec(train=TrainSpec(model=model, lake=store.url, dataset="probe", output=str(tmp_path / "run"),
                                           max_length=64), retrain_prefix=str(tmp_path / "retrain"))
    run_dir = layout.lds_dir(layout.ground_truth_dir("m", "main", "probe", "held_out"), "k")
    chats = [[{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]
             for i in range(2)]
    first = stored_losses(store, run_dir, "subset-000", model, ["q0", "q1"], chats, spec)
    stored_losses(store, run_dir, "subset-001", model, ["q0", "q1"], chats, spec)
    losses = f"{run_dir}/losses"
    assert findings(store) == {losses: ("ok", [])}
    damage(store, f"{losses}/subset-000.parquet", b"garbage")
    status, problems = findings(store)[losses]
    assert status == "damaged" and "subset-000.parquet holds 7 bytes" in problems[0] and len(problems) == 1
    capsys.readouterr()
    again = stored_losses(store, run_dir, "subset-000", model, ["q0", "q1"], chats, spec)
    warning = capsys.readouterr().out
    assert "warning:" in warning and f"{losses}/subset-000.parquet" in warning and "computing" in warning
    np.testing.assert_allclose(again, first, rtol=1e-6)
    assert findings(store) == {losses: ("ok", [])}
