"""The retry rule: a service that is not there is not retried; a timeout, 429 and 5xx are.

Real sockets on loopback: a port that was just bound and closed refuses connections, as a server that is not
running does.  No torch here and no conftest fixture (`pytest --noconftest` runs it), so that the Python 3.12
check in .ci/run can run it beside an install without torch."""

from __future__ import annotations

import socket
import time

import httpx
import openai
import pytest
from prefect.states import Failed

from gradlake.tasks.common.retries import not_answering, retry_unless_bad_input, transient, unreachable


@pytest.fixture
def closed_port() -> int:
    """A loopback port nothing listens on: bound, then closed."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def refused(port: int) -> BaseException:
    """The error httpx raises when a server refuses the connection, as raised (with its cause)."""
    try:
        httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=5)
    except httpx.ConnectError as err:
        return err
    raise AssertionError(f"port {port} answered")


def status_error(status: int) -> openai.APIStatusError:
    request = httpx.Request("POST", "http://127.0.0.1/v1/chat/completions")
    return openai.APIStatusError(f"{status}", response=httpx.Response(status, request=request), body=None)


def test_the_retry_rule_gives_up_on_a_missing_service_and_retries_a_passing_fault(closed_port):
    connection_refused = refused(closed_port)
    assert unreachable(connection_refused) == "connection refused"
    assert not transient(connection_refused)
    assert not transient(ConnectionRefusedError(111, "Connection refused"))
    assert not transient(socket.gaierror(-2, "Name or service not known"))
    assert transient(RuntimeError("a failure of unknown kind"))  # stays retried, as before
    for status in (408, 429, 500, 502, 503, 504):
        assert transient(status_error(status)), status
    for status in (400, 401, 403, 404, 422):
        assert not transient(status_error(status)), status
    assert transient(TimeoutError("timed out")) and transient(httpx.ReadTimeout("read timed out"))
    for full in (28, 122, 27):  # ENOSPC, EDQUOT, EFBIG: a retry writes the same bytes to the same full disk
        assert not transient(OSError(full, "No space left on device"))
    assert not transient(ValueError("bad input stays bad"))
    # Prefect's view: the failed state of a task that raised it
    assert retry_unless_bad_input(None, None, Failed(data=status_error(503)))
    assert not retry_unless_bad_input(None, None, Failed(data=connection_refused))


def test_a_refusing_or_unknown_host_is_found_in_one_look(closed_port):
    started = time.monotonic()
    assert not_answering(f"http://127.0.0.1:{closed_port}/v1") == "connection refused"
    assert not_answering("http://gradlake-no-such-host.invalid/v1") == "the host name does not resolve"
    assert time.monotonic() - started < 5
    with socket.socket() as server:  # a listening server answers
        server.bind(("127.0.0.1", 0))
        server.listen()
        assert not_answering(f"http://127.0.0.1:{server.getsockname()[1]}/v1") is None
