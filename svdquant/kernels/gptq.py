"""GPTQ's inner block: round ``B`` columns one after another, each column's error spread onto the block's later
columns, for all rows at once (the quantizer's GPTQ stage).

Reference: ``svdquant.algorithm.gptq._round_block``. In torch the block is ``B`` steps of ~8 small kernels over an
``N``-row column, launch-bound on a GPU (a FLUX-size transformer rounds ~1.5 M columns); here one program owns
``BLOCK_N`` rows and the whole ``B``-column tile in registers, since GPTQ's rows never interact: one launch per
block. Rounding is to the nearest value of the format's grid (``values`` ascending, ``mids`` between them, ties to
the lower value, as ``torch.bucketize`` does), under per-element factors. Launched without fused multiply-adds
and with IEEE divisions, so every number is rounded as torch rounds it: on a GPU the result is the reference's bit
for bit (one flipped rounding would move the error of every later column of its row).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def gptq_block_kernel(w_ptr, f_ptr, u_ptr, v_ptr, m_ptr, idx_ptr, err_ptr, N, B,
                      NV: tl.constexpr, BLOCK_N: tl.constexpr, BP: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BP)
    mask = (rows < N)[:, None] & (cols < B)[None, :]
    offs = rows[:, None].to(tl.int64) * B + cols[None, :]
    w = tl.load(w_ptr + offs, mask=mask, other=0.0)
    f = tl.load(f_ptr + offs, mask=mask, other=0.0)
    idx = tl.zeros([BLOCK_N, BP], tl.int32)
    err = tl.zeros([BLOCK_N, BP], tl.float32)
    for j in range(B):
        sel = cols[None, :] == j
        wj = tl.sum(tl.where(sel, w, 0.0), axis=1)
        fj = tl.sum(tl.where(sel, f, 0.0), axis=1)
        x = tl.where(fj > 0, tl.math.div_rn(wj, tl.maximum(fj, 1e-30)), 0.0)
        k = tl.zeros([BLOCK_N], tl.int32)
        for t in tl.static_range(NV - 1):  # bucketize: how many midpoints lie below x
            k += (x > tl.load(m_ptr + t)).to(tl.int32)
        val = tl.load(v_ptr + k)
        e = tl.math.div_rn(wj - fj * val, tl.load(u_ptr + j * B + j))
        u_row = tl.load(u_ptr + j * B + cols, mask=(cols >= j) & (cols < B), other=0.0)
        w -= e[:, None] * u_row[None, :]
        idx = tl.where(sel, k[:, None], idx)
        err = tl.where(sel, e[:, None], err)
    tl.store(idx_ptr + offs, idx, mask=mask)
    tl.store(err_ptr + offs, err, mask=mask)


def gptq_round_block(w: torch.Tensor, f: torch.Tensor, u: torch.Tensor, values: torch.Tensor, mids: torch.Tensor):
    """``(grid indices int32 [N, B], errors fp32 [N, B])`` of one block: ``w``, ``f`` fp32 ``[N, B]``, ``u`` fp32
    ``[B, B]`` the block of GPTQ's upper inverse factor, ``values`` / ``mids`` fp32 the grid."""
    n, b = w.shape
    w, f, u = (t.float().contiguous() for t in (w, f, u))
    idx = torch.empty(n, b, dtype=torch.int32, device=w.device)
    err = torch.empty(n, b, dtype=torch.float32, device=w.device)
    bp = triton.next_power_of_2(b)
    block_n = max(1, min(64, 8192 // bp))
    gptq_block_kernel[(triton.cdiv(n, block_n),)](
        w, f, u, values.float().contiguous(), mids.float().contiguous(), idx, err, n, b,
        NV=values.numel(), BLOCK_N=block_n, BP=bp, num_warps=4, enable_fp_fusion=False)
    return idx, err
