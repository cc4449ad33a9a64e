"""Weight-only layers without calibration inputs (text encoders): the recipe's weight rounding, nothing else."""

from __future__ import annotations

import time

import torch

from ..formats import check_finite, quantize
from ..recipes import QuantConfig
from .layer import LayerReport, QuantizedWeights


def quantize_weight_only(weight: torch.Tensor, bias: torch.Tensor | None,
                         recipe: QuantConfig) -> tuple[QuantizedWeights, LayerReport]:
    """Round a weight to the recipe's weight-only format with no calibration inputs (text encoders).

    Weight-only layers have no smoothing and no branch, so the rounding rule alone decides the
    result and it needs no activations; the report's errors are the weight's own,
    ``‖W − Q(W)‖ / ‖W‖``, not an output error.
    """
    t0 = time.perf_counter()
    if recipe.activations is not None or recipe.branch_rank:
        raise ValueError(f"quantize_weight_only takes a weight-only recipe without a branch (activations=None, "
                         f"rank 0 or method 'naive'), got {recipe.name!r}")
    if recipe.gptq:
        raise ValueError(f"recipe {recipe.name!r} has gptq=True, which needs calibration inputs; weight-only "
                         "rounding has none: use recipe.replace(gptq=False)")
    if weight.ndim != 2:
        raise ValueError(f"the weight must be an [N, K] matrix, got {tuple(weight.shape)}")
    check_finite(weight, "the weight")
    dt = weight.dtype
    w = weight.detach().float()
    q = quantize(w, recipe.weights, recipe.group_size, scale_dtype=dt, weight=True, check=False)
    err = float((q.dequantize() - w).norm() / w.norm().clamp_min(1e-30))
    qw = QuantizedWeights(weight=q, bias=bias.detach().to(dt) if bias is not None else None, smooth=None,
                          lora_down=None, lora_up=None)
    report = LayerReport(shape=tuple(weight.shape), method=recipe.method, rank=0, rel_error_naive=err,
                         rel_error=err, seconds=time.perf_counter() - t0)
    return qw, report
