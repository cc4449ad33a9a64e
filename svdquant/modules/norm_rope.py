"""FLUX's, Qwen-Image's and Z-Image's attention with q/k RMSNorm and the rotary embedding as one op
(``svdquant.fuse(pipe, norm_rope=True)``).

:class:`NormRopeFluxAttnProcessor` is diffusers' ``FluxAttnProcessor`` (0.42) with its ``norm_q`` / ``norm_k``,
the text stream's ``norm_added_q`` / ``norm_added_k``, their concatenation and ``apply_rotary_emb`` replaced by
:func:`svdquant.ops.norm_rope.norm_rope_qk`: on a GPU one Triton launch per stream, for q and k together, reads the
projections once and writes the attention's inputs once; elsewhere, and for a call the op cannot take, its torch
reference, which is diffusers' math to the bit. ``svdquant.optimize`` turns it on: a compiled FLUX.1-dev step on an
H100 took 89.03 ms with it against 91.39 without (BENCHMARKS.md, "Session 37").

:class:`NormRopeQwenAttnProcessor` is the same for Qwen-Image's double-stream attention (diffusers'
``QwenDoubleStreamAttnProcessor2_0``), whose rotary embedding is a complex product: inductor does not generate code
for complex operators, so compiled it runs as torch's own kernels around an fp32 copy of q and k and back. The op
computes the same bits from the product's real and imaginary parts, with diffusers' ``RMSNorm`` rounding
(``round_norm``). :class:`NormRopeZImageAttnProcessor` is the same for Z-Image's single-stream attention (a complex
table per batch entry). ``svdquant.optimize`` turns both on (:data:`OPTIMIZED`): on an H100 Z-Image's pipeline by
default took 2.107 s an image with it against 2.278 without, and the op did a Qwen-Image block's q and k in 0.054 ms
(BENCHMARKS.md, "Session 42"); Qwen-Image's pipeline is not yet timed with it.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.normalization import RMSNorm
from diffusers.models.transformers.transformer_flux import FluxAttention, FluxAttnProcessor, _get_qkv_projections
from diffusers.models.transformers.transformer_qwenimage import QwenDoubleStreamAttnProcessor2_0
from diffusers.models.transformers.transformer_z_image import ZSingleStreamAttnProcessor

from ..integrations.diffusers.compat import attention_reads_heads_first, has_hooks
from ..ops.norm_rope import complex_tables, norm_rope_qk, norm_rope_reference, unsupported_qk
from .fused_view import FusedViewProcessor

# The attentions the op takes, and those svdquant.optimize fuses: every one (FLUX.1 and Z-Image timed faster end to
# end, BENCHMARKS.md "Session 37" and "Session 42"; Qwen-Image's processor is Z-Image's design with a text stream)
ARCHITECTURES = ("flux", "qwenimage", "zimage")
OPTIMIZED = ARCHITECTURES


def _eps(norm: nn.Module, dtype: torch.dtype) -> float:
    return norm.eps if norm.eps is not None else torch.finfo(dtype).eps  # torch.nn.RMSNorm's default


def _on_original(name: str) -> property:
    """An attribute diffusers sets on a processor, kept on the wrapped diffusers processor."""
    return property(lambda self: getattr(self.original, name), lambda self, value: setattr(self.original, name, value))


class _AroundDiffusers:
    """Our processors' common part: diffusers' processor they stand in for, given back by unfuse and run for what
    they cannot take. The attention backend and parallel config that diffusers sets on a processor live on it."""

    def __init__(self, original):
        self.original = original

    _attention_backend = _on_original("_attention_backend")
    _parallel_config = _on_original("_parallel_config")


class NormRopeFluxAttnProcessor(_AroundDiffusers):
    """diffusers' ``FluxAttnProcessor`` with q/k RMSNorm + RoPE as one op (see the module doc). Calls it does not
    know (no rotary tables as a ``(cos, sin)`` pair) run diffusers' processor. Built by :func:`fuse_norm_rope` only,
    for attentions whose q/k norms share one eps (the op takes one)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        if not (isinstance(image_rotary_emb, tuple) and len(image_rotary_emb) == 2):
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        cos, sin = image_rotary_emb
        query, key, value, text_q, text_k, text_v = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        two = attn.added_kv_proj_dim is not None
        heads = query.shape[-1] // attn.head_dim  # this rank's heads under tensor parallelism, as diffusers counts
        heads_first = attention_reads_heads_first(self._attention_backend)  # SDPA's layout: no copy before it
        norms = (attn.norm_q, attn.norm_k) + ((attn.norm_added_q, attn.norm_added_k) if two else (None, None))
        q, k = _norm_rope_qk(query, key, text_q if two else None, text_k if two else None, norms, cos, sin, heads,
                             heads_first)
        value = value.unflatten(-1, (-1, attn.head_dim))
        if two:
            value = torch.cat([text_v.unflatten(-1, (-1, attn.head_dim)), value], dim=1)
        out = dispatch_attention_fn(q, k, value, attn_mask=attention_mask, backend=self._attention_backend,
                                    parallel_config=self._parallel_config)
        out = out.flatten(2, 3).to(q.dtype)
        if encoder_hidden_states is None:
            return out
        text_out, out = out.split_with_sizes([encoder_hidden_states.shape[1], out.shape[1] -
                                              encoder_hidden_states.shape[1]], dim=1)
        out = attn.to_out[1](attn.to_out[0](out.contiguous()))
        return out, attn.to_add_out(text_out.contiguous())


def _norm_rope_qk(query, key, text_q, text_k, norms, cos, sin, heads, heads_first, round_norm=False):
    """q and k through the op, a stream's two in one launch, where it takes them; else diffusers' math (decided from
    shapes: folded when traced)."""
    w_q, w_k, w_q2, w_k2 = (None if n is None else n.weight for n in norms)
    eps = _eps(norms[0], query.dtype)  # every norm's: fuse_norm_rope gives the processor only to such attentions
    if unsupported_qk(query, key, w_q, w_k, cos, sin, heads, text_q, text_k, w_q2, w_k2) is None:
        return norm_rope_qk(query, key, w_q, w_k, cos, sin, eps, heads, text_q, text_k, w_q2, w_k2,
                            heads_first=heads_first, round_norm=round_norm)
    return (norm_rope_reference(query, w_q, cos, sin, eps, heads, text_q, w_q2, round_norm),
            norm_rope_reference(key, w_k, cos, sin, eps, heads, text_k, w_k2, round_norm))


class NormRopeQwenAttnProcessor(_AroundDiffusers):
    """diffusers' ``QwenDoubleStreamAttnProcessor2_0`` with q/k RMSNorm + RoPE as one op (see the module doc): the
    same projections (through a stacked q/k/v's view where ``fuse`` made one), attention and output projections.
    Calls it does not know (no text stream, an external mask, rotary tables other than one complex ``[tokens,
    D / 2]`` table per stream, norm weights of another dtype than the input, whose product diffusers does not
    round) run diffusers' processor. Built by :func:`fuse_norm_rope` only."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, encoder_hidden_states_mask=None,
                 attention_mask=None, image_rotary_emb=None):
        norms = (attn.norm_q, attn.norm_k, attn.norm_added_q, attn.norm_added_k)
        if not _qwen_takes(image_rotary_emb, hidden_states, encoder_hidden_states) or attention_mask is not None or \
                any(n.weight.dtype != hidden_states.dtype for n in norms):
            return self.original(attn, hidden_states, encoder_hidden_states, encoder_hidden_states_mask,
                                 attention_mask, image_rotary_emb)
        # the tables are made per call, a small kernel a block once compiled: the transformer hands every block
        # diffusers' complex ones
        tables = complex_tables(image_rotary_emb[1], image_rotary_emb[0])  # text first, as the tokens are joined
        seq_txt = encoder_hidden_states.shape[1]
        if encoder_hidden_states_mask is not None:  # as diffusers builds it: the text's mask, then the image's tokens
            image_mask = hidden_states.new_ones(hidden_states.shape[:2], dtype=torch.bool)
            attention_mask = torch.cat([encoder_hidden_states_mask, image_mask], dim=1)[:, None, None, :]
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        text_q, text_k = attn.add_q_proj(encoder_hidden_states), attn.add_k_proj(encoder_hidden_states)
        text_v = attn.add_v_proj(encoder_hidden_states)
        head_dim = attn.inner_dim // attn.heads
        heads = query.shape[-1] // head_dim  # this rank's heads under tensor parallelism, as diffusers counts
        q, k = _norm_rope_qk(query, key, text_q, text_k, norms, *tables, heads,
                             attention_reads_heads_first(self._attention_backend), round_norm=True)
        value = torch.cat([text_v.unflatten(-1, (-1, head_dim)), value.unflatten(-1, (-1, head_dim))], dim=1)
        out = dispatch_attention_fn(q, k, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False,
                                    backend=self._attention_backend, parallel_config=self._parallel_config)
        out = out.flatten(2, 3).to(q.dtype)
        image_out = attn.to_out[0](out[:, seq_txt:].contiguous())
        if len(attn.to_out) > 1:
            image_out = attn.to_out[1](image_out)  # dropout
        return image_out, attn.to_add_out(out[:, :seq_txt].contiguous())


class NormRopeZImageAttnProcessor(_AroundDiffusers):
    """diffusers' ``ZSingleStreamAttnProcessor`` (Z-Image) with q/k RMSNorm + RoPE as one op, as
    :class:`NormRopeQwenAttnProcessor` (one stream; its complex tables ``[B, tokens, D / 2]``). Calls without such
    tables, or with norm weights of another dtype than the input, run diffusers' processor."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, freqs_cis=None):
        norms = (attn.norm_q, attn.norm_k)
        if not (isinstance(freqs_cis, torch.Tensor) and freqs_cis.is_complex() and freqs_cis.ndim == 3 and
                freqs_cis.shape[:2] == hidden_states.shape[:2]) or \
                any(n.weight.dtype != hidden_states.dtype for n in norms):
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, freqs_cis)
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        q, k = _norm_rope_qk(query, key, None, None, (*norms, None, None), *complex_tables(freqs_cis), attn.heads,
                             attention_reads_heads_first(self._attention_backend), round_norm=True)
        if attention_mask is not None and attention_mask.ndim == 2:  # [batch, tokens] as diffusers widens it
            attention_mask = attention_mask[:, None, None, :]
        out = dispatch_attention_fn(q, k, value.unflatten(-1, (attn.heads, -1)), attn_mask=attention_mask,
                                    dropout_p=0.0, is_causal=False, backend=self._attention_backend,
                                    parallel_config=self._parallel_config)
        out = attn.to_out[0](out.flatten(2, 3).to(q.dtype))
        return attn.to_out[1](out) if len(attn.to_out) > 1 else out  # dropout


def _qwen_takes(rotary, hidden_states, encoder_hidden_states) -> bool:
    """A text stream and Qwen-Image's complex tables ``(image, text)``, ``[tokens, D / 2]`` each, for these tokens
    (decided from shapes: folded when traced)."""
    if encoder_hidden_states is None or not (isinstance(rotary, (tuple, list)) and len(rotary) == 2):
        return False
    image, text = rotary
    return all(isinstance(t, torch.Tensor) and t.is_complex() and t.ndim == 2 for t in rotary) and \
        (image.shape[0], text.shape[0]) == (hidden_states.shape[1], encoder_hidden_states.shape[1])


def _plain_norms(norms) -> bool:
    """Norms the op can stand for: no hooks and no forward of their own (the op reads their weights), one eps."""
    return all("forward" not in n.__dict__ and not has_hooks(n) and not n._forward_hooks and not n._forward_pre_hooks
               for n in norms) and len({n.eps for n in norms}) == 1


# diffusers' processors of attentions whose rotary embedding is a complex product: the q/k norms' names, our processor
COMPLEX_ROPE = {"qwenimage": (QwenDoubleStreamAttnProcessor2_0, ("norm_q", "norm_k", "norm_added_q", "norm_added_k"),
                              NormRopeQwenAttnProcessor),
                "zimage": (ZSingleStreamAttnProcessor, ("norm_q", "norm_k"), NormRopeZImageAttnProcessor)}


def _takes_complex(attn, processor, architecture: str) -> bool:
    """diffusers' processor of ``architecture`` and q/k norms that are diffusers' ``RMSNorm`` with a weight and no
    bias."""
    diffusers_processor, names, _ = COMPLEX_ROPE[architecture]
    norms = [getattr(attn, name, None) for name in names]
    return type(processor) is diffusers_processor and all(
        type(n) is RMSNorm and n.weight is not None and getattr(n, "bias", None) is None for n in norms) and \
        _plain_norms(norms)


def _takes(attn) -> bool:
    """diffusers' processor, and q/k norms that are plain ``torch.nn.RMSNorm``s with one eps the op can stand for
    (no hooks, no forward of their own: the op reads their weights)."""
    norms = [attn.norm_q, attn.norm_k] + ([attn.norm_added_q, attn.norm_added_k] if attn.added_kv_proj_dim else [])
    return type(attn.processor) is FluxAttnProcessor and all(type(n) is nn.RMSNorm for n in norms) and \
        _plain_norms(norms)


def fuse_norm_rope(model: nn.Module, architectures: tuple[str, ...] = ARCHITECTURES) -> int:
    """Every attention of ``model`` of the ``architectures`` (:data:`ARCHITECTURES`) with diffusers' processor and
    the q/k norms the op stands for given its processor: FLUX's :class:`NormRopeFluxAttnProcessor`, Qwen-Image's
    :class:`NormRopeQwenAttnProcessor` and Z-Image's :class:`NormRopeZImageAttnProcessor` (inside the view processor
    of a stacked q/k/v); returns how many."""
    done = 0
    for m in model.modules():
        if "flux" in architectures and isinstance(m, FluxAttention) and _takes(m):
            m.processor = NormRopeFluxAttnProcessor(m.processor)
            done += 1
        processor = getattr(m, "processor", None)
        view = isinstance(processor, FusedViewProcessor)
        inner = processor.__dict__["inner"] if view else processor
        for architecture in COMPLEX_ROPE.keys() & set(architectures):
            if _takes_complex(m, inner, architecture):
                ours = COMPLEX_ROPE[architecture][2](inner)
                if view:
                    processor.__dict__["inner"] = ours
                else:
                    m.processor = ours
                done += 1
    return done


def unfuse_norm_rope(model: nn.Module) -> int:
    done = 0
    for m in model.modules():
        processor = getattr(m, "processor", None)
        if isinstance(processor, _AroundDiffusers):
            m.processor = processor.original
            done += 1
        elif isinstance(processor, FusedViewProcessor) and isinstance(processor.__dict__["inner"], _AroundDiffusers):
            processor.__dict__["inner"] = processor.__dict__["inner"].original
            done += 1
    return done


__all__ = ["ARCHITECTURES", "NormRopeFluxAttnProcessor", "NormRopeQwenAttnProcessor", "NormRopeZImageAttnProcessor",
           "OPTIMIZED", "fuse_norm_rope", "unfuse_norm_rope"]
