"""Training that goes wrong stops in one line and writes no checkpoint past the failure.

Before these checks, training from NaN weights completed and wrote a NaN checkpoint; a learning rate
that blew up logged `nan` losses and the run ended Completed; an infinite learning rate was accepted;
a resumed run whose optimizer state was damaged went on silently to other weights; a damaged
`gradlake_train.json` was one line about an unterminated string; and an S3 endpoint that went away
mid-run ended the command in a traceback.  Each case runs through the real `gradlake train`.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path

import boto3
import fsspec
import pytest
import torch

from conftest import write_probe
from gradlake.lake.manifest import check_directory, read_manifest
from gradlake.tasks.common.model import ModelSpec
from gradlake.tasks.training.checks import DamagedCheckpoint, check_before_save
from gradlake.tasks.training.plan import plan_run
from gradlake.tasks.training.spec import TrainSpec, checkpoint_name
from gradlake.tasks.training.train import train
from s3proxy import FaultyS3Proxy
from test_architectures import poisoned_copy
from test_errors import run_commands

NAN_TENSOR = "model.layers.1.mlp.down_proj.weight"


def spec_for(model: str, lake: str, output: str, checkpoint: str = "checkpoint-0", **overrides) -> TrainSpec:
    settings = dict(model=ModelSpec(model=model, checkpoint=checkpoint, device="cpu"), lake=lake, dataset="probe",
                    output=output, steps=4, batch_size=4, learning_rate=3e-3, checkpoint_every=2, max_length=128,
                    quality=None)
    return TrainSpec(**{**settings, **overrides})


def checkpoints(output: Path) -> list[str]:
    return sorted(p.name for p in output.glob("checkpoint-*")) if output.exists() else []


def damage(path: Path) -> None:
    """Change the last byte: a safetensors file still loads (its header is intact), with other values."""
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x55
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def runs(tiny_models, tmp_path_factory):
    """Each bad case through `gradlake train` in one process: (exit code, stdout, stderr lines, output dir) by case."""
    root = tmp_path_factory.mktemp("train-checks")
    lake = str(root / "lake")
    write_probe(lake, 8)
    model = str(tiny_models["olmo2"])
    poisoned = poisoned_copy(tiny_models, root, NAN_TENSOR)
    specs = {"nan-weights": spec_for(poisoned, lake, str(root / "nan-weights"), "checkpoint-1", checkpoint_every=1),
             "exploding-rate": spec_for(model, lake, str(root / "exploding-rate"), learning_rate=1e8, checkpoint_every=1),
             "damaged-optimizer": spec_for(model, lake, str(root / "damaged-optimizer")),
             "damaged-lineage": spec_for(model, lake, str(root / "damaged-lineage"))}
    for case in ("damaged-optimizer", "damaged-lineage"):  # a run killed after checkpoint 2, then damaged
        train(plan_run(specs[case]), log=lambda _: None)
        final = Path(specs[case].output) / checkpoint_name(4)
        for file in final.rglob("*"):
            file.unlink() if file.is_file() else None
        for directory in sorted(final.rglob("*"), reverse=True) + [final]:
            directory.rmdir()
    second = root / "damaged-optimizer" / checkpoint_name(2)
    damage(second / "trainer_state" / "optimizer.safetensors")
    lineage = root / "damaged-lineage" / checkpoint_name(2) / "gradlake_train.json"
    lineage.write_text(lineage.read_text()[:200])  # cut short, as a copy that stopped half way
    argv = {case: ["train", "--spec", spec.model_dump_json()] for case, spec in specs.items()}
    argv["infinite-rate"] = ["train", "--spec", spec_for(model, lake, str(root / "infinite-rate")).model_dump_json(),
                             "--learning-rate", "inf"]
    return {"specs": specs, **{case: (*ran, root / case) for case, ran in run_commands(root, argv).items()}}


@pytest.mark.parametrize("case, said, left", [
    ("nan-weights", f"hold NaN or Inf ({NAN_TENSOR} first): training stopped before step 1 and wrote nothing", []),
    ("exploding-rate", "training stopped at step 2 of 4: the loss is nan (learning rate 7.5e+07 at that step); no "
                       "checkpoint was written past checkpoint-000001, the last good one", [checkpoint_name(1)]),
    ("infinite-rate", "learning rate inf is not accepted: give a finite number above 0", []),
    ("damaged-optimizer", f"checkpoint-000002 cannot be resumed: ", [checkpoint_name(2)]),
    ("damaged-lineage", f"checkpoint-000002/gradlake_train.json holds 200 bytes, ", [checkpoint_name(2)]),
])
def test_bad_training_stops_in_one_line_with_no_checkpoint_past_it(runs, case, said, left):
    code, stdout, lines, output = runs[case]
    errors = [line for line in lines if line.startswith("error: ")]
    assert code == 2 and len(errors) == 1 and said in errors[0], "\n".join(lines)
    assert not any("Traceback" in line or line.startswith("  File ") for line in lines), "\n".join(lines)
    assert checkpoints(output) == left, errors[0]
    if case.startswith("damaged"):  # the line says what to do: resume from the one before, or a new prefix
        assert f"remove {output / checkpoint_name(2)} and train again to resume from the checkpoint before it" in errors[0]
    if case == "damaged-optimizer":
        assert "trainer_state/optimizer.safetensors differs from what was written" in errors[0]


def test_every_checkpoint_carries_a_manifest_of_all_its_files(runs):
    output = runs["exploding-rate"][3]
    directory = output / checkpoint_name(1)
    files = read_manifest(fsspec.filesystem("file"), str(directory))
    assert {"model.safetensors", "config.json", "gradlake_train.json", "trainer_state/optimizer.safetensors",
            "trainer_state/rng.safetensors", "trainer_state/optimizer.json"} <= set(files)
    assert {p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file()} == {*files, "manifest.json"}
    assert check_directory(fsspec.filesystem("file"), str(directory)) == []


def test_a_lineage_record_without_a_manifest_is_named_when_damaged(runs, tmp_path):
    """A checkpoint written before manifests: its unreadable lineage is one line naming the file, not a JSON error."""
    import shutil

    output = runs["damaged-lineage"][3]
    older = tmp_path / "older"
    shutil.copytree(output, older)
    (older / checkpoint_name(2) / "manifest.json").unlink(missing_ok=True)
    spec = runs["specs"]["damaged-lineage"].model_copy(update={"output": str(older)})
    with pytest.raises(DamagedCheckpoint, match=r"checkpoint-000002/gradlake_train.json is damaged \(JSONDecodeError: "
                                                r"Unterminated string.*\); remove .* and train again"):
        plan_run(spec)


def test_weights_gone_non_finite_are_never_saved(tiny_models):
    """A NaN the loss has not shown yet (an overflowing gradient's update) stops the save, naming step and tensor."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_models["olmo2"] / "checkpoint-0"))
    check_before_save(model, 4, 12, [2])
    with torch.no_grad():
        model.get_parameter(NAN_TENSOR).view(-1)[3] = float("inf")
    with pytest.raises(ValueError, match=rf"stopped at step 4 of 12: the weights hold NaN or Inf \({NAN_TENSOR} first\), "
                                         r"so checkpoint-000004 was not written; no checkpoint was written past "
                                         r"checkpoint-000002"):
        check_before_save(model, 4, 12, [2])


def train_through_an_outage(s3_endpoint, tmp_path, spec: TrainSpec, gone: Callable[[], bool]) -> tuple[str, str, str]:
    """`gradlake train` with S3 behind a proxy that stops once `gone()` holds: (the proxy's endpoint, the error line,
    the last lines of the console)."""
    with FaultyS3Proxy(s3_endpoint, fail=0) as proxy:
        endpoint = proxy.endpoint

        def outage() -> None:
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline and not gone():
                time.sleep(0.02)
            proxy.stop()

        cut = threading.Thread(target=outage, daemon=True)
        cut.start()
        code, _, lines = run_commands(tmp_path, {"outage": ["train", "--spec", spec.model_dump_json()]},
                                      GRADLAKE_S3_ENDPOINT_URL=endpoint)["outage"]
        cut.join()
    errors = [line for line in lines if line.startswith("error: ")]
    assert not any("Traceback" in line or line.startswith("  File ") for line in lines), "\n".join(lines)
    assert code == 2 and len(errors) == 1, "\n".join(lines)
    return endpoint, errors[0], "\n".join(lines[-12:])


def test_an_s3_outage_mid_run_is_one_line_naming_the_endpoint(tiny_models, s3_endpoint, tmp_path):
    """The output's endpoint goes away after checkpoint 2: one line naming it; no half-written checkpoint counts."""
    import uuid

    lake = str(tmp_path / "lake")
    write_probe(lake, 8)
    prefix = f"checkpoints/outage-{uuid.uuid4().hex[:8]}"
    spec = spec_for(str(tiny_models["olmo2"]), lake, f"s3://lake/{prefix}", steps=12, checkpoint_every=1)
    direct = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    weights = f"{prefix}/{checkpoint_name(2)}/model.safetensors"  # gone while later checkpoints are written

    def keys() -> list[str]:
        return [o["Key"] for o in direct.list_objects_v2(Bucket="lake", Prefix=prefix).get("Contents", [])]

    endpoint, error, shown = train_through_an_outage(s3_endpoint, tmp_path, spec, lambda: weights in keys())
    assert f"cannot reach the S3 endpoint {endpoint} for s3://lake/{prefix}: connection refused" in error, shown
    # What the run left: every checkpoint counted is whole and as written; a half-uploaded one is not counted.
    plan = plan_run(spec)
    assert 1 <= max(plan.done) < 12, plan.done
    fs = fsspec.filesystem("s3", client_kwargs={"endpoint_url": s3_endpoint})
    for step in plan.done:
        assert check_directory(fs, f"lake/{prefix}/{checkpoint_name(step)}") == [], step
    # The same command once the endpoint answers again resumes from the last whole checkpoint and finishes.
    resumed = train(plan, log=lambda _: None)
    assert resumed.resumed_from == max(plan.done) and resumed.final == checkpoint_name(12)


def test_the_lakes_s3_outage_after_training_is_one_line_naming_it(tiny_models, s3_endpoint, tmp_path):
    """The lake's endpoint goes away once the last checkpoint is written, before its answers are scored into the lake."""
    import uuid

    from gradlake.tasks.data.quality import QualitySpec

    lake = f"s3://lake/train-outage-{uuid.uuid4().hex[:8]}"
    write_probe(lake, 8)
    spec = spec_for(str(tiny_models["olmo2"]), lake, str(tmp_path / "out"), steps=2, checkpoint_every=0,
                    quality=QualitySpec(max_samples=2, max_new_tokens=4))
    final = tmp_path / "out" / checkpoint_name(2)
    endpoint, error, shown = train_through_an_outage(s3_endpoint, tmp_path, spec, final.exists)
    # said by the lake's own reads (a LakeError) or, for a raw read, prefixed with what was not done
    assert f"cannot reach the S3 endpoint {endpoint} for {lake}: connection refused" in error, shown
    assert checkpoints(tmp_path / "out") == [checkpoint_name(2)]


def test_planning_a_run_leaves_no_directory_behind(tiny_models, tmp_path):
    """The writability probe of a checkpoint (or retraining) prefix removes what it made: a refusal after it leaves nothing."""
    lake = str(tmp_path / "lake")
    write_probe(lake, 4)
    spec = spec_for(str(tiny_models["olmo2"]), lake, str(tmp_path / "runs" / "nested" / "run"))
    assert plan_run(spec).done == []
    assert not (tmp_path / "runs").exists()
    assert train(plan_run(spec), log=lambda _: None).final == checkpoint_name(4)  # the first checkpoint makes it
