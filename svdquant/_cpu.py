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
