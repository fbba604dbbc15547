"""Several extractions of one variant side by side: their settings name their groups, the catalog tells them apart,
the analyst API, `gradlake evaluate` and the attribution baselines pick one by its settings (one clear error when the
choice is not clear), and an extraction that kept only its projections says so."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import write_probe
from gradlake.flows.evaluate import evaluate
from gradlake.flows.extract import extract_gradients
from gradlake.lake import LakeError, layout, open_lake
from gradlake.lake.extractions import AmbiguousExtraction
from gradlake.lake.store import LakeStore
from gradlake.tasks.common.model import ModelSpec
from gradlake.tasks.evaluate.spec import EvaluationSpec
from gradlake.tasks.gradients.plan import ExtractionSpec
from gradlake.tasks.projection.spec import ProjectionSpec

N = 8
MLP = ["model.layers.*.mlp.down_proj.weight"]
PROJECTION = ProjectionSpec(kind="rademacher", dim=64, scope="flat")
GRADLAKE = str(Path(sys.executable).parent / "gradlake")


def _spec(model: ModelSpec, lake: str, variant: str, **kw) -> ExtractionSpec:
    return ExtractionSpec(model=model, variant=variant, lake=lake, **{"shard_size": 4, "batch_size": 4, "max_length": 256, **kw})


@pytest.fixture(scope="module")
def two_extractions(tiny_models, tmp_path_factory):
    """Originals and paraphrases extracted twice: every parameter, and the MLP down-projections with a projection."""
    lake = f"file://{tmp_path_factory.mktemp('extractions') / 'lake'}"
    write_probe(lake, N)
    model = ModelSpec(model=str(tiny_models["olmo2"]), checkpoint="checkpoint-1")
    paths = {}
    for variant in ("original", "paraphrased"):
        paths["all", variant] = extract_gradients(_spec(model, lake, variant))
        paths["mlp", variant] = extract_gradients(_spec(model, lake, variant, layers=MLP, projections=[PROJECTION]))
    return lake, model, paths


def test_settings_name_the_groups_and_a_rerun_finds_its_own(two_extractions):
    lake, model, paths = two_extractions
    named = "sft-store-" + layout.extraction_settings(MLP)
    assert named.startswith("sft-store-L") and len(named) == len("sft-store-L") + 8
    for variant in ("original", "paraphrased"):
        assert paths["all", variant].endswith(f"/{variant}/sft-store")  # the defaults keep the name lakes always had
        assert paths["mlp", variant].endswith(f"/{variant}/{named}")
    files = sorted(p for p in Path(lake[len("file://"):]).rglob("*") if p.is_file())
    before = {p: p.stat().st_mtime_ns for p in files}
    assert extract_gradients(_spec(model, lake, "original", layers=MLP, projections=[PROJECTION])) == paths["mlp", "original"]
    assert extract_gradients(_spec(model, lake, "original")) == paths["all", "original"]
    assert {p: p.stat().st_mtime_ns for p in files if ".gradlake" not in str(p)} == \
        {p: t for p, t in before.items() if ".gradlake" not in str(p)}, "a rerun with the same settings wrote again"
    # What does not name a group still differs from the group of that name: refused, naming it.
    with pytest.raises(LakeError, match=r"already holds a different extraction .*max_length"):
        extract_gradients(_spec(model, lake, "original", layers=MLP, max_length=200))


def test_the_catalog_tells_them_apart(two_extractions):
    lake, _, paths = two_extractions
    catalog = open_lake(lake).catalog()
    grads = catalog[(catalog["kind"] == "gradients") & (catalog["variant"] == "original")].set_index("path")
    everything, mlp = grads.loc[paths["all", "original"]], grads.loc[paths["mlp", "original"]]
    assert (everything["extraction"], everything["layers"], everything["holds"]) == ("sft-store", "every parameter", "gradients")
    assert (mlp["extraction"], mlp["layers"], mlp["holds"]) == (paths["mlp", "original"].rsplit("/", 1)[-1], MLP[0], "gradients")
    assert everything["n_parameters"] > mlp["n_parameters"] == 2
    projection = grads[grads["projection"].notna()]
    assert len(projection) == 1 and projection.index[0] == layout.projection_group_path(paths["mlp", "original"], PROJECTION.label)
    assert projection.iloc[0]["extraction"] == mlp["extraction"] and projection.iloc[0]["holds"] == "projection"


def test_the_analyst_api_picks_one_by_its_settings(two_extractions):
    lake, _, paths = two_extractions
    opened = open_lake(lake)
    with pytest.raises(AmbiguousExtraction) as err:
        opened.gradients(variant="original")
    message = str(err.value)
    named = paths["mlp", "original"].rsplit("/", 1)[-1]
    assert "2 extractions" in message and "sft-store (layers every parameter" in message
    assert f"{named} (layers {MLP[0]}" in message and "extraction=" in message and "layers=" in message
    everything = opened.gradients(variant="original", extraction="sft-store")
    mlp = opened.gradients(variant="original", extraction=named)
    assert opened.gradients(variant="original", layers=MLP).attrs["gradlake"]["fingerprint"] == mlp.attrs["gradlake"]["fingerprint"]
    assert opened.gradients(variant="original", layers=[]).attrs == everything.attrs
    assert sorted(n for n in mlp.data_vars if n.endswith("down_proj.weight")) == sorted(
        n for n in mlp.data_vars if n not in ("sample", "input_ids", "label_mask", "n_tokens", "shard_complete", "chunk_digest"))
    name = next(n for n in mlp.data_vars if n.endswith("mlp.down_proj.weight"))
    np.testing.assert_allclose(mlp[name].values, everything[name].values, rtol=1e-5, atol=1e-7)
    # The projection belongs to the MLP extraction alone, so asking for it needs no choice.
    assert opened.projections(variant="original", dim=64).attrs["gradlake"]["lineage"]["layer_patterns"] == MLP
    with pytest.raises(LakeError, match="no projection group"):
        opened.projections(variant="original", dim=64, extraction="sft-store")


def test_evaluate_picks_an_extraction_and_keeps_each_result(two_extractions):
    lake, model, paths = two_extractions
    base = dict(model=model, queries=["paraphrased"], lake=lake, dense_baseline=False, greedy_steps=0)
    with pytest.raises(AmbiguousExtraction, match=r"2 extractions .*sft-store \(layers every parameter.*--extraction NAME"):
        evaluate(EvaluationSpec(**base))
    # The command says the same in one line, before Prefect starts.
    done = subprocess.run([GRADLAKE, "evaluate", "--model", model.model, "--checkpoint", "checkpoint-1", "--query", "paraphrased",
                           "--lake", lake, "--no-dense-baseline"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "COLUMNS": "200"})
    assert done.returncode == 2 and done.stderr.startswith("error: 2 extractions match"), done.stderr
    assert "--extraction NAME" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    named = paths["mlp", "original"].rsplit("/", 1)[-1]
    plain = evaluate(EvaluationSpec(**base, extraction="sft-store"))
    by_layers = evaluate(EvaluationSpec(**base, layers=MLP))
    assert plain.endswith("/probe/sft") and by_layers.endswith("/probe/sft-" + named.removeprefix("sft-store-"))
    opened = open_lake(lake)
    evaluations = opened.catalog().query("kind == 'evaluation'").set_index("path")
    assert list(evaluations.loc[[plain, by_layers], "extraction"]) == ["sft-store", named]
    with pytest.raises(LakeError, match=f"2 evaluations match .*tell them apart with extraction='sft-store' or '{named}'"):
        opened.evaluation(paradigm="sft")
    everything = opened.evaluation(paradigm="sft", extraction="sft-store")
    mlp = opened.evaluation(extraction=named)
    assert (everything["vectors"] == "full").any() and (mlp["vectors"] == f"proj:{PROJECTION.label}").any()
    assert not (everything["vectors"] == f"proj:{PROJECTION.label}").any(), "the projection belongs to the MLP extraction"
    assert mlp.query("kind == 'tensor'")["vectors"].str.endswith("mlp.down_proj.weight").all()
    assert everything.query("kind == 'tensor'")["vectors"].nunique() > mlp.query("kind == 'tensor'")["vectors"].nunique()


def test_attribution_reads_the_extraction_it_is_told(two_extractions):
    from gradlake.tasks.attribution.baselines import gradient_pair
    from gradlake.tasks.attribution.queries import QuerySet

    lake, model, paths = two_extractions
    store = LakeStore(lake)
    ids = [f"probe-{i:04d}" for i in range(1, N + 1)]
    queries = QuerySet(label="paraphrased", dataset="probe", variant="paraphrased", ids=ids[:2], chats=[], sources=[])
    with pytest.raises(AmbiguousExtraction, match="AttributionSpec.extraction"):
        gradient_pair(store, model, "probe", "original", queries, ids, "sft")
    named = paths["mlp", "original"].rsplit("/", 1)[-1]
    pair = gradient_pair(store, model, "probe", "original", queries, ids, "sft", named)
    assert (pair.train_dir, pair.query_dir) == (paths["mlp", "original"], paths["mlp", "paraphrased"])
    assert all(t.endswith("mlp.down_proj.weight") for t in pair.tensors)


def test_projections_only_say_so(tiny_models, tmp_path):
    lake = f"file://{tmp_path / 'lake'}"
    write_probe(lake, N)
    model = ModelSpec(model=str(tiny_models["olmo2"]), checkpoint="checkpoint-1")
    path = extract_gradients(_spec(model, lake, "original", layers=MLP, projections=[PROJECTION], keep_gradients=False))
    opened = open_lake(lake)
    row = opened.catalog().set_index("path").loc[path]
    assert (row["mode"], bool(row["complete"]), row["holds"], row["n_parameters"]) == ("store", True, "projections only", 0)
    projection = layout.projection_group_path(path, PROJECTION.label)
    with pytest.raises(LakeError) as err:
        opened.gradients(variant="original")
    message = str(err.value)
    assert path in message and "keep_gradients off" in message and projection in message and "lake.projections" in message
    assert opened.projections(variant="original", dim=64).sizes["sample"] == N
    # Keeping the gradients is not a setting that names a group: the same extraction with them is refused at that name.
    with pytest.raises(LakeError, match="gradients_kept"):
        extract_gradients(_spec(model, lake, "original", layers=MLP, projections=[PROJECTION]))
