"""The temporary Prefect server a process starts without PREFECT_API_URL: made to end with that process."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
from typing import Any, Callable

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
# What marks the subprocess in which Prefect (3.8) runs its temporary server: uvicorn serving this app factory,
# with this variable in its environment (SubprocessASGIServer._run_uvicorn_command).
_SERVER_APP = "prefect.server.api.server:create_app"
_SERVER_MARK = "PREFECT__SERVER_EPHEMERAL"
_prctl: Callable[..., int] | None = None  # libc's, once end_with_this_process has found it


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
