"""Attention with INT8 Q·Kᵀ and a 16-bit P·V: the numerics, and the op a model calls.

SageAttention's split (arXiv 2410.02367; SageAttention2, arXiv 2411.10958): Q and K are rounded to INT8 with one
scale per token (each first centred on its mean over the tokens, the mean query's scores added back exactly, and
each channel balanced between Q and K: :func:`smoothing`), their product is an exact int32 sum on the INT8 tensor
cores (on Hopper the FP8 rate, twice BF16's), and the probabilities multiply V in 16 bits with fp32 accumulation,
as FlashAttention does. Issue 23 measured on the tiny FLUX what each rounding costs (BENCHMARKS.md, "FP8
attention's numerics" and "INT8 Q·Kᵀ attention"): E4M3 Q and K cost ~7 dB, INT8 Q and K per 128-token block 0.45
dB, this module's numerics 0.23 dB on average. Per-token scales are the finest an INT8 GEMM takes for free (a row
and a column scale on the int32 sums).

:func:`int8_attention_reference` is what the Triton kernel (:mod:`svdquant.kernels.int8_attention`) computes,
in plain torch: the kernel is tested against it, and ``benchmarks/fp8_attention_quality.py`` measures its
images. :func:`int8_attention` is the op: the kernel on a CUDA GPU (a torch custom op, so ``torch.compile``
and CUDA graphs take it whole), the reference elsewhere.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from . import library

LOG2E = 1.4426950408889634  # the kernel's softmax runs on exp2: scores are scaled by log2(e) once, in the scale
BALANCE = 0.5  # the channel balance's exponent (SmoothQuant's default; the tiny FLUX's 16-bit model against itself,
# before Q was centred, seed 0: 63.3 dB unbalanced, 64.0 at 0.5, 63.8 at 0.75)
HEAD_DIMS = (32, 64, 128)  # built and tested for these (FLUX, Wan: 128; SD3: 64; SANA: 32; not PixArt-Σ: 72)


class Smoothing(NamedTuple):
    """What Q and K are smoothed by before rounding, each ``[B, H, D]`` fp32 (:func:`smoothing`)."""

    q_mean: Tensor
    k_mean: Tensor
    q_factor: Tensor
    k_factor: Tensor


def smoothing(q: Tensor, k: Tensor, tokens_dim: int) -> Smoothing:
    """Q's and K's means over the tokens, and a channel factor ``a = (amax|Q - Q̄| / amax|K - K̄|) ** BALANCE``
    (over the tokens; 1 where either is 0): Q's factor ``1 / a``, K's ``a``.

    Q·Kᵀ = (Q - Q̄)·(K - K̄)ᵀ + Q̄·(K - K̄)ᵀ + (a per query, which the softmax ignores). The first term is what INT8
    computes, each operand centred (SageAttention2, arXiv 2411.10958, smooths both), with (Q - Q̄) / a and
    (K - K̄) · a sharing each channel's range, so that an outlier channel of either no longer sets its tokens'
    scales alone (SmoothQuant's balance, arXiv 2211.10438, between the two operands); the second, the mean
    query's score of each key, is added back exactly (in fp32, by the K quantization pass)."""
    q_mean, aq = _mean_and_centred_amax(q, tokens_dim)
    k_mean, ak = _mean_and_centred_amax(k, tokens_dim)
    ok = (aq > 0) & (ak > 0)
    a = torch.where(ok, (aq / torch.where(ok, ak, 1.0)) ** BALANCE, 1.0)
    return Smoothing(q_mean, k_mean, 1.0 / a, a)


def _mean_and_centred_amax(x: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """``x``'s mean over ``dim`` and ``amax |x - mean|``, fp32, from three reductions of ``x`` itself (one pass
    once compiled): ``max |x - m| = max(max x - m, m - min x)``, to the bit, since rounding ``x_i - m`` is monotonic
    in ``x_i``."""
    mean = x.mean(dim=dim, dtype=torch.float32)
    return mean, torch.maximum(x.amax(dim=dim).float() - mean, mean - x.amin(dim=dim).float())


def mean_query_scores(k: Tensor, sm: Smoothing) -> Tensor:
    """``Q̄·(K - K̄)ᵀ`` per key, ``[B, H, S_k]`` fp32, for ``k`` ``[B, H, S_k, D]``."""
    return ((k.float() - sm.k_mean[:, :, None, :]) * sm.q_mean[:, :, None, :]).sum(dim=-1)


def quantize_tokens(x: Tensor, shift: Tensor | None = None, factor: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(x - shift) · factor`` (``x`` ``[B, H, S, D]``; ``shift`` / ``factor`` ``[B, H, D]`` fp32, each optional)
    as INT8 codes with one fp32 scale per token: ``(codes [B, H, S, D] int8, scales [B, H, S] fp32)``,
    ``scale = amax / 127`` and ``code = round(x / scale)`` (ties to even); a token of zeros gets scale 0 and zero
    codes."""
    xf = x.float()
    if shift is not None:
        xf = xf - shift[:, :, None, :]
    if factor is not None:
        xf = xf * factor[:, :, None, :]
    scale = xf.abs().amax(dim=-1) / 127.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.round(xf / safe[..., None]).clamp_(-127, 127)
    codes = torch.where((scale > 0)[..., None], codes, torch.zeros_like(codes))
    return codes.to(torch.int8), scale


def key_mask(attn_mask: Tensor, batch: int, keys: int) -> Tensor | None:
    """``attn_mask`` as one entry per key, ``[B or 1, S_k]``, if it is that (``[B, S_k]`` or ``[B, 1, 1, S_k]``, bool
    or additive: a padding mask, as Qwen-Image and Z-Image pass for prompts of different lengths); else None."""
    shape = tuple(attn_mask.shape)
    if attn_mask.ndim == 4 and shape[1:3] == (1, 1):
        shape = (shape[0], shape[3])
    if len(shape) != 2 or shape[1] != keys or shape[0] not in (1, batch):
        return None
    return attn_mask.reshape(shape)


def mask_bias(mask: Tensor, scale: float) -> Tensor:
    """A :func:`key_mask` as what is added to the raw scores ``Q·Kᵀ`` before ``scale``, fp32: 0 / -inf for a bool
    mask, ``mask / scale`` for an additive one (SDPA adds it after the scale)."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill(~mask, float("-inf"))
    return mask.float() / scale


def int8_attention_reference(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None,
                             p_dtype: torch.dtype | None = None, attn_mask: Tensor | None = None) -> Tensor:
    """Attention of ``q``, ``k``, ``v`` ``[B, H, S, D]`` with INT8 Q·Kᵀ per token, Q and K smoothed;
    the probabilities rounded to ``p_dtype`` (default ``v``'s dtype, as the kernel does) before P·V (fp32 sums),
    the output in ``v``'s dtype. ``scale``: the scores' factor (default ``1 / sqrt(D)``); ``attn_mask``: one entry
    per key (:func:`key_mask`)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    sm = smoothing(q, k, tokens_dim=2)
    qc, qs = quantize_tokens(q, sm.q_mean, sm.q_factor)
    kc, ks = quantize_tokens(k, sm.k_mean, sm.k_factor)
    # int8 products summed in fp32 are exact up to 2**24 (D <= 128: 128 * 127**2 < 2**21)
    s = (qc.float() @ kc.float().mT) * qs[..., :, None] * ks[..., None, :] + mean_query_scores(k, sm)[..., None, :]
    if attn_mask is not None:
        s = s + mask_bias(key_mask(attn_mask, q.shape[0], k.shape[2]), scale)[:, None, None, :]
    s = s * (scale * LOG2E)
    p = torch.exp2(s - s.amax(dim=-1, keepdim=True))
    out = (p.to(p_dtype or v.dtype).float() @ v.float()) / p.sum(dim=-1, keepdim=True)
    return out.to(v.dtype)


def unsupported(q: Tensor, k: Tensor, v: Tensor, attn_mask=None, dropout_p: float = 0.0, is_causal: bool = False,
                enable_gqa: bool = False) -> str | None:
    """Why :func:`int8_attention` cannot take this call (``[B, S, H, D]`` tensors), or None if it can. Read from
    shapes, dtypes and arguments only: under ``torch.compile`` it is decided while tracing."""
    if dropout_p or is_causal or enable_gqa:
        return "dropout, causal attention or grouped-query attention"
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        return f"tensors of {q.ndim}, {k.ndim}, {v.ndim} dims (it takes [batch, tokens, heads, head_dim])"
    if attn_mask is not None and key_mask(attn_mask, q.shape[0], k.shape[1]) is None:
        return f"a mask of shape {tuple(attn_mask.shape)} (it takes one entry per key: [B, S_k] or [B, 1, 1, S_k])"
    if q.shape[-1] not in HEAD_DIMS or k.shape[-1] != q.shape[-1] or v.shape[-1] != q.shape[-1]:
        return f"head size {q.shape[-1]} (it takes {', '.join(map(str, HEAD_DIMS[:-1]))} or {HEAD_DIMS[-1]}, the same " \
               "for q, k, v)"
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        return f"q, k, v of shapes {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
    if q.numel() == 0 or k.numel() == 0:
        return f"empty q or k (shapes {tuple(q.shape)}, {tuple(k.shape)})"
    if q.device.type == "cuda" and not (q.dtype == k.dtype == v.dtype and v.dtype in (torch.float16, torch.bfloat16)):
        return f"{q.dtype} / {k.dtype} / {v.dtype} on a GPU (the kernel takes float16 or bfloat16)"
    return None


def int8_attention(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None,
                   attn_mask: Tensor | None = None) -> Tensor:
    """Attention with INT8 Q·Kᵀ per token and a 16-bit P·V, ``q`` ``[B, S_q, H, D]``, ``k`` / ``v`` ``[B, S_k, H,
    D]`` (diffusers' layout) -> ``[B, S_q, H, D]``: the Triton kernel on a CUDA GPU, the reference elsewhere.
    ``attn_mask``: one entry per key (:func:`key_mask`). Check :func:`unsupported` first (another mask, another
    head size: use SDPA)."""
    why = unsupported(q, k, v, attn_mask)
    if why is not None:
        raise ValueError(f"INT8 attention cannot take {why}; use torch's scaled_dot_product_attention for it")
    return int8_attention_unchecked(q, k, v, scale, attn_mask)


def int8_attention_unchecked(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None,
                             attn_mask: Tensor | None = None) -> Tensor:
    """:func:`int8_attention` for a caller that asked :func:`unsupported` itself (diffusers' backend, per call)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if q.device.type == "cuda":
        sm = smoothing(q, k, tokens_dim=1)  # torch ops: inductor fuses them in a graph
        bias = None if attn_mask is None else mask_bias(key_mask(attn_mask, q.shape[0], k.shape[1]), scale)
        if torch.compiler.is_compiling():
            return torch.ops.svdquant.int8_attention(q, k, v, *sm, bias, scale * LOG2E)
        return library.int8_attention_impl(q, k, v, *sm, bias, scale * LOG2E)
    return int8_attention_reference(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale,
                                    attn_mask=attn_mask).transpose(1, 2)


__all__ = ["LOG2E", "BALANCE", "HEAD_DIMS", "Smoothing", "smoothing", "mean_query_scores", "key_mask", "mask_bias",
           "quantize_tokens", "int8_attention_reference", "int8_attention", "int8_attention_unchecked", "unsupported"]
