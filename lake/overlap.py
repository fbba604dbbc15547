"""Lake writes on a thread of their own, so that they overlap the computation of the next batch.

The queue is bounded: when writing is slower than computing, the computation waits rather
than piling batches up in memory.  An error in a write stops the work at the next batch
and is raised in the caller, never lost.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable

_DONE = object()


class BackgroundWrites:
    """Runs submitted writes in order on one thread; at most `depth` wait while one runs.

    Use as ``with BackgroundWrites() as writes: writes.submit(fn, *args)``; leaving the block
    waits for every write and raises the first error of any.  `depth` 0 writes synchronously
    in `submit` (no thread), for comparison and debugging.
    """

    def __init__(self, depth: int = 1, name: str = "gradlake-writes"):
        if depth < 0:
            raise ValueError(f"queue depth must be 0 (synchronous) or more, not {depth}")
        self.depth = depth
        self._queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.busy_s = 0.0  # time spent writing, for the progress line

    def __enter__(self) -> "BackgroundWrites":
        if self.depth:
            self._thread.start()
        return self

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _DONE:
                return
            if self._error is not None:
                continue  # drain: after a failure nothing more is written
            self._write(*item)

    def _write(self, fn: Callable, args: tuple) -> None:
        began = time.perf_counter()
        try:
            fn(*args)
        except BaseException as err:  # raised in the caller
            self._error = err
        self.busy_s += time.perf_counter() - began

    def submit(self, fn: Callable, *args) -> None:
        """Queue one write; blocks while the queue is full; raises a failed earlier write's error."""
        self.check()
        if not self.depth:
            self._write(fn, args)
        else:
            self._queue.put((fn, args))

    def check(self) -> None:
        if self._error is not None:
            raise self._error

    def __exit__(self, kind, exc, tb) -> None:
        if self.depth:
            self._queue.put(_DONE)
            self._thread.join()
        if kind is None:
            self.check()
