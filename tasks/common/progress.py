"""Progress of long work: samples done, rate and time left, said at most every few seconds."""

from __future__ import annotations

import time


def duration(seconds: float) -> str:
    """A short human duration: '45s', '12m05s', '3h07m'."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    """Work done of a total, its rate and the time left, said at most every `every` seconds."""

    def __init__(self, total: int, unit: str, log=print, every: float = 10.0, clock=time.monotonic):
        self.total, self.unit, self.log, self.every, self.clock = total, unit, log, every, clock
        self.done = 0
        self.began = self.last = clock()

    @property
    def elapsed(self) -> float:
        return self.clock() - self.began

    @property
    def percent(self) -> float:
        return 100.0 * self.done / self.total if self.total else 100.0

    def line(self, what: str = "", extra: str = "") -> str:
        elapsed = self.elapsed
        rate = self.done / elapsed if elapsed > 0 else 0.0
        left = f"ETA {duration((self.total - self.done) / rate)}" if rate > 0 else "ETA unknown"
        if self.done >= self.total:
            left = f"done in {duration(elapsed)}"
        return f"{what}{self.done}/{self.total} {self.unit} ({self.percent:.0f}%), {rate:.2f} {self.unit}/s{extra}, {left}"

    def add(self, n: int, what: str = "", extra: str = "") -> bool:
        """Count `n` more; log a line if `every` seconds passed since the last one. True if it logged."""
        self.done += n
        now = self.clock()
        if now - self.last < self.every:
            return False
        self.last = now
        self.log(self.line(what, extra))
        return True
