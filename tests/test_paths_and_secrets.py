"""No path escapes the lake and no credential reaches a message: names given as parameters, names read from the lake,
links inside a local lake, credentials in a lake URL or in the API key's setting."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from gradlake.flows.cli import app

runner = CliRunner()
SECRET, KEY_ID = "wJalrXUtnFEMIK7MDENGbPxRfiCYSECRETKEY", "AKIAIOSFODNN7EXAMPLE"


def run_cli(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.output


def one_error_line(code: int, out: str) -> str:
    """The single `error:` line of a refused command (exit 2, no traceback)."""
    lines = [line for line in out.splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in out, out
    return lines[0]


# ---------------------------------------------------------------- credentials

@pytest.mark.parametrize("command", [["catalog"], ["verify"], ["dataset", "probe"]])
def test_a_lake_url_with_credentials_is_refused_without_showing_them(tmp_path, command):
    code, out = run_cli(*command, "--lake", f"s3://{KEY_ID}:{SECRET}@bucket/lake")
    line = one_error_line(code, out)
    assert SECRET not in out and KEY_ID not in out, out
    assert "s3://bucket/lake" in line and "credentials" in line and "AWS_SECRET_ACCESS_KEY" in line


def test_a_checkpoint_prefix_with_credentials_is_refused_without_showing_them(tmp_path):
    code, out = run_cli("train", "--model", "m", "--lake", str(tmp_path / "lake"), "--dataset", "probe",
                        "--output", f"s3://{KEY_ID}:{SECRET}@bucket/run")
    line = one_error_line(code, out)
    assert SECRET not in out and KEY_ID not in out and "output 's3://bucket/run'" in line, out


@pytest.mark.parametrize("option, value", [
    ("--api-key-env", f"sk-proj-{SECRET}"),  # a key where its variable's name belongs
    ("--api-key-env", SECRET),  # a valid-looking name that is random text: a key
    ("--api-key-env", f"not a name {SECRET}"),
    ("--api-key-block", f"sk-{SECRET}"),
    ("--base-url", f"http://user:{SECRET}@localhost:9/v1"),
])
def test_a_key_given_in_place_of_its_name_is_refused_without_echoing_it(tmp_path, option, value):
    lake = tmp_path / "lake"
    code, out = run_cli("dataset", "create", "--name", "probe", "--lake", str(lake), "--paraphrase", option, value)
    line = one_error_line(code, out)
    assert SECRET not in out, out
    assert option.lstrip("-").replace("-", "_") in line and "not shown" in line or "left out" in line, line
    assert not lake.exists()


def test_a_variable_name_is_still_accepted_as_api_key_env():
    from gradlake.tasks.data.paraphrase import ParaphraseSpec

    assert ParaphraseSpec(api_key_env="MY_VLLM_KEY_2", api_key_block="openai-key").api_key_env == "MY_VLLM_KEY_2"


# ---------------------------------------------------------------- links inside a local lake

@pytest.mark.parametrize("link", ["gradients", "datasets/probe/original"])
def test_a_link_out_of_a_local_lake_is_refused_before_anything_is_written(tiny_models, tmp_path, link):
    """A directory link inside the lake that leads out of it: extraction would write through it."""
    import shutil

    from conftest import write_probe

    lake, outside = tmp_path / "lake", tmp_path / "outside"
    write_probe(str(lake), 6)
    if link == "gradients":
        outside.mkdir()
    else:  # the data itself lies outside, linked in: reading it would do, but a write through the link would escape
        shutil.move(str(lake / link), str(outside))
    (lake / link).symlink_to(outside, target_is_directory=True)
    before = sorted(p.name for p in outside.rglob("*"))
    code, out = run_cli("extract", "--model", str(tiny_models["olmo2"]), "--checkpoint", "checkpoint-1",
                        "--layers", "model.layers.*.mlp.down_proj.weight", "--lake", str(lake))
    line = one_error_line(code, out)
    assert f"{lake}/{link}" in line and str(outside) in line, line
    assert sorted(p.name for p in outside.rglob("*")) == before


def test_a_link_that_stays_inside_the_lake_is_followed(tmp_path):
    from gradlake.lake.store import LakeStore

    (tmp_path / "lake" / "a").mkdir(parents=True)
    (tmp_path / "lake" / "b").symlink_to(tmp_path / "lake" / "a", target_is_directory=True)
    LakeStore(str(tmp_path / "lake")).check_writable()


# ---------------------------------------------------------------- names given as parameters

ESCAPE = "../../escape"


def stage_commands(model: str, lake: str, out: str) -> dict[str, tuple[list[str], str]]:
    """Per stage: a command with every required setting good, and the field its bad name is given to."""
    train = ["--model", model, "--checkpoint", "checkpoint-1", "--lake", lake, "--output", out]
    at = ["--model", model, "--checkpoint", "checkpoint-1", "--lake", lake]
    pair = ["--base", model, "--base-checkpoint", "checkpoint-0", "--candidate", model, "--lake", lake]
    return {
        "dataset name": (["dataset", "create", "--lake", lake, "--name", ESCAPE], "name"),
        "generate checkpoint": (["dataset", "create", "--lake", lake, "--name", "probe", "--generate",
                                 f"{model}@{ESCAPE}"], "checkpoint"),
        "extract dataset": (["extract", *at, "--dataset", ESCAPE], "dataset"),
        "extract variant": (["extract", *at, "--variant", "/tmp/escape"], "variant"),
        "extract checkpoint": (["extract", "--model", model, "--lake", lake, "--checkpoint", ESCAPE], "checkpoint"),
        "project gradients": (["project", "--lake", lake, "--gradients", f"gradients/{ESCAPE}", "--kind", "rademacher",
                               "--dim", "8"], "gradients"),
        "evaluate dataset": (["evaluate", *at, "--dataset", ESCAPE], "dataset"),
        "evaluate extraction": (["evaluate", *at, "--extraction", ESCAPE], "extraction"),
        "influence dataset": (["influence", *at, "--dataset", ESCAPE], "dataset"),
        "influence queries": (["influence", *at, "--dataset", "probe",
                               "--queries", ESCAPE], "queries"),
        "influence query dataset": (["influence", *at, "--dataset", "probe",
                                     "--query-dataset", "/tmp/escape"], "query_dataset"),
        "influence train variants": (["influence", *at, "--dataset", "probe",
                                      "--train-variants", ESCAPE], "train_variants"),
        "train dataset": (["train", *train, "--dataset", ESCAPE], "dataset"),
        "train variants": (["train", *train, "--dataset", "probe", "--variants", ESCAPE], "variants"),
        "train version": (["train", *train, "--dataset", "probe", "--version", ESCAPE], "version"),
        "train quality variant": (["train", *train, "--dataset", "probe", "--quality-variant", ESCAPE], "variant"),
        "attribution queries": (["attribution", *train, "--dataset", "probe", "--retrain-prefix", out,
                                 "--queries", ESCAPE], "queries"),
        "attribution query dataset": (["attribution", *train, "--dataset", "probe", "--retrain-prefix", out,
                                       "--query-dataset", ESCAPE], "query_dataset"),
        "attribution retrieval queries": (["attribution", *train, "--dataset", "probe", "--retrain-prefix", out,
                                           "--retrieval-queries", ESCAPE], "retrieval_queries"),
        "trace dataset": (["trace", *pair, "--candidate-checkpoint", "checkpoint-1", "--dataset", ESCAPE],
                          "dataset"),
        "trace variant": (["trace", *pair, "--candidate-checkpoint", "checkpoint-1", "--variant", ESCAPE],
                          "variant"),
        "trace checkpoint": (["trace", *pair, "--candidate-checkpoint", ESCAPE], "checkpoint"),
    }


@pytest.mark.parametrize("stage", list(stage_commands("m", "l", "o")))
def test_a_name_that_would_leave_its_directory_is_refused_before_anything_is_written(tiny_models, tmp_path, stage):
    """Every name a stage turns into a lake path: one line naming the field, the value and what is accepted."""
    from conftest import write_probe

    lake, out = tmp_path / "lake", tmp_path / "out"
    write_probe(str(lake), 6)
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    args, field = stage_commands(str(tiny_models["olmo2"]), str(lake), str(out))[stage]
    code, output = run_cli(*args)
    line = one_error_line(code, output)
    bad = next(a for a in args if "escape" in a and not a.startswith(str(tiny_models["olmo2"]))
               ) if "checkpoint" not in stage else ESCAPE
    assert field in line and repr(bad) in line and ("one path part" in line or "no '..'" in line), line
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before  # nothing written, in the lake or beside it
