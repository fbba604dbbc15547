"""Shard size and batch size are scheduling choices: another run with other ones reuses what is done.

Per-sample gradients are not bitwise independent of the batch a sample was computed in
(padding changes the shapes of the batched products; about 1e-8 apart on the tiny models),
so "the same bytes" means: every row-chunk holds exactly what an uninterrupted run with
the settings of the run that wrote it holds, and a finished chunk is never rewritten.

Batches here are in dataset order (`token_budget=None`): their grid does not depend on the
shard size, so these tests can say which run computed each chunk.  Packed batches
(tests/test_batching.py) are planned per shard, so their bits depend on the shard size too.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import zarr

from conftest import write_probe
from gradlake.flows.extract import extract_gradients
from gradlake.flows.project import project_gradients
from gradlake.lake import layout, open_lake
from gradlake.lake.store import LakeError
from gradlake.tasks.gradients.plan import ExtractionSpec, create_group, plan_extraction
from gradlake.tasks.common.progress import Progress
from gradlake.tasks.gradients.extract import extract_shard
from gradlake.tasks.common.model import ModelSpec
from gradlake.tasks.projection.stored import ProjectSpec
from gradlake.tasks.projection.spec import ProjectionSpec

N = 24
LAYERS = ["model.embed_tokens.weight", "model.layers.1.mlp.*", "model.layers.1.post_attention_layernorm.weight",
          "lm_head.weight"]


def spec_for(model_dir, lake: str, shard_size: int, batch_size: int, **kw) -> ExtractionSpec:
    return ExtractionSpec(model=ModelSpec(model=str(model_dir), checkpoint="checkpoint-1"), dataset="probe",
                          layers=LAYERS, shard_size=shard_size, batch_size=batch_size, max_length=256, lake=lake,
                          **{"token_budget": None, **kw})


def new_lake(tmp_path: Path, name: str) -> str:
    url = f"file://{tmp_path / name}"
    write_probe(url, N)
    return url


def files(lake: str, path: str) -> dict[str, tuple[int, bytes]]:
    """Every file of a group: its modification time and its bytes."""
    root = Path(lake[len("file://"):]) / path
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.read_bytes()) for p in root.rglob("*") if p.is_file()}


def arrays(lake: str, path: str) -> dict[str, np.ndarray]:
    group = zarr.open_group(lake[len("file://"):], path=path, mode="r")
    return {k: group[k][:] for k in group.array_keys() if k.startswith(("model.", "lm_head."))}


def partly_done(spec: ExtractionSpec, shards: range) -> str:
    """Create the group and finish only some of its shards (what a killed run leaves)."""
    group = create_group(plan_extraction(spec))
    for shard in shards:
        extract_shard(spec, group, shard, log=lambda *_: None)
    return group.path


def test_rerun_with_other_shard_or_batch_size_rewrites_nothing(tiny_models, tmp_path):
    lake = new_lake(tmp_path, "lake")
    path = extract_gradients(spec_for(tiny_models["olmo2"], lake, shard_size=4, batch_size=2))
    before = files(lake, path)
    assert sum(1 for f in before if re.search(r"^model\.layers\.1\.mlp\.down_proj\.weight/c/\d+/\d+$", f)) == N // 2
    for shard_size, batch_size in [(8, 4), (6, 3), (12, 12), (2, 1), (24, 8)]:
        again = spec_for(tiny_models["olmo2"], lake, shard_size=shard_size, batch_size=batch_size)
        assert extract_gradients(again) == path
        assert files(lake, path) == before, f"shard {shard_size} / batch {batch_size} rewrote a file"
    rows = open_lake(lake).catalog().query("kind == 'gradients'")
    assert len(rows) == 1 and rows.iloc[0]["complete"]
    meta = rows.iloc[0]
    assert meta["chunks_done"] == meta["chunks_total"] == N // 2  # row-chunks of the first run's batch size


def test_shard_size_not_in_whole_chunks_is_refused_before_any_write(tiny_models, tmp_path):
    lake = new_lake(tmp_path, "lake")
    path = extract_gradients(spec_for(tiny_models["olmo2"], lake, shard_size=8, batch_size=4))
    before = files(lake, path)
    with pytest.raises(LakeError, match=r"shard_size 6 must be a multiple of 4, the chunk height .* use e\.g\. 8"):
        plan_extraction(spec_for(tiny_models["olmo2"], lake, shard_size=6, batch_size=2))
    state = extract_gradients(spec_for(tiny_models["olmo2"], lake, shard_size=6, batch_size=3), return_state=True)
    assert state.is_failed() and "chunk height" in str(state.result(raise_on_failure=False))
    assert files(lake, path) == before


@pytest.mark.parametrize("mode", ["store", "mean", "mean_normalized"])
def test_partial_group_finished_with_other_schedule(tiny_models, tmp_path, mode):
    """Four shards of 2 done with batches of 2; the rest done by shards of 8 in batches of 2, or of 12 in batches of 3."""
    model = tiny_models["olmo2"]
    first = dict(shard_size=2, batch_size=2, mode=mode)
    # Uninterrupted references: the first settings throughout, and the second batch size
    # throughout in a group of the same layout (created by the first settings' plan).
    ref_a = new_lake(tmp_path, "ref-a")
    path = extract_gradients(spec_for(model, ref_a, **first))
    ref_b = new_lake(tmp_path, "ref-b")
    partly_done(spec_for(model, ref_b, **first), range(0))
    extract_gradients(spec_for(model, ref_b, shard_size=12, batch_size=3, mode=mode))

    for second, expected in [(dict(shard_size=8, batch_size=2), [ref_a, ref_a]), (dict(shard_size=12, batch_size=3), [ref_a, ref_b])]:
        lake = new_lake(tmp_path, f"mixed-{second['batch_size']}")
        assert partly_done(spec_for(model, lake, **first), range(4)) == path  # samples 0-7 done, in chunks 0-3
        done = {f: v for f, v in files(lake, path).items() if (m := re.search(r"/c/(\d+)", f)) and int(m[1]) < 4}
        assert extract_gradients(spec_for(model, lake, mode=mode, **second)) == path
        assert {f: v for f, v in files(lake, path).items() if f in done} == done, "a finished chunk was rewritten"
        group = zarr.open_group(lake[len("file://"):], path=path, mode="r")
        assert group["shard_complete"][:].all() and open_lake(lake).catalog().query("kind == 'gradients'").iloc[0]["complete"]
        got, (head, tail) = arrays(lake, path), (arrays(expected[0], path), arrays(expected[1], path))
        for name, values in got.items():
            if mode == "store":  # sample 8 shares the batch 6-8 with finished ones: computed in it, written alone
                want = np.concatenate([head[name][:8], tail[name][8:]])
            elif name.endswith(".partial_sum"):  # one row per chunk of 2 samples
                want = np.concatenate([head[name][:4], tail[name][4:]])
            else:  # the mean: those chunks' sums added in chunk order, over N
                total = np.zeros(values.shape[0])
                for row in np.concatenate([head[f"{name}.partial_sum"][:4], tail[f"{name}.partial_sum"][4:]]):
                    total += row
                want = (total / N).astype(np.float32)
            np.testing.assert_array_equal(values, want, err_msg=f"{second} {name}")
            np.testing.assert_allclose(values, head[name], rtol=1e-5, atol=1e-6 * np.abs(head[name]).max(), err_msg=name)
    # The checks tell the batch sizes apart: chunk 4 (samples 8-9) differs in the last bits between them.
    a, b = arrays(ref_a, path), arrays(ref_b, path)
    lo, hi = (8, 10) if mode == "store" else (4, 5)
    assert any(not np.array_equal(a[k][lo:hi], b[k][lo:hi]) for k in a if mode == "store" or k.endswith(".partial_sum"))


def test_projection_groups_follow_the_same_rules(tiny_models, tmp_path):
    """On-the-fly and post-hoc projection groups are recognised under any shard size; a missing chunk is redone alone."""
    lake = new_lake(tmp_path, "lake")
    projection = ProjectionSpec(kind="rademacher", dim=32, scope="flat", seed=3)
    spec = spec_for(tiny_models["olmo2"], lake, shard_size=4, batch_size=2, projections=[projection])
    path = extract_gradients(spec)
    target = layout.projection_group_path(path, projection.label)
    before = {p: files(lake, p) for p in (path, target)}
    assert extract_gradients(spec.model_copy(update={"shard_size": 12, "batch_size": 6})) == path
    post = ProjectSpec(gradients=path, projection=projection, shard_size=8, lake=lake)
    assert project_gradients(post) == target
    assert {p: files(lake, p) for p in (path, target)} == before

    group = zarr.open_group(lake[len("file://"):], path=target, mode="r+")
    kept = group["flat"][:]
    group["shard_complete"][3] = 0  # samples 6-7
    group["flat"][6:8] = 0
    with pytest.raises(LakeError, match="multiple of 2"):
        project_gradients(post.model_copy(update={"shard_size": 5}))
    assert project_gradients(post) == target
    after = files(lake, target)
    changed = sorted(f for f in after if after[f] != before[target].get(f))
    assert changed == ["chunk_digest/c/3", "flat/c/3/0", "shard_complete/c/3"], changed
    np.testing.assert_allclose(group["flat"][:], kept, rtol=1e-5, atol=1e-6 * np.abs(kept).max())
    assert files(lake, path) == before[path]


def test_progress_lines_at_most_every_ten_seconds():
    now, lines = [0.0], []
    progress = Progress(100, "samples", lines.append, clock=lambda: now[0])
    for t in (1, 4, 9):  # fast batches: nothing until 10 s have passed
        now[0] = t
        assert not progress.add(4)
    now[0] = 10.0
    assert progress.add(4) and lines == ["16/100 samples (16%), 1.60 samples/s, ETA 52s"]
    for t in (25.0, 40.0):  # slow batches: a line for every one
        now[0] = t
        assert progress.add(4)
    assert len(lines) == 3 and lines[-1].startswith("24/100 samples") and "ETA 2m07s" in lines[-1]
    now[0] = 120.0
    progress.add(76)
    assert lines[-1].endswith("done in 2m00s")


def test_flow_progress_artifact_and_shard_names(tiny_models, tmp_path, prefect_server):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    lake = new_lake(tmp_path, "lake")
    spec = spec_for(tiny_models["olmo"], lake, shard_size=8, batch_size=4).model_copy(update={"layers": ["lm_head.weight"]})
    state = extract_gradients(spec, return_state=True)
    assert state.is_completed()
    APILogHandler().flush()
    run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])))
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
        logs = [entry.message for entry in client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))]
    progress = [a for a in artifacts if a.type == "progress"]
    assert len(progress) == 1 and float(progress[0].data) == 100.0, [(a.type, a.data) for a in artifacts]
    shard_runs = sorted(t.name for t in tasks if t.name.startswith("extract-"))
    assert shard_runs == ["extract-original-shard-0", "extract-original-shard-1", "extract-original-shard-2"]
    assert any(m.startswith("original: 1/3 shards (33%)") and "ETA" in m for m in logs), logs
    assert any(m.startswith("original shard 2 (samples 16-23): computed 8/8 samples") for m in logs), logs
