"""Token-budget batching: every sample once, within the budget, and the same gradients as batches in dataset order."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import write_probe
from gradlake.lake import open_lake
from gradlake.lake.gradients import GradientGroup
from gradlake.tasks.gradients import batching, extract, plan
from gradlake.tasks.gradients.batching import padded_tokens, shard_batches
from gradlake.tasks.gradients.plan import ExtractionSpec, create_group, plan_extraction
from gradlake.tasks.gradients.extract import extract_shard, pending_shards
from gradlake.tasks.common.model import ModelSpec

N = 24


def test_every_sample_once_within_budget_longest_first():
    lengths = np.random.default_rng(0).integers(5, 300, size=61)
    for budget, most in [(600, 8), (1000, 3), (50, 8), (10**6, 8)]:
        batches = shard_batches(lengths, 100, most, budget)
        rows = np.concatenate(batches)
        assert sorted(rows.tolist()) == list(range(100, 161)), (budget, most)
        for b in batches:
            assert len(b) <= most
            assert len(b) == 1 or len(b) * lengths[b - 100].max() <= budget  # a sample over the budget runs alone
        firsts = [lengths[b[0] - 100] for b in batches]
        assert firsts == sorted(firsts, reverse=True)  # longest first
        assert shard_batches(lengths, 100, most, budget) is not batches
        assert all((x == y).all() for x, y in zip(batches, shard_batches(lengths, 100, most, budget)))
    # Sorting packs: far less padding than dataset order on varied lengths.
    assert padded_tokens(lengths, shard_batches(lengths, 0, 8, 4096)) < 0.8 * padded_tokens(lengths, shard_batches(lengths, 0, 8))


def test_dataset_order_and_windows():
    lengths = np.arange(1, 21)
    assert [b.tolist() for b in shard_batches(lengths, 40, 8)] == [list(range(40, 48)), list(range(48, 56)), list(range(56, 60))]
    windowed = shard_batches(lengths, 0, 8, 10**6, window_rows=6)
    for b in windowed:  # no batch crosses a window
        assert len({int(i) // 6 for i in b}) == 1
    assert sorted(np.concatenate(windowed).tolist()) == list(range(20))
    assert batching.window_chunks(4, 1 << 20, window_bytes=10 << 20) == 2
    assert batching.window_chunks(4, 1 << 30, window_bytes=10 << 20) == 1
    with pytest.raises(ValueError, match="token budget must be at least 1"):
        shard_batches(lengths, 0, 8, 0)


def run(spec: ExtractionSpec) -> GradientGroup:
    """Plan, create and compute every shard without Prefect; the gradient group, finalized."""
    group = create_group(plan_extraction(spec))
    for shard in pending_shards(spec, group):
        extract_shard(spec, group, shard, log=lambda *_: None)
    for target in plan.projection_groups(spec, group.store, group.path):
        assert target.finalize()
    assert group.finalize()
    return group


def spec_for(model_dir, lake, **kw) -> ExtractionSpec:
    defaults = dict(dataset="probe", shard_size=12, batch_size=4, max_length=256)
    return ExtractionSpec(model=ModelSpec(model=str(model_dir), checkpoint="checkpoint-1"), lake=lake, **{**defaults, **kw})


@pytest.mark.parametrize("mode", ["store", "mean"])
def test_packed_batches_match_dataset_order_and_repeat_bitwise(tiny_models, tmp_path, monkeypatch, mode):
    lakes = {}
    for name, kw in [("order", dict(token_budget=None)), ("packed", dict(token_budget=700)), ("again", dict(token_budget=700)),
                     ("windows", dict(token_budget=700))]:
        lakes[name] = f"file://{tmp_path / name}"
        write_probe(lakes[name], N)
        if name == "windows":  # a window of one chunk: rows of a chunk never wait for another window
            monkeypatch.setattr(extract, "WINDOW_BYTES", 1)
        extra = [] if mode != "store" else [{"kind": "sparse", "scope": "flat", "dim": 64}]
        run(spec_for(tiny_models["olmo2"], lakes[name], mode=mode, projections=extra, **kw))
    got = {name: open_lake(url).gradients(dataset="probe", mode=mode) for name, url in lakes.items()}
    names = [v for v in got["order"].data_vars if v not in ("sample", "input_ids", "label_mask", "n_tokens", "shard_complete", "chunk_digest")]
    assert len(names) > 10
    for v in names:
        want = got["order"][v].values
        assert np.isfinite(want).all()
        np.testing.assert_allclose(got["packed"][v].values, want, rtol=2e-4, atol=1e-6 * np.abs(want).max(), err_msg=v)
        np.testing.assert_array_equal(got["again"][v].values, got["packed"][v].values, err_msg=v)
        np.testing.assert_allclose(got["windows"][v].values, want, rtol=2e-4, atol=1e-6 * np.abs(want).max(), err_msg=v)
    if mode == "store":
        proj = {name: open_lake(url).projections(dataset="probe", kind="sparse")["flat"].values for name, url in lakes.items()}
        np.testing.assert_array_equal(proj["again"], proj["packed"])
        np.testing.assert_allclose(proj["packed"], proj["order"], rtol=2e-4, atol=1e-6 * np.abs(proj["order"]).max())
