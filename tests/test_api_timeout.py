"""A Prefect server that accepts connections and never answers ends a command in one line naming it, within a
minute (Prefect's own waits and retries took seven); one that is only slow still serves, and a
PREFECT_API_REQUEST_TIMEOUT the user set is the wait."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

GRADLAKE = str(Path(sys.executable).parent / "gradlake")
SECRET = "gradlake-api-secret-7d2e"  # in the URL's user:password; must never be printed
ADVICE = ("; check that it runs there and is not stuck, raise PREFECT_API_REQUEST_TIMEOUT if it is only slow, "
          "or unset PREFECT_API_URL")


@pytest.fixture
def silent_api():
    """A listening socket on loopback that accepts every connection and never sends a byte; (its API URL, connections)."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    held, stop = [], threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"127.0.0.1:{listener.getsockname()[1]}/api", held
    stop.set()
    thread.join()
    for conn in [*held, listener]:
        conn.close()


@pytest.fixture
def slow_api():
    """An HTTP server on loopback whose health endpoint answers after 3 s; (its API URL, the paths it was asked)."""
    asked = []

    class Slow(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            asked.append(self.path)
            time.sleep(3)
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", "4")
            self.end_headers()
            self.wfile.write(b"true")

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    server.daemon_threads = True  # a request the client gave up on must not hold the shutdown
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/api", asked
    server.shutdown()
    server.server_close()


def test_a_silent_api_ends_the_command_in_one_line_naming_it(silent_api, tmp_path):
    address, held = silent_api
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_REQUEST_TIMEOUT"}
    env.update(PREFECT_API_URL=f"http://gradlake:{SECRET}@{address}", COLUMNS="200")
    started = time.monotonic()
    done = subprocess.run([GRADLAKE, "watch", "--off"], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=180)
    assert time.monotonic() - started < 60, "the issue's bound: a silent server is found within a minute"
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == (f"error: the Prefect server at http://{address} accepted the connection but did not answer "
                           f"within 15 s{ADVICE}\n")
    assert held, "the command must have reached the socket"


def test_a_slow_api_serves_and_the_users_request_timeout_is_the_wait(prefect_server, slow_api, monkeypatch):
    from prefect.settings import PREFECT_API_REQUEST_TIMEOUT, PREFECT_API_URL, temporary_settings

    from gradlake.flows.api_check import api_problem

    assert api_problem() is None  # the session's real Prefect server
    slow, asked = slow_api
    monkeypatch.setenv("PREFECT_API_URL", slow)  # where error lines read it, as in a command's environment
    with temporary_settings(updates={PREFECT_API_URL: slow}):
        assert api_problem() is None  # 3 s is slow, not silent
        with temporary_settings(updates={PREFECT_API_REQUEST_TIMEOUT: 1}):
            assert api_problem() == (f"the Prefect server at {slow} accepted the connection but did not answer "
                                     f"within 1 s{ADVICE}")
    assert asked == ["/api/health", "/api/health"]
