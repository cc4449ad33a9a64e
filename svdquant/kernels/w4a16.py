"""Weight-only INT4 (W4A16) for a few tokens: ``Y = X · dequant(W)ᵀ + b`` reading 4-bit weights once.

Reference: :func:`svdquant.ops.reference.weight_only_linear` on the dequantized weight
(``code · scale`` rounded to X's dtype, as the reference does). FLUX's adaLN modulation
linears run on one token per image (M = batch), so they are memory-bound: the time is the
4-bit weight bytes over bandwidth. Two kernels:

- :func:`w4a16_kernel` (2-16 tokens): each program owns ``BLOCK_N`` output channels and walks K ``GROUPS_PER_STEP``
  groups of 64 at a time: unpack the two halves of each group (byte j = codes j and j + 32), scale them, and two
  16-bit tensor-core dots with the matching halves of X (M padded to 16 inside the kernel, never in memory).
- :func:`w4a16_gemv_kernel` (one token by default, up to four): the codes read as int32 words and made exact fp32
  values by integer logic (:func:`_nibble`), ``Σ code · x`` per word in fp32 multiply-adds, then the group's scale.
  The tiles spend a quarter-rate int-to-float conversion and ~12 instructions per weight (ahead-of-time SASS, sm_90),
  and ran at a quarter of the copy rate; the GEMV ~5 instructions, split over K for more programs: FLUX's adaLN
  GEMVs 23.4 / 14.9 µs against 31.8 / 20.3 on an H100 in CUDA graphs (BENCHMARKS.md, "Session 31").

``split_k``: K slices in programs of their own, then one launch summing their fp32 partials in slice order
(:func:`w4a16_sum_kernel`: the same sum every call). With ``zeros`` (the ``int4z`` format: AWQ layers imported from
Nunchaku) the codes are unsigned and each weight is ``code · scale + zero``, the product exact in fp32 (4-bit code,
16-bit scale), so the tiles' fused multiply-add rounds it once, as the reference does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import groups_per_program, interpreting, load_halves


@triton.jit
def w4a16_kernel(x_ptr, p_ptr, s_ptr, z_ptr, b_ptr, y_ptr, part_ptr, M, N, K, stride_xm, stride_ym,
                 KP: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr,
                 HAS_ZEROS: tl.constexpr, F32_DOT: tl.constexpr, GROUPS_PER_STEP: tl.constexpr,
                 SPLIT_K: tl.constexpr):
    """Program (n block, K slice): with ``SPLIT_K`` > 1 each of the K slices writes its fp32 partial product to
    ``part_ptr`` ``[SPLIT_K, M, N]`` and :func:`w4a16_sum_kernel` adds them (in slice order) and the bias."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = rows < N
    ms = tl.arange(0, 16)
    mmask = ms < M
    n_groups: tl.constexpr = KP // GROUP
    STEPS: tl.constexpr = n_groups // GROUPS_PER_STEP // SPLIT_K
    acc = tl.zeros([16, BLOCK_N], dtype=tl.float32)
    if SPLIT_K > 1:
        first = tl.program_id(1) * STEPS
    else:  # the loop as it was before split_k (a constant start)
        first = 0
    for step in range(first, first + STEPS):
        x_lo, x_hi, w_lo, w_hi = _step_operands(x_ptr, p_ptr, s_ptr, z_ptr, rows, nmask, ms, mmask, step, K, stride_xm,
                                                KP, GROUP, BLOCK_N, HAS_ZEROS, GROUPS_PER_STEP)
        if F32_DOT:  # the CPU interpreter cannot multiply bf16; fp32 inputs keep fp32 accuracy
            acc = tl.dot(x_lo.to(tl.float32), w_lo.to(tl.float32).T, acc, input_precision="ieee")
            acc = tl.dot(x_hi.to(tl.float32), w_hi.to(tl.float32).T, acc, input_precision="ieee")
        else:
            acc = tl.dot(x_lo, w_lo.T, acc)
            acc = tl.dot(x_hi, w_hi.T, acc)
    if SPLIT_K > 1:
        tl.store(part_ptr + (tl.program_id(1) * M + ms[:, None]) * N + rows[None, :], acc,
                 mask=mmask[:, None] & nmask[None, :])
    else:
        if HAS_BIAS:
            acc += tl.load(b_ptr + rows, mask=nmask, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + ms[:, None] * stride_ym + rows[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=mmask[:, None] & nmask[None, :])


@triton.jit
def w4a16_sum_kernel(part_ptr, b_ptr, y_ptr, M, N, stride_ym, SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr,
                     BLOCK: tl.constexpr):
    """``y = Σ_s part[s] (+ bias)`` over a split-K product's slices, in slice order (the same sum every call)."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = i < M * N
    acc = tl.load(part_ptr + i, mask=mask, other=0.0)
    for s_ in range(1, SPLIT_K):
        acc += tl.load(part_ptr + s_ * M * N + i, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + i % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + (i // N) * stride_ym + i % N, acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def w4a16_gemv_kernel(x_ptr, p_ptr, s_ptr, z_ptr, b_ptr, y_ptr, part_ptr, M, N, K, stride_xm, stride_ym, MAGIC,
                      KP: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr,
                      HAS_ZEROS: tl.constexpr, GROUPS_PER_STEP: tl.constexpr, M_PAD: tl.constexpr,
                      SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr):
    """The same product for ``M <= M_PAD <= 4`` tokens on the CUDA cores, reading the codes as int32 words (8
    codes each) and turning them into floats with integer logic and one add (:func:`_nibble`): the int-to-float
    conversions of :func:`w4a16_kernel` run at a quarter of the issue rate and made it instruction-bound. Per word
    ``Σ code · x`` is exact-input fp32 multiply-adds, then times the group's scale (+ zero · ``Σ x``): the weight
    is not rounded to x's dtype first, as the reference's is (a difference below the 16-bit output's rounding)."""
    H: tl.constexpr = GROUP // 2  # bytes (code pairs) a group
    WG: tl.constexpr = H // 4  # int32 words a group
    WORDS: tl.constexpr = GROUPS_PER_STEP * WG
    n_groups: tl.constexpr = KP // GROUP
    STEPS: tl.constexpr = n_groups // GROUPS_PER_STEP // SPLIT_K
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = rows < N
    words = p_ptr.to(tl.pointer_type(tl.int32))
    acc0 = tl.zeros([BLOCK_N, WORDS], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_N, WORDS], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_N, WORDS], dtype=tl.float32)
    acc3 = tl.zeros([BLOCK_N, WORDS], dtype=tl.float32)
    first = tl.program_id(1) * STEPS
    for step in range(first, first + STEPS):
        w, sc, zr, k0 = _gemv_operands(words, s_ptr, z_ptr, rows, nmask, step, KP, GROUP, WORDS, WG, n_groups,
                                       HAS_ZEROS)
        if not HAS_ZEROS:
            w = w ^ -2004318072  # 0x88888888: each signed code c becomes the unsigned c + 8
        hi = w >> 16  # bytes 2 and 3 where bytes 0 and 1 are: the same four masks read them
        acc0 = _token_step(acc0, x_ptr, w, hi, sc, zr, k0, K, MAGIC, H, HAS_ZEROS, EVEN_K)
        if M_PAD > 1:  # a padding token reads the last real one's x (its outputs are not stored)
            acc1 = _token_step(acc1, x_ptr + tl.minimum(1, M - 1) * stride_xm, w, hi, sc, zr, k0, K, MAGIC, H,
                               HAS_ZEROS, EVEN_K)
        if M_PAD > 2:
            acc2 = _token_step(acc2, x_ptr + tl.minimum(2, M - 1) * stride_xm, w, hi, sc, zr, k0, K, MAGIC, H,
                               HAS_ZEROS, EVEN_K)
            acc3 = _token_step(acc3, x_ptr + tl.minimum(3, M - 1) * stride_xm, w, hi, sc, zr, k0, K, MAGIC, H,
                               HAS_ZEROS, EVEN_K)
    _gemv_store(acc0, 0, rows, nmask, M, N, b_ptr, y_ptr, part_ptr, stride_ym, HAS_BIAS, SPLIT_K)
    if M_PAD > 1:
        _gemv_store(acc1, 1, rows, nmask, M, N, b_ptr, y_ptr, part_ptr, stride_ym, HAS_BIAS, SPLIT_K)
    if M_PAD > 2:
        _gemv_store(acc2, 2, rows, nmask, M, N, b_ptr, y_ptr, part_ptr, stride_ym, HAS_BIAS, SPLIT_K)
        _gemv_store(acc3, 3, rows, nmask, M, N, b_ptr, y_ptr, part_ptr, stride_ym, HAS_BIAS, SPLIT_K)


@triton.jit
def _gemv_operands(words, s_ptr, z_ptr, rows, rmask, step, KP: tl.constexpr, GROUP: tl.constexpr,
                   WORDS: tl.constexpr, WG: tl.constexpr, n_groups: tl.constexpr, HAS_ZEROS: tl.constexpr):
    """Loop step ``step``'s code words ``[rows, WORDS]``, their groups' scales (and zeros; else the scales again)
    as fp32, and each word's first code ``k0`` (byte b of the word holds codes k0 + b and k0 + GROUP/2 + b)."""
    qq = step * WORDS + tl.arange(0, WORDS)  # the words' indices along a row
    g = qq // WG
    w = tl.load(words + rows[:, None] * (KP // 8) + qq[None, :], mask=rmask[:, None], other=0)
    at = rows[:, None] * n_groups + g[None, :]
    sc = tl.load(s_ptr + at, mask=rmask[:, None], other=0.0).to(tl.float32)
    zr = tl.load(z_ptr + at, mask=rmask[:, None], other=0.0).to(tl.float32) if HAS_ZEROS else sc
    return w, sc, zr, g * GROUP + (qq % WG) * 4


@triton.jit
def _token_step(acc, x_ptr, w, hi, sc, zr, k0, K, MAGIC, H: tl.constexpr, HAS_ZEROS: tl.constexpr,
                EVEN_K: tl.constexpr):
    """One token's loop step: ``acc += (Σ code · x) · scale (+ zero · Σ x)`` per word, over its 8 codes. x is
    scaled by 2^-4P for the nibble read at position P (exact: a power of two)."""
    t = tl.zeros(acc.shape, dtype=tl.float32)
    xs = tl.zeros(k0.shape, dtype=tl.float32)
    for b in tl.static_range(4):  # byte b of a word: codes k0 + b (low nibble) and k0 + H + b (high)
        if EVEN_K:
            xl = tl.load(x_ptr + k0 + b).to(tl.float32)
            xh = tl.load(x_ptr + k0 + H + b).to(tl.float32)
        else:
            xl = tl.load(x_ptr + k0 + b, mask=k0 + b < K, other=0.0).to(tl.float32)
            xh = tl.load(x_ptr + k0 + H + b, mask=k0 + H + b < K, other=0.0).to(tl.float32)
        if HAS_ZEROS:
            xs += xl + xh
        v = hi if b >= 2 else w
        t += _nibble(v, MAGIC, 2 * (b % 2), not HAS_ZEROS) * (xl * (1.0 / (1 << (8 * (b % 2)))))[None, :]
        t += _nibble(v, MAGIC, 2 * (b % 2) + 1, not HAS_ZEROS) * (xh * (1.0 / (1 << (8 * (b % 2) + 4))))[None, :]
    if HAS_ZEROS:
        return acc + t * sc + xs[None, :] * zr
    return acc + t * sc


@triton.jit
def _nibble(v, MAGIC, P: tl.constexpr, SIGNED: tl.constexpr):
    """Nibble ``P`` (< 4) of each int32 times 2^4P, exactly, in fp32 and without an int-to-float conversion: the
    masked nibble ORed into the mantissa of 2^23 (``MAGIC`` = 0x4B000000, an argument so that it stays in a
    register), then 2^23 subtracted (signed codes, stored + 8 here: also 8 · 2^4P)."""
    f = ((v & (15 << (4 * P))) | MAGIC).to(tl.float32, bitcast=True)
    if SIGNED:
        return f - (8388608.0 + 8.0 * (1 << (4 * P)))
    return f - 8388608.0


@triton.jit
def _gemv_store(acc, m: tl.constexpr, rows, nmask, M, N, b_ptr, y_ptr, part_ptr, stride_ym, HAS_BIAS: tl.constexpr,
                SPLIT_K: tl.constexpr):
    """Token ``m``'s outputs (or, split over K, its fp32 partials for :func:`w4a16_sum_kernel`)."""
    y = tl.sum(acc, 1)
    mask = nmask & (tl.full(rows.shape, m, tl.int32) < M)
    if SPLIT_K > 1:
        tl.store(part_ptr + (tl.program_id(1) * M + m) * N + rows, y, mask=mask)
    else:
        if HAS_BIAS:
            y += tl.load(b_ptr + rows, mask=nmask, other=0.0).to(tl.float32)
        tl.store(y_ptr + m * stride_ym + rows, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _step_operands(x_ptr, p_ptr, s_ptr, z_ptr, rows, nmask, ms, mmask, step, K, stride_xm, KP: tl.constexpr,
                   GROUP: tl.constexpr, BLOCK_N: tl.constexpr, HAS_ZEROS: tl.constexpr, GROUPS_PER_STEP: tl.constexpr):
    """Loop step ``step``'s operands: X's two halves of each group ``[M rows, STEP]`` and the weight's
    ``[BLOCK_N, STEP]``, dequantized and rounded to X's dtype (the reference's weight)."""
    H: tl.constexpr = GROUP // 2
    STEP: tl.constexpr = GROUPS_PER_STEP * H
    n_groups: tl.constexpr = KP // GROUP
    byte = tl.arange(0, STEP)
    g0 = step * GROUPS_PER_STEP
    c_lo, c_hi = load_halves(p_ptr, rows, nmask, g0, KP, GROUP, not HAS_ZEROS, GROUPS_PER_STEP)
    gcols = g0 + tl.arange(0, GROUPS_PER_STEP)
    sc = _per_code(tl.load(s_ptr + rows[:, None] * n_groups + gcols[None, :], mask=nmask[:, None],
                           other=0.0).to(tl.float32), BLOCK_N, GROUPS_PER_STEP, H)
    k_lo = (g0 + byte // H) * GROUP + byte % H  # code j (low nibble) and j + GROUP/2 (high) of group byte // H
    x_lo = tl.load(x_ptr + ms[:, None] * stride_xm + k_lo[None, :], mask=mmask[:, None] & (k_lo < K)[None, :],
                   other=0.0)
    x_hi = tl.load(x_ptr + ms[:, None] * stride_xm + (k_lo + H)[None, :],
                   mask=mmask[:, None] & (k_lo + H < K)[None, :], other=0.0)
    if HAS_ZEROS:  # code · scale + zero, the product exact in fp32: one rounding, as the reference
        zr = _per_code(tl.load(z_ptr + rows[:, None] * n_groups + gcols[None, :], mask=nmask[:, None],
                               other=0.0).to(tl.float32), BLOCK_N, GROUPS_PER_STEP, H)
        w_lo = (c_lo.to(tl.float32) * sc + zr).to(x_lo.dtype)
        w_hi = (c_hi.to(tl.float32) * sc + zr).to(x_lo.dtype)
    else:
        w_lo = (c_lo.to(tl.float32) * sc).to(x_lo.dtype)
        w_hi = (c_hi.to(tl.float32) * sc).to(x_lo.dtype)
    return x_lo, x_hi, w_lo, w_hi


@triton.jit
def _per_code(v, BLOCK_N: tl.constexpr, G: tl.constexpr, H: tl.constexpr):
    """``v`` [BLOCK_N, G] (one value per group) repeated for each of a group's H codes: [BLOCK_N, G · H]."""
    return tl.reshape(tl.broadcast_to(v[:, :, None], (BLOCK_N, G, H)), (BLOCK_N, G * H))


_MAGIC = 0x4B000000  # 2^23's bits: see _nibble
MAX_TOKENS = 16  # beyond this the layer is no longer memory-bound: dequantize once and use cuBLAS
FMA_MAX_TOKENS = 4  # the multiply-add GEMV keeps an accumulator per token
GEMV_TOKENS = 1  # the multiply-add GEMV by default up to here (it re-reads x per token: w4a16_linear's defaults)


@triton.jit
def dequantize_int4_kernel(p_ptr, s_ptr, z_ptr, w_ptr, N, K, KP: tl.constexpr, GROUP: tl.constexpr,
                           BLOCK_N: tl.constexpr, GROUPS_PER_PROG: tl.constexpr, HAS_ZEROS: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_g = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    half = tl.arange(0, GROUP // 2)
    n_groups: tl.constexpr = KP // GROUP
    for i in range(0, GROUPS_PER_PROG):
        g = pid_g * GROUPS_PER_PROG + i
        c_lo, c_hi = load_halves(p_ptr, rows, rmask, g, KP, GROUP, not HAS_ZEROS)
        sc = tl.load(s_ptr + rows * n_groups + g, mask=rmask, other=0.0).to(tl.float32)
        lo = c_lo.to(tl.float32) * sc[:, None]  # the same expressions as w4a16_kernel: one rounding at the store
        hi = c_hi.to(tl.float32) * sc[:, None]
        if HAS_ZEROS:
            zr = tl.load(z_ptr + rows * n_groups + g, mask=rmask, other=0.0).to(tl.float32)
            lo += zr[:, None]
            hi += zr[:, None]
        k_lo = g * GROUP + half
        base = w_ptr + rows[:, None] * K
        tl.store(base + k_lo[None, :], lo.to(w_ptr.dtype.element_ty), mask=rmask[:, None] & (k_lo < K)[None, :])
        k_hi = k_lo + GROUP // 2
        tl.store(base + k_hi[None, :], hi.to(w_ptr.dtype.element_ty), mask=rmask[:, None] & (k_hi < K)[None, :])


def dequantize_int4(packed: torch.Tensor, scales: torch.Tensor, k: int, dtype: torch.dtype, *,
                    zeros: torch.Tensor | None = None, group_size: int = 64, block_n: int = 32,
                    num_warps: int = 4) -> torch.Tensor:
    """``packed`` ``[N, K_pad/2]`` -> the 16-bit weight ``[N, k]`` (``code · scale`` [+ zero], rounded once to
    ``dtype``): the many-token path of a weight-only layer (a text encoder reads 77–512 tokens), one streaming
    pass into a fresh buffer before a cuBLAS GEMM, as memory mode does for the INT8 path."""
    n, half = packed.shape
    kp = half * 2
    groups = kp // group_size
    gpp = groups_per_program(groups)
    w = torch.empty(n, k, dtype=dtype, device=packed.device)
    dequantize_int4_kernel[(triton.cdiv(n, block_n), groups // gpp)](
        packed, scales, zeros if zeros is not None else scales, w, n, k, KP=kp, GROUP=group_size,
        BLOCK_N=block_n, GROUPS_PER_PROG=gpp, HAS_ZEROS=zeros is not None, num_warps=num_warps,
    )
    return w


def default_groups_per_step(groups: int, gemv: bool = False) -> int:
    """Groups a W4A16 loop step reads when none is asked: two where a row's group count is even, else one; the
    multiply-add GEMV (``gemv``) four where the count allows."""
    for g in (4, 2) if gemv else (2,):
        if groups % g == 0:
            return g
    return 1


def default_split_k(steps: int) -> int:
    """The multiply-add GEMV's K slices when none are asked: four where the loop's step count allows, else two or
    one (the tensor-core kernel's default is one)."""
    return next(s for s in (4, 2, 1) if steps % s == 0)


def w4a16_linear(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None, *,
                 zeros: torch.Tensor | None = None, group_size: int = 64, block_n: int | None = None,
                 num_warps: int = 4, num_stages: int = 4, groups_per_step: int | None = None,
                 fma: bool | None = None, split_k: int | None = None) -> torch.Tensor:
    """``x`` ``[M <= 16, K]``, ``packed`` ``[N, K_pad/2]`` uint8 (signed INT4, halves layout; unsigned with
    ``zeros``), ``scales`` (and ``zeros``) ``[N, K_pad/g]`` 16-bit -> ``[M, N]`` in x's dtype.
    ``fma``: :func:`w4a16_gemv_kernel` (up to :data:`FMA_MAX_TOKENS` tokens, the CUDA cores' multiply-adds) instead
    of :func:`w4a16_kernel` (16-row tensor-core tiles); unset, the GEMV for up to :data:`GEMV_TOKENS` tokens.
    ``groups_per_step`` (a power of two dividing the group count): groups each loop step reads; unset, see
    :func:`default_groups_per_step`. ``split_k`` (a power of two dividing the loop's steps): as many programs per
    channel block, each over a K slice, then one launch that sums their fp32 partials (in slice order); unset, see
    :func:`default_split_k` for the GEMV, one for the tiles. ``block_n``: channels a program; unset, 64 (GEMV) / 32.

    Defaults: the fastest of ``benchmarks/kernel_speed.py``'s sweep in CUDA graphs on an H100 (session 31) at FLUX's
    adaLN shapes (3,072 -> 18,432 and 9,216): at one token the GEMV (64 channels, four groups a step, four K
    slices) in 23.4 / 14.9 µs against 31.8 / 20.3 for the tiles; at 2-4 tokens the tiles (32 channels, two
    groups a step, whole K), within 7 % of the sweep's best, where the GEMV re-reads x per token (38-63 µs). Timed
    in CUDA graphs, as a compiled step runs them: eagerly the GEMV's K slices cost a second launch. A token alone
    and the same token in a batch run different kernels: their results differ below the 16-bit output's rounding
    (the GEMV does not round the weight to 16 bits first)."""
    m, k = x.shape
    if m > MAX_TOKENS:
        raise ValueError(f"w4a16_linear takes at most {MAX_TOKENS} tokens, got {m}")
    if fma is None:  # the GEMV reads int32 words: a misaligned view of the codes gets the tiles
        fma = m <= GEMV_TOKENS and packed.data_ptr() % 4 == 0
    if fma and m > FMA_MAX_TOKENS:
        raise ValueError(f"w4a16_linear(fma=True) takes at most {FMA_MAX_TOKENS} tokens, got {m}")
    if fma and packed.data_ptr() % 4:
        raise ValueError("w4a16_linear(fma=True) reads the codes as int32 words: pass a 4-byte aligned tensor "
                         "(e.g. packed.clone())")
    groups = packed.shape[1] * 2 // group_size
    if groups_per_step is None:
        groups_per_step = default_groups_per_step(groups, gemv=fma)
    if groups_per_step < 1 or groups_per_step & (groups_per_step - 1) or groups % groups_per_step:
        raise ValueError(f"groups_per_step={groups_per_step} must be a power of two dividing the {groups} groups "
                         "of a row")
    steps = groups // groups_per_step
    if split_k is None:
        split_k = default_split_k(steps) if fma else 1
    if split_k < 1 or split_k & (split_k - 1) or steps % split_k:
        raise ValueError(f"split_k={split_k} must be a power of two dividing the {steps} loop steps "
                         f"({groups} groups, {groups_per_step} a step)")
    if block_n is None:
        block_n = 64 if fma else 32
    n = packed.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    part = torch.empty(split_k, m, n, dtype=torch.float32, device=x.device) if split_k > 1 else y
    common = (x, packed, scales, zeros if zeros is not None else scales, bias if bias is not None else scales, y, part,
              m, n, k, x.stride(0), y.stride(0))
    shape = dict(KP=packed.shape[1] * 2, GROUP=group_size, BLOCK_N=block_n, HAS_BIAS=bias is not None,
                 HAS_ZEROS=zeros is not None, GROUPS_PER_STEP=groups_per_step, SPLIT_K=split_k, num_warps=num_warps,
                 num_stages=num_stages)
    if fma:
        w4a16_gemv_kernel[(triton.cdiv(n, block_n), split_k)](*common, _MAGIC, M_PAD=triton.next_power_of_2(m),
                                                               EVEN_K=k == packed.shape[1] * 2, **shape)
    else:
        w4a16_kernel[(triton.cdiv(n, block_n), split_k)](
            *common, F32_DOT=interpreting() or x.dtype == torch.float32, **shape)
    if split_k > 1:
        w4a16_sum_kernel[(triton.cdiv(m * n, 1024),)](part, bias if bias is not None else part, y, m, n, y.stride(0),
                                                       SPLIT_K=split_k, HAS_BIAS=bias is not None, BLOCK=1024)
    return y
