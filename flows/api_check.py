"""Before a command's work: the Prefect server it was given answers, or the command ends in one line.

Prefect's client waits 60 s for each answer and tries six times with growing pauses between
(PREFECT_API_REQUEST_TIMEOUT, PREFECT_CLIENT_MAX_RETRIES): a server that accepts connections and never
answers held a command for seven minutes, then ended it in a traceback. One request to the server's
health endpoint, tried once with a bounded wait, finds that before anything is planned or written.
"""

from __future__ import annotations

import sys

import typer

# How long the health endpoint may take to answer. A working server answers it at once (it reads no
# database); this is generous for one that is only busy. A PREFECT_API_REQUEST_TIMEOUT the user set wins.
PROBE_SECONDS = 15.0
# The commands that never talk to the Prefect API: a silent server must not stop them.
_WITHOUT_API = (["catalog"], ["verify"], ["dataset", "probe"])


def prepare_api(argv: list[str]) -> None:
    """Prefect's settings for this command: the temporary server's (no PREFECT_API_URL), or a check of the given one."""
    from gradlake.flows.temporary_server import prepare_temporary_server

    prepare_temporary_server()  # without PREFECT_API_URL, each flow needs one
    if not argv or "--help" in argv or "--version" in argv or any(argv[:len(c)] == c for c in _WITHOUT_API):
        return
    problem = api_problem()
    if problem:
        typer.secho(f"error: {problem}", fg=typer.colors.RED, err=True)
        sys.exit(2)


def api_problem() -> str | None:
    """One line saying why the Prefect server in PREFECT_API_URL (environment or profile) does not answer its health
    endpoint within PROBE_SECONDS (or the user's PREFECT_API_REQUEST_TIMEOUT), tried once; None where it answers,
    where no server is given, or where it answers with an error (Prefect names that at its first real request)."""
    from prefect.settings import PREFECT_CLIENT_MAX_RETRIES, get_current_settings, temporary_settings

    settings = get_current_settings()
    if not settings.api.url:
        return None
    import httpx
    from prefect.client.orchestration import get_client

    from gradlake.flows.console import explain

    given = "request_timeout" in settings.api.model_fields_set
    seconds = settings.api.request_timeout if given else PROBE_SECONDS
    with temporary_settings(updates={PREFECT_CLIENT_MAX_RETRIES: 0}):  # one try: the wait above is the whole wait
        with get_client(sync_client=True, httpx_settings={"timeout": httpx.Timeout(seconds)}) as client:
            failed = client.api_healthcheck()
    return explain(failed) if failed is not None else None
