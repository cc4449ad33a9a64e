"""Which GPU kernels the quantizer's inner loops run: the weight rounding of every candidate and refinement step,
and the candidates' error products. Each has a torch reference, which runs on the CPU and wherever
``SVDQUANT_REFERENCE=1`` asks for the reference everywhere. (GPTQ's block kernel is chosen in :mod:`.gptq`.)"""

from __future__ import annotations

import functools

import torch

from .._env import use_reference
from ..formats import get_format
from ..recipes import QuantConfig

# The candidates' error products on TF32 tensor cores (:mod:`svdquant.kernels.scoring`): on an H100 the 57-block
# quantization took 66.3 s against 67.8 with fp32 products, and the tiny FLUX table moved at most 0.03 dB
# (BENCHMARKS.md, "Session 25 on an H100"). ``False`` scores in fp32 (``quantize_flux.py --scoring fp32``).
SCORING_TF32 = True


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
