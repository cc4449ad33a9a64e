"""Process-wide CPU settings that the ``svdquant`` command applies to itself (never ``import svdquant``).

glibc's malloc returns every block above its mmap threshold (adjusted up to 32 MiB) to the system when it is
freed, so each large temporary of a CPU forward (a [5120, 1792] fp32 product of the tiny model is 37 MB) is
mapped and page-faulted in again on the next call: a 2-core machine spent as long in those faults as in the
matmul itself (measured in BENCHMARKS.md, "The demo on a 2-core CPU"). Raising the mmap and trim thresholds to
1 GiB keeps freed blocks in the heap for reuse; the process then holds its peak heap until it exits, which a
command-line run can afford and a library should not impose on its host.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
KEEP_BYTES = 1 << 30


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds to 1 GiB; True if they were set (False off glibc)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, KEEP_BYTES)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, KEEP_BYTES))
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False


def contended(threads: int | None = None) -> bool:
    """Whether other processes are competing for this machine's cores right now, measured: the same short run of
    small parallel element-wise ops takes over 1.5x longer on ``threads`` (default: torch's) than on one. With a
    core taken by another job, an OpenMP thread spins at every barrier until its descheduled partner runs, and
    the thousands of small ops of the quantizer's search and a small model's forward collapse (a 2-core machine
    with two other jobs: `svdquant quantize tiny` 5 min against 35 s, see BENCHMARKS.md); one thread does not."""
    import time

    import torch

    threads = threads or torch.get_num_threads()
    if threads < 2:
        return False
    x = torch.ones(1 << 17)  # above torch's parallel grain (32768): each op splits across the threads

    def run(limit: float = float("inf")) -> float:
        t = time.perf_counter()
        for _ in range(40):
            x.add_(1.0)
            if time.perf_counter() - t > limit:  # already far slower than one thread: no need to finish
                break
        return time.perf_counter() - t

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        run()
        one = min(run() for _ in range(2))
        torch.set_num_threads(threads)
        run(limit=4 * one)
        many = min(run(limit=4 * one) for _ in range(2))
    finally:
        torch.set_num_threads(before)
    return many > 1.5 * one


class single_thread_if_contended:
    """``with single_thread_if_contended():`` the CPU work inside runs on one torch thread when :func:`contended`
    says other jobs hold the cores (checked on entry), else as configured; the thread count is restored after."""

    def __enter__(self):
        import torch

        self.before = torch.get_num_threads()
        self.single = contended(self.before)
        if self.single:
            torch.set_num_threads(1)
        return self

    def __exit__(self, *exc):
        import torch

        torch.set_num_threads(self.before)
        return False
