"""What the `gradlake` command shows of Prefect's log on its console: an error gradlake told, without a traceback.

A check that only the run can make (NaN gradients, a key the API refuses at its first answer) raises
a ValueError whose message says what is wrong and what to do. Prefect logs that failure with its
full traceback, about 40 lines of its own engine above the one `error:` line the command ends with.
On the console those lines hide the message; the run's log on the Prefect server keeps them.
An error raised anywhere else (a ValueError from numpy, say: a bug, not bad input) keeps its traceback.
"""

from __future__ import annotations

import logging

_installed = False


def told(error: BaseException | None) -> bool:
    """Whether `error` is bad input that gradlake itself named: a ValueError raised by gradlake's own code."""
    if not isinstance(error, ValueError) or error.__traceback__ is None:
        return False
    innermost = error.__traceback__
    while innermost.tb_next is not None:
        innermost = innermost.tb_next
    return str(innermost.tb_frame.f_globals.get("__name__", "")).startswith("gradlake.")


class _WithoutToldTraceback(logging.Formatter):
    """Formats like the formatter it wraps, leaving out the traceback of an error gradlake told."""

    def __init__(self, inner: logging.Formatter):
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        if record.exc_info and told(record.exc_info[1]):
            record = logging.makeLogRecord({**record.__dict__, "exc_info": None, "exc_text": None})
        return self.inner.format(record)


def _wrap_console_handlers() -> None:
    handlers = logging.getLogger().handlers + [
        handler for logger in logging.Logger.manager.loggerDict.values() if isinstance(logger, logging.Logger)
        for handler in logger.handlers]
    for handler in handlers:
        # Prefect's console handler, found by name: importing its module would cost every command ~1 s.
        if type(handler).__name__ == "PrefectConsoleHandler" and not isinstance(handler.formatter, _WithoutToldTraceback):
            handler.setFormatter(_WithoutToldTraceback(handler.formatter or logging.Formatter()))


def hide_told_tracebacks() -> None:
    """From now on in this process, the console shows an error gradlake told as its message only.

    Prefect configures its handlers when it is first imported, which a command may never do; so
    they are looked at when a record carrying such an error is made, before any handler sees it."""
    global _installed
    if _installed:
        return
    _installed = True
    make_record = logging.getLogRecordFactory()

    def factory(*args, **kwargs) -> logging.LogRecord:
        record = make_record(*args, **kwargs)
        if record.exc_info and told(record.exc_info[1]):
            _wrap_console_handlers()
        return record

    logging.setLogRecordFactory(factory)
