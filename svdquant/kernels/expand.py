"""Expand two-level INT4 weights to the INT8 GEMM's operand: ``code · multiplier`` as int8.

Reference: :func:`svdquant.formats.int4m.int4m_integer_values` of the unpacked codes.
One streaming pass: read ``N · K/2`` packed bytes and ``N · K/64`` multipliers, write
``N · K`` int8. Speed mode runs it once at load; memory mode runs it into a fresh buffer
right before each GEMM (the caching allocator hands every layer the same block, so one
layer-sized buffer is resident). Packing: within each group of 64, byte j holds code j
(low nibble) and code j + 32 (high nibble), two's complement
(:func:`svdquant.formats.pack_4bit_halves`), so a shift pair sign-extends each half.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import groups_per_program, load_halves


@triton.jit
def expand_int4m_kernel(p_ptr, m_ptr, w_ptr, N, KP: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr,
                        GROUPS_PER_PROG: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_g = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    n_groups: tl.constexpr = KP // GROUP
    for i in range(0, GROUPS_PER_PROG):
        g = pid_g * GROUPS_PER_PROG + i
        lo, hi = load_halves(p_ptr, rows, rmask, g, KP, GROUP, True)
        mult = tl.load(m_ptr + rows * n_groups + g, mask=rmask, other=0).to(tl.int8)
        lo = lo * mult[:, None]  # |code · m| <= 126: no int8 overflow
        hi = hi * mult[:, None]
        vals = tl.reshape(tl.permute(tl.join(lo, hi), (0, 2, 1)), (BLOCK_N, GROUP))  # [lo | hi], one wide store
        cols = tl.arange(0, GROUP)
        tl.store(w_ptr + rows[:, None] * KP + g * GROUP + cols[None, :], vals, mask=rmask[:, None])


def expand_int4m(packed: torch.Tensor, mult: torch.Tensor, *, out: torch.Tensor | None = None, group_size: int = 64,
                 block_n: int = 32, groups_per_prog: int | None = None, num_warps: int = 4) -> torch.Tensor:
    """``packed`` ``[N, K_pad/2]`` uint8, ``mult`` ``[N, K_pad/g]`` uint8 -> ``[N, K_pad]`` int8 ``code · m``."""
    n, half = packed.shape
    kp = half * 2
    groups = kp // group_size
    if groups_per_prog is None:
        groups_per_prog = groups_per_program(groups)
    w = out if out is not None else torch.empty(n, kp, dtype=torch.int8, device=packed.device)
    expand_int4m_kernel[(triton.cdiv(n, block_n), groups // groups_per_prog)](
        packed, mult, w, n, KP=kp, GROUP=group_size, BLOCK_N=block_n, GROUPS_PER_PROG=groups_per_prog,
        num_warps=num_warps,
    )
    return w
