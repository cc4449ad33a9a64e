"""What every command's checks share: the one-line ``UsageError``, the device and dtype options, image sizes,
``--lora`` values, and whether progress bars draw (a terminal) or not (a log)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

from .. import _checks

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class UsageError(Exception):
    """A mistake on the command line: ``main`` prints ``svdquant CMD: error: ...`` and returns 2."""


def check_optimize_flags(args) -> None:
    """``--attention int8`` / ``flash4`` and ``--compile model`` are set by svdquant.optimize: on a CUDA device,
    without ``--no-optimize`` (``--compile model`` without ``--offload`` too). Call after :func:`resolve_device`."""
    flags = [f"--attention {args.attention}"] if getattr(args, "attention", "auto") != "auto" else []
    flags += ["--compile model"] if getattr(args, "compile", "blocks") == "model" else []
    for flag in flags:
        if not getattr(args, "optimize", True):
            raise UsageError(f"{flag} is set by svdquant.optimize: drop --no-optimize")
        if not str(args.device).startswith("cuda"):
            raise UsageError(f"{flag} runs on a CUDA GPU; on {args.device} leave it out")
    if "--compile model" in flags and getattr(args, "offload", False):
        raise UsageError("--compile model compiles the whole forward, which --offload's hooks run outside the graph: "
                         "leave one of them out")


def compile_arg(args):
    """``--compile`` as :func:`svdquant.optimize`'s ``compile=`` (True: each repeated block)."""
    return "model" if getattr(args, "compile", "blocks") == "model" else True


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return _checks.device("--device", name)


def resolve_dtype(name: str | None, device: str) -> torch.dtype:
    if name is None:
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return DTYPES[name]


def pipeline_kwargs(args) -> dict:
    kw = {}
    for k in ("height", "width", "guidance_scale"):
        v = getattr(args, k, None)
        if v is not None:
            kw[k] = v
    return kw


def validate_sizes(args) -> None:
    for k in ("height", "width"):
        if getattr(args, k) is not None:
            _checks.size(f"--{k}", getattr(args, k))
    if args.guidance_scale is not None:
        _checks.real("--guidance-scale", args.guidance_scale, lo=0)


def parse_loras(specs) -> list[tuple[str, float]]:
    """``--lora PATH[:STRENGTH]`` options as (path, strength) pairs."""
    loras = []
    for spec in specs or ():
        path, sep, strength = spec.rpartition(":")
        if not sep or not _is_number(strength):  # no ":STRENGTH" suffix
            path, strength = spec, "1"
        if not math.isfinite(float(strength)):
            raise UsageError(f"--lora {spec}: the strength must be a finite number, e.g. {path}:0.8")
        if not Path(path).is_file():
            raise UsageError(f"no LoRA file at {path}")
        loras.append((path, float(strength)))
    return loras


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def show_bars() -> bool:
    """Progress bars only on a terminal: a redirected log gets no bar redraws (svdquant's own steps print a
    plain line now and then there instead: svdquant/_progress.py)."""
    return sys.stderr.isatty()
