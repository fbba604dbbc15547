"""A lake written by an earlier gradlake reopens, resumes and evaluates unchanged with the current code.

The fixture `tests/data/legacy_lake/` was written by the code of commit 76c1ce0 (before `tasks/` was
grouped by stage) with `tests/data/build_legacy_lake.py`, which says how; `tests/data/legacy_lake.json`
holds the specs it used and the paths that code gave each group.  Its model, `tests/data/legacy_model/`,
is named by the URL `memory://gradlake-legacy-v1/tiny-olmo2` (a local directory's lake key would hash
its absolute path, which differs between clones), so each test puts the checkpoint there first.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import fsspec
import numpy as np
import pandas as pd
import pytest
import torch
from transformers import AutoModelForCausalLM

from gradlake.flows.evaluate import evaluate
from gradlake.flows.extract import extract_gradients
from gradlake.lake import layout, open_lake
from gradlake.lake.gradients import GradientGroup
from gradlake.lake.integrity import CHUNK_DIGEST, digest
from gradlake.lake.store import LakeStore
from gradlake.tasks.evaluate.spec import EvaluationSpec
from gradlake.tasks.gradients.plan import ExtractionSpec


DATA = Path(__file__).resolve().parent / "data"
BUILT = json.loads((DATA / "legacy_lake.json").read_text())
MODEL_KEY = BUILT["evaluation"]["directory"].split("/")[1]  # as the old code keyed the model: tiny-olmo2-<hash of the URL>
SAMPLES = [f"probe-{i:04d}" for i in range(1, BUILT["n_samples"] + 1)]
TABLES = ("results", "self_similarity", "greedy")


@pytest.fixture
def legacy(tmp_path, monkeypatch) -> str:
    """A copy of the legacy lake in tmp_path (its URL), with its model at the URL the specs name."""
    shutil.copytree(DATA / "legacy_lake", tmp_path / "lake")
    fs, root = fsspec.core.url_to_fs(BUILT["model_url"])
    checkpoints = DATA / BUILT["model_dir"]
    for file in sorted(p for p in checkpoints.rglob("*") if p.is_file()):
        fs.pipe_file(f"{root}/{file.relative_to(checkpoints).as_posix()}", file.read_bytes())
    monkeypatch.setenv("GRADLAKE_MODEL_CACHE", str(tmp_path / "model-cache"))
    yield f"file://{tmp_path / 'lake'}"
    fs.rm(root, recursive=True)


def spec(record: dict, lake: str) -> ExtractionSpec:
    return ExtractionSpec.model_validate({**record["spec"], "lake": lake})


def files(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under `root`: relative path -> (size, mtime in ns)."""
    return {p.relative_to(root).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def local(url: str) -> Path:
    return Path(url.removeprefix("file://"))


def group_attrs(lake: str, path: str) -> dict:
    return json.loads((local(lake) / path / "zarr.json").read_text())["attributes"]["gradlake"]


def test_catalog_lists_the_legacy_lake_as_built(legacy):
    lake = open_lake(legacy)
    catalog = lake.catalog()
    datasets = catalog[catalog["kind"] == "dataset"].set_index("variant")
    assert sorted(datasets.index) == ["original", "paraphrased"]
    for variant, version in BUILT["dataset"]["versions"].items():
        assert datasets.loc[variant, "path"] == f"datasets/probe/{variant}/{version}"
        assert datasets.loc[variant, "n_samples"] == BUILT["n_samples"]
    assert list(lake.dataset("probe", "paraphrased")["id"]) == SAMPLES

    gradients = catalog[catalog["kind"] == "gradients"].set_index("path")
    complete = [p for built in BUILT["complete"].values() for p in built["paths"]]
    incomplete = BUILT["incomplete"]["paths"]
    assert sorted(gradients.index) == sorted(complete + incomplete)
    assert gradients["damaged"].isna().all()
    for path in complete:
        assert gradients.loc[path, "complete"], path
        assert gradients.loc[path, "chunks_done"] == gradients.loc[path, "chunks_total"] == 2, path
    for path in incomplete:  # shard 0 of 2 (one row-chunk of 4 samples) was written
        assert not gradients.loc[path, "complete"], path
        assert (gradients.loc[path, "chunks_done"], gradients.loc[path, "chunks_total"]) == (1, 2), path

    evaluations = catalog[catalog["kind"] == "evaluation"]
    assert list(evaluations["path"]) == [BUILT["evaluation"]["directory"]]

    # The bfloat16 groups read back as float32 through the lake API, every sample finite; the unfinished
    # shard of the incomplete group reads as NaN (the arrays' fill value), never as plausible numbers.
    paraphrased = lake.gradients(model=MODEL_KEY, variant="paraphrased", paradigm="sft")
    assert list(paraphrased["sample"].values) == SAMPLES
    assert paraphrased["model.layers.1.mlp.down_proj.weight"].attrs.get("stored_as") == "bfloat16"
    for name in ("model.layers.0.self_attn.o_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        assert paraphrased[name].dtype == np.float32 and np.isfinite(paraphrased[name].values).all()
    flat = lake.projections(variant="paraphrased", paradigm="sft", kind="rademacher", dim=128, seed=0, scope="flat")
    assert flat["flat"].shape == (BUILT["n_samples"], 128)
    partial = lake.gradients(variant="original", paradigm="pre")["model.layers.0.mlp.down_proj.weight"].values
    assert np.isfinite(partial[:4]).all() and np.isnan(partial[4:]).all()


def test_rerun_of_a_complete_group_writes_nothing(legacy):
    before = files(local(legacy))
    fingerprints = {p: group_attrs(legacy, p)["fingerprint"] for built in BUILT["complete"].values() for p in built["paths"]}
    for built in BUILT["complete"].values():
        assert extract_gradients(spec(built, legacy)) == built["paths"][-1]
    # The current code recognises the old groups (same fingerprints) and their completion records:
    # no chunk recomputed, no file written, not even the group metadata.
    assert files(local(legacy)) == before
    assert {p: group_attrs(legacy, p)["fingerprint"] for p in fingerprints} == fingerprints


def test_incomplete_group_resumes_its_missing_shard_only(legacy, tmp_path):
    built = BUILT["incomplete"]
    root = local(legacy)
    data_arrays = {path: list(group_attrs(legacy, path)["plan"]["parameters"]) for path in built["paths"]}
    before = files(root)
    shard0 = {f for f in before if any(f.startswith(f"{p}/{a}/c/0/") for p, arrays in data_arrays.items() for a in arrays)}
    assert len(shard0) == sum(map(len, data_arrays.values())), "the fixture must hold shard 0 of every data array"

    assert extract_gradients(spec(built, legacy)) == built["paths"][-1]

    after = files(root)
    assert all(after[f] == before[f] for f in shard0), "a chunk the old code finished was computed again"
    new = set(after) - set(before)
    assert all("/c/1" in f for f in new), sorted(new)  # row-chunk 1 (shard 1) of data and bookkeeping arrays alone
    assert {f for f in new if "/c/1/" in f} == {f"{p}/{a}/c/1/0" for p, arrays in data_arrays.items() for a in arrays}
    rows = open_lake(legacy).catalog().set_index("path").loc[built["paths"]]
    assert rows["complete"].all() and (rows["chunks_done"] == 2).all()

    # The resumed group equals a fresh extraction of the same spec by the current code, bit for bit, and has
    # the fingerprint the old code gave it.  In a fresh lake the extraction's settings (its layers) name its group
    # (`lake.layout.extraction_settings`); the old lake keeps the plain name it had, found there by its fingerprint.
    fresh = f"file://{tmp_path / 'fresh'}"
    shutil.copytree(root / "datasets", local(fresh) / "datasets")
    fresh_path = extract_gradients(spec(built, fresh))
    old_path = built["paths"][-1]
    assert fresh_path == f"{old_path}-{layout.extraction_settings(spec(built, fresh).layers)}"
    resumed_lake, fresh_lake = open_lake(legacy), open_lake(fresh)
    assert group_attrs(legacy, old_path)["fingerprint"] == group_attrs(fresh, fresh_path)["fingerprint"]
    for path in built["paths"][:-1]:  # projections cite their source group's path: equal but for it
        moved = layout.projection_group_path(fresh_path, path.rsplit("-proj-", 1)[1])
        old, new = group_attrs(legacy, path), group_attrs(fresh, moved)
        assert new["lineage"]["projection"]["source_group"] == fresh_path
        assert {**new["lineage"]["projection"], "source_group": old_path} == old["lineage"]["projection"], path
        assert new["plan"] == old["plan"], path
    projection = {"kind": "rademacher", "dim": 64, "seed": 1, "scope": "flat"}
    pairs = [(resumed_lake.gradients(variant="original", paradigm="pre"), fresh_lake.gradients(variant="original", paradigm="pre")),
             (resumed_lake.projections(variant="original", paradigm="pre", **projection),
              fresh_lake.projections(variant="original", paradigm="pre", **projection))]
    for got, want in pairs:
        assert list(got["sample"].values) == SAMPLES
        assert set(got.data_vars) == set(want.data_vars)
        for name in want.data_vars:
            if name != "chunk_digest":  # each group's digests are in its own algorithm (below)
                np.testing.assert_array_equal(got[name].values, want[name].values, err_msg=name)
    # The old group keeps its algorithm (CRC32, named nowhere) for the chunks the resume wrote; new groups use CRC32C.
    fresh_paths = [fresh_path, *(layout.projection_group_path(fresh_path, p.rsplit("-proj-", 1)[1]) for p in built["paths"][:-1])]
    for lake, paths, algorithm in ((legacy, built["paths"], "crc32"), (fresh, fresh_paths, CHUNK_DIGEST)):
        for path in paths:
            group = GradientGroup.open(LakeStore(lake), path)
            assert group.digest_algorithm == algorithm, path
            for k in range(group.plan.n_chunks):
                assert group.stored_digest(k) == digest(group.read_chunk(k), algorithm), (path, k)

    # A sample of the resumed shard against one plain backward pass of the checked-in model (paradigm 'pre').
    grads = pairs[0][0]
    row = 5
    n = int(grads["n_tokens"][row])
    ids = torch.tensor(grads["input_ids"][row, :n].values, dtype=torch.long)[None]
    labels = torch.where(torch.tensor(grads["label_mask"][row, :n].values)[None], ids, -100)
    model = AutoModelForCausalLM.from_pretrained(DATA / BUILT["model_dir"] / BUILT["checkpoint"], dtype=torch.float32).eval()
    model(input_ids=ids, labels=labels).loss.backward()
    parameters = dict(model.named_parameters())
    names = data_arrays[built["paths"][-1]]
    assert len(names) == 4
    for name in names:
        want = parameters[name].grad.flatten()
        err = ((torch.from_numpy(grads[name][row].values) - want).norm() / want.norm()).item()
        assert err < 1e-5, f"{name}: relative error {err:.2e}"


def test_evaluation_reruns_to_the_stored_tables(legacy):
    lake = open_lake(legacy)
    stored = {t: lake.evaluation(model=MODEL_KEY, dataset="probe", paradigm="sft", table=t) for t in TABLES}
    results = stored["results"]
    assert set(results["query"]) == {"paraphrased"}
    assert {"full", "mlp", "attention", "bm25", "proj:rademacher-flat-d128-s0", "proj:kronecker-4x4-d16-s0"} <= set(results["vectors"])
    assert len(stored["self_similarity"]) and len(stored["greedy"])

    directory = evaluate(EvaluationSpec.model_validate({**BUILT["evaluation"]["spec"], "lake": legacy}))
    assert directory == BUILT["evaluation"]["directory"]
    rerun = {t: open_lake(legacy).evaluation(model=MODEL_KEY, dataset="probe", paradigm="sft", table=t) for t in TABLES}
    # The similarity is now computed in tiles aligned to the arrays' chunks, so that the memory budget never changes
    # a score; the code that wrote this lake summed float32 products in budget-shaped blocks. Scores agree to float32
    # rounding (about 3e-8 here), and every rank, metric and label is the same.
    for table in TABLES:
        pd.testing.assert_frame_equal(rerun[table], stored[table], check_exact=False, rtol=1e-6, atol=0, obj=table)
