"""svdquant's attention backends for diffusers: ``model.set_attention_backend(name)`` on any diffusers model, or
through ``svdquant.optimize(pipe, attention=...)``. ``svdquant_int8`` is registered when diffusers loads its attention
dispatcher (:func:`register`); ``svdquant_flash4`` when :func:`register_flash4` is called (``optimize`` calls it),
which also checks where flash-attn-4 can run.

* ``svdquant_int8`` (``attention="int8"``): INT8 Q·Kᵀ per token with a 16-bit P·V
  (:mod:`svdquant.ops.int8_attention`; its quality cost is in BENCHMARKS.md).
* ``svdquant_flash4`` (``attention="flash4"``, and a candidate of ``attention="auto"`` where it can run): exact
  attention by flash-attn-4's CuTe DSL kernels (:mod:`svdquant.ops.flash4_attention`), if installed.

Calls a kernel cannot take (a mask it does not handle, dropout, an unsupported head size or dtype, tensors off the
GPU) run diffusers' native backend (PyTorch's SDPA) instead: the same attention, exactly, and decided from shapes
and arguments, so a compiled model decides it once while tracing.
"""

from __future__ import annotations

import torch

from ...ops import flash4_attention as flash4
from ...ops.int8_attention import int8_attention_unchecked, unsupported
from . import compat

BACKEND = "svdquant_int8"
FLASH4 = "svdquant_flash4"


def _native(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, return_lse, _parallel_config):
    return compat.native_attention_backend()(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                             is_causal=is_causal, scale=scale, enable_gqa=enable_gqa,
                                             return_lse=return_lse, _parallel_config=_parallel_config)


def svdquant_int8_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask=None,
                            dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
                            enable_gqa: bool = False, return_lse: bool = False, _parallel_config=None):
    """diffusers' backend signature (``[B, S, H, D]`` tensors): INT8 Q·Kᵀ per token with a 16-bit P·V
    (:mod:`svdquant.ops.int8_attention`), or the native backend for what it cannot take."""
    if not return_lse and _parallel_config is None and \
            unsupported(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa) is None:
        return int8_attention_unchecked(query, key, value, scale, attn_mask)
    return _native(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, return_lse,
                   _parallel_config)


def svdquant_flash4_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask=None,
                              dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
                              enable_gqa: bool = False, return_lse: bool = False, _parallel_config=None):
    """diffusers' backend signature (``[B, S, H, D]`` tensors): flash-attn-4's forward
    (:mod:`svdquant.ops.flash4_attention`), or the native backend for what it cannot take."""
    if not return_lse and _parallel_config is None and \
            flash4.unsupported(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa) is None:
        return flash4.attention(query, key, value, scale)
    return _native(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, return_lse,
                   _parallel_config)


def register() -> str:
    """Add the INT8 backend to diffusers' dispatcher (idempotent); returns its name."""
    compat.add_attention_backend(BACKEND, svdquant_int8_attention)
    return BACKEND


def register_flash4() -> str:
    """Add the flash-attn-4 backend to diffusers' dispatcher (idempotent) and check every visible GPU for it
    (:func:`svdquant.ops.flash4_attention.probe_devices`: imports flash-attn-4); returns its name. Calls on a device
    where it cannot run (not installed, another GPU, the CPU) run the native backend."""
    flash4.probe_devices()
    compat.add_attention_backend(FLASH4, svdquant_flash4_attention)
    return FLASH4


__all__ = ["BACKEND", "FLASH4", "register", "register_flash4", "svdquant_flash4_attention",
           "svdquant_int8_attention"]
