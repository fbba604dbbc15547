"""Influence factors in the lake are checked whenever they are reused, and by verify: a factor file changed in place,
removed or added after the factors were written is refused in one line naming it, before anything is written."""

from __future__ import annotations

import json
import shutil
import struct
import uuid

import numpy as np
import pytest

from conftest import write_probe
from gradlake.lake.manifest import DamagedFile
from gradlake.lake.scores import ScoreGroup
from gradlake.lake.store import LakeStore, public_url
from gradlake.lake.verify_results import OLDER, result_findings
from gradlake.tasks.common.model import ModelSpec
from gradlake.tasks.influence.compute import compute_influence
from gradlake.tasks.influence.spec import InfluenceSpec

MLP = "model.layers.*.mlp.down_proj.weight"
LAMBDA = "lambda_matrix.safetensors"


def spec_for(tiny_models, lake: str, **overrides) -> InfluenceSpec:
    settings = dict(model=ModelSpec(model=str(tiny_models["olmo2"]), checkpoint="checkpoint-1", device="cpu"),
                    lake=lake, dataset="probe", max_queries=2, layers=[MLP], max_length=256, strategy="diagonal")
    return InfluenceSpec(**{**settings, **overrides})


@pytest.fixture(scope="module")
def fitted(tiny_models, tmp_path_factory) -> tuple[str, str, str]:
    """A local lake with diagonal factors (a lambda matrix) and their scores: (lake, factors dir, score group path);
    copied by `fresh` for each test, which damages its copy."""
    lake = str(tmp_path_factory.mktemp("factors") / "lake")
    write_probe(lake, 8)
    path = compute_influence(spec_for(tiny_models, lake), log=lambda _: None)
    return lake, ScoreGroup.open(LakeStore(lake), path).meta["lineage"]["factors"], path


@pytest.fixture(params=["file", "s3"])
def fresh(request, fitted, tmp_path) -> LakeStore:
    """A copy of the fitted lake, on the local filesystem or on the loopback S3 endpoint."""
    if request.param == "file":
        shutil.copytree(fitted[0], tmp_path / "lake")
        return LakeStore(f"file://{tmp_path}/lake")
    request.getfixturevalue("s3_endpoint")
    store = LakeStore(f"s3://lake/factors-{uuid.uuid4().hex[:8]}")
    store.fs.put(f"{fitted[0]}/", store.root, recursive=True)
    return store


def scaled(raw: bytes, factor: float) -> bytes:
    """A safetensors file with every float32 value multiplied by `factor` in place (its header and size unchanged)."""
    size = struct.unpack("<Q", raw[:8])[0]
    header, data = json.loads(raw[8:8 + size]), bytearray(raw[8 + size:])
    for name, tensor in header.items():
        if name != "__metadata__" and tensor["dtype"] == "F32":
            start, stop = tensor["data_offsets"]
            data[start:stop] = (np.frombuffer(bytes(data[start:stop]), dtype="<f4") * factor).astype("<f4").tobytes()
    return raw[:8 + size] + bytes(data)


def findings(store: LakeStore) -> dict:
    return {directory: (status, problems) for _, directory, status, problems in result_findings(store, log=lambda _: None)}


def test_a_factor_file_changed_in_place_is_refused_on_reuse_and_named_by_verify(tiny_models, fitted, fresh):
    from typer.testing import CliRunner

    from gradlake.flows.cli import app

    _, factors, path = fitted
    target = fresh.path(f"{factors}/{LAMBDA}")
    raw = fresh.fs.cat_file(target)
    changed = scaled(raw, 1.5)
    assert len(changed) == len(raw) and changed != raw
    fresh.fs.pipe_file(target, changed)
    again = path.rsplit("/", 1)[0] + "/again"
    result = CliRunner().invoke(app, ["influence", "--model", str(tiny_models["olmo2"]), "--checkpoint", "checkpoint-1",
                                      "--device", "cpu", "--lake", fresh.url, "--dataset", "probe", "--strategy",
                                      "diagonal", "--layers", MLP, "--max-queries", "2", "--max-length", "256",
                                      "--method", "again"])
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and len(lines) == 1 and "Traceback" not in result.output, result.output
    named = f"{public_url(fresh.url)}/{factors}/{LAMBDA}"
    assert f"{named} differs from what was written" in lines[0], lines[0]
    assert f"remove {public_url(fresh.url)}/{factors} and rerun" in lines[0], lines[0]
    assert not fresh.fs.exists(fresh.path(again)), "a score group was written before the factors were checked"
    status, problems = findings(fresh)[factors]
    assert status == "damaged" and len(problems) == 1 and named in problems[0], problems
    result = CliRunner().invoke(app, ["verify", "--lake", fresh.url])
    assert result.exit_code == 1 and named in result.output, result.output


@pytest.mark.parametrize("damage", ["removed", "added", "manifest removed"])
def test_a_factor_file_removed_or_added_is_refused_before_anything_is_written(tiny_models, fitted, tmp_path, damage):
    _, factors, path = fitted
    shutil.copytree(fitted[0], tmp_path / "lake")
    store = LakeStore(f"file://{tmp_path}/lake")
    name = {"removed": LAMBDA, "added": "lambda_matrix_2.safetensors", "manifest removed": "manifest.json"}[damage]
    target = tmp_path / "lake" / factors / name
    if damage == "added":
        target.write_bytes((target.parent / LAMBDA).read_bytes())
    else:
        target.unlink()
    with pytest.raises(DamagedFile) as raised:
        compute_influence(spec_for(tiny_models, store.url, method="again"), log=lambda _: None)
    assert str(raised.value).count("\n") == 0 and f"{store.url}/{factors}/{name}" in str(raised.value), raised.value
    assert not (tmp_path / "lake" / path.rsplit("/", 1)[0] / "again").exists()
    status, problems = findings(store)[factors]
    assert status == "damaged" and f"{store.url}/{factors}/{name}" in problems[0], problems


def test_factors_written_before_digests_are_reused_unchecked_and_say_so(tiny_models, fitted, tmp_path):
    lake, factors, path = fitted
    shutil.copytree(lake, tmp_path / "lake")
    store = LakeStore(f"file://{tmp_path}/lake")
    record_path = tmp_path / "lake" / factors / "factors.json"
    record = json.loads(record_path.read_text())
    assert set(record["digests"]) == set(record["files"]) and LAMBDA in record["files"]
    del record["digests"]
    record_path.write_text(json.dumps(record))
    (record_path.parent / "manifest.json").unlink()
    assert findings(store)[factors] == ("unchecked", [f"its files: {OLDER}"])
    logged = []
    again = compute_influence(spec_for(tiny_models, store.url, method="again"), log=logged.append)
    assert any("written before gradlake recorded their digests: reused unchecked" in line for line in logged), logged
    assert any(line.startswith("factors (diagonal) found in the lake") for line in logged), logged
    np.testing.assert_array_equal(ScoreGroup.open(store, again).read(), ScoreGroup.open(LakeStore(lake), path).read())
