"""The temporary Prefect server a process starts without PREFECT_API_URL: made to end with that process."""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from typing import Any, Callable, Iterator

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
# What marks the subprocess in which Prefect (3.8) runs its temporary server: uvicorn serving this app factory,
# with this variable in its environment (SubprocessASGIServer._run_uvicorn_command).
_SERVER_APP = "prefect.server.api.server:create_app"
_SERVER_MARK = "PREFECT__SERVER_EPHEMERAL"
_prctl: Callable[..., int] | None = None  # libc's, once end_with_this_process has found it


def prepare_temporary_server() -> None:
    """Settings for the temporary Prefect server a command starts without PREFECT_API_URL, and its end with the command."""
    # Its start-up telemetry write can collide with a concurrent run's on the shared SQLite file; gradlake has no use for it.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # It starts in about 25 s on a busy two-core machine, past Prefect's 20 s default wait.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    end_with_this_process()  # a killed command would leave it running


def end_with_this_process() -> None:
    """Make the temporary Prefect server this process may start die with it, even when it is SIGKILLed.

    Prefect stops that server from an atexit hook, which a killed process never runs: the server
    (uvicorn, about 190 MB) then lives on, orphaned, until someone kills it by hand. Prefect has no
    setting for this, so the one Popen that starts the server gets a preexec_fn asking Linux to SIGKILL
    the child when its parent ends (prctl PR_SET_PDEATHSIG). SIGKILL rather than SIGTERM: nobody is left
    to escalate should uvicorn's graceful shutdown hang, and SQLite's journal makes an abrupt end safe.
    Every other Popen call passes through unchanged. Elsewhere than Linux this does nothing.
    """
    global _prctl
    if not sys.platform.startswith("linux") or issubclass(subprocess.Popen, _PopenEndingWithParent):
        return
    try:
        _prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # a libc without prctl
        return
    # Patched on the module, because Prefect looks `subprocess.Popen` up when it starts the server,
    # which happens lazily (importing Prefect's server module ahead of time costs seconds on every command).
    subprocess.Popen = _PopenEndingWithParent


class _PopenEndingWithParent(subprocess.Popen):
    def __init__(self, args: Any, *rest: Any, **kwargs: Any) -> None:
        env = kwargs.get("env") or {}
        # Linux sends the signal when the *thread* that started the child ends: only the main thread
        # lives as long as the process, so a server started from any other thread is left as Prefect made it.
        if (isinstance(args, (list, tuple)) and _SERVER_APP in args and env.get(_SERVER_MARK) == "1"
                and kwargs.get("preexec_fn") is None and threading.current_thread() is threading.main_thread()):
            kwargs["preexec_fn"] = _die_with(os.getpid())
        super().__init__(args, *rest, **kwargs)


def _die_with(parent: int) -> Callable[[], None]:
    # prctl(2) reads its arguments as unsigned longs; built here, so the child only makes the call and a check
    arguments = (_PR_SET_PDEATHSIG, *(ctypes.c_ulong(v) for v in (signal.SIGKILL, 0, 0, 0)))

    def preexec() -> None:  # runs in the child between fork and exec
        _prctl(*arguments)
        if os.getppid() != parent:  # the parent died before the signal was asked for
            os._exit(1)

    return preexec


class TemporaryServer:
    """Prefect's temporary server, started by gradlake as soon as a command knows it will run a flow.

    Prefect starts the same server (the same uvicorn command and environment) only when the flow calls
    for a client, and waits for it there; started here it comes up while the command checks its inputs
    and plans, and the command does not import Prefect's server modules (about 3 CPU-s) to start it.
    It dies with this process like Prefect's (the parent-death signal), and stops at exit."""

    def __init__(self) -> None:
        import prefect
        from prefect.settings import get_current_settings

        self._prefect_dir = str(prefect.__module_path__.parent)
        self._env = {**os.environ, "PREFECT_UI_ENABLED": "0", _SERVER_MARK: "1", "PREFECT__SERVER_FINAL": "1",
                     **get_current_settings().to_environment_variables(exclude_unset=True)}
        self._start()
        atexit.register(self.stop)

    def _start(self) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/api"
        on_main = threading.current_thread() is threading.main_thread() and _prctl is not None
        self.process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--app-dir", self._prefect_dir, "--factory", _SERVER_APP, "--host", "127.0.0.1",
             "--port", str(self.port), "--log-level", "error", "--lifespan", "on"],
            env=self._env, preexec_fn=_die_with(os.getpid()) if on_main else None)

    def wait(self, timeout: float) -> str:
        """Wait until the server answers; returns its API URL."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() == 3:  # uvicorn's exit when the port was taken meanwhile: another port
                self._start()
            elif self.process.poll() is not None:
                break
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=5) as answer:
                    if answer.status == 200:
                        return self.url
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        code = self.process.poll()
        raise RuntimeError(f"the temporary Prefect server did not answer at {self.url} within {timeout:g} s"
                           + (f" (it exited with code {code})" if code is not None else "")
                           + "; give a server in PREFECT_API_URL, or raise PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS")

    def stop(self) -> None:
        """Stop the server (Prefect's way: terminate, then kill after 5 s)."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_temporary_server() -> TemporaryServer | None:
    """Start Prefect's temporary server now, without waiting for it, where Prefect would start one for a flow
    (no PREFECT_API_URL: Prefect 3.8 then starts one whatever its ephemeral settings say); None where a server is given."""
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        return None
    return TemporaryServer()


@contextlib.contextmanager
def served_by(server: TemporaryServer | None) -> Iterator[None]:
    """Flows run within this use `server` (waited for here) as their Prefect API; no change where it is None."""
    if server is None:
        yield
        return
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, temporary_settings

    url = server.wait(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value())
    with temporary_settings(updates={PREFECT_API_URL: url}):
        yield
