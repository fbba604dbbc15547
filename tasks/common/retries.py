"""When a Prefect task is retried: failures that may pass (a timeout, a busy or failing server), never bad input
and never a service that is not there (connection refused, a host name that does not resolve, the hub offline).

Retrying cannot bring back a server nobody started or a name the resolver does not know, and each retry of a
task waits 10 s, then 60 s, before it says so again; those failures end the run at once, with the error that
says what to do.  An HTTP status is read where an error carries one: 408, 409, 425, 429 and 5xx are the
server's "try again"; any other 4xx is a request that will be refused again.
"""

from __future__ import annotations

import errno
import socket
import urllib.request
from urllib.parse import urlsplit

from gradlake.lake.store import error_chain

TRANSIENT_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})

# How the resolver and the socket layer word the two failures, in the texts of the errors wrapping them
# (httpx, httpcore, urllib3, aiohttp, requests keep the OS error's text but not always its class).
_REFUSED = ("connection refused", "errno 111", "[winerror 10061]")
_NO_NAME = ("name or service not known", "nodename nor servname", "temporary failure in name resolution",
            "no address associated with hostname", "failed to resolve", "getaddrinfo failed", "errno -2]", "errno -3]",
            "name resolution")
# A full disk, a spent quota, a file past the file-size limit: a retry writes the same bytes to the same full place.
NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
# Error classes (by name: importing their libraries here would cost every task start) that mean "offline".
_OFFLINE_CLASSES = {"OfflineModeIsEnabled": "HF_HUB_OFFLINE is set", "NameResolutionError": "the host name does not resolve"}


def unreachable(error: BaseException) -> str | None:
    """Why the server `error` was raised trying to reach is not there ('connection refused', ...), or None.

    None for every other failure, a timeout included: a server that is slow or busy may answer later."""
    for e in error_chain(error):
        if isinstance(e, ConnectionRefusedError):
            return "connection refused"
        if isinstance(e, socket.gaierror):
            return "the host name does not resolve"
        if isinstance(e, OSError) and e.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH):
            return "no route to the host"
        if type(e).__name__ in _OFFLINE_CLASSES:
            return _OFFLINE_CLASSES[type(e).__name__]
        if isinstance(e, TimeoutError) or "timeout" in type(e).__name__.lower():
            return None
        text = str(e).lower()
        if any(marker in text for marker in _REFUSED):
            return "connection refused"
        if any(marker in text for marker in _NO_NAME):
            return "the host name does not resolve"
        if "network is unreachable" in text or "no route to host" in text:
            return "no route to the host"
    return None


def out_of_space(error: BaseException) -> OSError | None:
    """The OSError in `error`'s chain that says the disk is full (ENOSPC, EDQUOT, EFBIG), or None."""
    return next((e for e in error_chain(error) if isinstance(e, OSError) and e.errno in NO_SPACE), None)


def not_answering(url: str, timeout: float = 5.0) -> str | None:
    """Why nothing can answer at `url` ('connection refused', 'the host name does not resolve'), or None.

    One name lookup and one TCP connection, so that a client which would retry for a minute is not started at
    all.  None when a proxy is configured for `url` (the client goes through it, not to the host), when the
    connection attempt times out (a slow network may still answer), or when it succeeds."""
    parts = urlsplit(url)
    if not parts.hostname or parts.scheme not in ("http", "https"):
        return None
    if urllib.request.getproxies_environment().get(parts.scheme) and not urllib.request.proxy_bypass_environment(parts.hostname):
        return None
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=timeout).close()
    except ConnectionRefusedError:
        return "connection refused"
    except socket.gaierror:
        return "the host name does not resolve"
    except OSError as err:  # a timeout or another failure: left to the client, whose retries are for those
        return "no route to the host" if err.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH) else None
    return None


def http_status(error: BaseException) -> int | None:
    """The HTTP status an error (or one it was raised from) carries: openai's, httpx's and botocore's errors say it."""
    for e in error_chain(error):
        try:
            response = getattr(e, "response", None)
        except RuntimeError:  # httpx's errors raise on an attribute they were not given
            response = None
        if isinstance(response, dict):  # botocore's ClientError
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        else:
            status = getattr(e, "status_code", None) or getattr(response, "status_code", None)
        if isinstance(status, int) and 100 <= status < 600:
            return status
    return None


def transient(error: BaseException) -> bool:
    """Whether trying the same thing again later may succeed.

    No for bad input (a ValueError: gradlake's own refusals derive from it), a 4xx other than the server's
    "try again" ones, and an unreachable service; yes for a timeout, 408/409/425/429/5xx, and any other failure
    of the machine or the network (a dropped connection).  A full disk is no: nothing frees it in the minute
    the retries wait, and each retry would compute everything again first."""
    if isinstance(error, ValueError) or out_of_space(error) is not None:
        return False
    status = http_status(error)
    if status is not None:
        return status in TRANSIENT_STATUS
    return unreachable(error) is None


def retry_unless_bad_input(task, task_run, state) -> bool:
    """Prefect's retry condition: retry only a failure that may pass (:func:`transient`)."""
    error = state.data if isinstance(state.data, BaseException) else None
    if error is None:
        try:
            state.result(raise_on_failure=True)
        except BaseException as raised:  # the state's own exception, re-raised to look at it
            error = raised
    return transient(error)
