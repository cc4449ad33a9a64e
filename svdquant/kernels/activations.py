"""The activation kernels of the INT8 path: smoothing, per-token quantization and ``X · L1ᵀ``.

Reference: :func:`svdquant.ops.reference.quantize_input` with the ``int8`` (A8) or
``int4m`` (two-level A4) activation format. Two passes, each split over tokens × K slices
so that enough programs keep enough loads in flight (one program walking a whole row
reached only a fifth of the copy rate on an H200):

1. load X, accumulate the branch's down projection ``lora_act += x · L1ᵀ`` (tensor cores,
   fp32), and the row maxima of ``u = (x + shift) · λ⁻¹`` (signed and post-GELU parts);
2. load X again (the block was just read: it comes from L2) and write the quantized values
   as int8: A8 ``rne(u / s)`` with ``s = absmax / 127``; A4 ``code · m`` with the two-level
   rule of :mod:`svdquant.formats.int4m` (``s = max(absmax_signed / 126, max_unsigned / 120)``,
   ``m = clamp(rne(gmax · s⁻¹ / qmax), 1, m_max)``, ``code = clamp(rne(u / (s · m)))``).

A token's scale needs the whole row, hence the two passes; pass 2 first reduces the K
slices' partial maxima (and, in its first slice, the partial down projections). Every division is IEEE
(``div_rn``), as in torch, so the codes equal the reference's bit for bit (with an input GELU, a code may move
one step: the interpreter's tanh-GELU against torch's in the last bit, the GPU's ``tanh.approx`` more). Output:
values ``[M, K_pad]`` int8 (zero beyond K), scales ``[M]`` fp32, ``lora_act`` ``[M, R]`` fp32.

Where the input's producer wrote each row's partial maxima (``row_maxima=``), one pass reads X once: the scales
from those, the codes and each K slice's partial ``X·L1ᵀ`` (:func:`quantize_given_maxima_kernel`), then the
slices' sum (:func:`lora_sum_kernel`).

Both passes in one launch instead (a program per row block walking all of K twice, the second time from L2, no
partials) measured 1.1-6.6x slower than the two at every FLUX pass type, whatever its blocks (H100, in a CUDA
graph; BENCHMARKS.md, "Session 29"): with a program per row block too few loads are in flight.

An input may come in two column parts, ``[x | tail]`` (a FLUX single block's ``proj_out``: its attention output and
a column slice of the stacked q/k/v + MLP GEMM's output): each K block is loaded from the part holding it, chosen
once per block, so the concatenation is never made. Compiled for sm_90 at FLUX's ``proj_out`` launch (Triton 3.9,
ahead of time: ``benchmarks/kernel_resources.py``) the two-part passes use 207 / 128 registers against 238 / 146
for one part, with no spills; selecting the part per element instead (a pointer ``tl.where``) spilled.

An input's columns from one block on may be pre-activations (``input_gelu_from``: an MLP's down projection, whose
GELU ``svdquant.fuse`` moves here): each such block is tanh-GELU'd as it is loaded, in both passes (compiled:
247 / 98 registers with the input in two parts, 248 / 112 in one, no spills). On the GPU the GELU is one
``tanh.approx.f32`` per element (:func:`~svdquant.kernels.common.gelu_tanh`): evaluated twice per element, its
earlier ``exp`` and division bound the passes on the special-function unit (1.7x the plain pass at K = 15,360).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .common import down_projection_dot, gelu_tanh, interpreting, reciprocal, rne


@triton.jit
def _load_x(x_ptr, t_ptr, rows, rmask, k0, k, K, stride_xm, stride_tm, k_head, HAS_TAIL: tl.constexpr):
    """Columns ``k = k0 + arange(BLOCK_K)`` of ``X``: of ``x`` alone, or of ``[x | t]`` (``x`` holds the first
    ``k_head`` columns, a whole number of blocks: :func:`quantize_activations` checks). One load either way: the
    block's part is chosen once per block (scalars), not per element."""
    if HAS_TAIL:
        base, stride, first = x_ptr, stride_xm, k_head - k_head  # an i32 zero: both branches give one type
        if k0 >= k_head:
            base, stride, first = t_ptr, stride_tm, k_head
    else:
        base, stride, first = x_ptr, stride_xm, 0
    return tl.load(base + rows[:, None] * stride + (k - first)[None, :], mask=rmask[:, None] & (k < K)[None, :],
                   other=0.0)


@triton.jit
def _load_u(x_ptr, t_ptr, sinv_ptr, rows, rmask, k0, k, K, stride_xm, stride_tm, k_head, shift, unsigned_from,
            gelu_from, HAS_SHIFT: tl.constexpr, HAS_TAIL: tl.constexpr, HAS_GELU: tl.constexpr,
            APPROX_GELU: tl.constexpr):
    kmask = k < K
    x = _load_x(x_ptr, t_ptr, rows, rmask, k0, k, K, stride_xm, stride_tm, k_head, HAS_TAIL)
    if HAS_GELU:  # pre-activations from gelu_from on (a whole number of blocks): as diffusers' GELU module gives them
        if k0 >= gelu_from:
            x = gelu_tanh(x.to(tl.float32), APPROX_GELU).to(x.dtype)
    sinv = tl.load(sinv_ptr + k, mask=kmask, other=0.0)
    uns = k >= unsigned_from
    if HAS_SHIFT:  # post-GELU channels: shifted, clamped at 0 (unsigned); the rest as they are
        u = (x.to(tl.float32) + tl.where(uns, shift, 0.0)[None, :]) * sinv[None, :]
        u = tl.where(uns[None, :], tl.maximum(u, 0.0), u)
    else:
        u = x.to(tl.float32) * sinv[None, :]
    return x, u, uns


@triton.jit
def _down_projection(x, l1_ptr, k, K, lora, R: tl.constexpr, IEEE: tl.constexpr, F32_DOT: tl.constexpr):
    """``lora += x · L1[:, k]ᵀ`` for one K block of the rows (tensor cores, fp32 accumulators)."""
    rr = tl.arange(0, R)
    l1 = tl.load(l1_ptr + rr[None, :] * K + k[:, None], mask=(k < K)[:, None], other=0.0)
    return down_projection_dot(x, l1, lora, IEEE, F32_DOT)


@triton.jit
def _store_partial(lp_ptr, split, rows, rmask, lora, M, R: tl.constexpr):
    """A K slice's partial down projections of the rows into ``lp[split]`` (``[slices, M, R]`` fp32)."""
    rr = tl.arange(0, R)
    tl.store(lp_ptr + split * M * R + rows[:, None] * R + rr[None, :], lora, mask=rmask[:, None])


@triton.jit
def _accumulate(x_ptr, t_ptr, sinv_ptr, l1_ptr, rows, rmask, k0, K, stride_xm, stride_tm, k_head, shift,
                unsigned_from, gelu_from, lora, amax_s, amax_u, R: tl.constexpr, BLOCK_K: tl.constexpr,
                HAS_LORA: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_TAIL: tl.constexpr, HAS_GELU: tl.constexpr,
                APPROX_GELU: tl.constexpr, IEEE: tl.constexpr, F32_DOT: tl.constexpr):
    """One K block into the row maxima (signed and unsigned parts) and ``x · L1ᵀ``."""
    k = k0 + tl.arange(0, BLOCK_K)
    x, u, uns = _load_u(x_ptr, t_ptr, sinv_ptr, rows, rmask, k0, k, K, stride_xm, stride_tm, k_head, shift,
                        unsigned_from, gelu_from, HAS_SHIFT, HAS_TAIL, HAS_GELU, APPROX_GELU)
    if HAS_LORA:
        lora = _down_projection(x, l1_ptr, k, K, lora, R, IEEE, F32_DOT)
    if HAS_SHIFT:
        amax_s = tl.maximum(amax_s, tl.max(tl.where(uns[None, :], 0.0, tl.abs(u)), axis=1))
        amax_u = tl.maximum(amax_u, tl.max(tl.where(uns[None, :], u, 0.0), axis=1))
    else:
        amax_s = tl.maximum(amax_s, tl.max(tl.abs(u), axis=1))
    return lora, amax_s, amax_u


@triton.jit
def _token_scale(amax_s, amax_u, A4: tl.constexpr):
    """A token's scale from its row maxima: A8 ``absmax / 127``; A4 the two-level rule's."""
    if A4:
        return tl.maximum(tl.math.div_rn(amax_s, 126.0), tl.math.div_rn(amax_u, 120.0))
    else:
        return tl.math.div_rn(amax_s, 127.0)


@triton.jit
def _codes(u, kb, s, inv_s, unsigned_from, BLOCK_K: tl.constexpr, A4: tl.constexpr, FAST_ROUND: tl.constexpr):
    """The int8 values of K block ``kb`` of ``u`` with the rows' scales: A8 ``rne(u / s)``; A4 (``BLOCK_K`` one
    group) the group's multiplier, then the codes, as ``code · m``."""
    if A4:
        g_uns = kb * BLOCK_K >= unsigned_from
        qmax = tl.where(g_uns, 15.0, 7.0)
        mmax = tl.where(g_uns, 8.0, 18.0)
        gmax = tl.max(tl.abs(u), axis=1)
        m = rne(tl.math.div_rn(gmax * inv_s, tl.zeros_like(gmax) + qmax), FAST_ROUND)
        m = tl.minimum(tl.maximum(m, 1.0), mmax)
        inv = reciprocal(s * m)
        q = rne(u * inv[:, None], FAST_ROUND)
        q = tl.minimum(tl.maximum(q, tl.where(g_uns, 0.0, -7.0)), qmax)
        q = q * m[:, None]
    else:
        q = rne(u * inv_s[:, None], FAST_ROUND)
        q = tl.minimum(tl.maximum(q, -127.0), 127.0)
    return q.to(tl.int8)


@triton.jit
def _quantize_block(x_ptr, t_ptr, sinv_ptr, q_ptr, rows, rmask, kb, s, inv_s, K, stride_xm, stride_tm, k_head,
                    shift, unsigned_from, gelu_from, KP: tl.constexpr, BLOCK_K: tl.constexpr, A4: tl.constexpr,
                    HAS_SHIFT: tl.constexpr, HAS_TAIL: tl.constexpr, HAS_GELU: tl.constexpr,
                    APPROX_GELU: tl.constexpr, FAST_ROUND: tl.constexpr):
    """K block ``kb`` of the rows, quantized with their scales and written as int8; returns the block as loaded
    (GELU'd where it applies) and its columns ``(x, k)``, for a down projection of the same read."""
    k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    x, u, uns = _load_u(x_ptr, t_ptr, sinv_ptr, rows, rmask, kb * BLOCK_K, k, K, stride_xm, stride_tm, k_head,
                        shift, unsigned_from, gelu_from, HAS_SHIFT, HAS_TAIL, HAS_GELU, APPROX_GELU)
    q = _codes(u, kb, s, inv_s, unsigned_from, BLOCK_K, A4, FAST_ROUND)
    tl.store(q_ptr + rows[:, None] * KP + k[None, :], q, mask=rmask[:, None])
    return x, k


@triton.jit
def _row_scales(st_ptr, rows, rmask, M, SPLITS: tl.constexpr, BLOCK_M: tl.constexpr, A4: tl.constexpr):
    """The rows' scales from ``SPLITS`` partial maxima, ``st[0, j]`` signed and ``st[1, j]`` unsigned."""
    amax_s = tl.zeros([BLOCK_M], dtype=tl.float32)
    amax_u = tl.zeros([BLOCK_M], dtype=tl.float32)
    for j in range(0, SPLITS):
        amax_s = tl.maximum(amax_s, tl.load(st_ptr + j * M + rows, mask=rmask, other=0.0))
        amax_u = tl.maximum(amax_u, tl.load(st_ptr + (SPLITS + j) * M + rows, mask=rmask, other=0.0))
    return _token_scale(amax_s, amax_u, A4)


@triton.jit
def _slice_rows(st_ptr, s_ptr, M, SPLITS: tl.constexpr, BLOCK_M: tl.constexpr, A4: tl.constexpr):
    """A quantizing program's K slice, rows and their scales (from ``SPLITS`` partial maxima; the first slice's
    programs write them): ``(split, rows, row mask, s, 1 / s)``."""
    split = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    s = _row_scales(st_ptr, rows, rmask, M, SPLITS, BLOCK_M, A4)
    if split == 0:
        tl.store(s_ptr + rows, s, mask=rmask)
    return split, rows, rmask, s, reciprocal(s)


@triton.jit
def _sum_partials(lp_ptr, la_ptr, rows, rmask, M, SPLITS: tl.constexpr, R: tl.constexpr, BLOCK_M: tl.constexpr):
    """The K slices' partial down projections ``lp[j]``, summed in a fixed order (deterministic), into ``la``."""
    rr = tl.arange(0, R)
    lora = tl.zeros([BLOCK_M, R], dtype=tl.float32)
    for j in range(0, SPLITS):
        lora += tl.load(lp_ptr + j * M * R + rows[:, None] * R + rr[None, :], mask=rmask[:, None], other=0.0)
    tl.store(la_ptr + rows[:, None] * R + rr[None, :], lora, mask=rmask[:, None])


@triton.jit
def activation_stats_kernel(
    x_ptr, t_ptr, sinv_ptr, l1_ptr, st_ptr, lp_ptr,
    M, K, stride_xm, stride_tm, k_head, gelu_from, shift, unsigned_from,
    BLOCKS_PER_SPLIT: tl.constexpr, R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_LORA: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_TAIL: tl.constexpr, HAS_GELU: tl.constexpr,
    APPROX_GELU: tl.constexpr, IEEE: tl.constexpr, F32_DOT: tl.constexpr,
):
    """Pass 1 over one K slice: partial row maxima (signed and unsigned parts) and partial ``x · L1ᵀ``."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    lora = tl.zeros([BLOCK_M, R], dtype=tl.float32)
    amax_s = tl.zeros([BLOCK_M], dtype=tl.float32)
    amax_u = tl.zeros([BLOCK_M], dtype=tl.float32)
    for i in range(0, BLOCKS_PER_SPLIT):  # constexpr bound: the CPU interpreter needs it
        lora, amax_s, amax_u = _accumulate(
            x_ptr, t_ptr, sinv_ptr, l1_ptr, rows, rmask, (split * BLOCKS_PER_SPLIT + i) * BLOCK_K, K, stride_xm,
            stride_tm, k_head, shift, unsigned_from, gelu_from, lora, amax_s, amax_u, R, BLOCK_K, HAS_LORA,
            HAS_SHIFT, HAS_TAIL, HAS_GELU, APPROX_GELU, IEEE, F32_DOT)
    nsplit = tl.num_programs(1)
    tl.store(st_ptr + split * M + rows, amax_s, mask=rmask)
    tl.store(st_ptr + (nsplit + split) * M + rows, amax_u, mask=rmask)
    if HAS_LORA:
        _store_partial(lp_ptr, split, rows, rmask, lora, M, R)


@triton.jit
def quantize_activations_kernel(
    x_ptr, t_ptr, sinv_ptr, st_ptr, lp_ptr, q_ptr, s_ptr, la_ptr,
    M, K, stride_xm, stride_tm, k_head, gelu_from, shift, unsigned_from,
    KP: tl.constexpr, STAT_SPLITS: tl.constexpr, BLOCKS_PER_SPLIT: tl.constexpr, R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, HAS_LORA: tl.constexpr, A4: tl.constexpr,
    HAS_SHIFT: tl.constexpr, HAS_TAIL: tl.constexpr, HAS_GELU: tl.constexpr, APPROX_GELU: tl.constexpr,
    FAST_ROUND: tl.constexpr,
):
    """Pass 2 over one K slice: the token scale from the partial maxima, then the int8 values."""
    split, rows, rmask, s, inv_s = _slice_rows(st_ptr, s_ptr, M, STAT_SPLITS, BLOCK_M, A4)
    if HAS_LORA:
        if split == 0:  # the K slices' partial down projections, summed once per row
            _sum_partials(lp_ptr, la_ptr, rows, rmask, M, STAT_SPLITS, R, BLOCK_M)
    for i in range(0, BLOCKS_PER_SPLIT):
        _quantize_block(x_ptr, t_ptr, sinv_ptr, q_ptr, rows, rmask, split * BLOCKS_PER_SPLIT + i, s, inv_s, K,
                        stride_xm, stride_tm, k_head, shift, unsigned_from, gelu_from, KP, BLOCK_K, A4, HAS_SHIFT,
                        HAS_TAIL, HAS_GELU, APPROX_GELU, FAST_ROUND)


@triton.jit
def quantize_given_maxima_kernel(
    x_ptr, t_ptr, sinv_ptr, l1_ptr, st_ptr, q_ptr, s_ptr, lp_ptr,
    M, K, stride_xm, stride_tm, k_head, gelu_from, shift, unsigned_from,
    KP: tl.constexpr, STAT_SPLITS: tl.constexpr, BLOCKS_PER_SPLIT: tl.constexpr, R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, HAS_LORA: tl.constexpr, A4: tl.constexpr,
    HAS_SHIFT: tl.constexpr, HAS_TAIL: tl.constexpr, HAS_GELU: tl.constexpr, APPROX_GELU: tl.constexpr,
    IEEE: tl.constexpr, F32_DOT: tl.constexpr, FAST_ROUND: tl.constexpr,
):
    """The one pass over X where the rows' partial maxima are given (a producer wrote them): over one K slice, the
    int8 values and the slice's partial ``x · L1ᵀ`` (:func:`lora_sum_kernel` sums the slices')."""
    split, rows, rmask, s, inv_s = _slice_rows(st_ptr, s_ptr, M, STAT_SPLITS, BLOCK_M, A4)
    lora = tl.zeros([BLOCK_M, R], dtype=tl.float32)
    for i in range(0, BLOCKS_PER_SPLIT):
        x, k = _quantize_block(x_ptr, t_ptr, sinv_ptr, q_ptr, rows, rmask, split * BLOCKS_PER_SPLIT + i, s, inv_s,
                               K, stride_xm, stride_tm, k_head, shift, unsigned_from, gelu_from, KP, BLOCK_K, A4,
                               HAS_SHIFT, HAS_TAIL, HAS_GELU, APPROX_GELU, FAST_ROUND)
        if HAS_LORA:
            lora = _down_projection(x, l1_ptr, k, K, lora, R, IEEE, F32_DOT)
    if HAS_LORA:
        _store_partial(lp_ptr, split, rows, rmask, lora, M, R)


@triton.jit
def lora_sum_kernel(lp_ptr, la_ptr, M, SPLITS: tl.constexpr, R: tl.constexpr, BLOCK_M: tl.constexpr):
    """``la = Σ_j lp[j]`` over the K slices, in order."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    _sum_partials(lp_ptr, la_ptr, rows, rows < M, M, SPLITS, R, BLOCK_M)


def _splits(blocks: int, m_blocks: int, target: int) -> int:
    """The largest divisor of the K-block count (up to 48) that keeps the grid within ``target`` programs."""
    for s_ in (48, 32, 24, 16, 12, 8, 6, 4, 3, 2, 1):
        if blocks % s_ == 0 and (m_blocks * s_ <= target or s_ == 1):
            return s_
    return 1


def _blocks(kp: int, a4: bool, group_size: int, block_k: int, stats_block_k: int) -> tuple[int, int]:
    """The K blocks of pass 1 and pass 2 for a padded width ``kp``."""
    b1 = stats_block_k if kp % stats_block_k == 0 else group_size
    bq = group_size if a4 else (block_k if kp % block_k == 0 else group_size)  # A4: one group per step
    return b1, bq


def reads_in_place(k_head: int, k: int, *, a4: bool = False, group_size: int = 64, block_k: int | None = None,
                   stats_block_k: int | None = None) -> bool:
    """Whether :func:`quantize_activations` reads an input ``[head | tail]`` whose head is ``k_head`` of ``k``
    columns from both tensors (the head a whole number of both passes' K blocks: FLUX's 3,072 is), rather than
    from their concatenation, made first; also whether an input GELU may start at column ``k_head``. Blocks left
    unset: :func:`launch_plan`'s for the width, as the launch takes them."""
    plan = launch_plan(1, k, a4=a4, group_size=group_size, block_k=block_k, stats_block_k=stats_block_k)
    b1, bq = plan["b1"], plan["bq"]
    return k_head % b1 == 0 and k_head % bq == 0


# Row chunks: an input larger than this (bytes of X) runs both passes over one chunk of rows at a time, so that pass 2
# reads the rows pass 1 just read from L2 (40-50 MB on A100 / H100 / H200) rather than from memory: FLUX's fc2 and
# proj_out inputs are 113-141 MB. 0 turns it off: 24 MB chunks made the FLUX.1-dev step slower on an H100 (110.3
# against 107.8 ms, BENCHMARKS.md "Session 25 on an H100"); other sizes: benchmarks/activation_passes.py.
CHUNK_BYTES = 0

# The blocks by padded width: the fastest of benchmarks/activation_passes.py's sweep, each FLUX pass type timed in a
# CUDA graph (H100, session 29; 13.0 -> 11.3 ms of a step's passes). Narrow inputs want few K slices in pass 1 (each
# slice's fp32 partial down projections cross memory twice: at K = 3,072 in 24 slices, half of X's bytes); wide ones
# shorter row blocks and 4 warps.
NARROW_BLOCKS = dict(stats_block_m=64, stats_block_k=128, target_programs=512, num_warps=8)
WIDE_BLOCKS = dict(stats_block_m=32, stats_block_k=128, target_programs=2048, num_warps=4)
NARROW_MAX_K = 4096


def default_blocks(kp: int) -> dict:
    """Pass 1's blocks, the K-slice target and the warps for an input of padded width ``kp``."""
    return dict(NARROW_BLOCKS if kp <= NARROW_MAX_K else WIDE_BLOCKS)


# The one pass given row maxima holds L1's tile beside X's: 128-column blocks. Its rows, K-slice target and warps:
# the fastest of activation_passes.py's sweep over FLUX's wide inputs (fc2, proj_out) at batch 1 and 4 (H100,
# Triton 3.6, session 30): a step's wide passes 6.81 ms at batch 1 and 22.4 at batch 4, against 7.11 / 24.4 at 16
# rows, 8.45 / 30.4 at 8 warps and 8.31 / 31.6 for the two passes. (Session 30 shipped 16 rows because 32 seemed to
# spill 136-168 B on sm_90: compiled ahead of time without the 16-byte pointer alignment the JIT specializes on.
# With it, 32 rows take 210-218 registers and spill nothing: benchmarks/kernel_resources.py, session 31.)
GIVEN_MAXIMA_BLOCKS = dict(block_m=32, block_k=128, target_programs=2048, num_warps=4)


def launch_plan(m: int, k: int, *, a4: bool = False, group_size: int = 64, given_maxima: bool = False,
                **blocks) -> dict:
    """How :func:`quantize_activations` launches for ``m`` rows of ``k`` columns: the padded width ``kp``, pass 1's
    and pass 2's K blocks ``b1`` / ``bq``, pass 1's and pass 2's rows ``stats_block_m`` / ``block_m``, the warps and
    the ``splits`` (K slices of each pass). ``blocks`` (``block_m``, ``block_k``, ``stats_block_m``,
    ``stats_block_k``, ``target_programs``, ``num_warps``) left unset or None: :func:`default_blocks` for the width
    (16-row, 256-column blocks in pass 2), and :data:`GIVEN_MAXIMA_BLOCKS` for the one pass given row maxima."""
    kp = k + (-k) % group_size
    chosen = default_blocks(kp) | dict(block_m=16, block_k=256) | (GIVEN_MAXIMA_BLOCKS if given_maxima else {})
    chosen |= {key: v for key, v in blocks.items() if v is not None}
    b1, bq = _blocks(kp, a4, group_size, chosen["block_k"], chosen["stats_block_k"])
    splits = (_splits(kp // b1, triton.cdiv(m, chosen["stats_block_m"]), chosen["target_programs"]),
              _splits(kp // bq, triton.cdiv(m, chosen["block_m"]), chosen["target_programs"]))
    return dict(kp=kp, b1=b1, bq=bq, stats_block_m=chosen["stats_block_m"], block_m=chosen["block_m"],
                num_warps=chosen["num_warps"], splits=splits)


def quantize_activations(x: torch.Tensor, smooth_inv: torch.Tensor, lora_down: torch.Tensor | None, *,
                         tail: torch.Tensor | None = None, input_gelu_from: int | None = None, a4: bool = False,
                         group_size: int = 64,
                         shift: float = 0.0, unsigned_from: int = 0, block_m: int | None = None,
                         block_k: int | None = None, stats_block_m: int | None = None, stats_block_k: int | None = None,
                         target_programs: int | None = None, num_warps: int | None = None, exact_gelu: bool = False,
                         lora_dtype: torch.dtype = torch.float32, chunk_bytes: int | None = None,
                         row_maxima: torch.Tensor | None = None):
    """Launch the two passes. ``x``: ``[M, K]`` rows with unit column stride (any row stride: a column slice of
    a wider tensor is read where it is); ``tail``: the input's last columns, ``[M, K_t]``, when it is
    ``[x | tail]`` (read from both where they are, no concatenated copy, where :func:`reads_in_place`);
    ``input_gelu_from``: the input's columns from this one on are pre-activations (an MLP's down projection: its
    GELU moved here by ``svdquant.fuse``), tanh-GELU'd as they are read, in the input's dtype, before anything
    else. ``lora_down``: ``[R, K]`` (K counting the tail), R a power of two >= 16. Returns ``(values [M, K_pad]
    int8, scales [M] fp32, lora_act [M, R] in ``lora_dtype`` or None)``; K_pad is K rounded up to ``group_size``
    (``lora_dtype`` bf16 for the Hopper GEMM's bf16 branch, :mod:`svdquant.kernels.cutlass_launch`). ``shift``
    applies to channels ``>= unsigned_from`` (A4 only).

    ``exact_gelu``: the input GELU with ``exp`` and a division instead of one ``tanh.approx`` on the GPU
    (:func:`~svdquant.kernels.common.gelu_tanh`); a sweep option (``kernel_speed.py --gelu-sweep``), to time what
    the approximation saves.

    ``chunk_bytes`` (default :data:`CHUNK_BYTES`): an input of more bytes runs both passes one chunk of rows (of
    about that size, a multiple of both passes' row blocks) at a time, so that pass 2 finds in L2 what pass 1 read;
    each row's result is the same either way.

    ``row_maxima``: ``[2, S, M]`` fp32, each row's partial maxima of ``u`` (``[0]`` the signed part's absolute
    value, ``[1]`` the unsigned part's max) over ``S`` column slices, as pass 1 would find them: written by the
    input's producer, they make one pass over X (:func:`quantize_given_maxima_kernel`, then a sum of the slices'
    down projections) instead of two; no chunks. Its blocks: :data:`GIVEN_MAXIMA_BLOCKS` unless given.

    ``block_m``, ``block_k``, ``stats_block_m``, ``stats_block_k``, ``target_programs``, ``num_warps`` left unset: as
    :func:`launch_plan` picks them for the input's width. Pass 1 takes taller token blocks than pass 2: every
    block re-reads all of ``L1`` from L2, so short blocks made the down projection cost more than X."""
    m, k_head = x.shape
    k = k_head + (tail.shape[1] if tail is not None else 0)
    plan = launch_plan(m, k, a4=a4, group_size=group_size, block_m=block_m, block_k=block_k,
                       given_maxima=row_maxima is not None, stats_block_m=stats_block_m, stats_block_k=stats_block_k,
                       target_programs=target_programs, num_warps=num_warps)
    kp, b1, bq, stats_block_m, block_m, num_warps, splits = (
        plan[key] for key in ("kp", "b1", "bq", "stats_block_m", "block_m", "num_warps", "splits"))
    if input_gelu_from is not None and (input_gelu_from % b1 or input_gelu_from % bq):
        raise ValueError(f"input_gelu_from={input_gelu_from} is not a whole number of K blocks ({b1}, {bq}): "
                         "apply that GELU before (svdquant.ops.reference.gelu_columns)")
    if tail is not None and (k_head % b1 or k_head % bq):  # a head that ends inside a block: one concatenation
        x, tail, k_head = torch.cat([x, tail], 1), None, k
    if row_maxima is not None and (row_maxima.dtype != torch.float32 or row_maxima.dim() != 3
                                   or row_maxima.shape[0] != 2 or row_maxima.shape[2] != m):
        raise ValueError(f"row_maxima must be [2, slices, {m}] float32 (each row's signed and unsigned partial "
                         f"maxima), got {list(row_maxima.shape)} {row_maxima.dtype}")
    chunk_bytes = 0 if row_maxima is not None else CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    unit = stats_block_m * block_m // math.gcd(stats_block_m, block_m)  # a chunk: whole row blocks of both passes
    rows = m if not chunk_bytes or m * k * x.element_size() <= chunk_bytes else \
        max(unit, chunk_bytes // (k * x.element_size()) // unit * unit)
    q = torch.empty(m, kp, dtype=torch.int8, device=x.device)
    s = torch.empty(m, dtype=torch.float32, device=x.device)
    la = torch.empty(m, lora_down.shape[0], dtype=lora_dtype, device=x.device) if lora_down is not None else None
    # K slices as for the whole input (the plan's): every chunk sums a row's partial down projections in one order
    for r0 in range(0, m, max(rows, 1)):  # static: the same launches every call (CUDA graphs)
        r1 = min(m, r0 + rows)
        _passes(x[r0:r1], tail[r0:r1] if tail is not None else None, k, k_head, kp, b1, bq, smooth_inv, lora_down,
                q[r0:r1], s[r0:r1], la[r0:r1] if la is not None else None, input_gelu_from, a4, shift,
                unsigned_from, block_m, stats_block_m, splits, num_warps, exact_gelu, row_maxima)
    return q, s, la


def _passes(x, tail, k, k_head, kp, b1, bq, smooth_inv, lora_down, q, s, la, input_gelu_from, a4, shift,
            unsigned_from, block_m, stats_block_m, splits, num_warps, exact_gelu, maxima):
    """Both passes over the rows of ``x`` (and ``tail``), writing ``q``, ``s`` and ``la`` (rows of the outputs),
    pass 1 in ``splits[0]`` K slices and pass 2 in ``splits[1]``; or, with the rows' partial ``maxima`` given, the
    one pass in ``splits[1]`` slices and the sum of their down projections."""
    m = x.shape[0]
    r = lora_down.shape[0] if lora_down is not None else 16
    has_lora = lora_down is not None
    t, stride_t = (tail, tail.stride(0)) if tail is not None else (x, x.stride(0))
    shared = dict(R=r, HAS_LORA=has_lora, HAS_SHIFT=bool(shift), HAS_TAIL=tail is not None,
                  HAS_GELU=input_gelu_from is not None, APPROX_GELU=not (exact_gelu or interpreting()),
                  num_warps=num_warps)
    rest = (m, k, x.stride(0), stride_t, k_head, input_gelu_from if input_gelu_from is not None else kp,
            float(shift), int(unsigned_from) if shift else kp)
    l1 = lora_down if has_lora else x
    s1, s2 = splits
    if maxima is not None:
        partial = torch.empty(s2, m, r, dtype=torch.float32, device=x.device) if has_lora else s
        quantize_given_maxima_kernel[(triton.cdiv(m, block_m), s2)](
            x, t, smooth_inv, l1, maxima, q, s, partial, *rest, KP=kp, STAT_SPLITS=maxima.shape[1],
            BLOCKS_PER_SPLIT=kp // bq // s2, BLOCK_M=block_m, BLOCK_K=bq, A4=a4, IEEE=x.dtype == torch.float32,
            F32_DOT=interpreting(), FAST_ROUND=not interpreting(), **shared)
        if has_lora:
            lora_sum_kernel[(triton.cdiv(m, 64),)](partial, la, m, SPLITS=s2, R=r, BLOCK_M=64)
        return
    stats = torch.empty(2, s1, m, dtype=torch.float32, device=x.device)
    partial = torch.empty(s1, m, r, dtype=torch.float32, device=x.device) if has_lora else stats
    activation_stats_kernel[(triton.cdiv(m, stats_block_m), s1)](
        x, t, smooth_inv, l1, stats, partial, *rest, BLOCKS_PER_SPLIT=kp // b1 // s1, BLOCK_M=stats_block_m,
        BLOCK_K=b1, IEEE=x.dtype == torch.float32, F32_DOT=interpreting(), **shared)
    quantize_activations_kernel[(triton.cdiv(m, block_m), s2)](
        x, t, smooth_inv, stats, partial, q, s, la if has_lora else s, *rest, KP=kp, STAT_SPLITS=s1,
        BLOCKS_PER_SPLIT=kp // bq // s2, BLOCK_M=block_m, BLOCK_K=bq, A4=a4, FAST_ROUND=not interpreting(),
        **shared)
