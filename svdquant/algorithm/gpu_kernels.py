"""Which GPU kernels the quantizer's inner loops run: the weight rounding of every candidate and refinement step,
and the candidates' error products. Each has a torch reference, which runs on the CPU and wherever
``SVDQUANT_REFERENCE=1`` asks for the reference everywhere. (GPTQ's block kernel is chosen in :mod:`.gptq`.)"""

from __future__ import annotations

import functools

import torch

from .._env import use_reference
from ..formats import get_format
from ..recipes import QuantConfig

# The candidates' error products on TF32 tensor cores (:mod:`svdquant.kernels.scoring`). Off until a GPU run
# measures the quantizer's time and the quality table with it (benchmarks/quantize_flux.py --scoring tf32,
# benchmarks/quality.py); the CPU emulation left the demo's table as it was (BENCHMARKS.md, "Faster products for
# scoring the candidates").
SCORING_TF32 = False


def weight_rounding_kernel(recipe: QuantConfig, device: torch.device):
    """The GPU kernel that rounds this recipe's weights for the search, or None (on the CPU, where the format
    has none, or when ``SVDQUANT_REFERENCE=1`` asks for the torch reference everywhere)."""
    fmt = get_format(recipe.weights)
    group = fmt.group(recipe.group_size)
    # the kernel's group is a tl.arange: a power of two (recipes accept any even size)
    if fmt.weight_rounding_kernel is None or device.type != "cuda" or use_reference() or group & (group - 1):
        return None
    from .. import kernels

    return functools.partial(getattr(kernels, fmt.weight_rounding_kernel), group_size=group)


def _fp32_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a @ b.mT


def scoring_product(device: torch.device):
    """``(xq, wq) -> xq @ wq.mT`` for the candidates' errors: the TF32 kernel on a GPU while :data:`SCORING_TF32` is
    on, else the fp32 product."""
    if not SCORING_TF32 or device.type != "cuda" or use_reference():
        return _fp32_product
    from .. import kernels

    return kernels.scoring_product
