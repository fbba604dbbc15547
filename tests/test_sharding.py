"""Zarr v3 sharding of wide gradient arrays (`object_mb`): a row-chunk's column chunks share objects.

The chunk size is shrunk so that the tiny model's tensors span several column chunks, as a 7B
model's do at the real sizes.
"""

from __future__ import annotations

import math
import uuid

import numpy as np
import pytest
import zarr

from conftest import write_probe
from gradlake.lake import layout, open_lake
from gradlake.lake.gradient_plan import GradientPlan
from gradlake.lake.gradients import GradientGroup
from gradlake.lake.integrity import read_checked
from gradlake.lake.store import LakeError, LakeStore
from gradlake.lake.verify import verify_lake
from gradlake.tasks.evaluate.similarity import array_dots
from test_batching import run, spec_for

N = 8
LAYERS = ["model.embed_tokens.weight", "model.layers.1.mlp.down_proj.weight", "model.norm.weight"]


def test_shard_columns_gather_whole_column_chunks_within_the_object_size():
    object_bytes = 256 << 20
    for rows, numel, itemsize in [(8, 4096 * 11008, 2), (8, 100278 * 4096, 2), (1, 4096 * 4096, 8), (4, 1000, 4),
                                  (16, 3 * (16 << 20), 4)]:
        cols, wide = layout.column_chunk(rows, numel, itemsize), layout.shard_columns(rows, numel, itemsize, object_bytes)
        assert layout.shard_columns(rows, numel, itemsize, 0) is None  # 0: one object per chunk
        if cols >= numel:
            assert wide is None  # one chunk already covers the row: nothing to gather
            continue
        assert wide % cols == 0 and wide > cols
        assert rows * wide * itemsize <= object_bytes
        # no shard is wider than the row rounded up to whole chunks
        assert wide <= cols * math.ceil(numel / cols)


def test_olmo2_7b_row_chunk_objects():
    """The documented figure: objects per row-chunk of every OLMo-2-7B tensor, bf16, 8 rows, 256 MiB objects."""
    hidden, mlp, vocab, layers = 4096, 11008, 100352, 32
    shapes = [(vocab, hidden), (vocab, hidden), (hidden,)] + layers * (
        [(hidden, hidden)] * 4 + [(mlp, hidden)] * 2 + [(hidden, mlp)] + [(hidden,)] * 4)
    chunks = objects = 0
    for shape in shapes:
        numel = math.prod(shape)
        cols, wide = layout.column_chunk(8, numel, 2), layout.shard_columns(8, numel, 2, 256 << 20)
        chunks += math.ceil(numel / cols)
        objects += math.ceil(numel / (wide or cols))
    assert (len(shapes), chunks, objects) == (355, 7089, 595)


def objects_under(lake: str, path: str, array: str) -> list[str]:
    store = LakeStore(lake)
    return store.fs.find(store.path(f"{path}/{array}/c"))


@pytest.mark.parametrize("mode", ["store", "mean"])
def test_sharded_extraction_on_s3_matches_the_chunked_one_bitwise(tiny_models, s3_endpoint, tmp_path, monkeypatch, mode):
    chunked = f"file://{tmp_path / 'chunked'}"
    write_probe(chunked, N)
    plain = run(spec_for(tiny_models["olmo2"], chunked, layers=LAYERS, mode=mode, batch_size=2, shard_size=4))

    sharded = f"s3://lake/{uuid.uuid4().hex}"
    write_probe(sharded, N)
    # chunks of 1,024 columns (2 float32 rows; a chunk's float64 sums), every chunk of a row in one object
    monkeypatch.setattr(layout, "CHUNK_BYTES", 8 << 10)
    group = run(spec_for(tiny_models["olmo2"], sharded, layers=LAYERS, mode=mode, batch_size=2, shard_size=4, object_mb=1))
    monkeypatch.undo()

    data = {"store": LAYERS, "mean": [f"{name}.partial_sum" for name in LAYERS]}[mode]
    shards = {name: group.group[name].shards for name in data}
    assert shards[data[2]] is None  # model.norm.weight: one chunk covers its 64 values
    embed, down = data[0], data[1]
    # embed_tokens (32,768 values) and down_proj (8,192): one object per row-chunk instead of 32 and 8 chunks
    for name in (embed, down):
        assert shards[name] is not None and shards[name][1] >= group.group[name].shape[1]
        assert len(objects_under(sharded, group.path, name)) == group.plan.n_chunks, name

    # the same values, read by zarr, by the lake's API, and checked by verify
    a = zarr.open_group(LakeStore(chunked).zarr_store, path=plain.path, mode="r")
    b = zarr.open_group(LakeStore(sharded).zarr_store, path=group.path, mode="r")
    assert sorted(a.array_keys()) == sorted(b.array_keys())
    for name in a.array_keys():
        assert np.array_equal(a[name][:], b[name][:], equal_nan=True), name
    kwargs = dict(dataset="probe", variant="original", mode=mode)
    got, want = open_lake(sharded).gradients(**kwargs), open_lake(chunked).gradients(**kwargs)
    for name in LAYERS:
        np.testing.assert_array_equal(got[name].values, want[name].values)
    table = verify_lake(LakeStore(sharded), log=lambda *_: None)
    assert set(table.query("kind == 'gradients'")["status"]) == {"ok"}

    if mode == "store":  # block-wise scoring reads whole shards where they fit, chunks of them where not
        matrix = a[embed][:].astype(np.float64)
        for budget in (1 << 30, 64 << 10):
            dots, q_sq, d_sq = array_dots(b[embed], b[embed], 2, 6, budget)
            np.testing.assert_allclose(dots, matrix[2:6] @ matrix.T, rtol=1e-5, atol=1e-9)
            np.testing.assert_allclose(d_sq, (matrix ** 2).sum(axis=1), rtol=1e-5)


def test_several_objects_per_row_chunk_are_named_when_damaged_and_rewritten(tmp_path, monkeypatch):
    """Objects of 4 chunks, 2 per row-chunk: a damaged one is named, and writing its row-chunk again replaces it
    (zarr reads a shard before writing it; one that cannot be read is removed first)."""
    monkeypatch.setattr(layout, "CHUNK_BYTES", 8 << 10)  # 1,024 float32 columns of 2 rows
    store = LakeStore(f"file://{tmp_path / 'lake'}")
    rng = np.random.default_rng(0)
    values = rng.standard_normal((6, 8192)).astype(np.float32)
    plan = GradientPlan(n_samples=6, parameters={"w": [8192]}, mode="store", dtype="float32", max_tokens=4, chunk_rows=2,
                        object_bytes=32 << 10)
    tokens = np.zeros((6, 4), dtype=np.int32)
    group = GradientGroup.create(store, "g", plan, {"test": "sharding"}, [f"s{i}" for i in range(6)], tokens, tokens > 0)
    for k in range(3):
        group.write_chunk(k, {"w": values[2 * k: 2 * k + 2]})
        group.mark_complete(k)
    array = group.group["w"]
    assert array.shards == (2, 4096) and array.chunks == (2, 1024)
    assert sorted(p.name for p in (tmp_path / "lake" / "g" / "w" / "c" / "1").iterdir()) == ["0", "1"]
    np.testing.assert_array_equal(read_checked(array, slice(None)), values)

    target = tmp_path / "lake" / "g" / "w" / "c" / "1" / "1"
    target.write_bytes(rng.bytes(target.stat().st_size))
    with pytest.raises(LakeError, match="chunk object w/c/1/1 is damaged"):
        read_checked(array, slice(None))
    group.write_chunk(1, {"w": values[2:4]})
    np.testing.assert_array_equal(read_checked(GradientGroup.open(store, "g").group["w"], slice(None)), values)
