"""FP8 attention's numerics: the torch reference of attention with E4M3 inputs, probabilities and output.

This is what cuDNN's FP8 attention computes on Hopper (cudnn-frontend's ``sdpa_fp8``: Q, K, V in E4M3 with a
descale each, fp32 scores and softmax, the un-normalized probabilities quantized to E4M3 with a fixed scale before
the product with V, fp32 accumulation, the output written in E4M3 with its own scale: Hopper refuses a 16-bit
output there). It decides whether FP8 attention can keep the images (issue 23: the tiny FLUX table may move at most
0.3 dB), before any kernel exists, and it is what an FP8 attention kernel is tested against.

The error depends on how finely Q, K and V are scaled (``granularity``): one scale per tensor, one per head, or
(Q and K) one per block of ``BLOCK`` tokens of a head, V then per head. ``smooth_k`` subtracts from every key of a
head the keys' mean over the tokens before quantizing (SageAttention, arXiv 2410.02367): that adds the same amount
to all of one query's scores, which the softmax ignores, and it removes the shared offset that would otherwise set
K's scale.
"""

from __future__ import annotations

import math

import torch

E4M3_MAX = 448.0
GRANULARITIES = ("tensor", "head", "block")
BLOCK = 128  # tokens per Q / K scale with granularity="block" (SageAttention's Q block; cuDNN tiles 128 too)


def e4m3(x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """``x`` rounded to E4M3 under one scale per slice that ``dims`` reduces (``amax / 448``), back in fp32."""
    x = x.float()
    scale = x.abs().amax(dim=dims, keepdim=True).clamp_min(1e-12) / E4M3_MAX
    return (x / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float() * scale


def _blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """``[B, H, S, D]`` -> ``[B, H, ceil(S / block), block, D]`` (zero-padded tokens: they do not move an amax)."""
    b, h, s, d = x.shape
    pad = (-s) % block
    if pad:
        x = torch.nn.functional.pad(x, (0, 0, 0, pad))
    return x.view(b, h, (s + pad) // block, block, d)


def _quantize_qk(x: torch.Tensor, granularity: str, rnd=e4m3) -> torch.Tensor:
    if granularity == "tensor":
        return rnd(x, (0, 1, 2, 3))
    if granularity == "head":
        return rnd(x, (2, 3))
    s = x.shape[2]
    return rnd(_blocks(x, BLOCK), (3, 4)).flatten(2, 3)[:, :, :s]


def int8(x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """``x`` rounded to INT8 ([-127, 127]) under one scale per slice that ``dims`` reduces (``amax / 127``), in
    fp32."""
    x = x.float()
    scale = x.abs().amax(dim=dims, keepdim=True).clamp_min(1e-12) / 127.0
    return torch.round(x / scale).clamp(-127, 127) * scale


def fp8_sdpa_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, granularity: str = "head",
                       smooth_k: bool = True, scale: float | None = None, fp8_probabilities: bool = True,
                       fp8_output: bool = True, int8_qk: bool = False, fp8_v: bool = True) -> torch.Tensor:
    """Attention of ``q``, ``k``, ``v`` ``[B, H, S, D]`` (no mask) as FP8 attention computes it; returns the
    output ``[B, H, S_q, D]`` in ``q``'s dtype. ``scale``: the scores' factor (default ``1 / sqrt(D)``).
    ``fp8_probabilities`` / ``fp8_output`` / ``fp8_v`` False keep those in fp32: what each rounding costs (a
    kernel on Hopper rounds them). ``int8_qk``: Q and K as INT8 at ``granularity`` instead of E4M3 (SageAttention2's
    split, arXiv 2411.10958: 7 bits of precision for the scores, INT8 tensor cores at the FP8 rate)."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity={granularity!r} is unknown; choose one of {GRANULARITIES}")
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k, v must be [batch, heads, tokens, head_dim], got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    kf = k.float()
    if smooth_k:
        kf = kf - kf.mean(dim=2, keepdim=True)
    rnd = int8 if int8_qk else e4m3
    qq, kq = _quantize_qk(q.float(), granularity, rnd), _quantize_qk(kf, granularity, rnd)
    vq = e4m3(v, (0, 1, 2, 3) if granularity == "tensor" else (2, 3)) if fp8_v else v.float()
    s = (qq @ kq.mT) * scale
    p = torch.exp(s - s.amax(dim=-1, keepdim=True))  # un-normalized, in (0, 1]: what the kernel quantizes
    denom = p.sum(dim=-1, keepdim=True)
    if fp8_probabilities:
        p = (p * E4M3_MAX).to(torch.float8_e4m3fn).float() / E4M3_MAX  # a fixed scale: max 1 -> 448
    out = (p @ vq) / denom
    return (e4m3(out, (0, 1, 2, 3)) if fp8_output else out).to(q.dtype)  # the FP8 output: one scale, its amax


__all__ = ["E4M3_MAX", "GRANULARITIES", "BLOCK", "e4m3", "int8", "fp8_sdpa_reference"]
