"""The temporary Prefect server the CLI starts for itself dies with the CLI, even a SIGKILLed one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

GRADLAKE = str(Path(sys.executable).parent / "gradlake")

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")


def _children(pid: int) -> dict[int, str]:
    """Direct children of `pid` and their command lines, read from /proc."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # exited while we looked
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:  # the field after the state is the parent's pid
            found[int(entry.name)] = cmdline
    return found


def _alive(pid: int) -> bool:
    """Running, as opposed to gone or a zombie no one has reaped yet (a container's init may never reap it)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def test_killed_cli_takes_its_temporary_server_along(tmp_path):
    from gradlake.tasks.data.probes import load_probe_set

    source = tmp_path / "probes.jsonl"
    rows = load_probe_set().head(4)[["id", "instruction", "answer"]].to_dict(orient="records")
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    _kill_and_check([GRADLAKE, "dataset", "create", "--name", "mini", "--source", str(source), "--lake", str(tmp_path / "lake")],
                    tmp_path)


def test_killed_extract_takes_the_server_it_started_along(tiny_models, tmp_path):
    """`gradlake extract` starts the server itself, while it plans (flows/temporary_server.TemporaryServer)."""
    from conftest import write_probe

    write_probe(str(tmp_path / "lake"), 4)
    _kill_and_check([GRADLAKE, "extract", "--model", str(tiny_models["olmo2"]), "--checkpoint", "checkpoint-1",
                     "--lake", str(tmp_path / "lake")], tmp_path)


def _kill_and_check(command: list[str], tmp_path: Path) -> None:
    """Start `command` with no Prefect server given, SIGKILL it once its temporary server is there, and see the server go."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}  # no server given: the CLI starts its own
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    log = open(tmp_path / "cli.log", "w")
    cli = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    server = None
    try:
        deadline = time.monotonic() + 180  # importing torch and Prefect on two busy cores
        while server is None and cli.poll() is None and time.monotonic() < deadline:
            server = next((pid for pid, cmd in _children(cli.pid).items() if " uvicorn " in cmd), None)
            time.sleep(0.05)
        assert server is not None, f"no temporary server appeared under the CLI:\n{(tmp_path / 'cli.log').read_text()[-3000:]}"
        cli.kill()
        assert cli.wait(timeout=30) == -signal.SIGKILL, "the CLI ended before it was killed: nothing was tested"
        deadline = time.monotonic() + 60
        while _alive(server) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(server), f"the temporary Prefect server (pid {server}) outlived its killed CLI"
    finally:
        if cli.poll() is None:
            cli.kill()
        if server is not None and _alive(server):
            os.kill(server, signal.SIGKILL)  # a failed run leaves no server behind
        log.close()
