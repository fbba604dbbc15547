"""Shared fixtures: tiny models of the real architectures, a real Prefect server, S3 on loopback."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Tests never reach the hub; everything they load is built here.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def start_worker(pool: str, name: str, env: dict, logs: Path, limit: int = 1) -> subprocess.Popen:
    """A Prefect process worker started outside the checkout (it finds the flows in its installed gradlake), logging to logs/<name>.log."""
    out = open(logs / f"{name}.log", "w")
    return subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--name", name,
                             "--type", "process", "--limit", str(limit)],
                            cwd=logs, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def stop_process(proc: subprocess.Popen) -> None:
    """End a process started in its own session and everything it started: SIGTERM, then SIGKILL after 20 s."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen, timeout: float, what: str) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before answering at {url}")
        try:
            with urllib.request.urlopen(url, timeout=2) as answer:
                if answer.status < 500:
                    return
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"{what} did not answer at {url} within {timeout}s")


@pytest.fixture(scope="session", autouse=True)
def prefect_server(tmp_path_factory):
    """One real Prefect server on loopback for the whole session; flows in and out of process use it."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_SERVER_UI_ENABLED": "false", "PREFECT_LOGGING_LEVEL": "WARNING",
           # the scheduler looks for due schedules every second (default 60 s), so a test sees it work
           "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "1",
           # SQLite on two busy cores: wait for the write lock rather than fail a service's loop
           "PREFECT_SERVER_DATABASE_TIMEOUT": "60"}
    log = open(home / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                             "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/api"
    try:
        _wait_http(f"{url}/health", proc, 120, "prefect server")
    except RuntimeError:
        proc.kill()
        raise RuntimeError((home / "server.log").read_text()[-3000:])
    from prefect.logging.configuration import ensure_logging_setup
    from prefect.settings import PREFECT_API_URL, temporary_settings

    # Prefect's console log handlers take whatever sys.stderr is when `prefect` is first imported in full.
    # Were that inside typer's CliRunner (a test module whose first flow import is a CLI call), they would
    # keep its temporary stream, closed after the call, and every later log line would fail.
    ensure_logging_setup()
    # The environment reaches subprocesses; in this process Prefect's settings were read at
    # import, so they are overridden explicitly too.
    with pytest.MonkeyPatch.context() as env_patch, temporary_settings(updates={PREFECT_API_URL: url}):
        env_patch.setenv("PREFECT_API_URL", url)
        env_patch.setenv("PREFECT_HOME", str(home))
        yield url
        # Ship the remaining run logs while the server is still up, or exit stalls retrying.
        from prefect.logging.handlers import APILogHandler

        APILogHandler().flush()
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's S3 server on loopback with a bucket 'lake'; credentials are dummies in the environment."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    import boto3

    with pytest.MonkeyPatch.context() as env_patch:
        for name, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                            ("AWS_DEFAULT_REGION", "us-east-1"), ("GRADLAKE_S3_ENDPOINT_URL", endpoint)):
            env_patch.setenv(name, value)
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="lake")
        yield endpoint
    server.stop()


@pytest.fixture(scope="session")
def probe_chats():
    from gradlake.tasks.data.probes import load_probe_set, probe_variant

    return list(probe_variant(load_probe_set(), "original")["messages"])


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, probe_chats) -> dict[str, Path]:
    """Tiny OLMo and OLMo-2 models, checkpoints 'checkpoint-0' and 'checkpoint-1' each."""
    from gradlake.tasks.training.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("models")
    return {arch: build_tiny_model(root / f"tiny-{arch}", arch, probe_chats) for arch in ("olmo", "olmo2")}


def thesis_choice(values: list[float]) -> int:
    """The "Select or Project?" thesis's final choice among BM25's candidates, written out: the first of the
    highest, in BM25's order."""
    best = 0
    for j, value in enumerate(values):
        if value > values[best]:
            best = j
    return best


def write_probe(lake: str, n: int | None = None, name: str = "probe") -> None:
    """Store the bundled probe set (its first n rows) in a lake."""
    from gradlake.tasks.data.probes import store_probe_set

    store_probe_set(lake, name, n)


@pytest.fixture(params=["file", "s3"])
def lake_store(request, tmp_path):
    """An empty lake, once on the local filesystem and once on the loopback S3 endpoint (a fresh prefix)."""
    import uuid

    from gradlake.lake.store import LakeStore

    if request.param == "file":
        return LakeStore(f"file://{tmp_path}/lake")
    request.getfixturevalue("s3_endpoint")
    return LakeStore(f"s3://lake/{request.module.__name__}-{uuid.uuid4().hex[:8]}")


@pytest.fixture
def openai_server(monkeypatch):
    """An OpenAI-compatible chat server on loopback (tests/openai_server.py), its key in $OPENAI_API_KEY."""
    from openai_server import FakeOpenAI

    server = FakeOpenAI().start()
    monkeypatch.setenv("OPENAI_API_KEY", server.api_key)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    yield server
    server.stop()
