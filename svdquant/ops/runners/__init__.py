"""Runners: a quantized linear's forward with everything prepared, one class per path (the interface and its
declared capabilities: :mod:`svdquant.ops.runner`; which one a layer gets: :mod:`svdquant.ops.routes`).

Each is built by :func:`svdquant.ops.prepare` from a layer's buffers and holds kernel-ready tensors (transposed
scales, a power-of-two-rank branch, INT8 weights...); ``__call__(x2)`` maps ``[M, K]`` to ``[M, N]`` and does
nothing but compute.

| module          | runners                                                        |
| --------------- | -------------------------------------------------------------- |
| reference.py    | ``ReferenceRunner`` (the torch reference), ``CpuRunner``       |
| int8.py         | ``Int8Runner``: INT8 / two-level INT4 kernels                  |
| float_scales.py | ``FloatScalesRunner``: the paper's W4A4 and NVFP4 kernels      |
| weight_only.py  | ``W4A16Runner``: weight-only INT4 kernels                      |
| cublas.py       | ``DenseRunner`` (one 16-bit linear), ``Fp8ScaledMMRunner``     |
"""

from ..runner import EMPTY_ON_GPU, ON_META, Runner, Unready
from .cublas import DenseRunner, Fp8ScaledMMRunner
from .float_scales import FloatScalesRunner
from .int8 import Int8Runner
from .reference import CpuRunner, ReferenceRunner
from .weight_only import W4A16Runner

__all__ = ["Runner", "Unready", "ON_META", "EMPTY_ON_GPU", "ReferenceRunner", "CpuRunner", "Int8Runner",
           "FloatScalesRunner", "W4A16Runner", "DenseRunner", "Fp8ScaledMMRunner"]
