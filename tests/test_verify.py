"""Nothing silently wrong: damaged chunks and metadata are found, named, repaired and recomputed to the same bytes.

Each case damages a real extraction the way a disk, a bucket or a careless hand would, then checks
that `gradlake verify` (and a plain read) notices, that `--repair` clears exactly the damaged
row-chunks, and that the next run restores arrays bitwise equal to an undamaged run.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

from conftest import write_probe
from gradlake.flows.cli import app
from gradlake.lake import layout, open_lake
from gradlake.lake.gradient_plan import NOT_GRADIENTS
from gradlake.lake.gradients import GradientGroup
from gradlake.lake.integrity import read_checked
from gradlake.lake.store import LakeError, LakeStore
from gradlake.lake.verify import verify_lake
from gradlake.tasks.gradients.plan import ExtractionSpec, create_group, plan_extraction
from gradlake.tasks.gradients.extract import extract_shard, finalize_task, pending_shards
from gradlake.tasks.common.model import ModelSpec
from gradlake.tasks.projection.spec import ProjectionSpec
from gradlake.tasks.projection.stored import ProjectSpec, create_projection_group

N = 8
# An embedding's gradient is zero on most rows: those chunks must still be stored (and checked).
LAYERS = ["model.embed_tokens.weight", "model.layers.1.mlp.down_proj.weight", "model.norm.weight"]


def extract(model_dir: Path, lake: str, mode: str = "store", object_mb: int = 0) -> str:
    spec = ExtractionSpec(model=ModelSpec(model=str(model_dir), checkpoint="checkpoint-1"), dataset="probe", mode=mode,
                          layers=LAYERS, shard_size=4, batch_size=2, max_length=128, lake=lake, object_mb=object_mb)
    group = create_group(plan_extraction(spec))
    for shard in pending_shards(spec, group):
        extract_shard(spec, group, shard, log=lambda *_: None)
    finalize_task.fn(lake, [group.path])
    return group.path


def arrays(lake: str, path: str) -> dict[str, np.ndarray]:
    group = zarr.open_group(LakeStore(lake).zarr_store, path=path, mode="r")
    return {name: np.asarray(array[:]) for name, array in group.arrays()}


@pytest.fixture(scope="module", params=["chunks", "shards"])
def clean(tiny_models, tmp_path_factory, request):
    """One undamaged extraction, copied for every case; "shards": its wide arrays hold several
    column chunks per object (the chunk size shrunk so that the tiny model's tensors have several)."""
    root = tmp_path_factory.mktemp("clean")
    lake = f"file://{root}/lake"
    write_probe(lake, N)
    with pytest.MonkeyPatch.context() as patch:
        if request.param == "shards":
            patch.setattr(layout, "CHUNK_BYTES", 2 << 10)
        path = extract(tiny_models["olmo2"], lake, object_mb=int(request.param == "shards"))
    group = zarr.open_group(LakeStore(lake).zarr_store, path=path, mode="r")
    assert (group[LAYERS[1]].shards is not None) is (request.param == "shards")
    return root / "lake", path, arrays(lake, path)


@pytest.fixture
def lake(clean, tmp_path):
    source, path, _ = clean
    shutil.copytree(source, tmp_path / "lake")
    return f"file://{tmp_path}/lake", tmp_path / "lake" / path


def chunk_file(group_dir: Path, array: str, row_chunk: int) -> Path:
    path = group_dir / array / "c" / str(row_chunk)
    return path if path.is_file() else sorted(path.iterdir())[0]  # a 1-D array's chunk, or a row's first object


def verify(url: str, *flags: str):
    return CliRunner().invoke(app, ["verify", "--lake", url, *flags])


def test_clean_lake_verifies(lake, clean):
    url, _ = lake
    result = verify(url)
    assert result.exit_code == 0, result.output
    table = verify_lake(LakeStore(url), log=lambda *_: None)
    assert set(table["status"]) == {"ok"} and {"gradients", "dataset"} <= set(table["kind"])
    assert result.output.splitlines()[-1] == f"{len(table)} checked: {len(table)} ok"  # the verdict last
    # every row-chunk of the zero-heavy embedding gradient is an object: none was skipped as "empty"
    assert len(list((Path(url[7:]) / clean[1] / LAYERS[0] / "c").iterdir())) == N // 2


@pytest.mark.parametrize("damage", ["garbage", "deleted", "truncated"])
def test_damaged_chunk_is_found_named_repaired_and_recomputed(lake, clean, tiny_models, damage):
    url, group_dir = lake
    target = chunk_file(group_dir, LAYERS[1], 2)
    if damage == "garbage":  # same size, so nothing but a checksum can tell
        target.write_bytes(np.random.default_rng(0).bytes(target.stat().st_size))
    elif damage == "deleted":
        target.unlink()
    else:
        target.write_bytes(target.read_bytes()[:17])

    if damage != "deleted":  # a plain read (zarr, xarray) fails loudly instead of returning the garbage
        with pytest.raises(ValueError):
            open_lake(url).gradients(dataset="probe")[LAYERS[1]].values
    else:  # a missing chunk reads as NaN (the fill value of a checked group), never as plausible zeros
        values = open_lake(url).gradients(dataset="probe")[LAYERS[1]].values
        array = zarr.open_group(LakeStore(url).zarr_store, path=clean[1], mode="r")[LAYERS[1]]
        width = (array.shards or array.chunks)[1]  # the columns the deleted object held
        assert np.isnan(values[4:6, :width]).all() and not np.isnan(values[4:6, width:]).any()
        assert not np.isnan(values[:4]).any()
    # gradlake's own readers (evaluation, projection, attribution) say which group, array and chunk
    array = zarr.open_group(LakeStore(url).zarr_store, path=clean[1], mode="r")[LAYERS[1]]
    with pytest.raises(LakeError) as err:
        read_checked(array, slice(None))
    assert clean[1] in str(err.value) and LAYERS[1] in str(err.value) and "\n" not in str(err.value)
    if damage != "deleted":
        assert f"chunk object {LAYERS[1]}/c/2/0 is damaged" in str(err.value), err.value

    result = verify(url)
    assert result.exit_code == 1, result.output
    assert clean[1] in result.output and "row-chunk 2 (samples 4-5)" in result.output, result.output

    result = verify(url, "--repair")
    assert result.exit_code == 0, result.output
    group = GradientGroup.open(LakeStore(url), clean[1])
    assert group.pending_chunks() == [2]  # exactly the damaged chunk is to be redone
    assert not open_lake(url).catalog().query("kind == 'gradients'")["complete"].any()

    extract(tiny_models["olmo2"], url)  # the next run recomputes that chunk alone
    after = arrays(url, clean[1])
    assert after.keys() == clean[2].keys()
    for name, value in clean[2].items():
        assert np.array_equal(after[name], value), name
    assert verify(url).exit_code == 0


def test_swapped_chunk_fails_its_digest(lake, clean):
    """Two valid chunk objects exchanged: each passes its checksum, the recorded digests tell."""
    url, group_dir = lake
    a, b = chunk_file(group_dir, LAYERS[1], 0), chunk_file(group_dir, LAYERS[1], 1)
    data_a, data_b = a.read_bytes(), b.read_bytes()
    a.write_bytes(data_b)
    b.write_bytes(data_a)
    table = verify_lake(LakeStore(url), log=lambda *_: None)
    row = table.query("kind == 'gradients'").iloc[0]
    assert row["status"] == "damaged" and row["damaged_chunks"] == 2 and "digest" in row["problem"]


def test_changed_shape_in_array_metadata_is_found(lake, clean):
    url, group_dir = lake
    meta_file = group_dir / LAYERS[2] / "zarr.json"
    meta = json.loads(meta_file.read_text())
    meta["shape"] = [meta["shape"][0], meta["shape"][1] + 1]
    meta_file.write_text(json.dumps(meta))
    result = verify(url)
    assert result.exit_code == 1 and "in its zarr.json" in result.output and LAYERS[2] in result.output
    assert verify(url, "--repair").exit_code == 1  # metadata is not repaired by clearing flags
    with pytest.raises(LakeError, match=r"is damaged: array 'model.norm.weight' is \(8, 65\)"):
        finalize_task.fn(url, [clean[1]])  # a run does not call it complete either


def test_damaged_group_metadata_is_one_line_and_the_catalog_still_lists_the_rest(lake, clean, tiny_models, tmp_path):
    url, group_dir = lake
    (group_dir / "zarr.json").write_text('{"zarr_format": 3, "node_type": "gro')  # truncated
    write_probe(url, N, name="other")
    catalog = open_lake(url).catalog()
    row = catalog.query("kind == 'gradients'").iloc[0]
    assert not row["complete"] and "zarr.json is not valid JSON" in row["damaged"]
    assert "other" in set(catalog.query("kind == 'dataset'")["dataset"])
    with pytest.raises(LakeError, match=r"damaged metadata: .*/zarr.json is not valid JSON") as err:
        extract(tiny_models["olmo2"], url)
    assert "\n" not in str(err.value)
    result = verify(url)
    assert result.exit_code == 1 and "not valid JSON" in result.output


def test_mean_mode_groups_are_checked_too(tiny_models, tmp_path):
    url = f"file://{tmp_path}/lake"
    write_probe(url, N)
    path = extract(tiny_models["olmo2"], url, mode="mean")
    before = arrays(url, path)
    target = chunk_file(Path(url[7:]) / path, f"{LAYERS[1]}.partial_sum", 3)
    target.write_bytes(target.read_bytes()[::-1])
    result = verify(url, "--repair")
    assert result.exit_code == 0 and "row-chunk 3" in result.output, result.output
    extract(tiny_models["olmo2"], url, mode="mean")
    after = arrays(url, path)
    for name in before:
        assert np.array_equal(after[name], before[name], equal_nan=True), name
    assert set(before) - set(NOT_GRADIENTS)  # gradients were compared, not only bookkeeping


def test_damaged_score_block_and_changed_dataset_are_found(tmp_path):
    import pandas as pd

    from gradlake.lake.scores import ScoreGroup

    url = f"file://{tmp_path}/lake"
    write_probe(url, N)
    store = LakeStore(url)
    path = "attribution/m/c/probe/probe.paraphrased/grad-dot"
    scores = ScoreGroup.create(store, path, [f"q{i}" for i in range(4)], [f"t{i}" for i in range(6)],
                               {"settings": {}}, query_rows=2, train_cols=3)
    for qb in range(2):
        scores.write_rows(2 * qb, np.arange(12, dtype=np.float32).reshape(2, 6) + qb)
    scores.finish()
    assert verify(url).exit_code == 0
    block = tmp_path / "lake" / path / "scores" / "c" / "1" / "0"
    data = bytearray(block.read_bytes())
    data[3] ^= 0xFF
    block.write_bytes(bytes(data))
    parquet = next((tmp_path / "lake" / "datasets" / "probe" / "original").glob("*/data.parquet"))
    frame = pd.read_parquet(parquet)
    frame.loc[0, "messages"] = frame.loc[1, "messages"]
    frame.to_parquet(parquet, index=False)

    result = verify(url, "--repair")
    assert result.exit_code == 1, result.output  # the dataset cannot be repaired by flags
    assert "block (1, 0) (queries 2-3, training samples 0-2): chunk object scores/c/1/0 is damaged" in result.output
    assert "does not hash to" in result.output
    assert ScoreGroup.open(store, path).pending_blocks() == [(1, 0)]  # exactly the damaged block is to be redone


@pytest.mark.parametrize("array,damage", [("input_ids", "garbage"), ("sample", "garbage"), ("n_tokens", "garbage"),
                                          ("n_tokens", "deleted"), ("label_mask", "deleted")])
def test_every_array_of_a_group_is_verified_and_readers_name_it(lake, clean, tiny_models, array, damage):
    """The tokens and bookkeeping, not only the gradient values: checked against digests recorded at creation."""
    url, group_dir = lake
    target = chunk_file(group_dir, array, 0)
    if damage == "garbage":
        target.write_bytes(np.random.default_rng(1).bytes(target.stat().st_size))
    else:
        target.unlink()
    result = verify(url)
    assert result.exit_code == 1, result.output
    assert f"array '{array}'" in result.output, result.output
    assert verify(url, "--repair").exit_code == 1  # tokens are not recomputed by clearing flags: named, not hidden
    if array in ("sample", "n_tokens"):  # proven on every open of the analyst API
        with pytest.raises(LakeError, match=f"{clean[1]}/{array}") as err:
            open_lake(url).gradients(dataset="probe")
        assert "\n" not in str(err.value)
    elif damage == "garbage":  # read on demand: the damaged chunk object is named, not a raw checksum error
        with pytest.raises(LakeError, match=rf"chunk object {array}/c/0/0 is damaged"):
            open_lake(url).gradients(dataset="probe")[array].values
        GradientGroup.open(LakeStore(url), clean[1]).clear([0])  # an extraction that must read those tokens
        with pytest.raises(LakeError, match=rf"{clean[1]}/{array}: chunk object {array}/c/0/0 is damaged .*remove "
                           "the group and extract again"):
            extract(tiny_models["olmo2"], url)
    if damage == "garbage" and array in ("sample", "input_ids"):  # a projection copies them: checked, never carried over
        with pytest.raises(LakeError, match=f"{clean[1]}/{array}"):
            create_projection_group(ProjectSpec(lake=url, gradients=clean[1], projection=ProjectionSpec(dim=16, scope="flat")))


@pytest.mark.parametrize("what", ["group", "array"])
def test_deleted_group_or_array_metadata_is_named(lake, clean, what):
    url, group_dir = lake
    (group_dir / ("zarr.json" if what == "group" else "n_tokens/zarr.json")).unlink()
    result = verify(url)
    assert result.exit_code == 1, result.output
    expected = "zarr.json is missing while" if what == "group" else "array 'n_tokens' is missing"
    assert expected in result.output and clean[1] in result.output, result.output


@pytest.mark.parametrize("array", ["shard_complete", "chunk_digest"])
def test_damaged_flag_or_digest_object_is_named_repaired_and_the_rerun_works(lake, clean, tiny_models, array):
    url, group_dir = lake
    target = group_dir / array / "c" / "1"
    target.write_bytes(b"\x07" * target.stat().st_size)
    result = verify(url)
    assert result.exit_code == 1 and f"chunk object {array}/c/1 is damaged" in result.output, result.output
    result = verify(url, "--repair")
    assert result.exit_code == 0, result.output
    group = GradientGroup.open(LakeStore(url), clean[1])
    # a damaged flag over values that still prove their digest is restored; a damaged digest proves nothing
    assert group.pending_chunks() == ([] if array == "shard_complete" else [1])
    extract(tiny_models["olmo2"], url)
    after = arrays(url, clean[1])
    for name, value in clean[2].items():
        assert np.array_equal(after[name], value), name
    assert verify(url).exit_code == 0


def test_a_missing_flag_object_of_a_complete_group_is_named_restored_or_recomputed(lake, clean, tiny_models):
    """Before: a deleted shard_complete object reads 0 and verify said ok, though the group is marked complete."""
    url, group_dir = lake
    (group_dir / "shard_complete" / "c" / "1").unlink()  # over values that still prove their digest
    (group_dir / "shard_complete" / "c" / "2").unlink()  # over a damaged chunk
    target = chunk_file(group_dir, LAYERS[1], 2)
    target.write_bytes(b"\x07" * target.stat().st_size)
    result = verify(url)
    assert result.exit_code == 1 and "shard_complete/c/1 is missing" in result.output, result.output
    assert verify(url, "--repair").exit_code == 0
    assert GradientGroup.open(LakeStore(url), clean[1]).pending_chunks() == [2]
    extract(tiny_models["olmo2"], url)
    after = arrays(url, clean[1])
    for name, value in clean[2].items():
        assert np.array_equal(after[name], value), name
    assert verify(url).exit_code == 0


SCORES = "attribution/m/c/probe/probe.paraphrased/grad-dot"


def score_lake(tmp_path) -> str:
    """A lake holding one complete 4 x 6 score group in 2 x 3 blocks."""
    from gradlake.lake.scores import ScoreGroup

    url = f"file://{tmp_path}/lake"
    scores = ScoreGroup.create(LakeStore(url), SCORES, [f"q{i}" for i in range(4)], [f"t{i}" for i in range(6)],
                               {"settings": {}, "method": "grad-dot"}, query_rows=2, train_cols=3)
    for qb in range(2):
        scores.write_rows(2 * qb, np.arange(12, dtype=np.float32).reshape(2, 6) + qb)
    scores.finish()
    return url


def test_deleted_score_chunk_is_one_error_naming_its_block(tmp_path):
    url, path = score_lake(tmp_path), SCORES
    assert open_lake(url).scores("grad-dot").shape == (4, 6)
    (tmp_path / "lake" / path / "scores" / "c" / "1" / "1").unlink()
    with pytest.raises(LakeError, match=r"block \(1, 1\) \(queries 2-3, training samples 3-5\) reads as NaN") as err:
        open_lake(url).scores("grad-dot")
    assert "\n" not in str(err.value)


def test_a_chunk_a_live_worker_holds_is_in_progress_never_damaged_nor_cleared(lake, clean):
    """A chunk under a live lease may be mid-rewrite: reported "in progress", its flag left alone."""
    from gradlake.lake import claims

    url, group_dir = lake
    target = chunk_file(group_dir, LAYERS[1], 2)
    target.write_bytes(target.read_bytes()[:17])  # what a reader may meet while the chunk is being written
    key = layout.lease_claim(clean[1], 2)
    assert claims.take(LakeStore(url), key, "worker", 600)  # held by a live process (this one)
    for flags in ((), ("--repair",)):
        result = verify(url, *flags)
        assert result.exit_code == 0 and "in progress" in result.output and "damaged" not in result.output.split(
            "problem", 1)[-1], result.output
    assert GradientGroup.open(LakeStore(url), clean[1]).pending_chunks() == []  # nothing cleared
    claims.release(LakeStore(url), key)  # the worker gone without rewriting it: now it is damage
    result = verify(url, "--repair")
    assert result.exit_code == 0 and "row-chunk 2" in result.output, result.output
    assert GradientGroup.open(LakeStore(url), clean[1]).pending_chunks() == [2]


@pytest.mark.parametrize("also_deleted", [False, True])
def test_damaged_score_flags_are_named_and_rewritten_from_the_blocks_that_check(tmp_path, also_deleted):
    from gradlake.lake.scores import ScoreGroup

    url = score_lake(tmp_path)
    flags = tmp_path / "lake" / SCORES / "block_complete" / "c" / "0" / "0"
    flags.write_bytes(b"\x07" * flags.stat().st_size)
    if also_deleted:
        (tmp_path / "lake" / SCORES / "scores" / "c" / "0" / "1").unlink()
    result = verify(url)
    assert result.exit_code == 1 and "block_complete/c/0/0" in result.output, result.output
    assert verify(url, "--repair").exit_code == 0
    assert ScoreGroup.open(LakeStore(url), SCORES).pending_blocks() == ([(0, 1)] if also_deleted else [])
