"""Which runner a quantized layer on a CUDA GPU gets: one ordered table, read by :func:`svdquant.ops.prepare` (to
build the runner) and :func:`svdquant.ops.gpu_support` (to say it in words, for model cards and ``svdquant info``).

A route matches on the fields of the two formats' records (:class:`svdquant.formats.Format`: ``integer``,
``grouped``, ``fp4``, ``scaled_mm``, ``w4a16``), never on their names, so a new format with the fields of an
existing one takes its kernels without an edit here. The first route that matches decides; on a GPU older than the
route's minimum compute capability the layer runs the torch reference instead (with a warning where the route has
one). Layers that no route matches run the reference too.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

from ..formats import Format
from .runner import Runner
from .runners import FloatScalesRunner, Fp8ScaledMMRunner, Int8Runner, ReferenceRunner, W4A16Runner


@dataclass(frozen=True)
class Route:
    """``accepts(weights, activations)`` (activations None: 16-bit) -> ``runner`` on compute capability
    ``min_capability`` and newer; ``support``: that in words; ``below``: the warning on an older GPU, if any."""

    accepts: Callable[[Format, Format | None], bool]
    runner: type[Runner]
    min_capability: tuple[int, int]
    support: str
    below: str | None = None


ROUTES: tuple[Route, ...] = (
    Route(lambda w, a: a is None and w.w4a16, W4A16Runner, (8, 0),
          "W4A16 kernel on compute capability 8.0+ for up to 16 tokens; above that, a dequantize kernel and cuBLAS"),
    Route(lambda w, a: a is not None and w.integer and a.integer, Int8Runner, (8, 0),
          "INT8 GEMM kernels on compute capability 8.0+ (A100, RTX 30xx/40xx, L40, B200; on H100/H200 a CUTLASS "
          "GEMM faster than FP8 where nvidia-cutlass-dsl is installed, TMA Triton kernels otherwise)"),
    # no FP8 conversions before Ada/Hopper
    Route(lambda w, a: w is a and w.grouped and w.fp4, FloatScalesRunner, (8, 9),
          "NVFP4 kernels on compute capability 8.9+ (RTX 40xx, L40, H100/H200, B200); reference before",
          below="NVFP4 layers need compute capability 8.9+ for the fused kernels; using the torch reference on this "
                "GPU (correct, slower)"),
    Route(lambda w, a: w is a and w.grouped and not w.fp4, FloatScalesRunner, (8, 0),
          "the paper's W4A4 kernels on compute capability 8.0+ (slow on Hopper: per-group rescales)"),
    Route(lambda w, a: a is not None and w.scaled_mm and a.scaled_mm, Fp8ScaledMMRunner, (8, 9),
          "torch._scaled_mm on compute capability 8.9+ (RTX 40xx, L40, H100/H200, B200)"),
)
REFERENCE = Route(lambda w, a: True, ReferenceRunner, (0, 0), "torch reference (any GPU or the CPU)")


def choose(weights: Format, activations: Format | None, capability: tuple[int, int] | None = None) -> Route:
    """The route of a layer of these formats: the first of :data:`ROUTES` that accepts them, else
    :data:`REFERENCE`. With a GPU's ``capability`` below the route's minimum: :data:`REFERENCE` (warned where the
    route says ``below``); without one, the route whatever the GPU (what :func:`svdquant.ops.gpu_support` says)."""
    route = next((r for r in ROUTES if r.accepts(weights, activations)), REFERENCE)
    if capability is not None and capability < route.min_capability:
        if route.below:
            warnings.warn(route.below, stacklevel=3)  # the caller of prepare, as before
        return REFERENCE
    return route
