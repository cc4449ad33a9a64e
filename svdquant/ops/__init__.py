"""Operators of a quantized linear, dispatched to fused Triton kernels on CUDA and to the torch reference elsewhere.

On a CUDA device, INT4 and NVFP4 layers run the fused kernels of :mod:`svdquant.kernels`
(compute capability 8.0+, else a clear error); FP8 layers run ``torch._scaled_mm``
(compute capability 8.9+). Everything else, and every layer when ``SVDQUANT_REFERENCE=1``,
runs :mod:`.reference`.
"""

from __future__ import annotations

import os

import torch

from . import reference


def use_reference() -> bool:
    return os.environ.get("SVDQUANT_REFERENCE", "0") not in ("", "0")


def svdq_linear(x: torch.Tensor, m) -> torch.Tensor:
    """Forward of :class:`svdquant.SVDQLinear` ``m`` on ``x`` ``[..., K]``."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, m.in_features)
    if x.is_cuda and not use_reference() and m.activations in ("int4", "nvfp4"):
        from .. import kernels

        y = kernels.linear(x2, m)
    elif x.is_cuda and not use_reference() and m.activations == "fp8" and _scaled_mm_ok(x):
        y = _fp8_scaled_mm(x2, m)
    else:
        y = reference_linear(x2, m)
    return y.reshape(*lead, m.out_features)


def reference_linear(x2: torch.Tensor, m) -> torch.Tensor:
    lora_down, lora_up = m.branch()
    if m.activations is None:
        w = m.dequantized_weight(x2.dtype)
        return reference.weight_only_linear(x2, w, lora_down, lora_up, m.bias)
    qin = reference.quantize_input(x2, m.smooth_inv, lora_down, m.activations, m.group_size, m.act_shift,
                                   getattr(m, "input_scale", None), m.act_unsigned_from)
    return reference.qgemm(qin, m.weights, m.group_size, m.qweight, m.wscales, getattr(m, "wtensor_scale", None),
                           lora_up, m.bias, x2.dtype)


def _scaled_mm_ok(x: torch.Tensor) -> bool:
    return torch.cuda.get_device_capability(x.device) >= (8, 9) and x.dtype in (torch.bfloat16, torch.float16)


def _fp8_scaled_mm(x2: torch.Tensor, m) -> torch.Tensor:
    """FP8 row-wise W8A8 on cuBLAS: the recipe users run on Hopper, behind the same module."""
    from ..formats import quantize_fp8

    q = quantize_fp8((x2.float() * m.smooth_inv), check=False)
    y = torch._scaled_mm(q.codes, m.qweight.t(), scale_a=q.scales.float()[:, None],
                         scale_b=m.wscales.float()[None, :], out_dtype=x2.dtype)
    lora_down, lora_up = m.branch()
    if lora_down is not None:
        y = y + ((x2.float() @ lora_down.float().T) @ lora_up.float().T).to(y.dtype)
    if m.bias is not None:
        y = y + m.bias.to(y.dtype)
    return y
