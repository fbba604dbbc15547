"""Score groups are read through the checked reader, their completion flags are one checked object per block, and
every attribution metric says how many queries it used and why it left the others out."""

from __future__ import annotations

import os

import numpy as np
import pytest
import zarr

from conftest import write_probe
from gradlake.lake import LakeError, open_lake
from gradlake.lake.scores import ScoreGroup
from gradlake.lake.store import LakeStore
from gradlake.lake.verify import verify_lake, verify_score_group
from test_verify import SCORES, score_lake


def lake_with_scores(tmp_path) -> tuple[str, ScoreGroup]:
    """A lake holding one complete 4 x 6 score group in 2 x 2 blocks of 2 x 3 (test_verify's), and the group."""
    url = score_lake(tmp_path)
    return url, ScoreGroup.open(LakeStore(url), SCORES)


def damage(path, how: str) -> None:
    if how == "deleted":
        os.remove(path)
    else:
        path.write_bytes(np.random.default_rng(0).bytes(path.stat().st_size))


@pytest.mark.parametrize("how", ["deleted", "damaged"])
def test_a_missing_or_damaged_score_chunk_is_one_error_for_every_reader(tmp_path, how):
    """Before: `row_blocks` read the chunks unchecked (a deleted one came back as NaN rows, a damaged one as zarr's
    own checksum error)."""
    url, _ = lake_with_scores(tmp_path)
    damage(tmp_path / "lake" / SCORES / "scores" / "c" / "1" / "1", how)
    group = ScoreGroup.open(LakeStore(url), SCORES)
    readers = {"lake.scores()": lambda: open_lake(url).scores("grad-dot"), "row_blocks": lambda: list(group.row_blocks()),
               "check": group.check}
    for name, read in readers.items():
        with pytest.raises(LakeError) as err:
            read()
        said = str(err.value)
        assert "\n" not in said and SCORES in said and "scores/c/1/1" in said and "gradlake verify --repair" in said, \
            (name, said)


def test_score_flags_are_one_checked_object_per_block_named_and_repaired(tmp_path):
    """Before: one zstd object for every flag, without a checksum (random bytes over it could decode); groups written
    that way are still read, verified and repaired."""
    url, group = lake_with_scores(tmp_path)
    flags = group.group["block_complete"]
    assert flags.chunks == (1, 1) and [type(c).__name__ for c in flags.compressors] == ["Crc32cCodec"]
    assert sorted(p.relative_to(tmp_path / "lake" / SCORES).as_posix() for p in
                  (tmp_path / "lake" / SCORES / "block_complete" / "c").rglob("*") if p.is_file()) == \
        [f"block_complete/c/{qb}/{tb}" for qb in range(2) for tb in range(2)]
    damage(tmp_path / "lake" / SCORES / "block_complete" / "c" / "0" / "1", "damaged")  # a flag over a good block
    damage(tmp_path / "lake" / SCORES / "block_complete" / "c" / "1" / "0", "damaged")  # a flag over a damaged block
    damage(tmp_path / "lake" / SCORES / "scores" / "c" / "1" / "0", "damaged")
    with pytest.raises(LakeError, match=r"block_complete/c/0/1 is damaged \(its checksum does not match\)"):
        ScoreGroup.open(LakeStore(url), SCORES).pending_blocks()
    finding = verify_score_group(LakeStore(url), SCORES)
    said = "; ".join(finding.problems)
    assert finding.status == "damaged" and "block_complete/c/0/1" in said and "block_complete/c/1/0" in said, said
    assert "scores/c/1/0" in said and "scores/c/0/1" not in said, said
    assert verify_score_group(LakeStore(url), SCORES, repair=True).repaired
    repaired = ScoreGroup.open(LakeStore(url), SCORES)
    assert repaired.pending_blocks() == [(1, 0)] and not repaired.meta["complete"]
    assert verify_score_group(LakeStore(url), SCORES).status == "ok"
    # groups written before per-block flags (one object for every flag, no checksum) still read, verify and repair
    tmp_path = tmp_path / "older"
    url, group = lake_with_scores(tmp_path)
    del group.group["block_complete"]
    old = group.group.create_array("block_complete", shape=(2, 2), chunks=(2, 2), dtype="uint8", fill_value=0,
                                   dimension_names=("query_block", "train_block"))
    old[:] = 1
    store = LakeStore(url)
    assert ScoreGroup.open(store, SCORES).pending_blocks() == [] and verify_score_group(store, SCORES).status == "ok"
    assert open_lake(url).scores("grad-dot").shape == (4, 6)
    damage(tmp_path / "lake" / SCORES / "block_complete" / "c" / "0" / "0", "damaged")
    damage(tmp_path / "lake" / SCORES / "scores" / "c" / "0" / "1", "deleted")
    finding = verify_score_group(store, SCORES, repair=True)
    assert finding.repaired and "block_complete/c/0/0" in finding.problems[0], finding.problems
    assert ScoreGroup.open(store, SCORES).pending_blocks() == [(0, 1)]
    assert zarr.open_array(store.zarr_store, path=f"{SCORES}/block_complete", mode="r").chunks == (2, 2)


def test_metrics_say_how_many_queries_they_used_and_why_they_left_others_out():
    """Before: LDS dropped NaN queries without a word, and top-1 took the argmax of NaN rows (0.25 from nothing)."""
    from gradlake.tasks.attribution.benchmark import retrieval_top1
    from gradlake.tasks.attribution.lds import dropped_text, lds
    from gradlake.tasks.attribution.queries import QuerySet

    rng = np.random.default_rng(0)
    masks, losses = rng.random((6, 8)) > 0.5, rng.random((6, 4))
    scores = rng.normal(size=(4, 8))
    scores[2, 3] = np.nan
    result = lds(scores, masks, losses, n_boot=20)
    assert result["n_queries"] == 3 and result["dropped"] == {"non-finite scores": 1}, result["dropped"]
    assert dropped_text(result["dropped"]) == "non-finite scores for 1 query" and np.isfinite(result["lds"])
    nan = np.full((4, 8), np.nan)
    everything = lds(nan, masks, losses, n_boot=20)
    assert np.isnan(everything["lds"]) and everything["n_queries"] == 0
    assert everything["dropped"] == {"non-finite scores": 4}
    queries = QuerySet("paraphrased", "probe", "paraphrased", [f"q{i}" for i in range(4)], [], [0, 1, None, 3])
    value, used, dropped = retrieval_top1(nan, queries, [f"t{i}" for i in range(8)])
    assert np.isnan(value) and used == 0, value
    assert dropped == {"no source among the training samples": 1, "non-finite scores": 3}
    finite = rng.normal(size=(4, 8))
    finite[0, 0] = 9.0
    assert retrieval_top1(finite, queries, [f"t{i}" for i in range(8)])[1:] == (3, {"no source among the training samples": 1})


def test_a_tie_at_the_top_is_worth_chance_not_the_first_sample():
    """A row of equal scores (BM25 with no word in common) once counted as found when the source came first."""
    from gradlake.tasks.attribution.benchmark import retrieval_top1
    from gradlake.tasks.attribution.queries import QuerySet

    queries = QuerySet("paraphrased", "probe", "paraphrased", ["q0", "q1", "q2"], [], [0, 1, 2])
    scores = np.zeros((3, 4))
    scores[1, [1, 3]] = 2.0  # q1: its source tied with one other sample at the top
    scores[2, 0] = 1.0  # q2: another sample alone at the top
    value, used, _ = retrieval_top1(scores, queries, [f"t{i}" for i in range(4)])
    assert used == 3 and value == pytest.approx((1 / 4 + 1 / 2 + 0) / 3)


def test_constant_scores_are_named_as_the_reason_a_query_has_no_lds():
    from gradlake.tasks.attribution.lds import dropped_text, lds

    rng = np.random.default_rng(1)
    masks, losses = rng.random((8, 10)) > 0.5, rng.random((8, 3))
    scores = rng.normal(size=(3, 10))
    scores[1] = 0.0
    losses[:, 2] = 1.0
    result = lds(scores, masks, losses, n_boot=10)
    assert result["n_queries"] == 1 and dropped_text(result["dropped"]) == (
        "the same retrained loss on every subset for 1 query; the same summed score on every subset (constant scores) "
        "for 1 query")


def test_influence_refuses_a_damaged_flag_and_after_repair_recomputes_what_it_covered(tiny_models, tmp_path):
    """Before: with a flag object damaged (or deleted) the rerun said "complete in the lake; nothing to do" while the
    block it covered stayed damaged."""
    from typer.testing import CliRunner

    from gradlake.flows.cli import app
    from gradlake.tasks.common.model import ModelSpec
    from gradlake.tasks.influence.compute import compute_influence
    from gradlake.tasks.influence.spec import InfluenceSpec

    lake = str(tmp_path / "lake")
    write_probe(lake, 8)
    mlp = "model.layers.*.mlp.down_proj.weight"
    spec = InfluenceSpec(model=ModelSpec(model=str(tiny_models["olmo2"]), checkpoint="checkpoint-1", device="cpu"),
                         lake=lake, dataset="probe", max_queries=2, layers=[mlp], max_length=256, strategy="identity",
                         train_block=4)
    path = compute_influence(spec, log=lambda _: None)
    store = LakeStore(lake)
    before = ScoreGroup.open(store, path).read()
    group_dir = tmp_path / "lake" / path
    damage(group_dir / "block_complete" / "c" / "0" / "1", "damaged")
    damage(group_dir / "scores" / "c" / "0" / "1", "damaged")
    result = CliRunner().invoke(app, ["influence", "--spec", spec.model_dump_json()])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and "block_complete/c/0/1" in lines[0], result.output
    assert "gradlake verify --repair" in lines[0]
    table = verify_lake(store, repair=True, log=lambda _: None)
    assert table.loc[table["path"] == path, "repaired"].item(), table
    said: list[str] = []
    compute_influence(spec, log=said.append)
    assert [line.split(":")[0] for line in said if line.startswith("scores block")] == ["scores block (0, 1) written"]
    np.testing.assert_array_equal(ScoreGroup.open(store, path).read(), before)
    os.remove(group_dir / "block_complete" / "c" / "0" / "0")  # a flag object gone: its block is not written
    said.clear()
    compute_influence(spec, log=said.append)
    assert not any("nothing to do" in line for line in said), said
    assert [line.split(":")[0] for line in said if line.startswith("scores block")] == ["scores block (0, 0) written"]
    np.testing.assert_array_equal(ScoreGroup.open(store, path).read(), before)
    assert verify_score_group(store, path).status == "ok"
