"""q/k RMSNorm + rotary embedding in one pass: FLUX's attention inputs read once, written once.

Reference: :func:`svdquant.ops.norm_rope.norm_rope_reference` (``torch.nn.RMSNorm`` then diffusers'
``apply_rotary_emb`` with ``use_real_unbind_dim=-1``). The input is a projection's output ``[B, S, H·D]`` (its rows
may be strided: a slice of the stacked q/k/v GEMM's output), the output ``[B, S_out, H, D]`` contiguous, as the
attention takes it, the tokens written from ``token_offset`` on (FLUX's text tokens come first). Each program owns
``BLOCK_T`` tokens of one head: the head's ``D`` values are normalized in fp32, scaled by the norm's weight and
rounded to the output dtype (as the module returns them), then rotated in fp32 with each value's pair partner
(``2i`` with ``2i + 1``), loaded a second time from cache rather than shuffled between lanes, and rounded again.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def norm_rope_kernel(x_ptr, w_ptr, cos_ptr, sin_ptr, out_ptr, S, stride_xb, stride_xs, H, token_offset, S_out, eps,
                     D: tl.constexpr, BLOCK_T: tl.constexpr):
    pid_t, h = tl.program_id(0), tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)  # offsets past 2**31 elements from batch 6 at 2048² (rows of 21,504)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.arange(0, D)
    tmask = (t < S)[:, None]
    rows = x_ptr + b * stride_xb + t[:, None] * stride_xs + h * D
    x = tl.load(rows + d[None, :], mask=tmask, other=0.0).to(tl.float32)
    partner = tl.load(rows + (d ^ 1)[None, :], mask=tmask, other=0.0).to(tl.float32)
    inv = tl.rsqrt(tl.sum(x * x, axis=1) / D + eps)[:, None]
    w = tl.load(w_ptr + d).to(tl.float32)
    w_partner = tl.load(w_ptr + (d ^ 1)).to(tl.float32)
    # the norm's output, rounded as the module returns it; the rotation reads that
    y = (x * inv * w[None, :]).to(out_ptr.dtype.element_ty).to(tl.float32)
    y_partner = (partner * inv * w_partner[None, :]).to(out_ptr.dtype.element_ty).to(tl.float32)
    sign = tl.where(d % 2 == 0, -1.0, 1.0)[None, :]  # rotated[2i] = -x[2i + 1], rotated[2i + 1] = x[2i]
    pos = token_offset + t
    table = pos[:, None] * D + d[None, :]
    c = tl.load(cos_ptr + table, mask=tmask, other=0.0).to(tl.float32)
    s = tl.load(sin_ptr + table, mask=tmask, other=0.0).to(tl.float32)
    out = y * c + sign * y_partner * s
    dst = out_ptr + ((b * S_out + pos[:, None]) * H + h) * D + d[None, :]
    tl.store(dst, out.to(out_ptr.dtype.element_ty), mask=tmask)


def norm_rope_into(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   eps: float, token_offset: int, block_t: int = 32) -> None:
    """``x`` ``[B, S, H·D]`` (unit stride in the last dim) normalized and rotated into ``out[:, token_offset:
    token_offset + S]`` (``out`` ``[B, S_out, H, D]`` contiguous; ``cos`` / ``sin`` ``[S_out, D]`` contiguous)."""
    batch, tokens, _ = x.shape
    heads, dim = out.shape[2], out.shape[3]
    grid = (triton.cdiv(tokens, block_t), heads, batch)
    norm_rope_kernel[grid](x, weight, cos, sin, out, tokens, x.stride(0), x.stride(1), heads, token_offset,
                           out.shape[1], eps, D=dim, BLOCK_T=block_t, num_warps=4)


__all__ = ["norm_rope_kernel", "norm_rope_into"]
