"""The demo's console: one line per stage and the problems; everything else (Prefect's INFO lines, warnings,
progress bars) in its log file.  A real flow on the session's Prefect server, Prefect's own console handler."""

from __future__ import annotations

import io
import logging
import re
import sys
import time

import pytest
from prefect import flow, get_run_logger

from gradlake.flows.console import console_handlers, log_to_file
from gradlake.flows.demo import demo_log, stage


@flow(log_prints=True)
def staged(fail: bool = False) -> None:
    log = get_run_logger()
    began = time.monotonic()
    with stage(log, began, "first stage"):
        log.info("an INFO line for the file")
        print("a print the flow logs")
        sys.stderr.write("a line a library wrote to stderr, as Python's warnings do\n")
        from tqdm import tqdm

        for _ in tqdm(range(3), desc="a progress bar"):
            pass
    with stage(log, began, "second stage"):
        log.warning("a warning for the console")
        if fail:
            raise RuntimeError("it broke")


@pytest.fixture
def prefect_console():
    """What Prefect's console handler writes, read back."""
    handlers = console_handlers()
    assert handlers, "Prefect configured no console handler"
    shown = io.StringIO()
    files = [(h, h.console.file) for h in handlers if hasattr(h, "console")]
    for handler, _ in files:
        handler.console.file = shown
    yield shown
    for handler, file in files:
        handler.console.file = file


def test_the_console_shows_each_stage_once_and_the_file_everything(tmp_path, prefect_console):
    stages = io.StringIO()
    path = tmp_path / "lake" / "demo.log"
    with log_to_file(path, stream=stages):
        staged()
    lines = stages.getvalue().splitlines()
    assert len(lines) == 2, lines
    assert re.fullmatch(r"\[ *\d+s\] first stage \.\.\. \d+s", lines[0]), lines
    assert re.fullmatch(r"\[ *\d+s\] second stage \.\.\. \d+s", lines[1]), lines
    shown = prefect_console.getvalue()
    assert "a warning for the console" in shown
    assert "INFO line" not in shown and "Beginning flow run" not in shown and "a print" not in shown
    logged = path.read_text()
    for line in ("an INFO line for the file", "a print the flow logs", "a line a library wrote to stderr",
                 "a progress bar", "a warning for the console", "first stage: done in", "Finished in state Completed"):
        assert line in logged, line
    # afterwards the console is Prefect's own again
    assert all(not h.filters for h in console_handlers())
    assert not any(type(h).__name__ == "StageLines" for h in logging.getLogger().handlers)


def test_a_failing_stage_says_so_and_the_error_reaches_the_console(tmp_path, prefect_console):
    stages = io.StringIO()
    with pytest.raises(RuntimeError, match="it broke"):
        with log_to_file(tmp_path / "demo.log", stream=stages):
            staged(fail=True)
    assert re.search(r"second stage \.\.\. failed after \d+s$", stages.getvalue().splitlines()[-1])
    assert "it broke" in prefect_console.getvalue()


def test_the_log_lives_in_a_local_lake_else_here():
    assert str(demo_log("file:///tmp/some/lake")) == "/tmp/some/lake/demo.log"
    assert demo_log("s3://bucket/lake").name == "gradlake-demo.log"
