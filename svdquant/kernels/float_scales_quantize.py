"""The activation kernel of the float-group-scale formats (``int4``, ``nvfp4``): one pass over X -> 4-bit
activations, their group scales, and the branch's down projection.

Reference: :func:`svdquant.ops.reference.quantize_input`. For each block of tokens and
each group of 64 channels the kernel loads X once, and from the same registers

* computes ``u = (x + shift_k) · λ⁻¹_k`` (the shift only on channels ``>= unsigned_from``),
* takes the group's absmax (max for unsigned groups), rounds the scale to its storage
  dtype exactly as the reference does, and writes codes as int8 (4-bit values in 8-bit
  containers: the GEMM copies them straight to shared memory as a tensor-core operand),
* accumulates ``lora_act += x · L1ᵀ`` on the tensor cores, in fp32.

Scales are written transposed, ``[groups, M]``, so the GEMM reads one contiguous vector per
group. For NVFP4 (``FP4=True``, groups of 16) the kernel writes the quantized activation
as its exact 16-bit value ``E2M1 · s_g`` instead: Hopper has no FP4 tensor cores and the
product is exact in bf16, so the GEMM can run on 16-bit tensor cores with the scales
already folded in.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import down_projection_dot, interpreting, round_half_even as _round_half_even


@triton.jit
def _round_fp32_to_bf16(x):
    """fp32 -> nearest bf16 value (ties to even), still in fp32. Explicit because Triton's
    CPU interpreter truncates on ``.to(tl.bfloat16)`` while the GPU rounds to nearest."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _round_fp32_to_e4m3(x):
    """Non-negative fp32 -> nearest E4M3 value (ties to even, saturating at 448), still in fp32.
    Explicit for the same reason as bf16: the interpreter's fp8 cast rounds wrongly."""
    bits = x.to(tl.uint32, bitcast=True)
    e = tl.maximum(((bits >> 23) & 0xFF).to(tl.int32) - 127, -6)  # below 2^-6: subnormal spacing 2^-9
    step = ((e - 3 + 127).to(tl.uint32) << 23).to(tl.float32, bitcast=True)  # 2^(e-3): 3 mantissa bits
    return tl.minimum(_round_half_even(x / step) * step, 448.0)


@triton.jit
def _e2m1_round(v):
    """Round to the E2M1 grid {0, .5, 1, 1.5, 2, 3, 4, 6} (ties to even mantissa), keep the sign, clamp ±6."""
    mag = tl.abs(v)
    step = tl.where(mag < 2.0, 0.5, tl.where(mag < 4.0, 1.0, 2.0))
    q = tl.minimum(_round_half_even(mag / step) * step, 6.0)
    return tl.where(v < 0, -q, q)


@triton.jit
def quantize_input_kernel(
    x_ptr, sinv_ptr, l1_ptr, q_ptr, s_ptr, la_ptr, ts_ptr,
    M, K, stride_xm,
    shift, unsigned_from,
    KP: tl.constexpr, GROUPS_PER_PROG: tl.constexpr, R: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr,
    HAS_LORA: tl.constexpr, FP4: tl.constexpr, IEEE: tl.constexpr, F32_DOT: tl.constexpr, SCALE_BF16: tl.constexpr,
):
    pid = tl.program_id(0)
    split = tl.program_id(1)  # K is split across programs: one pass over X still, more parallelism
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    cols = tl.arange(0, GROUP)
    lora = tl.zeros([BLOCK_M, R], dtype=tl.float32)
    # Loop bounds are constexpr: Triton's interpreter (the CPU tests) cannot loop to a computed bound.
    if FP4:
        ts = tl.load(ts_ptr)  # the static per-tensor activation scale (no host sync to read it)
    for i in range(0, GROUPS_PER_PROG):
        g = split * GROUPS_PER_PROG + i
        k = g * GROUP + cols
        kmask = k < K
        x = tl.load(x_ptr + rows[:, None] * stride_xm + k[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        if HAS_LORA:
            rr = tl.arange(0, R)
            l1 = tl.load(l1_ptr + rr[None, :] * K + k[:, None], mask=kmask[:, None], other=0.0)
            lora = down_projection_dot(x, l1, lora, IEEE, F32_DOT)
        sinv = tl.load(sinv_ptr + k, mask=kmask, other=0.0)
        if FP4:  # mirrors formats.nvfp4: s_g = e4m3(absmax / 6 / ts), code = e2m1(u / (s_g · ts))
            u = x.to(tl.float32) * sinv[None, :]
            amax = tl.max(tl.abs(u), axis=1)
            gs = _round_fp32_to_e4m3(amax / 6.0 / ts)
            full = gs * ts
            inv = tl.where(full > 0, 1.0 / full, 0.0)
            val = _e2m1_round(u * inv[:, None]) * gs[:, None]  # exact in bf16: E2M1 × E4M3
            tl.store(q_ptr + rows[:, None] * KP + k[None, :], val.to(q_ptr.dtype.element_ty), mask=rmask[:, None])
            tl.store(s_ptr + g * M + rows, gs.to(s_ptr.dtype.element_ty), mask=rmask)
        else:
            uns = g * GROUP >= unsigned_from
            u = (x.to(tl.float32) + tl.where(uns, shift, 0.0)) * sinv[None, :]
            u = tl.where(uns, tl.maximum(u, 0.0), u)
            qmax = tl.where(uns, 15.0, 7.0)
            amax = tl.max(tl.abs(u), axis=1)
            sf = amax / qmax
            if SCALE_BF16:
                sf = _round_fp32_to_bf16(sf)
            else:
                sf = sf.to(s_ptr.dtype.element_ty).to(tl.float32)
            scale = sf.to(s_ptr.dtype.element_ty)
            inv = tl.where(sf > 0, 1.0 / sf, 0.0)
            q = _round_half_even(u * inv[:, None])
            q = tl.minimum(tl.maximum(q, tl.where(uns, 0.0, -7.0)), qmax)
            tl.store(q_ptr + rows[:, None] * KP + k[None, :], q.to(q_ptr.dtype.element_ty), mask=rmask[:, None])
            tl.store(s_ptr + g * M + rows, scale, mask=rmask)
    if HAS_LORA:  # this split's partial sum; kernel 2 adds the splits (deterministic, no atomics)
        rr = tl.arange(0, R)
        tl.store(la_ptr + split * M * R + rows[:, None] * R + rr[None, :], lora, mask=rmask[:, None])


def _split_for(groups: int, m_blocks: int) -> int:
    """Largest divisor of the group count that keeps ~4 programs per SM (132 on H100) busy."""
    for s_ in (16, 12, 8, 6, 4, 3, 2, 1):
        if groups % s_ == 0 and (m_blocks * s_ <= 1024 or s_ == 1):
            return s_
    return 1


def quantize_input(x: torch.Tensor, smooth_inv: torch.Tensor, lora_down: torch.Tensor | None, *, fp4: bool = False,
                   group_size: int = 64, shift: float = 0.0, unsigned_from: int = 0,
                   input_scale: torch.Tensor | None = None, block_m: int | None = None, split: int | None = None,
                   num_warps: int = 4):
    """Launch kernel 1. ``x``: ``[M, K]`` contiguous rows; ``lora_down``: ``[R, K]`` with R a power of 2 >= 16.

    ``fp4``: NVFP4 activations (E2M1 codes, E4M3 group scales, ``input_scale`` per tensor), else INT4.
    Returns ``(codes [M, K_pad], scales [groups, M], lora_act [M, R] or None)``: INT4
    codes in int8 and
    scales in x's dtype; for NVFP4 the 16-bit values ``E2M1 · s_g`` (x's dtype) and the E4M3
    group scales (before the per-tensor scale). The kernel writes one partial ``X · L1ᵀ`` per
    K split; they are summed before returning.
    """
    m, k = x.shape
    kp = k + (-k) % group_size
    groups = kp // group_size
    if fp4:
        codes = torch.empty(m, kp, dtype=x.dtype, device=x.device)
        scales = torch.empty(groups, m, dtype=torch.float8_e4m3fn, device=x.device)
        ts = input_scale.reshape(1).float()
    else:
        codes = torch.empty(m, kp, dtype=torch.int8, device=x.device)
        scales = torch.empty(groups, m, dtype=x.dtype, device=x.device)
        ts = smooth_inv  # unused
    bm = block_m or 64
    m_blocks = triton.cdiv(m, bm)
    split = split or _split_for(groups, m_blocks)
    r = lora_down.shape[0] if lora_down is not None else 16
    lora_act = torch.empty(split, m, r, dtype=torch.float32, device=x.device) if lora_down is not None else None
    quantize_input_kernel[(m_blocks, split)](
        x, smooth_inv, lora_down if lora_down is not None else x, codes, scales,
        lora_act if lora_act is not None else scales, ts,
        m, k, x.stride(0),
        float(shift), int(unsigned_from) if shift else kp,
        KP=kp, GROUPS_PER_PROG=groups // split, R=r, GROUP=group_size, BLOCK_M=bm, HAS_LORA=lora_down is not None,
        FP4=fp4, IEEE=x.dtype == torch.float32, F32_DOT=interpreting(), SCALE_BF16=scales.dtype == torch.bfloat16,
        num_warps=num_warps,
    )
    if lora_act is not None:
        # One small reduction here, not in every GEMM tile: each of kernel 2's tiles would
        # otherwise re-read all `split` partials (measured: +120 % for a rank-96 branch).
        lora_act = lora_act.sum(0) if split > 1 else lora_act[0]
    return codes, scales, lora_act
