"""FP8 E4M3 with one fp32 scale per row (the row-wise recipe of ``torch._scaled_mm``).

``scale = absmax(row) / 448`` (fp32), ``code = e4m3(x / scale)`` with
round-to-nearest-even; E4M3 here is ``float8_e4m3fn`` (no infinities, max 448).
An all-zero row gets scale 0 and codes 0.
"""

from __future__ import annotations

import torch

from .common import QTensor, check_finite

E4M3_MAX = 448.0


def quantize_fp8(x: torch.Tensor, *, check: bool = True) -> QTensor:
    """Quantize each row (last dimension) of ``x`` to E4M3 codes with an fp32 scale per row."""
    if check:
        check_finite(x, "input of quantize_fp8")
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True) / E4M3_MAX
    inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
    codes = (xf * inv).clamp_(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return QTensor(codes, scale.squeeze(-1), "fp8", 0, x.shape[-1])


def dequantize_fp8(q: QTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q.codes.float() * q.scales.float().unsqueeze(-1)).to(dtype)
