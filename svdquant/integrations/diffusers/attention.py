"""svdquant's INT8 attention as a diffusers attention backend: ``model.set_attention_backend("svdquant_int8")`` on
any diffusers model once ``svdquant`` is imported (:func:`register` runs when diffusers loads its attention
dispatcher), or ``svdquant.optimize(pipe, attention="int8")``.

Calls the kernel cannot take (a mask other than one per key, dropout, a head size other than 32, 64 or 128, 32-bit
tensors on a GPU) run diffusers' native backend (PyTorch's SDPA) instead: the same attention, exactly, and decided
from shapes and arguments, so a compiled model decides it once while tracing.
"""

from __future__ import annotations

import torch

from ...ops.int8_attention import int8_attention_unchecked, unsupported
from . import compat

BACKEND = "svdquant_int8"


def svdquant_int8_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask=None,
                            dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
                            enable_gqa: bool = False, return_lse: bool = False, _parallel_config=None):
    """diffusers' backend signature (``[B, S, H, D]`` tensors): INT8 Q·Kᵀ per token with a 16-bit P·V
    (:mod:`svdquant.ops.int8_attention`), or the native backend for what it cannot take."""
    if not return_lse and _parallel_config is None and \
            unsupported(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa) is None:
        return int8_attention_unchecked(query, key, value, scale, attn_mask)
    return compat.native_attention_backend()(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                  enable_gqa=enable_gqa, return_lse=return_lse, _parallel_config=_parallel_config)


def register() -> str:
    """Add the backend to diffusers' dispatcher (idempotent); returns its name."""
    compat.add_attention_backend(BACKEND, svdquant_int8_attention)
    return BACKEND


__all__ = ["BACKEND", "register", "svdquant_int8_attention"]
