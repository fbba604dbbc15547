"""The training stage: deterministic runs, checkpoints that appear whole, resume after a kill, clear errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import write_probe
from gradlake.tasks.common.checkpoints import WatchedModel, list_checkpoints
from gradlake.tasks.common.model import ModelSpec
from gradlake.tasks.training.spec import TrainError, TrainSpec, checkpoint_name
from gradlake.tasks.training.plan import batch_of_step, learning_rate, plan_run
from gradlake.tasks.training.train import train

N_SAMPLES = 24


@pytest.fixture(scope="module")
def lake(tmp_path_factory) -> str:
    url = str(tmp_path_factory.mktemp("train-lake"))
    write_probe(url, N_SAMPLES)
    return url


def spec_for(tiny_models, lake: str, output, **overrides) -> TrainSpec:
    settings = dict(model=ModelSpec(model=str(tiny_models["olmo2"]), checkpoint="checkpoint-0", device="cpu"),
                    lake=lake, dataset="probe", output=str(output), steps=12, batch_size=4, learning_rate=3e-3,
                    warmup_steps=2, checkpoint_every=4, seed=7)
    return TrainSpec(**{**settings, **overrides})


def weights(directory) -> dict[str, torch.Tensor]:
    return load_file(str(Path(directory) / "model.safetensors"))


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs"


@pytest.fixture(scope="module")
def reference_run(tiny_models, lake, tmp_path_factory):
    """One uninterrupted run that the other tests compare with."""
    spec = spec_for(tiny_models, lake, tmp_path_factory.mktemp("ckpt") / "reference")
    result = train(plan_run(spec), log=lambda _: None)
    return spec, result


def test_same_spec_gives_bitwise_equal_weights_and_records_order(tiny_models, lake, tmp_path, reference_run):
    spec, result = reference_run
    assert result.checkpoints == [checkpoint_name(s) for s in (4, 8, 12)]
    again = train(plan_run(spec.model_copy(update={"output": str(tmp_path / "again")})), log=lambda _: None)
    final = Path(spec.output) / result.final
    assert_bitwise_equal(weights(final), weights(tmp_path / "again" / again.final))
    assert result.losses == again.losses
    # The model learned: the loss of the last steps is below that of the first.
    assert sum(result.losses[-3:]) < sum(result.losses[:3])
    # The recorded order is the seed's, step by step, as 'variant:id'.
    lineage = json.loads((final / "gradlake_train.json").read_text())
    plan = plan_run(spec)
    expected = [plan.data.keys[i] for s in range(12) for i in batch_of_step(s, spec.seed, N_SAMPLES, 4)]
    assert lineage["trained_on"] == expected and len(expected) == 48
    assert lineage["trained_on"][0].startswith("original:")
    middle = json.loads((Path(spec.output) / checkpoint_name(4) / "gradlake_train.json").read_text())
    assert middle["trained_on"] == expected[:16]
    assert lineage["base_model"]["commit"].startswith("sha256:") and lineage["data"]["versions"]["original"].startswith("v-")
    # Every sample is seen once per epoch (24 samples in batches of 4: 6 steps an epoch).
    assert sorted(expected[:24]) == sorted(plan.data.keys)
    # A different seed trains in a different order.
    assert batch_of_step(0, spec.seed + 1, N_SAMPLES, 4) != batch_of_step(0, spec.seed, N_SAMPLES, 4)


def test_checkpoints_are_hugging_face_directories_the_watcher_lists(reference_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec, result = reference_run
    found = list_checkpoints(WatchedModel(model=spec.output))
    assert found == result.checkpoints
    directory = Path(spec.output) / result.final
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "gradlake_train.json",
                 "trainer_state/optimizer.safetensors", "trainer_state/rng.safetensors"):
        assert (directory / name).is_file(), name
    model = AutoModelForCausalLM.from_pretrained(directory)
    assert AutoTokenizer.from_pretrained(directory).chat_template
    assert_bitwise_equal({n: p.detach() for n, p in model.state_dict().items()}, weights(directory))


def test_staging_directory_is_invisible_to_the_watcher(reference_run, tmp_path):
    import shutil

    spec, result = reference_run
    prefix = tmp_path / "prefix"
    shutil.copytree(Path(spec.output) / result.final, prefix / f".{result.final}.partial")
    half = prefix / "checkpoint-000002"
    shutil.copytree(Path(spec.output) / result.final, half)
    data = (half / "model.safetensors").read_bytes()
    (half / "model.safetensors").write_bytes(data[: len(data) // 2])  # a weight file still being written
    unfinished: list[str] = []
    assert list_checkpoints(WatchedModel(model=str(prefix)), unfinished) == []
    assert unfinished == ["checkpoint-000002"]


KILLED_RUN = textwrap.dedent("""
    import json, sys, time
    from gradlake.tasks.training.train import TrainSpec, plan_run, train
    spec = TrainSpec.model_validate(json.loads(sys.argv[1]))
    train(plan_run(spec), log=lambda _: None, on_step=lambda step, loss: time.sleep(0.4))
""")


def test_resume_after_kill_gives_the_same_final_weights(tiny_models, lake, tmp_path, reference_run):
    spec, result = reference_run
    killed = spec.model_copy(update={"output": str(tmp_path / "killed")})
    proc = subprocess.Popen([sys.executable, "-c", KILLED_RUN, killed.model_dump_json()])
    first = tmp_path / "killed" / checkpoint_name(4)
    deadline = time.monotonic() + 120
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert first.exists(), "the run wrote no checkpoint"
    os.kill(proc.pid, signal.SIGKILL)  # mid-run: the next checkpoint is 4 slow steps away
    proc.wait()
    assert not (tmp_path / "killed" / result.final).exists()
    plan = plan_run(killed)
    assert plan.done == [4]
    resumed = train(plan, log=lambda _: None)
    assert resumed.resumed_from == 4 and len(resumed.losses) == 8
    assert resumed.losses == result.losses[4:]
    assert_bitwise_equal(weights(tmp_path / "killed" / result.final), weights(Path(spec.output) / result.final))
    # A finished run asked again does nothing.
    assert train(plan_run(killed), log=lambda _: None).losses == []


def test_keep_and_drop_choose_the_samples(tiny_models, lake, tmp_path):
    spec = spec_for(tiny_models, lake, tmp_path / "x")
    ids = plan_run(spec).data.ids
    kept = plan_run(spec.model_copy(update={"keep": ids[:5]}))
    assert kept.data.ids == ids[:5] and kept.steps_per_epoch == 2
    dropped = plan_run(spec.model_copy(update={"drop": ids[:5]}))
    assert dropped.data.ids == ids[5:]
    assert kept.fingerprint != dropped.fingerprint != plan_run(spec).fingerprint


def test_learning_rate_schedules():
    base = dict(model=ModelSpec(model="/m"), lake="/l", dataset="d", output="/o", learning_rate=1.0, warmup_steps=2)
    linear = TrainSpec(**base, schedule="linear")
    assert [learning_rate(linear, s, 10) for s in (0, 1, 2, 6)] == [0.5, 1.0, 1.0, 0.5]
    cosine = TrainSpec(**base, schedule="cosine")
    assert learning_rate(cosine, 6, 10) == pytest.approx(0.5) and learning_rate(cosine, 9, 10) < 0.05
    assert learning_rate(TrainSpec(**base, schedule="constant"), 9, 10) == 1.0


@pytest.mark.parametrize("change, message", [
    ({"keep": ["nope-1"]}, "sample ids ['nope-1'] are not in dataset 'probe'"),
    ({"variants": ["translated"]}, "variant 'translated' is not in lake"),
    ({"dataset": "absent"}, "dataset 'absent' variant 'original' is not in lake"),
    ({"model": ModelSpec(model="/no/such/model")}, "model path '/no/such/model' does not exist"),
])
def test_bad_input_fails_before_anything_is_written(tiny_models, lake, tmp_path, change, message):
    spec = spec_for(tiny_models, lake, tmp_path / "out", **change)
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        plan_run(spec)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_spec_errors_name_the_value():
    base = dict(model=ModelSpec(model="/m"), lake="/l", dataset="d", output="/o")
    with pytest.raises(ValueError, match="`keep` or `drop`, not both"):
        TrainSpec(**base, keep=["a"], drop=["b"])
    with pytest.raises(ValueError, match="micro_batch_size 9 exceeds batch_size 8"):
        TrainSpec(**base, micro_batch_size=9)
    for rate in (0, -1e-3, float("inf"), float("nan")):  # inf and nan passed pydantic's gt=0 / said only "> 0"
        with pytest.raises(ValueError, match=f"learning rate {float(rate)} is not accepted: give a finite number above 0"):
            TrainSpec(**base, learning_rate=rate)


def test_unwritable_prefix_and_foreign_checkpoints_are_refused(tiny_models, lake, tmp_path, reference_run):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(TrainError, match="checkpoint prefix .*a-file/sub' is not writable"):
        plan_run(spec_for(tiny_models, lake, blocker / "sub"))
    spec, _ = reference_run
    other = spec.model_copy(update={"seed": 8})
    with pytest.raises(TrainError, match="holds checkpoint-000004 of another training run"):
        plan_run(other)


def test_micro_batches_give_the_same_training(tiny_models, lake, tmp_path):
    whole = train(plan_run(spec_for(tiny_models, lake, tmp_path / "a", steps=3, checkpoint_every=0)), log=lambda _: None)
    micro = train(plan_run(spec_for(tiny_models, lake, tmp_path / "b", steps=3, checkpoint_every=0, micro_batch_size=1)),
                  log=lambda _: None)
    assert micro.losses == pytest.approx(whole.losses, rel=1e-5)
    a, b = weights(tmp_path / "a" / whole.final), weights(tmp_path / "b" / micro.final)
    assert max(float((a[n] - b[n]).abs().max()) for n in a) < 1e-4


def test_training_to_s3_through_the_flow(tiny_models, lake, s3_endpoint):
    """The flow on the real Prefect server, checkpoints on S3: listed by the watcher, loadable, resumable."""
    import fsspec

    from gradlake.flows.train import train_model

    from gradlake.lake.store import LakeStore
    from gradlake.tasks.data.quality import QualitySpec, read_quality

    spec = spec_for(tiny_models, lake, "s3://lake/checkpoints/tiny", steps=4, checkpoint_every=2, save_initial=True,
                    quality=QualitySpec(max_samples=6, max_new_tokens=12))
    paths = train_model(spec)
    assert paths == [f"s3://lake/checkpoints/tiny/{checkpoint_name(s)}" for s in (0, 2, 4)]
    assert list_checkpoints(WatchedModel(model=spec.output)) == [checkpoint_name(s) for s in (0, 2, 4)]
    fs = fsspec.filesystem("s3", client_kwargs={"endpoint_url": s3_endpoint})
    record = json.loads(fs.cat_file(f"lake/checkpoints/tiny/{checkpoint_name(4)}/gradlake_train.json"))
    assert record["step"] == 4 and len(record["trained_on"]) == 16
    # Step 0 is the base model itself.
    base = weights(Path(spec.model.source()[0]))
    with fs.open(f"lake/checkpoints/tiny/{checkpoint_name(0)}/model.safetensors", "rb") as handle:
        from safetensors.torch import load as load_bytes

        assert_bitwise_equal(load_bytes(handle.read()), base)
    # Asked again, the run finds its checkpoints and trains nothing.
    assert plan_run(spec).done == [0, 2, 4]
    # Each checkpoint's answers are scored in the lake, with lineage back to the checkpoint.
    quality = read_quality(LakeStore(lake)).sort_values("checkpoint")
    assert list(quality["checkpoint"]) == [checkpoint_name(s) for s in (0, 2, 4)]
    assert quality["n"].tolist() == [6, 6, 6] and quality["rouge_l"].between(0, 1).all()
    assert [l["step"] for l in quality["lineage"]] == [0, 2, 4]
    assert quality["lineage"].iloc[2]["checkpoint"] == f"s3://lake/checkpoints/tiny/{checkpoint_name(4)}"


def test_pipeline_stages_load_checkpoints_from_s3(tiny_models, lake, s3_endpoint, tmp_path, monkeypatch):
    """A checkpoint the trainer wrote to S3 is a model the other stages can name: checked, keyed, downloaded once."""
    from gradlake.tasks.common.model import ModelError, check_model, lake_names, load_tokenizer, resolved_commit

    monkeypatch.setenv("GRADLAKE_MODEL_CACHE", str(tmp_path / "cache"))
    spec = spec_for(tiny_models, lake, "s3://lake/checkpoints/for-stages", steps=2, checkpoint_every=0, quality=None)
    train(plan_run(spec), log=lambda _: None)
    model = ModelSpec(model=spec.output, checkpoint=checkpoint_name(2))
    assert check_model(model).hidden_size == 64
    assert not (tmp_path / "cache").exists(), "checking a model reads its config only"
    assert lake_names(model) == ("s3://lake/checkpoints/for-stages", "checkpoint-000002")
    assert load_tokenizer(model).chat_template
    downloaded = list((tmp_path / "cache").iterdir())
    assert len(downloaded) == 1 and (downloaded[0] / "model.safetensors").is_file()
    assert resolved_commit(model).startswith("sha256:")
    with pytest.raises(ModelError, match="checkpoint 'checkpoint-9' of 's3://lake/checkpoints/for-stages' has no "
                                         r"config.json; checkpoints found there: \['checkpoint-000002'\]"):
        check_model(ModelSpec(model=spec.output, checkpoint="checkpoint-9"))
