"""INT4 with one scale per group of channels along K.

Weights (static): symmetric, group 64 along K, codes in ``[-7, 7]``,
``scale = absmax / 7`` stored in the model dtype, ``code = round_half_even(w / scale)``.

Activations (dynamic, per token and per group of 64 channels):
  * signed: as the weights, ``scale = absmax / 7``, codes ``[-7, 7]``;
  * unsigned, for inputs that follow a GELU and were shifted to be non-negative:
    ``scale = max / 15``, codes ``[0, 15]`` (negatives clamp to 0).

The code is computed from the scale *after* it is rounded to its storage dtype, so
``codes * scales`` is exactly what a kernel that reads the stored scale reconstructs.
A group that is all zeros gets scale 0 and codes 0. K that is not a multiple of the
group is zero-padded (see :func:`~svdquant.formats.common.pad_to_group`); ``codes``
keeps the padded length and :meth:`QTensor.dequantize` crops it.
"""

from __future__ import annotations

import torch

from .common import QTensor, check_finite, check_group_size, grouped, pad_to_group

INT4_MAX = 7
UINT4_MAX = 15


def _int4_grid(x, group_size, unsigned, scale_dtype, check):
    """Grouped fp32 input, stored scale, its fp32 value and reciprocal, and the code range."""
    check_group_size(group_size)
    if check:
        check_finite(x, "input of quantize_int4")
    scale_dtype = scale_dtype or (x.dtype if x.is_floating_point() else torch.float32)
    xg = grouped(pad_to_group(x.float(), group_size), group_size)
    if unsigned:
        xg = xg.clamp_min(0)
        scale = (xg.amax(dim=-1, keepdim=True) / UINT4_MAX).to(scale_dtype)
        lo, hi = 0, UINT4_MAX
    else:
        scale = (xg.abs().amax(dim=-1, keepdim=True) / INT4_MAX).to(scale_dtype)
        lo, hi = -INT4_MAX, INT4_MAX
    s = scale.float()
    inv = torch.where(s > 0, 1.0 / s, torch.zeros_like(s))
    return xg, scale, s, inv, lo, hi


def quantize_int4(
    x: torch.Tensor,
    group_size: int = 64,
    *,
    unsigned: bool = False,
    scale_dtype: torch.dtype | None = None,
    check: bool = True,
) -> QTensor:
    """Quantize the last dimension of ``x`` to INT4 codes (int8 tensor, or uint8 if ``unsigned``)."""
    xg, scale, _, inv, lo, hi = _int4_grid(x, group_size, unsigned, scale_dtype, check)
    codes = torch.round(xg * inv).clamp_(lo, hi)
    codes = codes.to(torch.uint8 if unsigned else torch.int8).flatten(-2)
    return QTensor(codes, scale.squeeze(-1), "uint4" if unsigned else "int4", group_size, x.shape[-1])


def fake_quantize_int4(x, group_size=64, *, unsigned=False, scale_dtype=None, check=True) -> torch.Tensor:
    """``dequantize_int4(quantize_int4(x))`` in fewer passes (the search runs it thousands of times)."""
    xg, _, s, inv, lo, hi = _int4_grid(x, group_size, unsigned, scale_dtype, check)
    return (xg * inv).round_().clamp_(lo, hi).mul_(s).flatten(-2)[..., : x.shape[-1]]


def dequantize_int4(q: QTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    out = grouped(q.codes.float(), q.group_size) * q.scales.float().unsqueeze(-1)
    return out.flatten(-2)[..., : q.in_features].to(dtype)
