"""INT8 with one scale per row: per output channel for weights, per token for activations.

Symmetric, ``scale = absmax(row) / 127`` in fp32, ``code = round_half_even(x / scale)``
clamped to ``[-127, 127]`` (the value -128 is never produced, so the format is
symmetric). An all-zero row gets scale 0 and codes 0. Products of two INT8 operands
are summed exactly in int32 (``ops.reference.int8_dot``) and rescaled by ``s_x * s_w``.
"""

from __future__ import annotations

import torch

from .common import QTensor, check_finite

INT8_MAX = 127


def quantize_int8(x: torch.Tensor, *, check: bool = True) -> QTensor:
    """Quantize each row (last dimension) of ``x`` to INT8 codes with an fp32 scale per row."""
    if check:
        check_finite(x, "input of quantize_int8")
    codes, scale = int8_code_values(x)
    return QTensor(codes.to(torch.int8), scale.squeeze(-1), "int8", 0, x.shape[-1])


def int8_code_values(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The codes of :func:`quantize_int8` as fp32 values (exact integers) and the scale ``[.., 1]``: a product of
    such codes in float32 needs no conversion (the CPU's quantized layers multiply them so)."""
    xf = x.float()
    # absmax without an |x| copy (amax and amin apart: torch.aminmax is several times slower on the CPU)
    scale = torch.maximum(-xf.amin(dim=-1, keepdim=True), xf.amax(dim=-1, keepdim=True)) / INT8_MAX
    inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
    return (xf * inv).round_().clamp_(-INT8_MAX, INT8_MAX), scale


def fake_quantize_int8(x: torch.Tensor, *, check: bool = True) -> torch.Tensor:
    """``dequantize_int8(quantize_int8(x))`` without building the codes."""
    if check:
        check_finite(x, "input of quantize_int8")
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True) / INT8_MAX
    inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
    return (xf * inv).round_().clamp_(-INT8_MAX, INT8_MAX).mul_(scale).add_(0.0)  # -0.0 -> +0.0


def dequantize_int8(q: QTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q.codes.float() * q.scales.float().unsqueeze(-1)).to(dtype)
