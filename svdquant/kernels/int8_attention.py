"""Attention with INT8 Q·Kᵀ (one scale per token) and a 16-bit P·V, forward only (masks: one entry per key).

Reference: :func:`svdquant.ops.int8_attention.int8_attention_reference`. Two kernels:

* ``quantize_tokens_kernel``: Q or K, smoothed (minus its token mean, each channel times a factor) -> INT8
  codes and one fp32 scale per token, in head-major order so the attention kernel reads each head's tokens
  contiguously; for K also the mean query's score of each key (the part of Q·Kᵀ that centring Q removed);
* ``int8_attention_kernel``: FlashAttention's loop (arXiv 2205.14135; Triton's fused-attention tutorial 06) with
  the scores an int8 × int8 -> int32 tensor-core product rescaled by the row and column scales, the softmax on
  exp2 (log2(e) folded into the scale) with fp32 running max and sum, the mean query's scores added per key, and
  P rounded to V's dtype for P·V.

Both take their inputs in diffusers' ``[B, S, H, D]`` layout through strides (the last dim contiguous), so the
projections' outputs are read where they are.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import interpreting, rne


@triton.jit
def quantize_tokens_kernel(x_ptr, shift_ptr, factor_ptr, dot_ptr, c_ptr, s_ptr, dots_ptr, S, H, stride_b, stride_s,
                           stride_h, D: tl.constexpr, BLOCK: tl.constexpr, HAS_SHIFT: tl.constexpr,
                           HAS_FACTOR: tl.constexpr, HAS_DOT: tl.constexpr, FAST_ROUND: tl.constexpr):
    bh = tl.program_id(1).to(tl.int64)  # 64-bit offsets: a Wan 720p batch of fused q/k/v passes 2**31 elements
    b, h = bh // H, bh % H
    toks = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tmask = toks < S
    d = tl.arange(0, D)
    x = tl.load(x_ptr + b * stride_b + h * stride_h + toks[:, None] * stride_s + d[None, :], mask=tmask[:, None],
                other=0.0).to(tl.float32)
    if HAS_SHIFT:
        x -= tl.load(shift_ptr + bh * D + d)[None, :]
    if HAS_DOT:  # each (shifted) token's dot product with a vector: the mean query's scores, for K
        tl.store(dots_ptr + bh * S + toks, tl.sum(x * tl.load(dot_ptr + bh * D + d)[None, :], axis=1), mask=tmask)
    if HAS_FACTOR:
        x *= tl.load(factor_ptr + bh * D + d)[None, :]
    scale = tl.math.div_rn(tl.max(tl.abs(x), axis=1), tl.zeros([BLOCK], tl.float32) + 127.0)  # as torch divides
    safe = tl.where(scale > 0, scale, 1.0)
    codes = tl.minimum(tl.maximum(rne(tl.math.div_rn(x, safe[:, None]), FAST_ROUND), -127.0), 127.0)
    codes = tl.where((scale > 0)[:, None], codes, 0.0)
    tl.store(c_ptr + (bh * S + toks)[:, None] * D + d[None, :], codes.to(tl.int8), mask=tmask[:, None])
    tl.store(s_ptr + bh * S + toks, scale, mask=tmask)


@triton.jit
def int8_attention_kernel(qc_ptr, qs_ptr, kc_ptr, ks_ptr, kb_ptr, v_ptr, o_ptr, k_desc, v_desc, SQ, SK, H, qk_scale,
                          stride_vb, stride_vs, stride_vh, stride_ob, stride_os, stride_oh,
                          D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_N: tl.constexpr,
                          HAS_KB: tl.constexpr, TMA: tl.constexpr, F32_DOT: tl.constexpr):
    bh = tl.program_id(1).to(tl.int64)  # 64-bit offsets, as above
    b, h = bh // H, bh % H
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < SQ
    d = tl.arange(0, D)
    q = tl.load(qc_ptr + (bh * SQ + rows)[:, None] * D + d[None, :], mask=rmask[:, None], other=0)
    qs = tl.load(qs_ptr + bh * SQ + rows, mask=rmask, other=0.0) * qk_scale  # scale · log2(e) folded in once
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    kc_ptr += bh * SK * D
    ks_ptr += bh * SK
    kb_ptr += bh * SK
    v_ptr += b * stride_vb + h * stride_vh
    for start in range(0, SK, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        cmask = cols < SK  # all true with EVEN_N, and then unused
        if TMA:  # Hopper: K's codes ([B·H·S_k, D]) and V ([B, S_k, H, D], zero past S_k) through tensor descriptors
            # descriptor coordinates are 32-bit (rows: B·H·S_k); rows past S_k are the next head's: masked scores
            k = k_desc.load([(bh * SK + start).to(tl.int32), 0])
            v = v_desc.load([b.to(tl.int32), start, h.to(tl.int32), 0]).reshape([BLOCK_N, D])
        elif EVEN_N:
            k = tl.load(kc_ptr + cols[:, None] * D + d[None, :])
            v = tl.load(v_ptr + cols[:, None] * stride_vs + d[None, :])
        else:
            k = tl.load(kc_ptr + cols[:, None] * D + d[None, :], mask=cmask[:, None], other=0)
            v = tl.load(v_ptr + cols[:, None] * stride_vs + d[None, :], mask=cmask[:, None], other=0.0)
        if EVEN_N:
            ks = tl.load(ks_ptr + cols)
        else:
            ks = tl.load(ks_ptr + cols, mask=cmask, other=0.0)
        s = tl.dot(q, k.T, out_dtype=tl.int32).to(tl.float32) * qs[:, None] * ks[None, :]
        if HAS_KB:  # the mean query's score of each key, scaled as the rest
            s += (tl.load(kb_ptr + cols, mask=cmask, other=0.0) * qk_scale)[None, :]
        if not EVEN_N:
            s = tl.where(cmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row whose keys so far are all masked: p, alpha 0
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if F32_DOT:  # the CPU interpreter cannot multiply 16-bit operands: P rounded to V's dtype, then fp32
            acc = tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32), acc * alpha[:, None], input_precision="ieee")
        else:
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(o_ptr + b * stride_ob + h * stride_oh + rows[:, None] * stride_os + d[None, :],
             out.to(o_ptr.dtype.element_ty), mask=rmask[:, None])


QUANTIZE_BLOCK = 64  # tokens per program of the quantization pass
# Tiles. Hopper, D = 128 (with TMA): the fastest of attention_speed.py --sweep's 36 at FLUX's shape (H200,
# NOTES-GPU.md session 16): 0.503 ms against 0.861 for the 8-warp / 2-stage tile, though ahead of time it spills
# 792 B of stack (Triton 3.9) where that one spills none: measured time decides. Elsewhere (sm_80-89, untimed: no
# such GPU is lent) and at D = 64 (SD3, untimed): the nearest configs to the FlashAttention-2 shape that compile
# with no spill for sm_90 (3 stages spilled 40 B at D = 128, 4 warps 320 B at D = 64).
HOPPER_CONFIG = dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3)
CONFIG = dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2)
CONFIG_D64 = dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2)


def _fp32(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.float().contiguous()


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def quantize_tokens(x: torch.Tensor, shift: torch.Tensor | None = None, factor: torch.Tensor | None = None,
                    dot: torch.Tensor | None = None):
    """``(x - shift) · factor`` (``x`` ``[B, S, H, D]``; ``shift``, ``factor`` ``[B, H, D]`` fp32, contiguous, each
    optional) -> ``(codes [B, H, S, D] int8, scales [B, H, S] fp32)``, the numbers of
    :func:`svdquant.ops.int8_attention.quantize_tokens` on ``x.transpose(1, 2)``; with ``dot`` ``[B, H, D]`` fp32
    also ``(x - shift) · dot`` per token, ``[B, H, S]`` fp32, as a third output."""
    x = _last_dim_contiguous(x)
    b, s, h, d = x.shape
    codes = torch.empty(b, h, s, d, dtype=torch.int8, device=x.device)
    scales = torch.empty(b, h, s, dtype=torch.float32, device=x.device)
    dots = torch.empty(b, h, s, dtype=torch.float32, device=x.device) if dot is not None else scales
    quantize_tokens_kernel[(triton.cdiv(s, QUANTIZE_BLOCK), b * h)](
        x, shift if shift is not None else scales, factor if factor is not None else scales,
        dot if dot is not None else scales, codes, scales, dots, s, h, x.stride(0), x.stride(1), x.stride(2), D=d,
        BLOCK=QUANTIZE_BLOCK, HAS_SHIFT=shift is not None, HAS_FACTOR=factor is not None, HAS_DOT=dot is not None,
        FAST_ROUND=not interpreting(), num_warps=4)
    return (codes, scales) if dot is None else (codes, scales, dots)


_HOPPER: dict[int, bool] = {}  # CUDA device index -> compute capability 9.0+, asked once per device


def hopper(device: torch.device) -> bool:
    """Whether ``device`` (a CUDA device) has TMA (sm_90+); the capability is asked at its first call only."""
    if device.index not in _HOPPER:
        _HOPPER[device.index] = torch.cuda.get_device_capability(device) >= (9, 0)
    return _HOPPER[device.index]


def tma_ready(v: torch.Tensor) -> bool:
    """Whether ``v`` can be read through a TMA descriptor: a 16-byte aligned base and strides."""
    return v.data_ptr() % 16 == 0 and all(s * v.element_size() % 16 == 0 for s in v.stride()[:-1])


def attend(qc: torch.Tensor, qs: torch.Tensor, kc: torch.Tensor, ks: torch.Tensor, v: torch.Tensor, qk_scale: float,
           key_bias: torch.Tensor | None = None, *, tma: bool | None = None, config: dict | None = None) -> torch.Tensor:
    """The attention kernel on quantized Q and K (:func:`quantize_tokens`' outputs) and ``v`` ``[B, S_k, H, D]``:
    ``[B, S_q, H, D]`` in ``v``'s dtype; ``key_bias`` ``[B, H, S_k]`` fp32: added to every query's score of each
    key (before ``qk_scale``). ``tma`` (sm_90+): K and V through tensor descriptors (pointers where
    ``v`` is not 16-byte aligned, or on a GPU before sm_90); ``None``: on a GPU that has them. (The CPU
    interpreter takes ``tma=True``: the tests.)"""
    b, h, sq, d = qc.shape
    sk = kc.shape[2]
    v = _last_dim_contiguous(v)
    o = torch.empty(b, sq, h, d, dtype=v.dtype, device=v.device)
    if tma is None:
        tma = v.device.type == "cuda" and hopper(v.device)
    elif tma and v.device.type == "cuda":
        tma = hopper(v.device)  # asked for on a GPU before sm_90: pointers
    tma = tma and tma_ready(v)
    cfg = config or (CONFIG_D64 if d <= 64 else HOPPER_CONFIG if tma else CONFIG)
    if tma:
        from triton.tools.tensor_descriptor import TensorDescriptor

        k_desc = TensorDescriptor.from_tensor(kc.view(b * h * sk, d), [cfg["BLOCK_N"], d])
        v_desc = TensorDescriptor(v, list(v.shape), list(v.stride()), [1, cfg["BLOCK_N"], 1, d])
    else:
        k_desc = v_desc = kc  # unused
    int8_attention_kernel[(triton.cdiv(sq, cfg["BLOCK_M"]), b * h)](
        qc, qs, kc, ks, key_bias if key_bias is not None else ks, v, o, k_desc, v_desc, sq, sk, h, qk_scale,
        v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2), D=d,
        EVEN_N=sk % cfg["BLOCK_N"] == 0, HAS_KB=key_bias is not None, TMA=tma, F32_DOT=interpreting(), **cfg)
    return o


def int8_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qk_scale: float, k_mean: torch.Tensor,
                   q_factor: torch.Tensor | None = None, k_factor: torch.Tensor | None = None, *,
                   q_mean: torch.Tensor | None = None, mask_bias: torch.Tensor | None = None,
                   tma: bool | None = None, config: dict | None = None) -> torch.Tensor:
    """Attention of ``q`` ``[B, S_q, H, D]``, ``k`` / ``v`` ``[B, S_k, H, D]`` (D 32, 64 or 128):
    ``[B, S_q, H, D]`` in ``v``'s dtype: :func:`quantize_tokens` of Q and K, then :func:`attend`. ``qk_scale``:
    the scores' factor times log2(e); ``k_mean``, ``q_factor``, ``k_factor``, ``q_mean`` ``[B, H, D]`` fp32: the
    smoothing (:func:`svdquant.ops.int8_attention.smoothing`; with ``q_mean``, Q is centred and the mean query's
    scores are computed by K's quantization pass and added back); ``mask_bias`` ``[B or 1, S_k]`` fp32: added to
    every score of each key before ``qk_scale`` (a padding mask: 0 or -inf)."""
    qc, qs = quantize_tokens(q, _fp32(q_mean), _fp32(q_factor))
    if q_mean is None:
        kc, ks = quantize_tokens(k, _fp32(k_mean), _fp32(k_factor))
        kb = None
    else:
        kc, ks, kb = quantize_tokens(k, _fp32(k_mean), _fp32(k_factor), dot=_fp32(q_mean))
    if mask_bias is not None:  # per key, the same for every head
        extra = mask_bias.float()[:, None, :]
        kb = (extra.expand(qc.shape[0], qc.shape[1], -1) if kb is None else kb + extra).contiguous()
    return attend(qc, qs, kc, ks, v, qk_scale, kb, tma=tma, config=config)
