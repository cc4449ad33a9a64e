"""FLUX's q/k RMSNorm and rotary embedding as one op (:func:`norm_rope`), for the attention's query and key.

diffusers' ``FluxAttnProcessor`` runs ``attn.norm_q`` (a ``torch.nn.RMSNorm`` over each head), concatenates the
text stream's normalized tokens ahead of the image stream's, then ``apply_rotary_emb`` (pairs ``2i``, ``2i + 1``
rotated by the position's angle, in fp32). Compiled, inductor's kernel for that in the 38 single blocks took 3.4-3.9
ms of a FLUX.1-dev step on an H100 (BENCHMARKS.md, "Session 34"), where reading their q and k once and writing them
once costs ~1.5 ms at the GPU's bandwidth. :func:`norm_rope` is the Triton kernel (:mod:`svdquant.kernels.norm_rope`)
on a CUDA GPU, a torch custom op so ``torch.compile`` and CUDA graphs take it whole, and :func:`norm_rope_reference`
elsewhere; :func:`norm_rope_qk` does the query and the key in one op, a stream's two in one launch (what the FLUX
processor runs: 2.91 ms of a FLUX.1-dev step on an H100, BENCHMARKS.md "Session 37"). ``round_norm`` gives Qwen-Image's
variant: diffusers' own ``RMSNorm`` rounds the normalized value before the weight, and its rotation is a complex
product, the same bits from :func:`complex_tables`' real and imaginary parts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import library


def norm_rope_reference(x: Tensor, weight: Tensor | None, cos: Tensor, sin: Tensor, eps: float, heads: int,
                        x2: Tensor | None = None, weight2: Tensor | None = None, round_norm: bool = False) -> Tensor:
    """What diffusers computes: ``x`` ``[B, S, H·D]`` (and the text stream ``x2`` ``[B, S2, H·D]``, put first)
    through ``F.rms_norm`` over each head with ``weight`` (``weight2``), concatenated, then rotated by ``cos`` /
    ``sin`` ``[S2 + S, D]`` (or ``[B, S2 + S, D]``, a table per batch entry) as diffusers'
    ``apply_rotary_emb(..., use_real_unbind_dim=-1)`` does -> ``[B, S2 + S, H, D]``. ``round_norm``: the norm as
    diffusers' own ``RMSNorm`` computes it (Qwen-Image's q/k norms), the normalized value rounded before the
    weight; the rotation is then the same bits as Qwen-Image's complex product (``apply_rotary_emb_qwen(...,
    use_real=False)``) with ``cos`` / ``sin`` its real and imaginary parts, each repeated for a pair's two values
    (Z-Image's the same, with a table per batch entry)."""
    def norm(t, w):
        t = t.unflatten(-1, (heads, -1))
        if not round_norm:
            return F.rms_norm(t, (t.shape[-1],), w, eps)
        t = (t * torch.rsqrt(t.float().pow(2).mean(-1, keepdim=True) + eps)).to(t.dtype)
        return t if w is None else t * w

    y = norm(x, weight) if x2 is None else torch.cat([norm(x2, weight2), norm(x, weight)], dim=1)
    real, imag = y.reshape(*y.shape[:-1], -1, 2).unbind(-1)
    rotated = torch.stack([-imag, real], dim=-1).flatten(3)
    return (y.float() * cos.unsqueeze(-2) + rotated.float() * sin.unsqueeze(-2)).to(y.dtype)


def complex_tables(*tables: Tensor) -> tuple[Tensor, Tensor]:
    """``(cos, sin)`` ``[tokens, D]`` for :func:`norm_rope` from complex rotary tables ``[tokens_i, D / 2]`` (as
    Qwen-Image gives them, one a stream; ``[B, tokens_i, D / 2]`` as Z-Image does: ``[B, tokens, D]``), joined in the
    order given: each value's real and imaginary part for its pair's two channels. Views of the complex tables, then
    real ops only (inductor generates no code for complex ones)."""
    parts = torch.cat([torch.view_as_real(t) for t in tables], dim=-3)
    return parts[..., 0].repeat_interleave(2, dim=-1), parts[..., 1].repeat_interleave(2, dim=-1)


def unsupported(x: Tensor, weight: Tensor | None, cos: Tensor, sin: Tensor, heads: int, x2: Tensor | None = None,
                weight2: Tensor | None = None) -> str | None:
    """Why :func:`norm_rope` cannot take this call, or None. Read from shapes and dtypes only (decided while
    tracing under ``torch.compile``)."""
    streams = [x] if x2 is None else [x, x2]
    if any(t.ndim != 3 or t.shape[-1] % heads or t.stride(-1) != 1 for t in streams):
        return "inputs that are not [batch, tokens, heads · head_dim] with a unit stride in the last dim"
    dim = x.shape[-1] // heads
    if dim & (dim - 1) or not 16 <= dim <= 256:
        return f"head size {dim} (it takes a power of two from 16 to 256)"
    if x2 is not None and (x2.shape[0] != x.shape[0] or x2.shape[-1] != x.shape[-1] or x2.dtype != x.dtype):
        return f"streams of shapes {tuple(x.shape)} and {tuple(x2.shape)}, dtypes {x.dtype} and {x2.dtype}"
    tokens = x.shape[1] + (0 if x2 is None else x2.shape[1])
    if tuple(cos.shape) != tuple(sin.shape) or tuple(cos.shape) not in ((tokens, dim), (x.shape[0], tokens, dim)):
        return f"rotary tables of shapes {tuple(cos.shape)}, {tuple(sin.shape)} (it takes [{tokens}, {dim}] or " \
               f"[{x.shape[0]}, {tokens}, {dim}])"
    if any(w is not None and tuple(w.shape) != (dim,) for w in (weight, weight2)):
        return "norm weights that are not one value per head channel"
    if x.dtype not in (torch.float16, torch.bfloat16):
        return f"{x.dtype} (it takes float16 or bfloat16)"
    if any(t.device != x.device for t in (cos, sin, weight, x2, weight2) if t is not None):
        return "tensors on more than one device"
    return None


def unsupported_qk(q: Tensor, k: Tensor, weight_q: Tensor | None, weight_k: Tensor | None, cos: Tensor, sin: Tensor,
                   heads: int, q2: Tensor | None = None, k2: Tensor | None = None, weight_q2: Tensor | None = None,
                   weight_k2: Tensor | None = None) -> str | None:
    """Why :func:`norm_rope_qk` cannot take this call, or None: :func:`unsupported` for each, and a query and a key
    of one shape and dtype in each stream."""
    why = unsupported(q, weight_q, cos, sin, heads, q2, weight_q2) or unsupported(k, weight_k, cos, sin, heads, k2,
                                                                                weight_k2)
    if why is not None:
        return why
    shapes = [tuple(t.shape) if t is not None else None for t in (q, k, q2, k2)]
    if shapes[0] != shapes[1] or shapes[2] != shapes[3] or q.dtype != k.dtype:
        return f"a query and a key of shapes {shapes[0]} and {shapes[1]} (text {shapes[2]} and {shapes[3]}), " \
               f"dtypes {q.dtype} and {k.dtype}"
    return None


def _empty(x: Tensor, tokens: int, heads: int, heads_first: bool) -> Tensor:
    """``[B, tokens, H, D]`` for ``x``'s output; ``heads_first``: the transpose of a contiguous ``[B, H, tokens, D]``,
    the layout SDPA's kernels read (diffusers' native backends transpose q/k/v to it), so no copy comes between."""
    shape = (x.shape[0], tokens, heads, x.shape[-1] // heads)
    return torch.empty_permuted(shape, (0, 2, 1, 3) if heads_first else (0, 1, 2, 3), dtype=x.dtype, device=x.device)


def _reference_in_layout(x: Tensor, weight: Tensor | None, cos: Tensor, sin: Tensor, eps: float, heads: int,
                         x2: Tensor | None, weight2: Tensor | None, heads_first: bool, round_norm: bool) -> Tensor:
    out = norm_rope_reference(x, weight, cos, sin, eps, heads, x2, weight2, round_norm)  # contiguous, as the fake's
    return _empty(x, out.shape[1], heads, True).copy_(out) if heads_first else out


@torch.library.custom_op("svdquant::norm_rope", mutates_args=())
def norm_rope_op(x: Tensor, weight: Tensor | None, cos: Tensor, sin: Tensor, eps: float, heads: int,
                 x2: Tensor | None, weight2: Tensor | None, heads_first: bool, round_norm: bool) -> Tensor:
    if x.device.type != "cuda":
        return _reference_in_layout(x, weight, cos, sin, eps, heads, x2, weight2, heads_first, round_norm)
    out = _empty(x, (0 if x2 is None else x2.shape[1]) + x.shape[1], heads, heads_first)
    _streams_into(out, x, weight, x2, weight2, cos.contiguous(), sin.contiguous(), eps, round_norm)
    return out


@norm_rope_op.register_fake
def _(x, weight, cos, sin, eps, heads, x2, weight2, heads_first, round_norm):
    return _empty(x, (0 if x2 is None else x2.shape[1]) + x.shape[1], heads, heads_first)


def _launch(out: Tensor, x: Tensor, weight: Tensor | None, cos: Tensor, sin: Tensor, eps: float, offset: int,
            round_norm: bool, key: tuple | None = None) -> None:
    """One stream; with ``key=(out_k, x_k, weight_k)`` the key's too: in the same launch where their inputs share
    shapes and strides (slices of one stacked q/k/v output), else a launch each."""
    launch = library._kernels().norm_rope_into  # svdquant.kernels, imported at the first launch
    w = weight if weight is not None else x.new_ones(out.shape[-1])
    if key is None:
        launch(out, x, w, cos, sin, eps, offset, round_norm=round_norm)
        return
    out_k, x_k, weight_k = key
    w_k = weight_k if weight_k is not None else x_k.new_ones(out.shape[-1])
    if (x.shape, x.stride(), x.dtype, w.dtype) == (x_k.shape, x_k.stride(), x_k.dtype, w_k.dtype):
        launch(out, x, w, cos, sin, eps, offset, pair=(out_k, x_k, w_k), round_norm=round_norm)
    else:
        launch(out, x, w, cos, sin, eps, offset, round_norm=round_norm)
        launch(out_k, x_k, w_k, cos, sin, eps, offset, round_norm=round_norm)


def _streams_into(out: Tensor, x: Tensor, weight: Tensor | None, x2: Tensor | None, weight2: Tensor | None,
                  cos: Tensor, sin: Tensor, eps: float, round_norm: bool, key: tuple | None = None) -> None:
    """Both ops' launches: the text stream ``x2`` (if any) from token 0, then the image stream ``x`` after it; with
    ``key=(out_k, k, weight_k, k2, weight_k2)`` the key's streams in the same launches."""
    if x2 is not None:
        _launch(out, x2, weight2, cos, sin, eps, 0, round_norm, None if key is None else (key[0], key[3], key[4]))
    _launch(out, x, weight, cos, sin, eps, 0 if x2 is None else x2.shape[1], round_norm,
            None if key is None else key[:3])


@torch.library.custom_op("svdquant::norm_rope_qk", mutates_args=())
def norm_rope_qk_op(q: Tensor, k: Tensor, weight_q: Tensor | None, weight_k: Tensor | None, cos: Tensor, sin: Tensor,
                    eps: float, heads: int, q2: Tensor | None, k2: Tensor | None, weight_q2: Tensor | None,
                    weight_k2: Tensor | None, heads_first: bool, round_norm: bool) -> tuple[Tensor, Tensor]:
    if q.device.type != "cuda":
        return (_reference_in_layout(q, weight_q, cos, sin, eps, heads, q2, weight_q2, heads_first, round_norm),
                _reference_in_layout(k, weight_k, cos, sin, eps, heads, k2, weight_k2, heads_first, round_norm))
    tokens = (0 if q2 is None else q2.shape[1]) + q.shape[1]
    out_q, out_k = _empty(q, tokens, heads, heads_first), _empty(k, tokens, heads, heads_first)
    _streams_into(out_q, q, weight_q, q2, weight_q2, cos.contiguous(), sin.contiguous(), eps, round_norm,
                  key=(out_k, k, weight_k, k2, weight_k2))
    return out_q, out_k


@norm_rope_qk_op.register_fake
def _(q, k, weight_q, weight_k, cos, sin, eps, heads, q2, k2, weight_q2, weight_k2, heads_first, round_norm):
    tokens = (0 if q2 is None else q2.shape[1]) + q.shape[1]
    return _empty(q, tokens, heads, heads_first), _empty(k, tokens, heads, heads_first)


def norm_rope_qk(q: Tensor, k: Tensor, weight_q: Tensor | None, weight_k: Tensor | None, cos: Tensor, sin: Tensor,
                 eps: float, heads: int, q2: Tensor | None = None, k2: Tensor | None = None,
                 weight_q2: Tensor | None = None, weight_k2: Tensor | None = None,
                 heads_first: bool = False, round_norm: bool = False) -> tuple[Tensor, Tensor]:
    """:func:`norm_rope` of the query and the key with one eps, a stream's two in one launch on a CUDA GPU (the
    kernel's ``pair=``): half the launches of a call each, the same bits. Check :func:`unsupported_qk` first."""
    return norm_rope_qk_op(q, k, weight_q, weight_k, cos, sin, eps, heads, q2, k2, weight_q2, weight_k2, heads_first,
                           round_norm)


def norm_rope(x: Tensor, weight: Tensor | None, cos: Tensor, sin: Tensor, eps: float, heads: int,
              x2: Tensor | None = None, weight2: Tensor | None = None, heads_first: bool = False,
              round_norm: bool = False) -> Tensor:
    """The q (or k) attention takes, ``[B, S2 + S, H, D]``: the Triton kernel on a CUDA GPU, the reference elsewhere.
    ``heads_first``: laid out as the transpose of ``[B, H, S2 + S, D]`` (for SDPA's kernels), else contiguous.
    ``round_norm``: the norm as diffusers' ``RMSNorm`` rounds it (:func:`norm_rope_reference`). Check
    :func:`unsupported` first."""
    return norm_rope_op(x, weight, cos, sin, eps, heads, x2, weight2, heads_first, round_norm)


__all__ = ["complex_tables", "norm_rope", "norm_rope_qk", "norm_rope_reference", "unsupported", "unsupported_qk"]
