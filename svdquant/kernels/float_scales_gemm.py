"""The GEMMs of the float-group-scale formats (``int4`` W4A4, ``nvfp4``), branch, bias and GELU in the epilogue.

These run checkpoints in the paper's formats. On Hopper the INT4 one is slow (its per-group
float rescale sits in the main loop: BENCHMARKS.md); the two-level ``int4m`` format runs the
plain INT8 GEMM of :mod:`.int8_gemm` instead.

Reference: :func:`svdquant.ops.reference.qgemm`. Hopper has no 4-bit tensor cores, but
4-bit integers are exact in INT8, so:

* the kernel computes ``Yᵀ = W · Xᵀ``: the packed weights are the *left* operand, unpacked
  in registers (a byte tile gives the two halves of a 64-group with a shift and a mask:
  :func:`~svdquant.formats.pack_4bit_halves`); the activation codes come from kernel 1
  in int8 containers and go to shared memory untouched as the right operand (on Hopper
  wgmma's right operand must live in shared memory; only the left may be in registers);
* per 64-deep group: two K=32 int8 dots into a fresh int32 tile, converted and scaled by
  ``s_x[m] · s_w[n]`` into the fp32 accumulator;
* epilogue: ``acc += L2 · lora_actᵀ`` (tf32 dot), ``+ bias``, optional tanh-GELU, cast,
  transposed store into ``Y [M, N]``.

NVFP4 runs through :func:`fp4_gemm_kernel`: E2M1 × E4M3 is exact in bf16, so both operands
carry their group scales and a 16-bit tensor-core dot does the group arithmetic; the two
per-tensor scales multiply the accumulator at the end.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import gelu_tanh as _gelu_tanh, grouped_tile, interpreting


@triton.jit
def _tile(M, N, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, GROUP_N: tl.constexpr):
    """This program's output tile: channel and token offsets and their masks (GROUP_N weight tiles share a
    sweep over token tiles)."""
    pid_n, pid_m = grouped_tile(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.cdiv(M, BLOCK_M), GROUP_N)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    return offs_n, offs_m, offs_n < N, offs_m < M


@triton.jit
def _epilogue(acc, offs_n, offs_m, nmask, mmask, la_ptr, lu_ptr, b_ptr, y_ptr, stride_ym,
              R: tl.constexpr, HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr, GELU: tl.constexpr,
              APPROX_GELU: tl.constexpr):
    if HAS_LORA:
        rr = tl.arange(0, R)
        lu = tl.load(lu_ptr + offs_n[:, None] * R + rr[None, :], mask=nmask[:, None], other=0.0).to(tl.float32)
        la = tl.load(la_ptr + offs_m[:, None] * R + rr[None, :], mask=mmask[:, None], other=0.0)
        acc = tl.dot(lu, tl.trans(la), acc, input_precision="tf32")
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=nmask, other=0.0).to(tl.float32)[:, None]
    if GELU:
        acc = _gelu_tanh(acc, APPROX_GELU)
    y_ptrs = y_ptr + offs_m[None, :] * stride_ym + offs_n[:, None]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=nmask[:, None] & mmask[None, :])


@triton.jit
def _group_dot(wq_ptr, xq_ptr, offs_n, offs_m, nmask, mmask, g, KP: tl.constexpr):
    """One 64-deep group's int32 dot, [BLOCK_N, BLOCK_M]: packed halves (uint8 [N, KP/2]) unpacked in registers."""
    half = tl.arange(0, 32)
    wb = tl.load(wq_ptr + offs_n[:, None] * (KP // 2) + g * 32 + half[None, :], mask=nmask[:, None], other=0)
    wb = wb.to(tl.int8, bitcast=True)
    w_lo = (wb << 4) >> 4  # arithmetic shifts sign-extend the nibbles
    w_hi = wb >> 4
    x_base = xq_ptr + offs_m[:, None] * KP + g * 64 + half[None, :]
    x_lo = tl.load(x_base, mask=mmask[:, None], other=0)
    x_hi = tl.load(x_base + 32, mask=mmask[:, None], other=0)
    p = tl.dot(w_lo, tl.trans(x_lo), out_dtype=tl.int32)
    return tl.dot(w_hi, tl.trans(x_hi), p, out_dtype=tl.int32)


@triton.jit
def w4a4_gemm_kernel(
    wq_ptr, ws_ptr, xq_ptr, xs_ptr, la_ptr, lu_ptr, b_ptr, y_ptr,
    M, N, stride_ym,
    KP: tl.constexpr, N_GROUPS: tl.constexpr, R: tl.constexpr, HAS_LORA: tl.constexpr,
    HAS_BIAS: tl.constexpr, GELU: tl.constexpr, APPROX_GELU: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, GROUP_N: tl.constexpr,
):
    offs_n, offs_m, nmask, mmask = _tile(M, N, BLOCK_N, BLOCK_M, GROUP_N)
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    n_groups: tl.constexpr = N_GROUPS  # constexpr loop bounds: the CPU interpreter needs them
    for g in range(0, n_groups):
        p = _group_dot(wq_ptr, xq_ptr, offs_n, offs_m, nmask, mmask, g, KP)
        ws = tl.load(ws_ptr + g * N + offs_n, mask=nmask, other=0.0).to(tl.float32)
        xs = tl.load(xs_ptr + g * M + offs_m, mask=mmask, other=0.0).to(tl.float32)
        acc += p.to(tl.float32) * (ws[:, None] * xs[None, :])
    _epilogue(acc, offs_n, offs_m, nmask, mmask, la_ptr, lu_ptr, b_ptr, y_ptr, stride_ym, R, HAS_LORA, HAS_BIAS, GELU,
              APPROX_GELU)


@triton.jit
def _e2m1_decode(c):
    """4-bit E2M1 code (int32, sign bit 3) -> fp32 value."""
    e = (c >> 1) & 3
    m = (c & 1).to(tl.float32)
    base = tl.where(e == 1, 1.0, tl.where(e == 2, 2.0, 4.0))
    mag = tl.where(e == 0, 0.5 * m, base * (1.0 + 0.5 * m))
    return tl.where((c & 8) != 0, -mag, mag)


@triton.jit
def fp4_gemm_kernel(
    wq_ptr, ws_ptr, xv_ptr, wts_ptr, xts_ptr, la_ptr, lu_ptr, b_ptr, y_ptr,
    M, N, stride_ym,
    KP: tl.constexpr, N_BLOCKS: tl.constexpr, R: tl.constexpr, HAS_LORA: tl.constexpr,
    HAS_BIAS: tl.constexpr, GELU: tl.constexpr, APPROX_GELU: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, GROUP_N: tl.constexpr,
    F32_DOT: tl.constexpr,
):
    offs_n, offs_m, nmask, mmask = _tile(M, N, BLOCK_N, BLOCK_M, GROUP_N)
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    i = tl.arange(0, 32)
    # A 64-deep block is 4 groups of 16; byte j of a group holds elements j (low) and j + 8 (high).
    col_lo = (i // 8) * 16 + (i % 8)
    grp = i // 8
    G = KP // 16
    for kb in range(0, N_BLOCKS):
        wb = tl.load(wq_ptr + offs_n[:, None] * (KP // 2) + kb * 32 + i[None, :], mask=nmask[:, None], other=0)
        wb = wb.to(tl.int32)
        gs = tl.load(ws_ptr + offs_n[:, None] * G + kb * 4 + grp[None, :], mask=nmask[:, None], other=0.0)
        gs = gs.to(tl.float32)
        w_lo = _e2m1_decode(wb & 15) * gs  # exact in bf16 / tf32: E2M1 × E4M3
        w_hi = _e2m1_decode(wb >> 4) * gs
        x_base = xv_ptr + offs_m[:, None] * KP + kb * 64 + col_lo[None, :]
        x_lo = tl.load(x_base, mask=mmask[:, None], other=0.0)
        x_hi = tl.load(x_base + 8, mask=mmask[:, None], other=0.0)
        if F32_DOT:  # CPU interpreter (no bf16 dots); the values are exact in tf32 too
            acc = tl.dot(w_lo, tl.trans(x_lo.to(tl.float32)), acc)
            acc = tl.dot(w_hi, tl.trans(x_hi.to(tl.float32)), acc)
        else:
            acc = tl.dot(w_lo.to(x_lo.dtype), tl.trans(x_lo), acc)
            acc = tl.dot(w_hi.to(x_hi.dtype), tl.trans(x_hi), acc)
    acc = acc * (tl.load(wts_ptr) * tl.load(xts_ptr))
    _epilogue(acc, offs_n, offs_m, nmask, mmask, la_ptr, lu_ptr, b_ptr, y_ptr, stride_ym, R, HAS_LORA, HAS_BIAS, GELU,
              APPROX_GELU)


DEFAULT_CONFIG = dict(BLOCK_N=64, BLOCK_M=128, GROUP_N=8, num_warps=4, num_stages=4)


def w4a4_gemm(codes, scales_t, qweight, wscales_t, lora_act, lora_up, bias, out_dtype, *, gelu=False, **config):
    """Launch the INT4 float-scale GEMM. ``codes`` [M, K_pad] int8, ``scales_t`` [groups, M], ``qweight``
    [N, K_pad/2] halves layout, ``wscales_t`` [groups, N], ``lora_act`` [M, R] fp32, ``lora_up`` [N, R]."""
    m, kp = codes.shape
    y, grid, tail, flags, cfg = _launch_setup(m, qweight.shape[0], out_dtype, codes.device, lora_act, lora_up, bias,
                                              config)
    w4a4_gemm_kernel[grid](qweight, wscales_t, codes, scales_t, *tail, KP=kp, N_GROUPS=kp // 64, **flags,
                           GELU=gelu, **cfg)
    return y


def _launch_setup(m, n, out_dtype, device, lora_act, lora_up, bias, config):
    """What both GEMM launchers pass alike: the output, the grid, the epilogue's pointer / size
    arguments (``y`` stands in for absent tensors) and flags, and the tile config."""
    cfg = {**DEFAULT_CONFIG, **config}
    y = torch.empty(m, n, dtype=out_dtype, device=device)
    has_lora = lora_act is not None
    grid = (triton.cdiv(n, cfg["BLOCK_N"]) * triton.cdiv(m, cfg["BLOCK_M"]),)
    tail = (lora_act if has_lora else y, lora_up if has_lora else y, bias if bias is not None else y, y,
            m, n, y.stride(0))
    flags = dict(R=lora_up.shape[1] if has_lora else 16, HAS_LORA=has_lora, HAS_BIAS=bias is not None,
                 APPROX_GELU=not interpreting())
    return y, grid, tail, flags, cfg


def fp4_gemm(values, qweight, wscales, wtensor_scale, input_scale, lora_act, lora_up, bias, out_dtype, *,
             gelu=False, **config):
    """Launch the NVFP4 GEMM. ``values`` [M, K_pad] 16-bit (E2M1 · s_g from kernel 1), ``qweight``
    [N, K_pad/2] (halves layout, groups of 16), ``wscales`` [N, K_pad/16] E4M3."""
    m, kp = values.shape
    y, grid, tail, flags, cfg = _launch_setup(m, qweight.shape[0], out_dtype, values.device, lora_act, lora_up,
                                              bias, config)
    fp4_gemm_kernel[grid](
        qweight, wscales, values, wtensor_scale, input_scale, *tail,
        KP=kp, N_BLOCKS=kp // 64, **flags,
        GELU=gelu, F32_DOT=interpreting() or values.dtype == torch.float32, **cfg,
    )
    return y
