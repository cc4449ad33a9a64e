"""The INT8 GEMM of the two-level path: ``Y = (A · Wᵀ) · s_a · s_w + lora_act · L2ᵀ + b`` (optional GELU).

Reference: :func:`svdquant.ops.reference.qgemm` for integer products. ``A`` holds the
activation values (``int8`` codes, or two-level ``code · m``), ``W`` the weights'
``code · m`` (or ``int8`` codes), both exact INT8; the main loop is a plain int8 × int8 →
int32 tensor-core GEMM over all of K with nothing else in it. The float work, the
branch's up projection, the bias and the GELU are in the epilogue.

On Hopper (``TMA=True``) the kernel is persistent (one program per SM walks the output
tiles) and loads A and W tiles through TMA tensor descriptors, the structure of Triton's
persistent FP8 matmul tutorial (09), which reaches cuBLAS speed. Elsewhere (sm_80–89, and
the CPU interpreter when asked) it loads tiles with pointers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import gelu_tanh, grouped_tile, interpreting


# lu_ptr not specialized on its 16-byte alignment: known aligned, Triton widens the branch's up-projection loads
# and the TMA build spills 728-816 B of registers on sm_90 (Triton 3.6 and 3.9, ahead of time); without, none
@triton.jit(do_not_specialize_on_alignment=["lu_ptr"])
def int8_gemm_kernel(
    a_desc, w_desc, a_ptr, w_ptr, as_ptr, ws_ptr, la_ptr, lu_ptr, b_ptr, y_ptr,
    M, N, K, stride_ym,
    R: tl.constexpr, R_CHUNK: tl.constexpr, HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr, GELU: tl.constexpr,
    APPROX_GELU: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    NUM_PROGRAMS: tl.constexpr, TMA: tl.constexpr, WARP_SPECIALIZE: tl.constexpr = False,
):
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    # WARP_SPECIALIZE (persistent + TMA, sm_90+; a tile config's option, off in the shipped ones until measured):
    # loads and MMAs in separate warp groups, as Triton's persistent matmul tutorial (09) does with descriptors
    for tile in tl.range(tl.program_id(0), num_m * num_n, NUM_PROGRAMS, flatten=TMA and not WARP_SPECIALIZE,
                         warp_specialize=WARP_SPECIALIZE):
        pid_m, pid_n = grouped_tile(tile, num_m, num_n, GROUP_M)  # GROUP_M token tiles per sweep
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
        offs_am = off_m + tl.arange(0, BLOCK_M)
        offs_wn = off_n + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        for ki in range(k_tiles):
            if TMA:
                a = a_desc.load([off_m, ki * BLOCK_K])
                w = w_desc.load([off_n, ki * BLOCK_K])
            else:  # K is a multiple of BLOCK_K; out-of-range rows are never stored
                a = tl.load(a_ptr + offs_am[:, None] * K + (ki * BLOCK_K + offs_k)[None, :],
                            mask=(offs_am < M)[:, None], other=0)
                w = tl.load(w_ptr + offs_wn[:, None] * K + (ki * BLOCK_K + offs_k)[None, :],
                            mask=(offs_wn < N)[:, None], other=0)
            acc = tl.dot(a, w.T, acc, out_dtype=tl.int32)
        mmask = offs_am < M
        nmask = offs_wn < N
        a_s = tl.load(as_ptr + offs_am, mask=mmask, other=0.0)
        w_s = tl.load(ws_ptr + offs_wn, mask=nmask, other=0.0)
        y = acc.to(tl.float32) * a_s[:, None] * w_s[None, :]
        if HAS_LORA:  # in chunks of 32 ranks: a LoRA-widened branch must not outgrow shared memory
            for r0 in range(0, R, R_CHUNK):
                rr = r0 + tl.arange(0, R_CHUNK)
                la = tl.load(la_ptr + offs_am[:, None] * R + rr[None, :], mask=mmask[:, None], other=0.0)
                lu = tl.load(lu_ptr + offs_wn[:, None] * R + rr[None, :], mask=nmask[:, None], other=0.0)
                y = tl.dot(la, lu.to(tl.float32).T, y, input_precision="tf32")
        if HAS_BIAS:
            y += tl.load(b_ptr + offs_wn, mask=nmask, other=0.0).to(tl.float32)[None, :]
        if GELU:
            y = gelu_tanh(y, APPROX_GELU)
        tl.store(y_ptr + offs_am[:, None] * stride_ym + offs_wn[None, :], y.to(y_ptr.dtype.element_ty),
                 mask=mmask[:, None] & nmask[None, :])


# Tiles measured on an H200 (NOTES-GPU.md); elsewhere a smaller tile that fits sm_80's shared memory.
HOPPER_CONFIG = dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=3)
# fp32 outputs double the epilogue's shared-memory staging: half the token tile (same weight tile and descriptor)
HOPPER_CONFIG_FP32 = dict(HOPPER_CONFIG, BLOCK_M=64, num_warps=4)
# sm_80-89 (A100, RTX 3090 / 4090, L40S): no GPU of these kinds has timed it. Compiled ahead of time
# (benchmarks/kernel_resources.py), the earlier 128 × 128 × 64 / 4 warps spilled 3.2-5.2 KB of stack on sm_80, 86
# and 89 under Triton 3.6 and 3.9 (ptxas kept 32-40 registers); this tile compiles with none on sm_86 / 89 under
# both, 48 B on sm_80. A sweep on such a GPU should replace it.
DEFAULT_CONFIG = dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4)


def tile_config(tma: bool, out_dtype: torch.dtype | None = None) -> dict:
    """The GEMM's tiles, chosen here only: Hopper's (``tma``) or the default, halved in tokens for fp32 outputs on
    Hopper. A weight's TMA descriptor depends only on ``BLOCK_N`` / ``BLOCK_K``, the same for every output dtype.
    The module's own dicts, read only: asked on every GEMM call, so nothing is copied."""
    if tma:
        return HOPPER_CONFIG_FP32 if out_dtype == torch.float32 else HOPPER_CONFIG
    return DEFAULT_CONFIG


def weight_descriptor(w: torch.Tensor, config: dict):
    """The TMA descriptor of a resident INT8 weight ``[N, K]`` (built once, at load)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor.from_tensor(w, [config["BLOCK_N"], config["BLOCK_K"]])


def int8_gemm(a, a_scale, w, w_scale, lora_act, lora_up, bias, out_dtype, *, gelu=False, tma=False, w_desc=None,
              num_programs=None, config=None):
    """Launch the GEMM. ``a`` ``[M, K]`` int8, ``a_scale`` ``[M]`` fp32, ``w`` ``[N, K]`` int8, ``w_scale`` ``[N]``
    fp32 (K a multiple of ``BLOCK_K``), ``lora_act`` ``[M, R]`` fp32, ``lora_up`` ``[N, R]``, ``bias`` ``[N]``.
    ``tma=True`` (sm_90+) uses tensor descriptors (``w_desc``: a prepared one for ``w``); ``num_programs``: the
    persistent grid size (the SM count), else one program per tile."""
    cfg = config or tile_config(tma)  # read only
    m, k = a.shape
    n = w.shape[0]
    y = torch.empty(m, n, dtype=out_dtype, device=a.device)
    tiles = triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"])
    programs = min(num_programs, tiles) if num_programs else tiles
    if tma:
        from triton.tools.tensor_descriptor import TensorDescriptor

        a_desc = TensorDescriptor.from_tensor(a, [cfg["BLOCK_M"], cfg["BLOCK_K"]])
        w_desc = w_desc if w_desc is not None else weight_descriptor(w, cfg)
    else:
        a_desc = w_desc = a  # unused
    has_lora = lora_act is not None
    int8_gemm_kernel[(programs,)](
        a_desc, w_desc, a, w, a_scale, w_scale,
        lora_act if has_lora else a_scale, lora_up if has_lora else a_scale, bias if bias is not None else a_scale, y,
        m, n, k, y.stride(0),
        R=lora_up.shape[1] if has_lora else 16, R_CHUNK=min(lora_up.shape[1] if has_lora else 16, 32),
        HAS_LORA=has_lora, HAS_BIAS=bias is not None, GELU=gelu, APPROX_GELU=not interpreting(),
        NUM_PROGRAMS=programs, TMA=tma, **cfg,
    )
    return y
