"""Helpers the Triton kernels share: exact rounding, and whether the CPU interpreter runs them.

Triton's CPU interpreter (``TRITON_INTERPRET=1``, the CI tests) cannot multiply bf16 in
``tl.dot`` and truncates instead of rounding on fp32 -> bf16 / fp8 casts, so the kernels
take an ``F32_DOT`` flag and round scales explicitly; the GPU path is unaffected.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl
from triton.language.extra import libdevice


# Read once, at import, as Triton itself decides at ``@triton.jit`` time whether a kernel is interpreted: the
# launchers ask on every call, and a hot path reads no environment.
_INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1 (the CPU tests): its dots cannot take bf16 operands, it runs no PTX."""
    return _INTERPRETING


def groups_per_program(groups: int) -> int:
    """How many 64-groups one program of a streaming weight pass walks: the largest of 8, 6, 4, 3, 2, 1 that
    divides the group count (loop bounds are constexpr for the interpreter)."""
    return next(d for d in (8, 6, 4, 3, 2, 1) if groups % d == 0)


@triton.jit
def load_halves(p_ptr, rows, rmask, g, KP: tl.constexpr, GROUP: tl.constexpr, SIGNED: tl.constexpr,
                GROUPS: tl.constexpr = 1):
    """Group ``g``'s codes of ``rows``, packed in halves (byte j holds code j low, j + GROUP/2 high;
    :func:`svdquant.formats.pack_4bit_halves`): ``(codes[:, :GROUP/2], codes[:, GROUP/2:])``. Signed codes
    sign-extend by a shift pair on int8; unsigned ones (``int4z``) are masked. ``GROUPS`` groups from ``g`` on
    (their bytes are contiguous): each half then holds the groups' halves side by side,
    ``[rows, GROUPS · GROUP/2]``."""
    half = tl.arange(0, GROUPS * GROUP // 2)
    b = tl.load(p_ptr + rows[:, None] * (KP // 2) + g * (GROUP // 2) + half[None, :], mask=rmask[:, None], other=0)
    if SIGNED:
        bs = b.to(tl.int8, bitcast=True)
        return (bs << 4) >> 4, bs >> 4
    else:
        bu = b.to(tl.int32)
        return bu & 15, bu >> 4


@triton.jit
def round_half_even(x):
    """Round to the nearest integer, ties to even (torch.round's rule), for |x| < 2**22."""
    r = tl.floor(x + 0.5)
    tie = (r - x) == 0.5
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    return tl.where(tie & odd, r - 1.0, r)


@triton.jit
def rne(x, FAST_ROUND: tl.constexpr):
    """Round half to even: one ``cvt.rni`` on the GPU (``FAST_ROUND``); the CPU interpreter lacks libdevice."""
    if FAST_ROUND:
        return libdevice.rint(x)
    else:
        return round_half_even(x)


@triton.jit
def reciprocal(v):
    """``1 / v`` (IEEE, as torch divides) where ``v > 0``, else 0: a zero scale quantizes to zero codes."""
    return tl.where(v > 0, tl.math.div_rn(tl.zeros_like(v) + 1.0, tl.where(v > 0, v, 1.0)), 0.0)


@triton.jit
def gelu_tanh(x, APPROX: tl.constexpr):
    """diffusers' tanh GELU, ``0.5 x (1 + tanh(u))``, on fp32 ``x``.

    ``APPROX`` (the GPU): one ``tanh.approx.f32`` (PTX ISA, sm_75+: a single special-function-unit instruction,
    relative error about 2^-11), where ``tl.exp`` plus a division cost two. In the activation passes, which GELU
    every block twice, the two-instruction form made the pass 1.7x slower than without a GELU at K = 15,360 (H200,
    NOTES-GPU.md session 16): the special-function unit, not memory, was the bound. Otherwise (the CPU
    interpreter, which runs no PTX) ``x / (1 + exp(-2u))``, the same function (1 + tanh(u) = 2 / (1 + exp(-2u))),
    with no multiply-adds around the division: in a 128 × 256 GEMM epilogue (sm_90, Triton 3.9) it spilled 616 B
    of stack against 1,352 B for ``0.5 x (1 + (2 / (1 + exp(-2u)) - 1))``."""
    inner = 0.7978845608028654 * (x + 0.044715 * x * x * x)
    if APPROX:
        t = tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [inner], dtype=tl.float32, is_pure=True,
                                      pack=1)
        return x * (0.5 + 0.5 * t)
    else:
        return x / (1.0 + tl.exp(-2.0 * inner))


@triton.jit
def grouped_tile(tile, num_outer, num_inner, GROUP: tl.constexpr):
    """Tile ``tile`` -> (outer, inner) index in grouped order: GROUP outer tiles share a sweep over the inner
    ones, so their operands stay in L2 (Triton's matmul tutorial's "super-grouping")."""
    per_group = GROUP * num_inner
    first = (tile // per_group) * GROUP
    size = tl.minimum(num_outer - first, GROUP)
    outer = first + (tile % per_group) % size
    inner = (tile % per_group) // size
    return outer, inner


@triton.jit
def down_projection_dot(x, l1, acc, IEEE: tl.constexpr, F32_DOT: tl.constexpr):
    """``acc += x · l1`` for the branch's down projection, at the reference's precision."""
    if IEEE:  # fp32 inputs: keep the reference's fp32 accuracy (no tf32)
        return tl.dot(x, l1.to(x.dtype), acc, input_precision="ieee")
    elif F32_DOT:  # the CPU interpreter cannot multiply bf16; 16-bit values are exact in tf32
        return tl.dot(x.to(tl.float32), l1.to(tl.float32), acc)
    else:
        return tl.dot(x, l1.to(x.dtype), acc)
