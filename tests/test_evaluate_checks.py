"""`gradlake evaluate` refuses bad input in one line, before Prefect starts and before anything is written.

Before these checks ran ahead of the flow, a query group extracted with other --layers ended in a
KeyError deep in the scoring, and a lake that cannot be written in a LakeError traceback from the
flow run; both after Prefect had started.  The flow runs the same checks (plan_evaluation), as a
deployment's run has no CLI before it.
"""

from __future__ import annotations

import os
import shutil
import stat
import uuid
from pathlib import Path

import boto3
import pytest
from typer.testing import CliRunner

from conftest import write_probe
from gradlake.flows.cli import app
from gradlake.tasks.gradients.plan import ExtractionSpec
from gradlake.tasks.common.model import ModelSpec
from s3proxy import FaultyS3Proxy
from test_batching import run

N = 4
LAYERS = ["lm_head.weight", "model.layers.1.mlp.down_proj.weight"]
OTHER_LAYERS = ["lm_head.weight", "model.layers.0.mlp.down_proj.weight"]


@pytest.fixture(scope="module")
def lake(tiny_models, tmp_path_factory) -> Path:
    """Dataset 'probe': original and paraphrased gradients of LAYERS; dataset 'mixed': the paraphrased ones of OTHER_LAYERS."""
    path = tmp_path_factory.mktemp("evaluate-checks") / "lake"
    model = ModelSpec(model=str(tiny_models["olmo2"]), checkpoint="checkpoint-1")
    for dataset, query_layers in (("probe", LAYERS), ("mixed", OTHER_LAYERS)):
        write_probe(str(path), N, name=dataset)
        for variant, layers in (("original", LAYERS), ("paraphrased", query_layers)):
            run(ExtractionSpec(model=model, dataset=dataset, variant=variant, layers=layers, shard_size=N, batch_size=N,
                               max_length=128, lake=str(path)))
    return path


def files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def evaluate_cli(model: Path, lake: str, *args: str) -> tuple[int, str]:
    """`gradlake evaluate` of the tiny OLMo-2's checkpoint-1; (exit code, its one error line), asserting it is one line."""
    result = CliRunner().invoke(app, ["evaluate", "--model", str(model), "--checkpoint", "checkpoint-1", "--query",
                                      "paraphrased", "--no-dense-baseline", "--lake", lake, *args])
    lines = result.output.strip().splitlines()
    assert "Traceback" not in result.output and isinstance(result.exception, (SystemExit, type(None))), result.output
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return result.exit_code, lines[0]


def test_query_group_with_other_layers_names_the_tensors_and_the_layers_to_use(lake, tiny_models):
    before = files(lake)
    code, line = evaluate_cli(tiny_models["olmo2"], str(lake), "--dataset", "mixed")
    assert code == 2
    assert "only the paraphrased group has model.layers.0.mlp.down_proj.weight" in line, line
    assert "only the original group has model.layers.1.mlp.down_proj.weight" in line, line
    assert "--layers 'lm_head.weight' --layers 'model.layers.1.mlp.down_proj.weight'" in line, line
    # other layers name a group of their own: the line says where it goes (beside the one there)
    held = next(lake.glob("gradients/*/checkpoint-1/mixed/paraphrased/*-store*"))
    assert f"extract paraphrased again (a group of its own, beside the paraphrased group at file://{held})" in line, line
    assert files(lake) == before and not (lake / "evaluations").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through chmod 0555; the S3 case below covers a lake it may not write")
def test_read_only_local_lake(lake, tiny_models, tmp_path):
    copy = tmp_path / "lake"
    shutil.copytree(lake, copy)
    directories = [copy, *(p for p in copy.rglob("*") if p.is_dir())]
    for d in directories:
        d.chmod(0o555)
    try:
        before = files(copy)
        code, line = evaluate_cli(tiny_models["olmo2"], str(copy))
        assert code == 2 and f"lake 'file://{copy}' is not writable" in line and "permission denied" in line, line
        assert files(copy) == before
    finally:
        for d in directories:
            d.chmod(stat.S_IRWXU | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)


@pytest.fixture
def read_only_s3_lake(lake, s3_endpoint, monkeypatch):
    """The lake in a bucket, reached through credentials that may read it and not write it: (url, keys, proxy)."""
    prefix = f"read-only-{uuid.uuid4().hex[:8]}"
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    for path in lake.rglob("*"):
        if path.is_file():
            client.upload_file(str(path), "lake", f"{prefix}/{path.relative_to(lake).as_posix()}")

    def keys() -> set[str]:
        pages = client.get_paginator("list_objects_v2").paginate(Bucket="lake", Prefix=f"{prefix}/")
        return {item["Key"] for page in pages for item in page.get("Contents", [])}

    with FaultyS3Proxy(s3_endpoint, fail=0) as proxy:
        proxy.read_only = True
        monkeypatch.setenv("GRADLAKE_S3_ENDPOINT_URL", proxy.endpoint)
        yield f"s3://lake/{prefix}", keys, proxy


def test_read_only_s3_lake(read_only_s3_lake, tiny_models):
    url, keys, proxy = read_only_s3_lake
    before = keys()
    assert any("/paraphrased/sft-store" in k and k.endswith("/zarr.json") for k in before), "the lake must hold the groups to evaluate"
    code, line = evaluate_cli(tiny_models["olmo2"], url)
    assert code == 2 and f"lake '{url}' is not writable" in line and "AccessDenied" in line and "may write to this bucket" in line, line
    assert proxy.stats["refused"] >= 1, "the write probe must have been refused, not skipped"
    assert keys() == before


def test_the_flow_runs_the_same_checks(read_only_s3_lake, tiny_models):
    """A deployment's run has no CLI before it: the flow refuses the lake itself, at once and without retries."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from gradlake.flows.evaluate import evaluate
    from gradlake.tasks.evaluate.spec import EvaluationSpec

    url, keys, _ = read_only_s3_lake
    before = keys()
    spec = EvaluationSpec(model=ModelSpec(model=str(tiny_models["olmo2"]), checkpoint="checkpoint-1"),
                          queries=["paraphrased"], dense_baseline=False, lake=url)
    state = evaluate(spec, return_state=True)
    assert state.is_failed() and "is not writable" in str(state.result(raise_on_failure=False))
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
    assert [(r.name.rsplit("-", 1)[0], r.run_count) for r in runs] == [("evaluate", 1)]
    assert keys() == before


def test_tensor_mismatch_names_shapes_and_the_default_layers():
    from gradlake.tasks.evaluate.evaluation import tensor_mismatch

    def meta(parameters: dict, **lineage) -> dict:
        return {"plan": {"parameters": parameters}, "lineage": lineage}

    embeds = meta({"inputs_embeds": [128, 64]}, layer_patterns=[], max_length=128)
    assert tensor_mismatch("paraphrased", embeds, meta({"inputs_embeds": [128, 64]})) is None
    line = tensor_mismatch("paraphrased", embeds, meta({"inputs_embeds": [256, 64]}))
    assert "tensors of other shapes (inputs_embeds: [128, 64] vs [256, 64])" in line and "max_length (128)" in line, line
    assert "remove the paraphrased group and extract paraphrased again with the originals' max_length" in line, line
    everything = meta({f"t{i}": [2] for i in range(5)}, layer_patterns=[])
    line = tensor_mismatch("model_generated", everything, meta({"t0": [2]}))
    assert "only the original group has t1, t2, t3, ... (4 in all)" in line and "(no --layers: every parameter)" in line, line
    assert "only the model_generated group" not in line and "\n" not in line
