"""Swapping a diffusers attention processor and back: what the new one must carry over from the old.

diffusers keeps an attention's backend (``set_attention_backend``) and context-parallel config on its processor, so a
processor svdquant puts in place (:mod:`svdquant.modules.flux_qk`) takes them from the one it replaces, and gives
back any set since when diffusers' processor returns (``fuse_qk``'s undo, and :func:`svdquant.modules.fused.unfuse`).
"""

from __future__ import annotations

import torch.nn as nn

from .._state import take


def carry_dispatch(old, new) -> None:
    """``old``'s attention backend and context-parallel config onto ``new``, a processor put in its place (diffusers
    keeps them per processor: ``set_attention_backend``, context parallelism)."""
    new._attention_backend = getattr(old, "_attention_backend", None)
    new._parallel_config = getattr(old, "_parallel_config", None)


def restore_qk_processor(attn: nn.Module) -> bool:
    """diffusers' processor back where :func:`svdquant.modules.flux_qk.fuse_qk` replaced it (a backend set since
    carries over); whether there was one."""
    processor = take(attn, "qk_processor")
    if processor is None:
        return False
    carry_dispatch(attn.processor, processor)
    attn.processor = processor
    return True
