"""Operators of a quantized linear, dispatched to fused Triton kernels on CUDA and to the torch reference elsewhere."""

from __future__ import annotations

import torch

from . import reference


def svdq_linear(x: torch.Tensor, m) -> torch.Tensor:
    """Forward of :class:`svdquant.SVDQLinear` ``m`` on ``x`` ``[..., K]``."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, m.in_features)
    lora_down = m.lora_down if m.rank else None
    lora_up = m.lora_up if m.rank else None
    if m.activations is None:
        w = m.dequantized_weight(x.dtype)
        y = reference.weight_only_linear(x2, w, lora_down, lora_up, m.bias)
    else:
        qin = reference.quantize_input(x2, m.smooth_inv, lora_down, m.activations, m.group_size, m.act_shift,
                                       getattr(m, "input_scale", None), m.act_unsigned_from)
        y = reference.qgemm(qin, m.weights, m.group_size, m.qweight, m.wscales, getattr(m, "wtensor_scale", None),
                            lora_up, m.bias, x.dtype)
    return y.reshape(*lead, m.out_features)
