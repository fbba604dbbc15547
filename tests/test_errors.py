"""Bad input gets one clear error, before any expensive work and before anything is written."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import write_probe
from gradlake.flows.cli import app
from gradlake.lake.datasets import write_dataset
from gradlake.lake.store import LakeStore

runner = CliRunner()


def run_cli(*args: str):
    result = runner.invoke(app, list(args))
    return result.exit_code, result.output


@pytest.fixture
def lake_dir(tmp_path) -> Path:
    path = tmp_path / "lake"
    write_probe(str(path), 6)
    return path


def assert_nothing_written(lake: Path) -> None:
    assert not (lake / "gradients").exists(), "an error must come before any write"


def test_unknown_model_path(lake_dir):
    code, out = run_cli("extract", "--model", "/no/such/model", "--lake", str(lake_dir))
    assert code == 2 and "'/no/such/model' does not exist" in out
    assert_nothing_written(lake_dir)


def test_missing_checkpoint_lists_the_available_ones(tiny_models, lake_dir):
    code, out = run_cli("extract", "--model", str(tiny_models["olmo"]), "--checkpoint", "checkpoint-9", "--lake", str(lake_dir))
    assert code == 2 and "checkpoint 'checkpoint-9'" in out and "checkpoint-0" in out and "checkpoint-1" in out
    assert_nothing_written(lake_dir)


def test_layer_pattern_matching_nothing(tiny_models, lake_dir):
    code, out = run_cli("extract", "--model", str(tiny_models["olmo2"]), "--checkpoint", "checkpoint-1",
                        "--layers", "model.layers.*.mlp.down_proj.weight", "--layers", "mlp.*.weight", "--lake", str(lake_dir))
    assert code == 2 and "layer pattern 'mlp.*.weight' matched no parameter" in out and "model.layers.0." in out
    assert_nothing_written(lake_dir)


def test_empty_dataset(tiny_models, tmp_path):
    lake = tmp_path / "lake"
    code, out = run_cli("extract", "--model", str(tiny_models["olmo"]), "--checkpoint", "checkpoint-1",
                        "--dataset", "nothing", "--lake", str(lake))
    assert code == 2 and "dataset 'nothing' variant 'original' is not in lake" in out
    assert_nothing_written(lake)
    import pandas as pd

    with pytest.raises(ValueError, match="has no rows"):
        write_dataset(LakeStore(str(lake)), "empty", "original", pd.DataFrame({"id": [], "messages": []}))


def test_unwritable_local_lake(tiny_models, tmp_path):
    """A lake path that runs through a regular file cannot be written, even by root."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    code, out = run_cli("extract", "--model", str(tiny_models["olmo"]), "--checkpoint", "checkpoint-1",
                        "--lake", str(blocker / "lake"))
    assert code == 2 and "is not writable" in out and str(blocker / "lake") in out


def test_unwritable_s3_lake(tiny_models, s3_endpoint):
    code, out = run_cli("extract", "--model", str(tiny_models["olmo"]), "--checkpoint", "checkpoint-1",
                        "--lake", "s3://no-such-bucket/lake")
    assert code == 2 and "'s3://no-such-bucket/lake' is not writable" in out
    assert "testing" not in out, "credentials must never be printed"


def test_unknown_preset_and_bad_values():
    code, out = run_cli("extract", "--model", "x", "--paradigm", "both", "--lake", "/tmp/none")
    assert code == 2 and "paradigm" in out and "'sft'" in out
    code, out = run_cli("extract", "--model", "x", "--shard-size", "10", "--batch-size", "3", "--lake", "/tmp/none")
    assert code == 2 and "multiple of batch_size 3" in out


def test_bad_input_is_not_retried(tiny_models, lake_dir):
    """Inside Prefect, a ValueError fails its task at once; retries are for machine and network faults."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from gradlake.flows.extract import extract_gradients
    from gradlake.tasks.gradients.plan import ExtractionSpec
    from gradlake.tasks.common.model import ModelSpec

    spec = ExtractionSpec(model=ModelSpec(model=str(tiny_models["olmo"]), checkpoint="checkpoint-1"),
                          layers=["no.such.layer"], lake=str(lake_dir))
    state = extract_gradients(spec, return_state=True)
    assert state.is_failed() and "matched no parameter" in str(state.result(raise_on_failure=False))
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
    assert [(r.name.rsplit("-", 1)[0], r.run_count) for r in runs] == [("plan-and-create-group", 1)]
    assert_nothing_written(lake_dir)


def _bad_sources(directory: Path) -> dict[str, tuple[Path, str, str]]:
    """Source files that cannot become a probe set: name -> (file, what the error says is wrong, what it accepts)."""
    import json

    rows = "each row needs a 'messages' list of role/content pairs, a 'conversations' list of strings"
    cases = {
        "invalid-json": ("bad.jsonl", "{not json\n{\"id\": 1,\n", "dropped: {'not valid JSON': 2}", rows),
        "empty-file": ("empty.jsonl", "", "has no usable row (0 read", rows),
        "non-utf8": ("latin1.jsonl", json.dumps({"id": "a", "prompt": "caf\u00e9", "response": "x"}, ensure_ascii=False)
                     .encode("latin-1") + b"\n", "'utf-8' codec can't decode", "UTF-8 text, one JSON object per line"),
        "system-turns-only": ("system.jsonl", json.dumps({"id": "a", "messages": [{"role": "system", "content": "Be brief."}]}),
                              "dropped: {'no user turn': 1}", rows),
        "unexpected-schema": ("schema.jsonl", json.dumps({"id": "a", "text": "no chat here"}),
                              "dropped: {'no messages, conversations or prompt/response columns': 1}", rows),
        "garbage-parquet": ("garbage.parquet", b"PAR1 this is not parquet", "Parquet magic bytes not found",
                            "a complete Parquet file"),
        "csv": ("data.csv", "prompt,response\nHi?,Hello.\n", "has suffix '.csv'", "'.jsonl', '.json', '.parquet', '.arrow'"),
        "missing-file": ("missing.jsonl", None, "does not exist", "pass a .jsonl, .parquet or .arrow file"),
    }
    out = {}
    for case, (name, content, wrong, accepted) in cases.items():
        path = directory / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif content is not None:
            path.write_text(content)
        out[case] = (path, wrong, accepted)
    return out


BAD_SOURCES = ["invalid-json", "empty-file", "non-utf8", "system-turns-only", "unexpected-schema", "garbage-parquet", "csv",
               "missing-file"]
# Runs `gradlake.flows.cli.main` once per case in one process (a process start costs ~10 s here), each with
# file descriptors 1 and 2 on files of its own: whatever Prefect or Python would print reaches them.
_DRIVER = """
import json, os, sys
from gradlake.flows.cli import main
where, cases, codes = sys.argv[1], json.loads(sys.argv[2]), {}
for case, argv in cases.items():
    saved = os.dup(1), os.dup(2)
    with open(os.path.join(where, case + ".out"), "w") as out, open(os.path.join(where, case + ".err"), "w") as err:
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        try:
            sys.argv = ["gradlake", *argv]
            main()
            codes[case] = 0
        except SystemExit as ended:
            codes[case] = ended.code if isinstance(ended.code, int) else 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
print(json.dumps(codes))
"""


def run_commands(root: Path, argv: dict[str, list[str]], **env: str) -> dict[str, tuple[int, str, list[str]]]:
    """Each command line through `_DRIVER` in one process: (exit code, stdout, stderr lines) by case."""
    import json
    import os
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _DRIVER, str(root), json.dumps(argv)],
                          env={**os.environ, "COLUMNS": "200", **env}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    codes = json.loads(done.stdout.strip().splitlines()[-1])
    return {case: (codes[case], (root / f"{case}.out").read_text(), (root / f"{case}.err").read_text().splitlines())
            for case in argv}


@pytest.fixture(scope="module")
def bad_source_runs(tmp_path_factory):
    """Each bad source through the real command: (exit code, stdout, stderr lines, the file, the lake) by case."""
    root = tmp_path_factory.mktemp("bad-sources")
    sources = _bad_sources(root)
    argv = {case: ["dataset", "create", "--name", "mini", "--source", str(sources[case][0]), "--lake", str(root / f"lake-{case}")]
            for case in BAD_SOURCES}
    return {case: (*ran, sources[case], root / f"lake-{case}") for case, ran in run_commands(root, argv).items()}


@pytest.mark.parametrize("case", BAD_SOURCES)
def test_a_bad_dataset_source_is_one_line_before_prefect_starts(case, bad_source_runs):
    """Through the real command: no Prefect traceback, only the error, and the lake stays empty."""
    code, stdout, lines, (path, wrong, accepted), lake = bad_source_runs[case]
    assert (code, stdout, len(lines)) == (2, "", 1), "\n".join(lines)
    assert lines[0].startswith("error: ") and repr(str(path)) in lines[0], lines[0]
    assert wrong in lines[0] and accepted in lines[0], lines[0]
    assert not lake.exists() or not any(lake.rglob("*")), "an error must come before any write"


# -- failures only the run can find ------------------------------------------------------------

@pytest.fixture(scope="module")
def in_run_failures(tiny_models, tmp_path_factory):
    """A NaN weight and a key the API refuses, each through the real command: (exit code, stdout, stderr lines) by case."""
    import json

    from gradlake.tasks.data.probes import load_probe_set
    from openai_server import FakeOpenAI
    from test_architectures import poisoned_copy

    root = tmp_path_factory.mktemp("in-run")
    model = poisoned_copy(tiny_models, root, "model.layers.1.mlp.down_proj.weight")
    write_probe(str(root / "lake-nan"), 4)
    source = root / "probes.jsonl"
    rows = load_probe_set().head(4)[["id", "instruction", "answer"]].to_dict(orient="records")
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    server = FakeOpenAI().start()
    argv = {"nan-weights": ["extract", "--model", model, "--checkpoint", "checkpoint-1", "--layers", "lm_head.weight",
                            "--max-length", "256", "--lake", str(root / "lake-nan")],
            "refused-key": ["dataset", "create", "--name", "mini", "--source", str(source), "--paraphrase",
                            "--paraphrase-model", server.models[0], "--base-url", server.base_url,
                            "--lake", str(root / "lake-key")]}
    try:
        return run_commands(root, argv, OPENAI_API_KEY="sk-revoked")
    finally:
        server.stop()


@pytest.mark.parametrize("case, said", [("nan-weights", "NaN or Inf in the loss and the gradients"),
                                        ("refused-key", "rejected the key from $OPENAI_API_KEY (401)")])
def test_a_failure_found_in_the_run_ends_in_its_line_without_prefects_traceback(case, said, in_run_failures):
    """Prefect logs the failed task and flow in a line each; the traceback of an error gradlake told stays on the server."""
    code, stdout, lines = in_run_failures[case]
    assert code == 2, "\n".join(lines)
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and said in errors[0], "\n".join(lines)
    assert not any("Traceback" in line or line.startswith("  File ") for line in lines), "\n".join(lines)
    assert "sk-revoked" not in stdout + "\n".join(lines)


def test_only_an_error_gradlake_raised_loses_its_traceback():
    """A ValueError from a library (a bug, not bad input) keeps its traceback on the console."""
    import logging

    import numpy as np

    from gradlake.flows.console import WithoutToldTraceback, told
    from gradlake.tasks.training.tiny import tiny_config

    caught = {}
    for name, call in (("ours", lambda: tiny_config("gptneox", 10)), ("numpy's", lambda: np.zeros(2).reshape(3))):
        try:
            call()
        except ValueError as err:
            caught[name] = err
    assert told(caught["ours"]) and not told(caught["numpy's"]) and not told(ValueError("never raised"))
    formatter = WithoutToldTraceback(logging.Formatter("%(message)s"))
    for name, err in caught.items():
        record = logging.LogRecord("prefect.flow_runs", logging.ERROR, __file__, 1, "failed", None, (type(err), err, err.__traceback__))
        shown = formatter.format(record)
        assert ("Traceback" in shown) == (name == "numpy's"), shown
        assert record.exc_info is not None, "the record itself is left whole for the server's log"
