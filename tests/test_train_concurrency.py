"""Two training runs into one checkpoint prefix: one trains, the other is refused in one line before it writes.

Before the prefix claim, two runs with different learning rates into one `output` both ended well and the
prefix held checkpoints of both, mixed: the check for another run's checkpoints ran only at plan time, a
checkpoint was published over another run's without reading it, and the staging directory was shared.
"""

from __future__ import annotations

import json
import shutil
import threading
import traceback
import uuid
from pathlib import Path

import fsspec
import pytest

from conftest import write_probe
from gradlake.lake import claims
from gradlake.lake.manifest import check_directory
from gradlake.tasks.common.checkpoints import WatchedModel, list_checkpoints
from gradlake.tasks.common.model import ModelSpec
from gradlake.tasks.training.claim import PREFIX_CLAIM, prefix_store
from gradlake.tasks.training.plan import plan_run
from gradlake.tasks.training.spec import TrainError, TrainSpec, checkpoint_name, settings
from gradlake.tasks.training.train import TrainResult, train


@pytest.fixture(scope="module")
def lake(tmp_path_factory) -> str:
    url = str(tmp_path_factory.mktemp("concurrent-lake"))
    write_probe(url, 8)
    return url


def spec_for(tiny_models, lake: str, output: str, **overrides) -> TrainSpec:
    settings = dict(model=ModelSpec(model=str(tiny_models["olmo2"]), checkpoint="checkpoint-0", device="cpu"),
                    lake=lake, dataset="probe", output=output, steps=4, batch_size=4, learning_rate=3e-3,
                    checkpoint_every=1, max_length=128, quality=None)
    return TrainSpec(**{**settings, **overrides})


def race(specs: list[TrainSpec]) -> list[TrainResult | Exception]:
    """Plan and train every spec at once, one thread each (the real functions); what each ended with."""
    start = threading.Barrier(len(specs))
    outcomes: list = [None] * len(specs)

    def run(index: int) -> None:
        start.wait()
        try:
            outcomes[index] = train(plan_run(specs[index]), log=lambda _: None)
        except Exception as err:  # a refusal (TrainError), or what a mixed prefix broke
            outcomes[index] = err

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(specs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    return outcomes


def prefix_of(where: str, tmp_path: Path, request) -> tuple[str, fsspec.AbstractFileSystem, str]:
    """(the output URL, its filesystem, its root there) for a fresh prefix, local or on the moto S3."""
    if where == "local":
        return str(tmp_path / "run"), fsspec.filesystem("file"), str(tmp_path / "run")
    endpoint = request.getfixturevalue("s3_endpoint")
    name = f"concurrent-{uuid.uuid4().hex[:8]}"
    return f"s3://lake/{name}", fsspec.filesystem("s3", client_kwargs={"endpoint_url": endpoint}), f"lake/{name}"


@pytest.mark.parametrize("where", ["local", "s3"])
def test_two_runs_into_one_prefix_one_is_refused_before_it_writes(tiny_models, lake, tmp_path, where, request):
    output, fs, root = prefix_of(where, tmp_path, request)
    specs = [spec_for(tiny_models, lake, output, learning_rate=3e-3), spec_for(tiny_models, lake, output, learning_rate=1e-3)]
    outcomes = race(specs)
    refused = [i for i, outcome in enumerate(outcomes) if isinstance(outcome, TrainError)]
    assert len(refused) == 1, [o if isinstance(o, (TrainResult, TrainError)) else "".join(traceback.format_exception(o))
                               for o in outcomes]
    winner = 1 - refused[0]
    assert isinstance(outcomes[winner], TrainResult) and outcomes[winner].final == checkpoint_name(4)
    fingerprint = plan_run(specs[winner]).fingerprint
    refusal = str(outcomes[refused[0]])
    assert "\n" not in refusal
    for said in (repr(output), fingerprint, "learning_rate", "another output prefix"):
        assert said in refusal, refusal
    # The prefix holds the winner's checkpoints only, each whole, each carrying the winner's fingerprint.
    fs.invalidate_cache()
    names = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False))
    assert names == [checkpoint_name(s) for s in (1, 2, 3, 4)], names  # no staging directory, no claim left
    for name in names:
        record = json.loads(fs.cat_file(f"{root}/{name}/gradlake_train.json"))
        assert record["fingerprint"] == fingerprint and record["step"] == int(name.split("-")[1])
        assert check_directory(fs, f"{root}/{name}") == [], name


@pytest.mark.parametrize("where", ["local", "s3"])
def test_another_runs_checkpoint_is_never_replaced(tiny_models, lake, tmp_path, where, request):
    """A checkpoint of another run that appears after the plan (written by a run that held no claim) is read right
    before publishing over it: the run stops in one line naming it, and it stays as it was."""
    output, fs, root = prefix_of(where, tmp_path, request)
    ours = spec_for(tiny_models, lake, output, steps=2)
    theirs = ours.model_copy(update={"output": str(tmp_path / "theirs"), "learning_rate": 1e-3})
    train(plan_run(theirs), log=lambda _: None)
    plan = plan_run(ours)
    foreign = tmp_path / "theirs" / checkpoint_name(1)
    target = f"{root}/{checkpoint_name(1)}"

    def appears(step: int, loss: float) -> None:  # after step 1 is computed, before its checkpoint is published
        if step == 1:
            fs.put(str(foreign), target, recursive=True) if where == "s3" else shutil.copytree(foreign, target)

    with pytest.raises(TrainError) as refused:
        train(plan, log=lambda _: None, on_step=appears)
    said = str(refused.value)
    assert "\n" not in said
    for part in (f"{checkpoint_name(1)} was not written: {output}/{checkpoint_name(1)} holds a checkpoint of another "
                 f"training run (fingerprint {plan_run(theirs).fingerprint}, this run {plan.fingerprint}; "
                 "learning_rate 0.001 there, 0.003 here)", "train into another output prefix"):
        assert part in said, said
    fs.invalidate_cache()
    assert sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)) == [checkpoint_name(1)]
    for file in foreign.rglob("*"):
        if file.is_file():
            assert fs.cat_file(f"{target}/{file.relative_to(foreign).as_posix()}") == file.read_bytes(), file


def test_a_live_claim_of_another_run_refuses_a_stale_one_or_this_runs_own_does_not(tiny_models, lake, tmp_path):
    """A prefix claimed by a live run with other settings is refused at plan time; a claim that ran out (its run
    died elsewhere) is taken over, and this run's own (a killed attempt of the same spec) is resumed under."""
    spec = spec_for(tiny_models, lake, str(tmp_path / "run"), steps=1)
    store = prefix_store(spec)
    other = settings(spec.model_copy(update={"seed": 9}))
    assert claims.take(store, PREFIX_CLAIM, "sha256:another", 600, {"settings": other})
    with pytest.raises(TrainError) as refused:
        plan_run(spec)
    said = str(refused.value)
    assert f"checkpoint prefix {spec.output!r} is in use by another training run (fingerprint sha256:another, " in said
    assert "seed 9 there, 0 here" in said and "nothing was trained or written: train into another output prefix" in said
    assert [p.name for p in Path(spec.output).iterdir()] == [".gradlake"]  # only the claim that refused it
    claims.release(store, PREFIX_CLAIM)
    assert claims.take(store, PREFIX_CLAIM, "sha256:another", -1, {"settings": other})  # ran out: its run died
    plan = plan_run(spec)
    assert claims.take(store, PREFIX_CLAIM, plan.fingerprint, 600, {})  # a killed attempt of this same spec
    assert train(plan, log=lambda _: None).final == checkpoint_name(1)
    assert sorted(p.name for p in Path(spec.output).iterdir()) == [checkpoint_name(1)]  # the claim is given back


def test_a_staging_directory_is_the_publishing_calls_own(tiny_models, lake, tmp_path):
    """Another writer's staging directory (here at the name every process shared before) is left alone; this run's
    own are gone once published, and the watcher lists the checkpoint only."""
    spec = spec_for(tiny_models, lake, str(tmp_path / "run"), steps=1)
    other = Path(spec.output) / f".{checkpoint_name(1)}.partial"
    other.mkdir(parents=True)
    (other / "config.json").write_text("{}")  # another process, part way through its copy
    assert train(plan_run(spec), log=lambda _: None).final == checkpoint_name(1)
    assert (other / "config.json").read_text() == "{}"
    assert sorted(p.name for p in Path(spec.output).iterdir()) == [other.name, checkpoint_name(1)]
    assert list_checkpoints(WatchedModel(model=spec.output)) == [checkpoint_name(1)]
