"""FLUX.1's q / k RMSNorm and rotary embedding in the stacked q/k/v GEMM's epilogue (``fuse(qk_epilogue=True)``).

Between its projections and the attention, diffusers' FLUX attention (``FluxAttnProcessor``, 0.42) normalizes every
head of q and k (torch's ``RMSNorm``, eps 1e-6, a learned weight) and rotates their (even, odd) column pairs by each
token's angles (``apply_rotary_emb``): one more read and write of q and k per attention, in 16 bits, after the GEMM
wrote them. With the stacked runner's epilogue doing both on the fp32 tile before it is rounded (:class:`QkNormRope`,
:func:`svdquant.ops.reference.qk_norm_rope`), q and k leave the GEMM ready for the attention. The text stream's
tokens come first in the joint sequence: its GEMM rotates from position 0, the image stream's from the text length;
a single block's stack (q/k/v and the MLP's up projection, one GEMM over both streams) from 0.

:class:`QkEpilogueFluxAttnProcessor` replaces diffusers' processor on the FLUX.1 attentions :func:`fuse_qk` finds
fused (``svdquant.fuse`` calls it after :func:`svdquant.modules.fused.fuse`, whose ``unfuse`` also puts diffusers'
processors back); a single block's stacked forward (``compat.stacked_single_block_forward``) passes the spec to its
stack. A stacked layer whose runner cannot apply it (the CPU reference, sm_80-89's narrower tile) applies the torch
reference after its GEMM, so the result does not depend on where it runs beyond rounding. Opt-in until an H200
measures the step faster (NOTES-GPU.md).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .._state import peek, state, take
from ..ops.runner import QkNormRope
from .fused import FusedSVDQLinear, Projected
from .processors import carry_dispatch, restore_qk_processor
from .linear import bump_revision


def qk_spec(norm_q: nn.Module, norm_k: nn.Module, rotary, qk_cols: int, seq: int, pos0: int) -> QkNormRope:
    """The epilogue's arguments for q / k normed by ``norm_q`` / ``norm_k`` (``RMSNorm``s) and rotated by
    ``rotary`` (diffusers' ``(cos, sin)`` [positions, D], each angle repeated for its pair: read every other one)."""
    cos, sin = rotary
    return QkNormRope(norm_q.weight, norm_k.weight, cos[:, ::2], sin[:, ::2], qk_cols, seq, pos0, float(norm_q.eps))


def _qk_cols(stack: FusedSVDQLinear) -> int:
    return stack.members[0].out_features + stack.members[1].out_features


class QkEpilogueFluxAttnProcessor:
    """diffusers' ``FluxAttnProcessor`` (0.42) for fused projections whose q and k come normed and rotated: by the
    stacked GEMMs called here with the spec, or (a stacked single block) by the block's own GEMM."""

    _attention_backend = None  # diffusers' attention dispatch reads these (set_attention_backend, context
    _parallel_config = None    # parallelism): fuse_qk carries them over from the processor it replaces
    normed_qk = True  # a stacked single block's forward asks for the epilogue only under this processor (compat)

    def __init__(self):
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        self._dispatch = dispatch_attention_fn  # resolved here: the call does only compute

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        if image_rotary_emb is None:  # nothing to rotate: diffusers' processor, which norms q and k itself
            return peek(attn).qk_processor(attn, hidden_states, encoder_hidden_states, attention_mask, None)
        if isinstance(attn.to_qkv, Projected):  # a stacked single block: its GEMM did q and k (its forward)
            query, key, value = hidden_states.chunk(3, dim=-1)
        else:
            n_txt = encoder_hidden_states.shape[1] if encoder_hidden_states is not None else 0
            spec = qk_spec(attn.norm_q, attn.norm_k, image_rotary_emb, _qk_cols(attn.to_qkv), hidden_states.shape[1],
                           n_txt)
            query, key, value = attn.to_qkv(hidden_states, qk=spec).chunk(3, dim=-1)
            if encoder_hidden_states is not None:
                spec = qk_spec(attn.norm_added_q, attn.norm_added_k, image_rotary_emb, _qk_cols(attn.to_added_qkv),
                               n_txt, 0)
                eq, ek, ev = attn.to_added_qkv(encoder_hidden_states, qk=spec).chunk(3, dim=-1)
                query, key, value = (torch.cat([e, t], dim=1) for e, t in ((eq, query), (ek, key), (ev, value)))
        query, key, value = (t.unflatten(-1, (-1, attn.head_dim)) for t in (query, key, value))
        out = self._dispatch(query, key, value, attn_mask=attention_mask, backend=self._attention_backend,
                                    parallel_config=self._parallel_config)
        out = out.flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is None:
            return out
        encoder_out, out = out.split_with_sizes([n_txt, out.shape[1] - n_txt], dim=1)
        out = attn.to_out[1](attn.to_out[0](out.contiguous()))
        return out, attn.to_add_out(encoder_out.contiguous())


def _eligible(attn) -> bool:
    """A FLUX.1 attention with diffusers' processor, its projections fused by svdquant, RMS norms on q and k."""
    from diffusers.models.normalization import RMSNorm
    from diffusers.models.transformers.transformer_flux import FluxAttention, FluxAttnProcessor

    if not isinstance(attn, FluxAttention) or type(attn.processor) is not FluxAttnProcessor or \
            not attn.fused_projections or not isinstance(attn.to_qkv, (FusedSVDQLinear, Projected)):
        return False
    norms = [attn.norm_q, attn.norm_k]
    if attn.added_kv_proj_dim is not None:
        if not isinstance(getattr(attn, "to_added_qkv", None), FusedSVDQLinear):
            return False
        norms += [attn.norm_added_q, attn.norm_added_k]
    # FLUX's attention makes torch's RMSNorm (diffusers 0.42), older ones diffusers' own: the same computation; one
    # eps for the epilogue (q's is passed for both)
    return all(isinstance(n, (RMSNorm, nn.RMSNorm)) and getattr(n, "weight", None) is not None and
               getattr(n, "eps", None) == norms[0].eps for n in norms) and norms[0].eps is not None


def single_block_spec(block: nn.Module, rotary, seq: int) -> QkNormRope:
    """A stacked single block's spec: the whole sequence (text, then image) in one GEMM, positions from 0. Kept on
    the block by :func:`fuse_qk` (a module-level function: a copied model's blocks read their own norms)."""
    return qk_spec(block.attn.norm_q, block.attn.norm_k, rotary, _qk_cols(peek(block).stack), seq, 0)


def fuse_qk(model: nn.Module) -> int:
    """Move q / k RMSNorm and RoPE into the stacked GEMMs of every fused FLUX.1 attention (after
    :func:`~svdquant.modules.fuse_projections`); returns how many attentions changed. :func:`unfuse_qk` undoes it."""
    stacked = set()  # single blocks' attentions whose q / k the block's stack will do
    for block in model.modules():
        if peek(block).stack is not None and _eligible(block.attn):
            state(block).qk = single_block_spec
            stacked.add(id(block.attn))
    n = 0
    for attn in model.modules():
        if _eligible(attn) and peek(attn).qk_processor is None and \
                (not isinstance(attn.to_qkv, Projected) or id(attn) in stacked):
            new = QkEpilogueFluxAttnProcessor()
            carry_dispatch(attn.processor, new)
            state(attn).qk_processor = attn.processor
            attn.processor = new  # not set_processor: it would drop nothing, but logs
            n += 1
    if n:
        bump_revision()  # the processors changed: captured CUDA graphs are stale
    return n


def unfuse_qk(model: nn.Module) -> int:
    """Undo :func:`fuse_qk`: diffusers' processors back, the stacks called without the spec."""
    n = 0
    for m in model.modules():
        take(m, "qk")
        n += restore_qk_processor(m)
    if n:
        bump_revision()
    return n
