"""Two-level INT4 rounding of weights, ``dequantize(quantize(W))`` in fp32: the quantizer's inner loop.

Reference: :func:`svdquant.formats.int4m.fake_quantize_int4m` with ``best=True`` (signed groups). The
smoothing search rounds a residual for each of its 39 candidates and each refinement step; in torch that
is ~40 elementwise kernels over the whole weight (3.2 ms for FLUX's 9216 × 3072 q/k/v on an H200,
``benchmarks/quantize_search.py``), here one program per row reads it twice and writes it once.

Per row: ``s = absmax / 126``; per group of 64, both ``floor`` and ``ceil`` of ``gmax · s⁻¹ / 7``
(clamped to [1, 18]) round the group, and the multiplier whose reconstruction has the smaller squared
error wins (the sums in float64, as the reference takes them: the squares are exact there, so only a near-tie
could still round differently with the order of a reduction). Every division is IEEE (``div_rn``) and every product is rounded on its own (launched
with ``enable_fp_fusion=False``: a fused multiply-add would round ``q·m·s − x`` once instead of twice),
so the output equals the reference bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import interpreting, reciprocal, rne

@triton.jit
def _round_group(x, m, s, FAST_ROUND: tl.constexpr):
    """``(q · m) · s`` with ``q = clamp(rne(x · (s · m)⁻¹), -7, 7)`` for a [GROUPS, GROUP] tile."""
    inv = reciprocal(s * m)
    q = tl.minimum(tl.maximum(rne(x * inv[:, None], FAST_ROUND), -7.0), 7.0)
    return (q * m[:, None]) * s


@triton.jit
def round_int4m_weights_kernel(
    x_ptr, out_ptr, K, stride_x, stride_o,
    GROUP: tl.constexpr, GROUPS: tl.constexpr, TILES: tl.constexpr, FAST_ROUND: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    g = tl.arange(0, GROUPS)
    j = tl.arange(0, GROUP)
    offs = g[:, None] * GROUP + j[None, :]
    xr = x_ptr + row * stride_x
    amax = tl.zeros([GROUPS], tl.float32)
    for t in range(TILES):
        k = t * GROUPS * GROUP + offs
        x = tl.load(xr + k, mask=k < K, other=0.0)
        amax = tl.maximum(amax, tl.max(tl.abs(x), axis=1))
    s = tl.math.div_rn(tl.max(amax, axis=0), 126.0)
    inv_s = reciprocal(s)
    for t in range(TILES):
        k = t * GROUPS * GROUP + offs
        x = tl.load(xr + k, mask=k < K, other=0.0)
        gmax = tl.max(tl.abs(x), axis=1)
        ideal = tl.math.div_rn(gmax * inv_s, tl.zeros_like(gmax) + 7.0)
        m_lo = tl.minimum(tl.maximum(tl.floor(ideal), 1.0), 18.0)
        m_hi = tl.minimum(tl.maximum(tl.ceil(ideal), 1.0), 18.0)
        d_lo = (_round_group(x, m_lo, s, FAST_ROUND) - x).to(tl.float64)
        d_hi = (_round_group(x, m_hi, s, FAST_ROUND) - x).to(tl.float64)
        e_lo = tl.sum(d_lo * d_lo, axis=1)
        e_hi = tl.sum(d_hi * d_hi, axis=1)
        m = tl.where(e_hi < e_lo, m_hi, m_lo)
        out = _round_group(x, m, s, FAST_ROUND) + 0.0  # + 0.0: -0.0 -> +0.0, as the reference
        tl.store(out_ptr + row * stride_o + k, out, mask=k < K)


def round_int4m_weights(x: torch.Tensor, group_size: int = 64) -> torch.Tensor:
    """``fake_quantize_int4m(x, group_size, best=True)`` for fp32 ``x`` ``[N, K]`` (rows independent):
    fp32 ``[N, K]``."""
    if x.dtype != torch.float32 or x.ndim != 2:
        raise ValueError(f"round_int4m_weights takes an fp32 [N, K] matrix, got {x.dtype} {tuple(x.shape)}")
    x = x.contiguous()
    n, k = x.shape
    out = torch.empty_like(x)
    if n == 0:
        return out
    groups = -(-k // group_size)
    per_tile = min(16, triton.next_power_of_2(groups))
    round_int4m_weights_kernel[(n,)](
        x, out, k, x.stride(0), out.stride(0), GROUP=group_size, GROUPS=per_tile,
        TILES=-(-groups // per_tile), FAST_ROUND=not interpreting(), num_warps=4, enable_fp_fusion=False,
    )
    return out
