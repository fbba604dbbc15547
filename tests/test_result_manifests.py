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
from gradlake.lake.verify_results import OLDER, result_findings

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


# -- quality results, training curves, the paraphrase cache and the group hierarchy: verify names each

QUALITY = layout.quality_dir("m", "main", "probe", "original")
CURVE = layout.training_curve_dir("m", "probe")


def test_quality_results_are_named_damaged_by_their_readers_and_by_verify(lake_store):
    from gradlake.tasks.data.quality import read_answers, read_quality, write_quality

    answers = pd.DataFrame({"id": ["1"], "reference": ["a"], "answer": ["a"], "rouge_l": [1.0], "bleu": [100.0]})
    write_quality(lake_store, "m", "main", "probe", "original", answers, {"n": 1, "rouge_l": 1.0})
    assert findings(lake_store)[QUALITY][0] == "ok"
    assert read_quality(lake_store)["rouge_l"].tolist() == [1.0]
    damage(lake_store, f"{QUALITY}/answers.parquet", b"PAR1 garbage PAR1")
    with pytest.raises(LakeError, match=r"quality/m/main/probe/original/answers\.parquet holds 17 bytes") as told:
        read_answers(lake_store, QUALITY)
    assert "\n" not in str(told.value)
    status, problems = findings(lake_store)[QUALITY]
    assert status == "damaged" and "answers.parquet" in problems[0]
    damage(lake_store, f"{QUALITY}/summary.json", b'{"n": 1, "rouge')  # was json's "Unterminated string" from the demo
    with pytest.raises(LakeError, match=r"quality/m/main/probe/original/summary\.json .*gradlake verify"):
        read_quality(lake_store)
    assert any("summary.json" in p for p in findings(lake_store)[QUALITY][1])


@pytest.mark.parametrize("name", ["curve.parquet", "curve.png"])
def test_a_training_curve_is_named_damaged_by_its_reader_and_by_verify(tmp_path, name):
    from gradlake.tasks.training.report import read_training_curve, write_training_curve

    store = LakeStore(f"file://{tmp_path}/lake")
    write_training_curve(store, CURVE, pd.DataFrame({"step": [0, 4], "lds bm25": [0.1, 0.2]}), PNG)
    assert findings(store)[CURVE] == ("ok", [])
    damage(store, f"{CURVE}/{name}", b"garbage")
    status, problems = findings(store)[CURVE]
    assert status == "damaged" and f"{CURVE}/{name}" in problems[0]
    if name == "curve.parquet":
        with pytest.raises(LakeError, match=rf"{CURVE}/curve\.parquet holds 7 bytes"):
            read_training_curve(store, CURVE)


def test_a_damaged_paraphrase_cache_entry_is_named_by_verify_and_asked_again_with_a_warning(tmp_path):
    from gradlake.lake.verify_results import cache_findings
    from gradlake.tasks.data.paraphrase import ParaphraseSpec, cache_path, read_cache, write_cache

    store = LakeStore(f"file://{tmp_path}/lake")
    spec = ParaphraseSpec(base_url="http://127.0.0.1:9/v1")
    texts = ["first request", "second request", "third request"]
    for text in texts:
        write_cache(store, spec, text, f"reworded {text}", served_by="m")
    assert [s for _, _, s, _ in cache_findings(store)] == ["ok"]
    truncated, swapped = cache_path(store, spec, texts[0]), cache_path(store, spec, texts[1])
    store.fs.pipe_file(truncated, store.fs.cat_file(truncated)[:20])
    store.fs.pipe_file(swapped, store.fs.cat_file(cache_path(store, spec, texts[2])))  # another text's answer
    warnings = []
    assert read_cache(store, spec, texts, log=warnings.append) == {texts[2]: "reworded third request"}
    assert sorted(warnings) == sorted(f"warning: the paraphrase cache entry file://{p} is damaged ({why}); its text is "
                                      "paraphrased again" for p, why in (
                                          (truncated, "it is not valid JSON (Unterminated string starting at: line 1 "
                                                      "column 10 (char 9))"),
                                          (swapped, "it does not hold the text its name is the sha256 of")))
    [(kind, _, status, problems)] = cache_findings(store)
    assert (kind, status) == ("paraphrase cache", "damaged")
    assert sorted(p.split(" is damaged")[0] for p in problems) == sorted(f"file://{p}" for p in (truncated, swapped))


def test_damaged_group_metadata_above_the_groups_is_named(tmp_path):
    from gradlake.lake.verify_results import hierarchy_findings

    store = LakeStore(f"file://{tmp_path}/lake")
    group = b'{"zarr_format": 3, "node_type": "group", "attributes": {}}'
    for level in ("", "gradients/", "gradients/m/", "attribution/m/main/probe/probe.original/"):
        store.fs.makedirs(store.path(level), exist_ok=True)
        store.fs.pipe_file(store.path(f"{level}zarr.json"), group)
    assert {(d, s) for _, d, s, _ in hierarchy_findings(store)} == {
        ("zarr.json", "ok"), ("gradients/zarr.json", "ok"), ("gradients/m/zarr.json", "ok"),
        ("attribution/m/main/probe/probe.original/zarr.json", "ok")}
    damage(store, "zarr.json", group[:30])
    damage(store, "gradients/m/zarr.json", group.replace(b"group", b"array"))
    damaged = {d: p[0] for _, d, s, p in hierarchy_findings(store) if s == "damaged"}
    assert damaged.keys() == {"zarr.json", "gradients/m/zarr.json"}
    assert f"file://{tmp_path}/lake/zarr.json is not valid JSON" in damaged["zarr.json"]
    assert "node_type 'array'" in damaged["gradients/m/zarr.json"]


def test_factors_written_before_manifests_are_unchecked_and_a_garbage_record_is_named(tmp_path):
    store = LakeStore(f"file://{tmp_path}/lake")
    factors = layout.influence_factors_dir("m", "main", "probe", "sft", "ekfac", "0123")
    store.fs.makedirs(store.path(factors), exist_ok=True)
    store.fs.pipe_file(store.path(f"{factors}/lambda_matrix.safetensors"), b"weights")
    store.fs.pipe_file(store.path(f"{factors}/factors.json"), b'{"files": ["lambda_matrix.safetensors"]}')
    assert findings(store)[factors] == ("unchecked", [f"its files: {OLDER}"])  # was "ok": nothing was proven
    damage(store, f"{factors}/factors.json", b'{"files": ["lambda')
    status, problems = findings(store)[factors]
    assert status == "damaged" and f"{factors}/factors.json cannot be read as JSON" in problems[0]
