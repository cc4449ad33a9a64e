"""INT4 with two-level scales: a float per row × a small integer multiplier per group of 64.

Why: with a float scale per group, a GEMM must rescale its accumulator after every
64-deep group, on the CUDA cores, inside the main loop; on Hopper that rescale, not the
tensor cores, sets the speed. Here a group's scale is ``s_row · m_g`` with an integer
``m_g``, so ``code · m_g`` is itself a small integer: ``[-7, 7] · [1, 18] ⊂ [-126, 126]``
is an exact INT8 value, and ``Σ_k (q·m)_a (q·m)_w`` accumulates exactly in int32 over
the whole of K. The only float work left is ``s_row_a · s_row_w`` once per output, in
the epilogue. This is QServe's "progressive group quantization" (arXiv 2405.04532) and
LiquidGEMM's (arXiv 2509.01229) W4A8 layout, applied to SVDQuant's residual.

Signed groups (weights, and activations):
  ``s = absmax(row) / (7 · 18)`` (fp32), ``m_g ∈ [1, 18]``, ``code ∈ [-7, 7]``;
unsigned groups (post-GELU activations, shifted to be non-negative):
  ``m_g ∈ [1, 8]``, ``code ∈ [0, 15]`` (15 · 8 = 120 still fits INT8);
a row with both kinds takes ``s = max(absmax_signed / 126, max_unsigned / 120)``.

The multiplier of a group with absmax ``a`` is ``m = clamp(rne(a / (qmax · s)), 1, m_max)``
("nearest", the activations' rule, one pass in a kernel); weights, quantized once,
may instead take whichever of ``floor`` / ``ceil`` of ``a / (qmax · s)`` gives the group
the smaller squared error ("best": ~0.3 dB better than nearest on Gaussian rows and
slightly better than float group scales). Then ``code = clamp(rne(x / (s · m)), lo, hi)``;
the division is by the fp32 product ``s · m``, exactly what a kernel computes. All-zero
groups get ``m = 1`` and codes 0; an all-zero row gets ``s = 0``.
"""

from __future__ import annotations

import torch

from .common import QTensor, check_finite, check_group_size, grouped, pad_to_group, per_element
from .int4 import INT4_MAX, UINT4_MAX, _unsigned_from

MULT_MAX = 18           # signed groups: 7 · 18 = 126 <= 127
MULT_MAX_UNSIGNED = 8   # unsigned groups: 15 · 8 = 120 <= 127


def _grid(x, group_size, unsigned, best, check):
    """Grouped fp32 input, row scale [.., 1, 1], multipliers [.., G, 1] (float), code bounds, and with ``best`` the
    dequantized values for the chosen multipliers (the search needs them next; computing them again would cost as
    much as the choice)."""
    check_group_size(group_size, None)
    if group_size <= 0:
        raise ValueError("int4m needs groups along K (group_size > 0, default 64)")
    if check:
        check_finite(x, "input of quantize_int4m")
    xg = grouped(pad_to_group(x.float(), group_size), group_size)
    start = _unsigned_from(unsigned, x.shape[-1], group_size)
    groups = xg.shape[-2]
    if start is None:  # all signed (weights): no per-group selections
        # 0-dim tensors on x's device, not Python numbers: CUDA divides by a host scalar as a multiplication by its
        # reciprocal, which rounds differently from the division the GPU rounding kernel does
        qmax, mmax, lo = (xg.new_tensor(float(v)) for v in (INT4_MAX, MULT_MAX, -INT4_MAX))
        amax = torch.maximum(-xg.amin(dim=-1, keepdim=True), xg.amax(dim=-1, keepdim=True))  # [.., G, 1]
    else:
        ug = (torch.arange(groups, device=x.device) >= start // group_size)[:, None]
        xg = xg.clamp_min(0) if start == 0 else torch.where(ug, xg.clamp_min(0), xg)
        qmax = torch.where(ug, float(UINT4_MAX), float(INT4_MAX))
        mmax = torch.where(ug, float(MULT_MAX_UNSIGNED), float(MULT_MAX))
        lo = torch.where(ug, 0.0, -float(INT4_MAX))
        amax = xg.abs().amax(dim=-1, keepdim=True)                   # [.., G, 1]
    # one row scale covers both kinds: the largest group lands on its largest multiplier
    s = (amax / (qmax * mmax)).amax(dim=-2, keepdim=True)            # [.., 1, 1]
    inv_s = torch.where(s > 0, 1.0 / s, torch.zeros_like(s))
    ideal = amax * inv_s / qmax
    one = torch.ones_like(ideal)
    if not best:
        m = torch.clamp_max(torch.maximum(torch.round(ideal), one), mmax)
        gs = s * m
        return xg, s, m, gs, torch.where(gs > 0, 1.0 / gs, torch.zeros_like(gs)), lo, qmax, start, None
    picks = []
    for m in (torch.clamp_max(torch.maximum(ideal.floor(), one), mmax),
              torch.clamp_max(torch.maximum(ideal.ceil(), one), mmax)):
        gs = s * m
        inv = torch.where(gs > 0, 1.0 / gs, torch.zeros_like(gs))
        dq = _codes(xg, inv, lo, qmax).mul_(m).mul_(s)
        # float64 sums: the choice then does not hang on a reduction's order (a kernel sums differently);
        # d * d, not square(): the same numbers, three times faster on the CPU
        d = (dq - xg).double()
        picks.append((m, gs, inv, dq, (d * d).sum(-1, keepdim=True)))
    (m0, gs0, inv0, dq0, e0), (m1, gs1, inv1, dq1, e1) = picks
    up = e1 < e0
    return (xg, s, torch.where(up, m1, m0), torch.where(up, gs1, gs0), torch.where(up, inv1, inv0), lo, qmax, start,
            torch.where(up, dq1, dq0))


def _codes(xg, inv, lo, hi):
    """``clamp(rne(x / (s · m)), lo, hi)`` as floats (the division is the fp32 reciprocal, as in a kernel)."""
    q = torch.round(xg * inv)
    return q.clamp_(lo, hi) if lo.ndim == 0 else torch.minimum(torch.maximum(q, lo), hi)


def quantize_int4m(x: torch.Tensor, group_size: int = 64, *, unsigned: bool | int = False, best: bool = False,
                   check: bool = True) -> QTensor:
    """Quantize the last dimension of ``x``: codes int8 ``[.., K_pad]``, ``scales`` fp32 ``[..]`` (one per row),
    ``multipliers`` uint8 ``[.., K_pad / group]``. ``best=True`` picks each multiplier for the smaller group error."""
    xg, s, m, _, inv, lo, hi, _, _ = _grid(x, group_size, unsigned, best, check)
    codes = _codes(xg, inv, lo, hi).to(torch.int8).flatten(-2)
    return QTensor(codes, s.reshape(s.shape[:-2]), "int4m", group_size, x.shape[-1],
                   multipliers=m.squeeze(-1).to(torch.uint8))


def fake_quantize_int4m(x: torch.Tensor, group_size: int = 64, *, unsigned: bool | int = False, best: bool = False,
                        check: bool = True) -> torch.Tensor:
    """``dequantize_int4m(quantize_int4m(x))`` in fewer passes (the search runs it thousands of times)."""
    xg, s, m, _, inv, lo, hi, _, dq = _grid(x, group_size, unsigned, best, check)
    if dq is None:
        # (code · m) is an exact integer; one rounding when scaled, as in dequantize and the INT8 GEMM
        dq = _codes(xg, inv, lo, hi).mul_(m).mul_(s)
    return dq.add_(0.0).flatten(-2)[..., : x.shape[-1]]  # + 0.0: -0.0 -> +0.0


def int4m_operand(x: torch.Tensor, group_size: int = 64, *, unsigned: bool | int = False):
    """The activation rule's ``code · multiplier`` as fp32 values ``[.., K_pad]`` (exact integers, the INT8 operand
    of :func:`int4m_integer_values`) and the row scale ``[.., 1]``, without building codes (the CPU's layers)."""
    xg, s, m, _, inv, lo, hi, _, _ = _grid(x, group_size, unsigned, False, False)
    return _codes(xg, inv, lo, hi).mul_(m).flatten(-2), s.reshape(*s.shape[:-2], 1)


def dequantize_int4m(q: QTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(code · m) · s``: the integer product first (exact), then one rounding."""
    out = grouped(q.codes.float(), q.group_size) * q.multipliers.float().unsqueeze(-1)
    out = out * q.scales.float()[..., None, None]
    return out.flatten(-2)[..., : q.in_features].to(dtype)


def int4m_integer_values(q: QTensor) -> torch.Tensor:
    """``code · multiplier`` as exact int8 ``[.., K_pad]``: the operand an INT8 GEMM multiplies."""
    v = grouped(q.codes.to(torch.int16), q.group_size) * q.multipliers.to(torch.int16).unsqueeze(-1)
    return v.flatten(-2).to(torch.int8)


def int4m_weight_grid(q: QTensor):
    """A weight's rounding grid under its fixed row scale and multipliers: element = (s · m) · code, code in [-7, 7]
    (GPTQ; the stored value rounds (code · m) · s once, which differs from this by at most an ulp)."""
    values = torch.arange(-INT4_MAX, INT4_MAX + 1, dtype=torch.float32, device=q.codes.device)
    return per_element(q.multipliers, q.group_size) * q.scales.float()[..., None], values, values.to(torch.int8)
