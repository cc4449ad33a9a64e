"""INT4 with a zero point: unsigned codes, a 16-bit scale and a 16-bit zero per group of 64 (weights only).

This is AWQ's W4A16 layout (arXiv 2306.00978), the one Nunchaku stores FLUX's adaLN modulation
linears in: ``w = code · scale + zero`` with ``code ∈ [0, 15]``, the product and sum formed
exactly in fp32 and rounded once, as Nunchaku's GEMV does with one fused multiply-add per weight
(``nunchaku/src/kernels/awq/gemv_awq.cu``). svdquant's own quantizer never picks this format
(its weight-only layers use symmetric ``int4``); it exists so that imported AWQ layers keep their
exact values.

Quantizing (for completeness and tests): per group, ``zero = min``, ``scale = (max − min) / 15``,
both rounded to the storage dtype first, then ``code = clamp(round((w − zero) / scale), 0, 15)``.
A constant group gets scale 0 and codes 0, so it dequantizes to its value exactly.
"""

from __future__ import annotations

import torch

from .common import QTensor, check_finite, check_group_size, grouped, pad_to_group

CODE_MAX = 15


def quantize_int4z(x: torch.Tensor, group_size: int = 64, *, scale_dtype: torch.dtype | None = None,
                   check: bool = True) -> QTensor:
    """Codes uint8 ``[.., K_pad]``, ``scales`` and ``zeros`` in ``scale_dtype`` ``[.., K_pad / group]``."""
    check_group_size(group_size)
    if group_size <= 0:
        raise ValueError("int4z needs groups along K (group_size > 0, default 64)")
    if check:
        check_finite(x, "input of quantize_int4z")
    scale_dtype = scale_dtype or (x.dtype if x.is_floating_point() else torch.float32)
    xg = grouped(pad_to_group(x.float(), group_size), group_size)
    lo = xg.amin(-1, keepdim=True).to(scale_dtype)
    hi = xg.amax(-1, keepdim=True)
    scale = ((hi - lo.float()) / CODE_MAX).to(scale_dtype)
    s = scale.float()
    inv = torch.where(s > 0, 1.0 / s, torch.zeros_like(s))
    codes = torch.round((xg - lo.float()) * inv).clamp_(0, CODE_MAX).to(torch.uint8).flatten(-2)
    return QTensor(codes, scale.squeeze(-1), "int4z", group_size, x.shape[-1], zeros=lo.squeeze(-1))


def dequantize_int4z(q: QTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``code · scale + zero`` in fp32 (exact for 16-bit scale and zero up to one rounding), then ``dtype``."""
    out = grouped(q.codes.float(), q.group_size) * q.scales.float().unsqueeze(-1) + q.zeros.float().unsqueeze(-1)
    return out.flatten(-2)[..., : q.in_features].to(dtype)
