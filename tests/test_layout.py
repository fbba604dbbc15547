"""Every path from lake.layout: the attribution stage under one prefix, score groups never confused with its other
results, and lakes of the earlier layout found where they are (a stored ground truth resumed, not recomputed)."""

from __future__ import annotations

import io

import pandas as pd
import pytest

from gradlake.lake import layout, open_lake
from gradlake.lake.evaluations import list_attribution_benchmarks
from gradlake.lake.locations import resolve_benchmark_dir, resolve_ground_truth_dir
from gradlake.lake.results import write_result
from gradlake.lake.scores import ScoreGroup, list_score_groups
from gradlake.lake.store import LakeStore
from gradlake.lake.verify import verify_lake

RUN = ("tiny-olmo2", "checkpoint-000010", "probe")  # model key, checkpoint key, training dataset


@pytest.fixture
def store(lake_store) -> LakeStore:
    return lake_store


def put(store: LakeStore, relative: str, data: bytes) -> None:
    store.fs.makedirs(store.path(relative).rsplit("/", 1)[0], exist_ok=True)
    store.fs.pipe_file(store.path(relative), data)


def test_every_location_is_where_the_docs_say():
    m, c, d = RUN
    assert layout.gradient_group_path(m, c, d, "original", "sft", "store", "inputs_embeds") == \
        f"gradients/{m}/{c}/{d}/original/sft-inputs_embeds-store"
    assert layout.gradients_dir(m, c, d) == f"gradients/{m}/{c}/{d}"
    # The settings that tell extractions of a variant apart name its group; the defaults keep the plain name.
    assert layout.extraction_settings([]) == "" and layout.extraction_settings([], "bfloat16") == "bfloat16"
    mlp = layout.extraction_settings(["model.layers.*.mlp.down_proj.weight"])
    assert mlp == "Lfecae432" and layout.extraction_settings(["model.layers.*.mlp.down_proj.weight"], "float16") == f"{mlp}-float16"
    assert layout.extraction_settings(["a", "b"]) != layout.extraction_settings(["b", "a"])  # as given, like the fingerprint
    named = layout.gradient_group_path(m, c, d, "original", "sft", "store", settings=mlp)
    assert named == f"gradients/{m}/{c}/{d}/original/sft-store-{mlp}"
    assert layout.projection_group_path(named, "rademacher-flat-d64-s0") == f"{named}-proj-rademacher-flat-d64-s0"
    plain = layout.gradient_group_path(m, c, d, "original", "sft", "store")
    assert layout.projection_group_path(plain, "k") == f"gradients/{m}/{c}/{d}/original/sft-proj-k"
    assert layout.evaluation_name("sft", mlp, thesis=True) == f"sft-{mlp}-thesis" and layout.evaluation_name("sft") == "sft"
    with pytest.raises(ValueError, match="in order"):
        layout.gradients_dir(m, None, d)
    assert layout.evaluation_dir(m, c, d, "sft-thesis") == f"evaluations/{m}/{c}/{d}/sft-thesis"
    assert layout.training_curve_dir(m, d) == f"evaluations/{m}/training/{d}"
    assert layout.influence_factors_dir(m, c, d, "sft", "ekfac", "0123abcd") == \
        f"influence/{m}/{c}/{d}/sft-ekfac-0123abcd/factors"
    assert layout.score_group_path(m, c, d, "probe", "paraphrased", "proj-cosine:x/y") == \
        f"attribution/{m}/{c}/{d}/probe.paraphrased/proj-cosine--x--y"
    assert layout.benchmark_dir(m, c, d, "other.paraphrased") == f"attribution/{m}/{c}/{d}/benchmarks/other.paraphrased"
    assert layout.legacy_benchmark_dir(m, c, d, "held_out") == f"evaluations/{m}/{c}/{d}/attribution/held_out"
    truth = layout.ground_truth_dir(m, c, d, "held_out")
    assert truth == f"attribution/{m}/{c}/{d}/groundtruth/held_out"
    assert layout.legacy_ground_truth_dir(m, c, d, "held_out") == f"groundtruth/{m}/{c}/{d}/held_out"
    assert layout.ground_truth_losses_file(layout.lds_dir(truth, "k1"), "subset-000") == \
        f"{truth}/lds-k1/losses/subset-000.parquet"
    assert layout.lds_subsets_file(layout.lds_dir(truth, "k1")) == f"{truth}/lds-k1/subsets.json"
    assert layout.counterfactual_dir(truth, "k2") == f"{truth}/cf-k2"
    assert layout.tracing_dir("base", "main", m, c) == f"tracing/base/main/{m}/{c}"
    assert layout.tracing_base_dir("base", "main") == "tracing/base/main"
    assert layout.claim_file(layout.lease_claim("gradients/a/b", 3)) == ".gradlake/leases/gradients/a/b/3.json"
    assert layout.claim_file(layout.creation_claim("gradients/a/b")) == ".gradlake/create/gradients/a/b.json"
    assert layout.paraphrase_cache_file("s1", "abc") == "cache/paraphrase/s1/abc.json"
    assert layout.dataset_latest_file("probe", "original") == "datasets/probe/original/latest.json"
    for directory in (layout.benchmark_dir(m, c, d, "q.v"), layout.legacy_benchmark_dir(m, c, d, "q.v")):
        assert layout.parse_benchmark_dir(directory) == {"model": m, "checkpoint": c, "dataset": d, "queries": "q.v"}
    with pytest.raises(ValueError, match="not a benchmark directory"):
        layout.parse_benchmark_dir(layout.score_group_path(m, c, d, "probe", "original", "bm25"))


def test_score_groups_are_never_confused_with_benchmarks_or_ground_truth(store):
    """The attribution stage's three kinds share a prefix; only score groups have a '.' where they branch."""
    m, c, d = RUN
    scores = layout.score_group_path(m, c, d, "probe", "original", "grad-dot")
    for other in (layout.benchmark_dir(m, c, d, "held_out"), layout.ground_truth_dir(m, c, d, "held_out"),
                  layout.benchmark_dir(m, c, d, "other.paraphrased")):
        put(store, f"{other}/zarr.json", b"{}")  # as a Zarr group would mark it
    ScoreGroup.create(store, scores, ["q1", "q2"], ["original:a", "original:b"], {"method": "grad-dot", "settings": {}})
    listed = [p[len(store.root) + 1:].rsplit("/", 1)[0] for p in store.glob(f"{layout.SCORE_GROUPS}/zarr.json")]
    assert listed == [scores]
    assert [g["path"] for g in list_score_groups(store)] == [scores]
    assert store.glob(f"{layout.BENCHMARKS}/zarr.json") == [store.path(f"{layout.benchmark_dir(m, c, d, q)}/zarr.json")
                                                           for q in ("held_out", "other.paraphrased")]


def losses(store: LakeStore, path: str) -> pd.DataFrame:
    return pd.read_parquet(io.BytesIO(store.fs.cat_file(store.path(path))))


def test_a_ground_truth_of_the_earlier_layout_is_resumed_where_it_is(store):
    m, c, d = RUN
    new, legacy = layout.ground_truth_dir(m, c, d, "held_out"), layout.legacy_ground_truth_dir(m, c, d, "held_out")
    assert resolve_ground_truth_dir(store, m, c, d, "held_out") == new  # nothing yet: today's layout
    stored = pd.DataFrame({"query": ["q1", "q2"], "loss": [1.5, 2.5]})
    buffer = io.BytesIO()
    stored.to_parquet(buffer, index=False)
    put(store, layout.ground_truth_losses_file(layout.lds_dir(legacy, "k1"), "subset-000"), buffer.getvalue())
    found = resolve_ground_truth_dir(store, m, c, d, "held_out")
    assert found == legacy
    pd.testing.assert_frame_equal(losses(store, layout.ground_truth_losses_file(layout.lds_dir(found, "k1"),
                                                                                "subset-000")), stored)
    assert resolve_ground_truth_dir(store, m, c, d, "paraphrased") == layout.ground_truth_dir(m, c, d, "paraphrased")
    put(store, layout.lds_subsets_file(layout.lds_dir(new, "k2")), b"{}")
    assert resolve_ground_truth_dir(store, m, c, d, "held_out") == new  # both: today's layout is preferred


def benchmark(store: LakeStore, directory: str, lds: float) -> None:
    write_result(store, directory, tables={"benchmark": pd.DataFrame({"method": ["grad-dot"], "lds": [lds]}),
                                           "lds_per_query": pd.DataFrame({"query": ["q1"], "grad-dot": [lds]})},
                 meta={"n_train": 4, "queries": directory.rsplit("/", 1)[-1]})


def test_benchmarks_of_both_layouts_are_listed_read_and_verified(store):
    m, c, d = RUN
    old = layout.legacy_benchmark_dir(m, c, d, "held_out")
    assert resolve_benchmark_dir(store, m, c, d, "held_out") == layout.benchmark_dir(m, c, d, "held_out")
    benchmark(store, old, 0.25)
    assert resolve_benchmark_dir(store, m, c, d, "held_out") == old  # a rerun replaces it where it is
    new = resolve_benchmark_dir(store, m, c, d, "paraphrased")
    assert new == layout.benchmark_dir(m, c, d, "paraphrased")
    benchmark(store, new, 0.5)

    assert [path for path, _ in list_attribution_benchmarks(store)] == sorted([new, old])
    lake = open_lake(store.url, store.storage_options)
    catalog = lake.catalog().query("kind == 'attribution'")
    assert sorted(catalog["variant"]) == ["held_out", "paraphrased"] and set(catalog["dataset"]) == {d}
    assert lake.attribution(queries="held_out")["lds"].tolist() == [0.25]
    assert lake.attribution(queries="paraphrased")["lds"].tolist() == [0.5]
    table = verify_lake(store, log=lambda *_: None)
    assert sorted(table.query("kind == 'attribution'")["path"]) == sorted([new, old])
    assert set(table["status"]) == {"ok"}

    # the same queries in both layouts (a lake copied by hand): listed once, today's
    benchmark(store, layout.benchmark_dir(m, c, d, "held_out"), 0.75)
    assert [path for path, _ in list_attribution_benchmarks(store)] == sorted([new, layout.benchmark_dir(m, c, d, "held_out")])
    assert lake.attribution(queries="held_out")["lds"].tolist() == [0.75]


def test_verify_names_a_damaged_benchmark_table_in_the_earlier_layout(tmp_path):
    store = LakeStore(f"file://{tmp_path}/lake")
    old = layout.legacy_benchmark_dir(*RUN, "held_out")
    benchmark(store, old, 0.25)
    (tmp_path / "lake" / old / "lds_per_query.parquet").write_bytes(b"PAR1 cut short")
    row = verify_lake(store, log=lambda *_: None).query("kind == 'attribution'").iloc[0]
    assert row["path"] == old and row["status"] == "damaged" and "lds_per_query.parquet" in row["problem"]
    (tmp_path / "lake" / old / "meta.json").write_bytes(b"{not json")
    row = verify_lake(store, log=lambda *_: None).query("kind == 'attribution'").iloc[0]
    assert row["status"] == "damaged" and f"{old}/meta.json" in row["problem"]
