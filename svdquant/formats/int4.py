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

from .common import QTensor, check_finite, check_group_size, grouped, pad_to_group, per_element

INT4_MAX = 7
UINT4_MAX = 15


def _unsigned_from(unsigned: bool | int, k: int, group_size: int) -> int | None:
    """First unsigned channel: ``True`` -> 0, ``False`` -> None (all signed), an int -> itself."""
    if unsigned is False or unsigned is None:
        return None
    start = 0 if unsigned is True else int(unsigned)
    if start < 0 or start > k or (group_size and start % group_size):
        raise ValueError(f"unsigned channels must start at a multiple of the group size ({group_size}), got {start}")
    return start


def _int4_grid(x, group_size, unsigned, scale_dtype, check):
    """Grouped fp32 input, stored scale, its fp32 value and reciprocal, and the code range."""
    check_group_size(group_size)
    if check:
        check_finite(x, "input of quantize_int4")
    scale_dtype = scale_dtype or (x.dtype if x.is_floating_point() else torch.float32)
    xg = grouped(pad_to_group(x.float(), group_size), group_size)
    start = _unsigned_from(unsigned, x.shape[-1], group_size)
    if start == 0:
        xg = xg.clamp_min(0)
        scale = (xg.amax(dim=-1, keepdim=True) / UINT4_MAX).to(scale_dtype)
        lo, hi = 0, UINT4_MAX
    elif start is None:
        scale = (xg.abs().amax(dim=-1, keepdim=True) / INT4_MAX).to(scale_dtype)
        lo, hi = -INT4_MAX, INT4_MAX
    else:  # signed groups, then unsigned groups from channel `start` on
        ug = (torch.arange(xg.shape[-2], device=x.device) >= start // group_size)[:, None]
        xg = torch.where(ug, xg.clamp_min(0), xg)
        qmax = torch.where(ug, float(UINT4_MAX), float(INT4_MAX))
        scale = (xg.abs().amax(dim=-1, keepdim=True) / qmax).to(scale_dtype)
        lo, hi = torch.where(ug, 0.0, -float(INT4_MAX)), qmax
    s = scale.float()
    inv = torch.where(s > 0, 1.0 / s, torch.zeros_like(s))
    return xg, scale, s, inv, lo, hi


def _clamp(t, lo, hi):
    return t.clamp_(lo, hi) if isinstance(lo, int) else torch.minimum(torch.maximum(t, lo), hi)


def quantize_int4(
    x: torch.Tensor,
    group_size: int = 64,
    *,
    unsigned: bool | int = False,
    scale_dtype: torch.dtype | None = None,
    check: bool = True,
) -> QTensor:
    """Quantize the last dimension of ``x`` to INT4 codes (int8 tensor, or uint8 if all unsigned).

    ``unsigned`` may also be a channel index (a multiple of the group): groups from there
    on are unsigned, those before signed, for an input that concatenates a plain part and
    a post-GELU part. Mixed codes are held in int8.
    """
    xg, scale, _, inv, lo, hi = _int4_grid(x, group_size, unsigned, scale_dtype, check)
    codes = _clamp(torch.round(xg * inv), lo, hi)
    all_unsigned = unsigned is True or (unsigned is not False and int(unsigned) == 0)
    codes = codes.to(torch.uint8 if all_unsigned else torch.int8).flatten(-2)
    return QTensor(codes, scale.squeeze(-1), "uint4" if all_unsigned else "int4", group_size, x.shape[-1])


def fake_quantize_int4(x, group_size=64, *, unsigned=False, scale_dtype=None, check=True) -> torch.Tensor:
    """``dequantize_int4(quantize_int4(x))`` in fewer passes (the search runs it thousands of times)."""
    xg, _, s, inv, lo, hi = _int4_grid(x, group_size, unsigned, scale_dtype, check)
    # `+ 0.0` turns the -0.0 of small negatives into the +0.0 that dequantize(0) gives.
    return _clamp((xg * inv).round_(), lo, hi).mul_(s).add_(0.0).flatten(-2)[..., : x.shape[-1]]


def dequantize_int4(q: QTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    out = grouped(q.codes.float(), q.group_size) * q.scales.float().unsqueeze(-1)
    return out.flatten(-2)[..., : q.in_features].to(dtype)


def int4_weight_grid(q: QTensor):
    """A signed weight's rounding grid under its fixed scales: element = scale · code, code in [-7, 7] (GPTQ)."""
    values = torch.arange(-INT4_MAX, INT4_MAX + 1, dtype=torch.float32, device=q.codes.device)
    return per_element(q.scales, q.group_size), values, values.to(torch.int8)


def shift_vector(k: int, shift: float, start: int | None, device=None) -> torch.Tensor:
    """Per-channel post-GELU shift: ``shift`` on channels ``>= start``, 0 elsewhere (all 0 if no shift)."""
    v = torch.zeros(k, device=device)
    if shift and start is not None:
        v[start:] = shift
    return v
