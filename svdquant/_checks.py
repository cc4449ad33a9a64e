"""Argument checks shared by the public API and the ``svdquant`` command.

Each check raises ``ValueError`` with one line that names the argument, the value and the fix,
before any work starts. ``name`` is how the caller spells the argument: ``"steps"`` in the
Python API (shown as ``steps=0``) or ``"--steps"`` on the command line (shown as ``--steps 0``).
"""

from __future__ import annotations

import errno
import math
import numbers
import os
import tempfile
from pathlib import Path

import torch

# Upper bounds that no real run reaches; above them a value is a typo (an extra zero), and would
# otherwise run for hours or exhaust memory before anything says so.
MAX_STEPS = 1000
MAX_IMAGES = 64            # images per call are sampled as one batch
MAX_SIZE = 8192            # pixels per side
MAX_SEED = 2**32 - 1       # seeds are offset per prompt / call; this keeps every derived seed in range


def show(name: str, value) -> str:
    """``--steps 0`` for an option, ``steps=0`` for a Python argument."""
    return f"{name} {value}" if name.startswith("-") else f"{name}={value!r}"


def count(name: str, value, *, lo: int = 1, hi: int | None = None, why: str = "") -> int:
    """A whole number in ``[lo, hi]``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{show(name, value)}: must be a whole number")
    if value < lo or (hi is not None and value > hi):
        rng = f"at least {lo}" if hi is None else f"between {lo} and {hi}"
        raise ValueError(f"{show(name, value)}: must be {rng}{why}")
    return int(value)


def steps(name: str, value) -> int:
    return count(name, value, hi=MAX_STEPS)


def seed(name: str, value) -> int:
    return count(name, value, lo=0, hi=MAX_SEED)


def real(name: str, value, *, lo: float | None = None) -> float:
    """A finite number, at least ``lo``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{show(name, value)}: must be a finite number")
    if lo is not None and value < lo:
        raise ValueError(f"{show(name, value)}: must be at least {lo}")
    return float(value)


def size(name: str, value, multiple: int = 1) -> int:
    """An image side in pixels."""
    count(name, value, hi=MAX_SIZE)
    if value % multiple:
        raise ValueError(f"{show(name, value)}: this model needs a multiple of {multiple} "
                         f"(e.g. {max(multiple, value - value % multiple)})")
    return value


def device(name: str, value) -> str:
    """A device torch can use here: cuda is refused, naming the reason, when there is no such GPU."""
    try:
        dev = torch.device(value)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"{name} {value!r} is not a device; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = " (this torch is a CPU build)" if torch.version.cuda is None else ""
            raise ValueError(f"{show(name, value)} was asked for, but torch sees no CUDA GPU{build}; "
                             f"use {show(name, 'cpu')}")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise ValueError(f"{show(name, value)}: torch sees {n} CUDA GPU(s), numbered 0 to {n - 1}")
    elif dev.type not in ("cpu", "mps", "xpu"):
        raise ValueError(f"{show(name, value)} is not a device svdquant runs on; use cpu or cuda")
    return str(value)


def output_parent(name: str, path: Path) -> None:
    """The folder ``path`` goes into exists or can be created, and is writable."""
    parent = Path(os.path.abspath(path)).parent
    probe = parent
    while not probe.exists():  # the nearest existing ancestor decides whether the rest can be created
        probe = probe.parent
    if not probe.is_dir():
        raise ValueError(f"{show(name, path)}: {probe} is a file, not a folder; choose another path")
    writable_folder(name, path, probe)


def writable_folder(name: str, path, folder: Path) -> None:
    """A new file can be made in the existing folder ``folder`` (where ``path``, as given, will be written)."""
    # Ask the file system, not the permission bits: os.access lets root through everywhere, also into /proc or
    # a read-only mount, where the write would fail only after the quantization or sampling it was to save.
    # The probe is an empty file, removed at once, and the folder's times are put back: a command refused
    # later changes nothing.
    times = os.stat(folder)
    try:
        fd, tmp = tempfile.mkstemp(prefix=".svdquant-write-check-", dir=folder)
    except OSError as e:
        why = "it takes no new files" if e.errno == errno.ENOENT else (e.strerror or str(e)).lower()
        raise ValueError(f"{show(name, path)}: cannot write into {folder} ({why}); choose another path") from None
    os.close(fd)
    os.unlink(tmp)
    try:
        os.utime(folder, ns=(times.st_atime_ns, times.st_mtime_ns))
    except OSError:  # a folder we may write into but do not own: its times are not ours to set
        pass



_MEMORY_UNITS = {"gb": 10**9, "gib": 2**30, "mb": 10**6, "mib": 2**20}


def memory_size(name: str, value) -> int:
    """An amount of memory in bytes: ``"16GB"``, ``"15.5 GiB"``, ``"24000MB"`` (from Python also a whole number
    of bytes). A bare number in a string is refused: GB and GiB differ by 7 %, and a cap 7 % too large is
    how a 24 GB card still runs out of memory."""
    if isinstance(value, bool) or not isinstance(value, (str, numbers.Integral)):
        raise ValueError(f"{show(name, value)}: give an amount such as '16GB' (units GB, GiB, MB, MiB)")
    if isinstance(value, str):
        text = value.strip().replace(" ", "")
        number = text.rstrip("GgIiMmBb")
        unit = text[len(number):].lower()
        if unit not in _MEMORY_UNITS:
            raise ValueError(f"{show(name, value)}: give a unit, GB, GiB, MB or MiB (e.g. 16GB)")
        try:
            amount = float(number)
        except ValueError:
            raise ValueError(f"{show(name, value)}: {number!r} is not a number; e.g. 16GB") from None
        if not math.isfinite(amount):
            raise ValueError(f"{show(name, value)}: must be a finite amount, e.g. 16GB")
        total = amount * _MEMORY_UNITS[unit]
    else:
        total = int(value)
    if total <= 0:
        raise ValueError(f"{show(name, value)}: must be positive, e.g. 16GB")
    if total < 2**20:  # no block fits below a megabyte: a unit slip (bytes for MB, MB for GB)
        raise ValueError(f"{show(name, value)}: less than 1 MiB; did you mean GB?")
    return int(total)
