"""A small progress bar for long work (no tqdm dependency): ``for x in progress(it, "pseudo", unit="img")``.

Writes to stderr, redraws at most every 0.2 s, shows count/total, rate and ETA; silent when
``enabled=False`` or when stderr is not a terminal and ``PRIMAPS_FAST_PROGRESS`` is not ``1`` (then it
prints one summary line at the end, so logs stay readable).
"""
from __future__ import annotations

import os
import sys
import time


def _fmt_seconds(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600:d}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60:02d}:{s % 60:02d}"


class progress:
    """Iterate over ``iterable`` with a progress bar; ``total`` defaults to ``len(iterable)``.

    ``update(n)`` advances by ``n`` units (e.g. images in a batch) when iterating manually;
    ``set_postfix(text)`` shows extra state such as the current loss.
    """

    def __init__(self, iterable=None, desc: str = "", *, total: int | None = None, unit: str = "it",
                 enabled: bool = True, stream=None):
        self.iterable = iterable
        self.desc = desc
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.unit = unit
        self.stream = stream or sys.stderr
        interactive = getattr(self.stream, "isatty", lambda: False)() or os.environ.get("PRIMAPS_FAST_PROGRESS") == "1"
        self.enabled = enabled
        self.live = enabled and interactive
        self.count = 0
        self.postfix = ""
        self.start = time.perf_counter()
        self._last_draw = 0.0

    def __iter__(self):
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def set_postfix(self, text: str) -> None:
        self.postfix = text

    def update(self, n: int = 1) -> None:
        self.count += n
        now = time.perf_counter()
        if self.live and now - self._last_draw >= 0.2:
            self._last_draw = now
            self.stream.write("\r" + self._line(now))
            self.stream.flush()

    def _line(self, now: float) -> str:
        elapsed = now - self.start
        rate = self.count / elapsed if elapsed > 0 else 0.0
        if self.total:
            eta = (self.total - self.count) / rate if rate > 0 else 0.0
            head = f"{self.desc}: {self.count}/{self.total} ({100 * self.count / self.total:.0f}%)"
            tail = f"{_fmt_seconds(elapsed)}<{_fmt_seconds(eta)}"
        else:
            head, tail = f"{self.desc}: {self.count}", _fmt_seconds(elapsed)
        post = f" {self.postfix}" if self.postfix else ""
        return f"{head} [{tail}, {rate:.2f} {self.unit}/s]{post}"

    def close(self) -> None:
        if self.enabled and self.count:
            end = "\n"
            self.stream.write(("\r" if self.live else "") + self._line(time.perf_counter()) + end)
            self.stream.flush()
            self.enabled = False
