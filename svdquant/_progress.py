"""Progress of long steps: a tqdm bar on a terminal, a plain line now and then anywhere else.

A bar redraws itself with carriage returns, which in a log file (``svdquant quantize ... 2> log``, a batch job,
CI) make one unreadable line, so bars are for terminals only; but a quantization that runs for 20 minutes must
not be silent in a log either. Off a terminal a step reports itself as one line, at most every
``SVDQUANT_PROGRESS_SECONDS`` seconds (default 20), and a step that ends before the first line is due prints
nothing, so short runs keep their output to what they say themselves::

    quantizing: 5 of 8 groups, 62 %, 1 min 40 s, block 2/2 single_transformer_blocks.0, 0 left
"""

from __future__ import annotations

import math
import os
import sys
import time

from tqdm.auto import tqdm

INTERVAL_VARIABLE = "SVDQUANT_PROGRESS_SECONDS"
DEFAULT_INTERVAL = 20.0


def progress(iterable=None, *, total: int | None = None, desc: str, unit: str = "it", enabled: bool = True,
             leave: bool = True):
    """What the steps of ``desc`` report themselves through: iterate over it, or call ``update(n)``;
    ``set_postfix_str(text)`` says what runs now. ``enabled=False``: nothing at all."""
    if not enabled:
        return tqdm(iterable, total=total, disable=True)
    if _interactive():
        return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave)
    return LineProgress(iterable, total=total, desc=desc, unit=unit)


def _interactive() -> bool:
    """A terminal, or a notebook (its stderr is no terminal, but tqdm.auto draws a widget there)."""
    try:
        if sys.stderr.isatty():
            return True
    except (AttributeError, ValueError):  # replaced by an object without isatty, or closed
        return False
    return "ipykernel" in sys.modules


def interval() -> float:
    """Seconds between two lines. A value that is not a number >= 0 counts as unset: a progress setting must
    not stop a run that has started."""
    try:
        value = float(os.environ.get(INTERVAL_VARIABLE, DEFAULT_INTERVAL))
    except ValueError:
        return DEFAULT_INTERVAL
    return value if value >= 0 and not math.isnan(value) else DEFAULT_INTERVAL


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


class LineProgress:
    """tqdm's interface as the library uses it (iteration, ``update``, ``set_postfix_str``, ``close``), printing
    a plain line to stderr when ``interval()`` seconds have passed since the last one (or the start)."""

    def __init__(self, iterable=None, *, total: int | None = None, desc: str, unit: str = "it"):
        self.iterable = iterable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.total, self.desc, self.unit = total, desc, unit
        self.n = 0
        self.postfix = ""
        self.every = interval()
        self.start = self.last = time.monotonic()
        self.printed = self.closed = False
        self.printed_n = -1

    def __iter__(self):
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __len__(self):
        return self.total or 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        self._maybe_print()

    def set_postfix_str(self, text: str = "", refresh: bool = True) -> None:
        self.postfix = text
        self._maybe_print()  # said before each piece of work starts: a long one is named while it runs

    def line(self) -> str:
        unit = self.unit if self.unit == "it" or (self.total or self.n) == 1 else f"{self.unit}s"
        done = f"{self.n} of {self.total} {unit}" if self.total else f"{self.n} {unit}"
        pct = f", {100 * self.n // self.total} %" if self.total else ""
        tail = f", {self.postfix}" if self.postfix else ""
        return f"{self.desc}: {done}{pct}, {_duration(time.monotonic() - self.start)}{tail}"

    def _maybe_print(self) -> None:
        now = time.monotonic()
        if not self.closed and now - self.last >= self.every:
            self._print(now)

    def _print(self, now: float) -> None:
        print(self.line(), file=sys.stderr, flush=True)  # sys.stderr now: it may have been redirected since
        self.last, self.printed, self.printed_n = now, True, self.n

    def close(self) -> None:
        # A step that reported itself also says that it ended; one that never did stays silent.
        if self.printed and not self.closed and self.total and self.n >= self.total and self.printed_n != self.n:
            self.postfix = ""
            self._print(time.monotonic())
        self.closed = True
