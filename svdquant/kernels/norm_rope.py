"""q/k RMSNorm + rotary embedding in one pass: FLUX's attention inputs read once, written once.

Reference: :func:`svdquant.ops.norm_rope.norm_rope_reference` (``torch.nn.RMSNorm`` then diffusers'
``apply_rotary_emb`` with ``use_real_unbind_dim=-1``). The input is a projection's output ``[B, S, H·D]`` (its rows
may be strided: a slice of the stacked q/k/v GEMM's output), the output ``[B, S_out, H, D]`` in the layout the
attention reads (contiguous, or heads first for SDPA's kernels), the tokens written from ``token_offset`` on
(FLUX's text tokens come first). Each program owns ``BLOCK_T`` tokens of ``HEADS`` heads (one by default), for
which it reads the rotary tables and the norm's weight once. A head's ``D`` values are normalized in fp32, scaled
by the norm's weight and rounded to the output dtype (as the module returns them), then rotated in fp32 with each
value's pair partner (``2i`` with ``2i + 1``), split from the registers by default (or loaded a second time from
cache, as to session 36), and rounded again. ``ROUND_NORM``: the norm as diffusers' own ``RMSNorm`` rounds it
(Qwen-Image's q/k norms): the normalized value rounded to the output dtype before the weight, the product rounded.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _normed(x, w, dtype: tl.constexpr, ROUND_NORM: tl.constexpr):
    """``x · rsqrt(mean x² + eps)`` times the weight, rounded to ``dtype`` and back: as ``torch.nn.RMSNorm`` (one
    rounding), or ``ROUND_NORM`` as diffusers' ``RMSNorm`` (rounded before the weight, the product rounded again)."""
    if ROUND_NORM:
        x = x.to(dtype).to(tl.float32)
    return (x * w).to(dtype).to(tl.float32)


@triton.jit
def norm_rope_kernel(x_ptr, w_ptr, cos_ptr, sin_ptr, out_ptr, xk_ptr, wk_ptr, outk_ptr, S, stride_xb, stride_xs,
                     stride_ob, stride_os, stride_oh, stride_tb, token_offset, eps, D: tl.constexpr,
                     BLOCK_T: tl.constexpr, HEADS: tl.constexpr, PAIR: tl.constexpr, SPLIT: tl.constexpr,
                     ROUND_NORM: tl.constexpr, BATCH_TABLES: tl.constexpr):
    pid_t, pid_h = tl.program_id(0), tl.program_id(1)
    if PAIR:  # the second half of the head axis is the key's (same shapes and strides), chosen once per program
        groups = tl.num_programs(1) // 2
        if pid_h >= groups:
            x_ptr = xk_ptr
            w_ptr = wk_ptr
            out_ptr = outk_ptr
            pid_h -= groups
    b = tl.program_id(2).to(tl.int64)  # offsets past 2**31 elements from batch 6 at 2048² (rows of 21,504)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.arange(0, D)
    tmask = (t < S)[:, None]
    # what the program's heads share, loaded once. Several heads a program were meant to save re-reading the fp32
    # tables (4 bytes a value to the input's 2) per head, but the re-reads come from L2: with the partners split from
    # registers, one head a program at 16 tokens took 0.0247 / 0.0273 ms (single / double case) on an H100, 4 heads
    # 0.0223 / 0.0284 and block_t 32 0.0240 / 0.0287 (BENCHMARKS.md "Session 37"): within 10 % either way, timed
    # alone and written contiguous only, so the default stays where the step was timed
    w = tl.load(w_ptr + d).to(tl.float32)[None, :]
    pos = token_offset + t
    table = pos[:, None] * D + d[None, :]
    if BATCH_TABLES:  # a table per batch entry (Z-Image's); FLUX's one table compiles as it was timed (64 registers)
        cos_ptr += b * stride_tb
        sin_ptr += b * stride_tb
    c = tl.load(cos_ptr + table, mask=tmask, other=0.0).to(tl.float32)
    s = tl.load(sin_ptr + table, mask=tmask, other=0.0).to(tl.float32)
    for i in tl.static_range(HEADS):
        h = pid_h * HEADS + i
        rows = x_ptr + b * stride_xb + t[:, None] * stride_xs + h * D
        x = tl.load(rows + d[None, :], mask=tmask, other=0.0).to(tl.float32)
        inv = tl.rsqrt(tl.sum(x * x, axis=1) / D + eps)[:, None]
        # the norm's output, rounded as the module returns it; the rotation reads that
        y = _normed(x * inv, w, out_ptr.dtype.element_ty, ROUND_NORM)
        if SPLIT:  # the partners from registers: [T, D/2, 2] split into the even and odd values, rejoined swapped
            even, odd = tl.split(tl.reshape(y, (BLOCK_T, D // 2, 2)))
            out = y * c + tl.reshape(tl.join(-odd, even), (BLOCK_T, D)) * s
        else:  # the partners loaded a second time (from cache) and normalized again
            w_partner = tl.load(w_ptr + (d ^ 1)).to(tl.float32)[None, :]
            sign = tl.where(d % 2 == 0, -1.0, 1.0)[None, :]  # rotated[2i] = -x[2i + 1], rotated[2i + 1] = x[2i]
            partner = tl.load(rows + (d ^ 1)[None, :], mask=tmask, other=0.0).to(tl.float32)
            y_partner = _normed(partner * inv, w_partner, out_ptr.dtype.element_ty, ROUND_NORM)
            out = y * c + sign * y_partner * s
        dst = out_ptr + b * stride_ob + pos[:, None] * stride_os + h * stride_oh + d[None, :]
        tl.store(dst, out.to(out_ptr.dtype.element_ty), mask=tmask)


def norm_rope_into(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   eps: float, token_offset: int, block_t: int = 16, group: int = 1,
                   pair: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None, split: bool = True,
                   round_norm: bool = False) -> None:
    """``x`` ``[B, S, H·D]`` (unit stride in the last dim) normalized and rotated into ``out[:, token_offset:
    token_offset + S]`` (``out`` ``[B, S_out, H, D]`` with a unit stride in D: contiguous, or a transposed
    ``[B, H, S_out, D]``; ``cos`` / ``sin`` ``[S_out, D]`` contiguous, or ``[B, S_out, D]``: a table per batch
    entry, as Z-Image gives them).
    Each program takes ``block_t`` tokens of ``group`` heads (a divisor of H). ``pair=(out_k, x_k, weight_k)``:
    the key too, in the same launch (twice the programs), with the query's shapes and strides: a block's q and k in
    0.0475 / 0.0518 ms on an H100 against 0.0504 / 0.0556 in two launches (BENCHMARKS.md "Session 37").
    ``split`` (the default): each value's rotation partner taken from registers (a reshape, split and join), not
    loaded and normalized a second time: the same bits in 64 registers a thread against 90 for sm_90, and twice the
    speed (0.0247 against 0.0493 ms for a single block's q, 2.3 TB/s: the kernel had been bound by its instructions,
    not by its bytes). ``round_norm``: the norm as diffusers' ``RMSNorm`` rounds it (the kernel's ``ROUND_NORM``)."""
    batch, tokens, _ = x.shape
    n_heads, dim = out.shape[2], out.shape[3]
    if n_heads % group:
        raise ValueError(f"group={group} heads a program must divide the {n_heads} heads")
    out_k, x_k, weight_k = pair if pair is not None else (out, x, weight)
    if (out_k.shape, out_k.stride(), x_k.shape, x_k.stride(), out_k.dtype, x_k.dtype, weight_k.dtype) != \
            (out.shape, out.stride(), x.shape, x.stride(), out.dtype, x.dtype, weight.dtype):
        raise ValueError("pair= takes the key's output and input with the query's shapes, strides and dtypes")
    grid = (triton.cdiv(tokens, block_t), n_heads // group * (1 if pair is None else 2), batch)
    norm_rope_kernel[grid](x, weight, cos, sin, out, x_k, weight_k, out_k, tokens, x.stride(0), x.stride(1),
                           out.stride(0), out.stride(1), out.stride(2), cos.stride(0) if cos.dim() == 3 else 0,
                           token_offset, eps, D=dim, BLOCK_T=block_t,
                           HEADS=group, PAIR=pair is not None, SPLIT=split, ROUND_NORM=round_norm,
                           BATCH_TABLES=cos.dim() == 3, num_warps=4)


__all__ = ["norm_rope_kernel", "norm_rope_into"]
