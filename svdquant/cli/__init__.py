"""The ``svdquant`` command (``svdquant --help``; the console script and ``python -m svdquant.cli`` run
:func:`main`).

* ``parser.py`` — every subcommand and option (:func:`build_parser`), each bound to its checks and its work;
* ``common.py`` — what the checks share: :class:`UsageError`, device, dtype, image sizes, ``--lora`` values;
* one module per command: ``quantize.py``, ``sampling.py`` (generate, compare), ``serve.py``, ``convert.py``,
  ``info.py``, ``demo.py``; each has a ``validate_<verb>`` and a ``cmd_<verb>``;
* ``media.py`` — what generate and compare write (images; a video pipeline's animations and .mp4 files) and the
  input image an edit pipeline takes.

Every value the user gave is checked before the command does anything, and before diffusers is imported (which
takes seconds): a mistake costs no time, leaves no files, and is reported in one line with exit status 2. The
modules here import torch and svdquant's light foundation at the top; the library's heavy parts are imported
inside the command that needs them.
"""

from __future__ import annotations

import logging
import os
import sys

from .._cpu import keep_freed_memory
from .common import UsageError, show_bars
from .parser import build_parser
from .quantize import _recipe  # noqa: F401 - the recipe the quantize options make (tests read it)

__all__ = ["main", "build_parser", "UsageError"]


def main(argv=None) -> int:
    from ..checkpoint import CheckpointError

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # said by the subcommand's parser, whose options they were meant to be
        parser.verbs[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    keep_freed_memory()  # large CPU temporaries reused instead of page-faulted in anew (svdquant/_cpu.py)
    # transformers notes on every diffusers pipeline load that its image processors lack torchvision;
    # svdquant uses none of them, and the note would bury the one line a command prints.
    logging.getLogger("transformers.utils.import_utils").addFilter(
        lambda r: "requires torchvision" not in r.getMessage())
    if "diffusers" not in sys.modules:  # its level is read when it is imported, which a check may do
        os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    try:
        # The whole request, before any work, and before diffusers is imported where the checks need it not
        # (importing it takes seconds, which a mistyped option should not wait for).
        args.validate(args)
        _quiet_libraries()
        args.func(args)
        sys.stdout.flush()  # a closed pipe must fail here, inside the handler, not at interpreter exit
    except (CheckpointError, UsageError, OSError, ValueError) as e:  # LoRAError is a ValueError
        if isinstance(e, BrokenPipeError):
            return _broken_pipe()
        msg = " ".join(str(e).split())  # one line, even for libraries' multi-line messages
        print(f"svdquant {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # every writer cleans up after itself (temporary names, then renames)
        print(f"svdquant {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


def _quiet_libraries() -> None:
    """diffusers' and transformers' logging and loading bars, set once they are imported."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    if not show_bars():  # diffusers / transformers loading bars: none in a redirected log
        dlog.disable_progress_bar()
        tlog.disable_progress_bar()
    # diffusers' warnings (offline mode, deprecations) would surround the one error line; svdquant's own
    # checks now catch what they warned about (sizes it would have resized quietly)
    dlog.set_verbosity_error()


def _broken_pipe() -> int:
    """The reader went away (``svdquant info CK | head``): stop quietly, as other Unix tools do.
    stdout is pointed at /dev/null so Python's final flush does not print a second error."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # not a real file (e.g. captured in tests)
        pass
    return 141  # 128 + SIGPIPE, what a shell reports for a command killed by a closed pipe
