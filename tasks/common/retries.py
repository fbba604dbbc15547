"""When a Prefect task is retried: failures of the machine or the network, never bad input."""

from __future__ import annotations


def retry_unless_bad_input(task, task_run, state) -> bool:
    """Retry failures of the machine or network, never a ValueError: bad input stays bad."""
    error = state.data if isinstance(state.data, BaseException) else None
    if error is None:
        try:
            state.result(raise_on_failure=True)
        except BaseException as raised:  # the state's own exception, re-raised to look at it
            error = raised
    return not isinstance(error, ValueError)
