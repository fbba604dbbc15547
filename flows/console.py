"""What the `gradlake` command shows of Prefect's log on its console: an error gradlake told, without a traceback;
for the demo, its stage lines and tables, with the whole log in a file (:func:`log_to_file`).

A check that only the run can make (NaN gradients, a key the API refuses at its first answer) raises
a ValueError whose message says what is wrong and what to do. Prefect logs that failure with its
full traceback, about 40 lines of its own engine above the one `error:` line the command ends with.
On the console those lines hide the message; the run's log on the Prefect server keeps them.
An error raised anywhere else (a ValueError from numpy, say: a bug, not bad input) keeps its traceback.
"""

from __future__ import annotations

import errno
import io
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import typer
from pydantic import ValidationError

from gradlake.flows.commands import refuse, validation_line


_installed = False


def told(error: BaseException | None) -> bool:
    """Whether `error` is bad input that gradlake itself named (a ValueError raised by gradlake's own code) or a full
    disk, which :func:`explain` names."""
    if error is not None and no_space(error) is not None:
        return True
    if not isinstance(error, ValueError) or error.__traceback__ is None:
        return False
    innermost = error.__traceback__
    while innermost.tb_next is not None:
        innermost = innermost.tb_next
    return str(innermost.tb_frame.f_globals.get("__name__", "")).startswith("gradlake.")


class WithoutToldTraceback(logging.Formatter):
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
        if type(handler).__name__ == "PrefectConsoleHandler" and not isinstance(handler.formatter, WithoutToldTraceback):
            handler.setFormatter(WithoutToldTraceback(handler.formatter or logging.Formatter()))


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


def console_handlers() -> list[logging.Handler]:
    """Prefect's console handlers, on the root logger and on those it configured (uvicorn, fastapi)."""
    loggers = [logging.getLogger()] + [logger for logger in logging.Logger.manager.loggerDict.values()
                                       if isinstance(logger, logging.Logger)]
    return list({id(h): h for logger in loggers for h in logger.handlers
                 if type(h).__name__ == "PrefectConsoleHandler"}.values())


def _only_problems(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING and not getattr(record, "stage", None)


class StageLines(logging.Handler):
    """The console's view of a long run: one line per stage, its start said at once and its time added at its end.

    A record with ``stage='start'`` writes its message and leaves the line open; ``stage='end'`` closes the
    line with the record's ``took`` (or its message when another line came in between)."""

    def __init__(self, stream):
        super().__init__()
        self.stream = stream
        self.open = False

    def emit(self, record: logging.LogRecord) -> None:
        kind = getattr(record, "stage", None)
        if kind == "start":
            self.stream.write(("\n" if self.open else "") + record.getMessage() + " ... ")
            self.open = True
        elif kind == "end":
            self.stream.write(f"{record.took}\n" if self.open else record.getMessage() + "\n")
            self.open = False
        else:
            return
        self.stream.flush()


@contextmanager
def log_to_file(path: Path, stream=None) -> Iterator[Path]:
    """While it lasts, the console shows stage lines and problems only; every log line goes to `path`.

    Prefect's INFO lines, Python warnings and the progress bars of transformers, datasets and bm25s (tqdm, on
    stderr) go to the file; Prefect's console keeps warnings and errors, and records logged with
    ``extra={"stage": "start" | "end"}`` become one console line per stage (:class:`StageLines`)."""
    stream = stream or sys.stdout
    path.parent.mkdir(parents=True, exist_ok=True)
    file = open(path, "w", encoding="utf-8", buffering=1)
    handlers = console_handlers()
    formatter = next((h.formatter.inner if isinstance(h.formatter, WithoutToldTraceback) else h.formatter
                      for h in handlers if h.formatter), None)
    to_file = logging.StreamHandler(file)
    to_file.setFormatter(formatter or logging.Formatter("%(asctime)s | %(levelname)-7s | %(name)s - %(message)s"))
    stages = StageLines(stream)
    root = logging.getLogger()
    root.addHandler(to_file)
    root.addHandler(stages)
    for handler in handlers:
        handler.addFilter(_only_problems)
    bars = _progress_bars(False)
    stderr, sys.stderr = sys.stderr, _IntoFile(file)
    try:
        yield path
    finally:
        sys.stderr = stderr
        _progress_bars(bars)
        for handler in handlers:
            handler.removeFilter(_only_problems)
        root.removeHandler(stages)
        root.removeHandler(to_file)
        if stages.open:
            stream.write("\n")
        file.close()


class _IntoFile(io.TextIOBase):
    """stderr while the demo runs: the log file (tqdm bars, warnings), never a terminal."""

    def __init__(self, file):
        self.file = file

    def write(self, text: str) -> int:
        return self.file.write(text)

    def flush(self) -> None:
        self.file.flush()

    def isatty(self) -> bool:
        return False


def _progress_bars(shown: bool | dict) -> dict:
    """Turn the Hugging Face libraries' progress bars off (False) or back to how they were (the dict returned)."""
    import importlib

    switches = {"transformers.utils.logging": ("is_progress_bar_enabled", "enable_progress_bar", "disable_progress_bar"),
                "huggingface_hub.utils": ("are_progress_bars_disabled", "enable_progress_bars", "disable_progress_bars"),
                "datasets.utils.logging": ("is_progress_bar_enabled", "enable_progress_bar", "disable_progress_bar")}
    was = {}
    for module, (state, enable, disable) in switches.items():
        try:
            lib = importlib.import_module(module)
        except ImportError:
            continue
        on = getattr(lib, state)()
        was[module] = not on if state.startswith("are_") else on
        wanted = shown.get(module, was[module]) if isinstance(shown, dict) else shown
        getattr(lib, enable if wanted else disable)()
    return was


def fail(err: Exception) -> None:
    refuse(validation_line(err) if isinstance(err, ValidationError) else (explain(err) or err))


def explain(err: BaseException) -> str | None:
    """One line for a service that does not answer (Prefect server, S3 endpoint) or missing credentials; None for others."""
    from gradlake.lake.store import error_chain, public_url, storage_problem

    chain = error_chain(err)
    api = os.environ.get("PREFECT_API_URL")
    if not api and "prefect.settings" in sys.modules:  # set in a Prefect profile rather than the environment
        api = sys.modules["prefect.settings"].get_current_settings().api.url
    for e in chain:
        to_api = bool(api) and public_url(_request_url(e)).startswith(public_url(api).rstrip("/"))
        if to_api and type(e).__name__ == "ReadTimeout":  # a server that accepts connections and never answers
            waited = _timeout(e, "read")
            return (f"the Prefect server at {public_url(api)} accepted the connection but did not answer"
                    + (f" within {waited:g} s" if waited else "") + "; check that it runs there and is not stuck, raise "
                    "PREFECT_API_REQUEST_TIMEOUT if it is only slow, or unset PREFECT_API_URL")
        to_api = to_api and type(e).__name__ in ("ConnectError", "ConnectTimeout")
        if api and (to_api or (isinstance(e, RuntimeError) and str(e).startswith("Failed to reach API at"))):
            why = "connection refused" if any("refused" in str(c).lower() for c in chain) else "no answer"
            return (f"no Prefect server answers at {public_url(api)}: {why}; start one with `prefect server start` "
                    "or unset PREFECT_API_URL")
    return no_space(err) or storage_problem(err, None)


def no_space(err: BaseException) -> str | None:
    """One line for a write that found the disk full, a quota spent or a file-size limit reached: where, and the room left."""
    import resource
    import shutil

    from gradlake.tasks.common.retries import out_of_space

    full = out_of_space(err)
    if full is None:
        return None
    path = full.filename or _written_path(full) or "the lake"
    if full.errno == errno.EFBIG:
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        allowed = "the file system's limit" if limit == resource.RLIM_INFINITY else f"this process's limit of {_size(limit)} (ulimit -f)"
        return (f"writing {path}: file too large for {allowed}; raise the limit or give a lake on another file system, "
                "then run the command again")
    existing = Path(path)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    usage = shutil.disk_usage(existing)
    what = "no space left on the device" if full.errno == errno.ENOSPC else "disk quota exceeded"
    return (f"writing {path}: {what} ({_size(usage.free)} free of {_size(usage.total)} there); free space there or "
            "give a lake on a larger disk, then run the command again")


def _written_path(err: BaseException) -> str | None:
    """The file a failed write was writing: the innermost `path` argument of the frames it was raised through."""
    found = None
    tb = err.__traceback__
    while tb is not None:
        value = tb.tb_frame.f_locals.get("path")
        if isinstance(value, (str, os.PathLike)):
            found = os.fspath(value)
        tb = tb.tb_next
    return found


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _request_url(err: BaseException) -> str:
    try:
        return str(err.request.url)  # httpx's errors carry the request they failed on
    except (AttributeError, RuntimeError):
        return ""


def _timeout(err: BaseException, phase: str) -> float | None:
    try:
        return err.request.extensions["timeout"][phase]  # httpx keeps the timeouts a request was sent with
    except (AttributeError, RuntimeError, KeyError, TypeError):
        return None


def print_benchmark(store, url: str, directory: str, title: str) -> None:
    """A benchmark's protocol lines, its table, and what its intervals support."""
    import json

    import pandas as pd

    from gradlake.tasks.attribution.benchmark import read_benchmark
    from gradlake.tasks.attribution.report import attribution_summary

    table = read_benchmark(store, directory)
    meta = json.loads(store.fs.cat_file(store.path(f"{directory}/meta.json")))
    summary = attribution_summary(table, meta)
    typer.echo("")
    typer.echo(f"{title} (report: {url}/{directory}/report.html)")
    for line in summary[:3]:
        typer.echo(f"  {line}")
    columns = [c for c in ("method", "lds", "lds_ci_low", "lds_ci_high", "separated_from_next", "lds_beyond_source",
                           "top1_paraphrased", "top1_model_generated") if c in table and table[c].notna().any()]
    with pd.option_context("display.width", 200, "display.max_columns", 12, "display.float_format", "{:.3f}".format):
        typer.echo(table[columns].to_string(index=False, na_rep=""))
    for line in summary[3:]:
        typer.echo(f"  {line}")


def training_losses(output: str) -> dict[str, float]:
    """Per checkpoint of a local training run: the mean loss of its last ten steps (from its lineage record)."""
    import json
    from pathlib import Path

    out = {}
    for record in Path(output).glob("checkpoint-*/gradlake_train.json"):
        losses = json.loads(record.read_text()).get("recent_losses") or []
        if losses:
            out[record.parent.name] = sum(losses[-10:]) / len(losses[-10:])
    return out


def print_headline(url: str, path: str) -> None:
    import pandas as pd

    from gradlake.lake.evaluations import read_evaluation
    from gradlake.lake.store import LakeStore
    from gradlake.tasks.evaluate.report import headline

    table = headline(read_evaluation(LakeStore(url), path))
    typer.echo("")
    typer.echo(f"select vs project ({path}; cosine; report: {url}/{path}/report.html)")
    with pd.option_context("display.width", 200, "display.max_columns", 12, "display.max_colwidth", 60,
                           "display.float_format", "{:.3f}".format):
        blank = {c: table[c].astype(object).where(table[c].notna(), "") for c in table
                 if not pd.api.types.is_float_dtype(table[c])}  # a baseline has no n_values: empty, not <NA>
        typer.echo(table.assign(**blank).to_string(index=False, na_rep=""))
