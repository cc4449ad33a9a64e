"""Fused q/k/v for attentions whose diffusers processor calls ``to_q``, ``to_k`` and ``to_v`` one by one.

FLUX's, FLUX.2's and Wan's attentions read a stacked ``to_qkv`` themselves once ``fused_projections`` is set, and SD3's
joint attention gets :class:`~svdquant.modules.fused.FusedJointAttnProcessor`. The others (Qwen-Image's double-stream
attention, Z-Image's, the self-attention of PixArt-Σ, SANA and SDXL's UNet) have processors that only ever call the three
projections. Rather than a copy of each processor, :class:`FusedViewProcessor` wraps diffusers' own: it hands it a
:class:`_FusedView` of the attention whose ``to_q(x)`` runs the stacked GEMM once and keeps k and v for the
``to_k(x)`` / ``to_v(x)`` calls that follow on the same tensor. Anything else, including a projection of another
tensor (a cross-attention's text), goes to the attention itself, so the result is the unfused one whatever the
processor does. The view is made per call and holds the call's tensors only: no module state changes in forward.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn as nn

# (fused attribute on the attention, the three projections it stacks), per stream: diffusers' names
# (Attention.fuse_projections, FluxAttention)
PROJECTIONS = (("to_qkv", ("to_q", "to_k", "to_v")), ("to_added_qkv", ("add_q_proj", "add_k_proj", "add_v_proj")))
# diffusers' processors known to call the three projections of a stream on one tensor (so the stacked GEMM's k
# and v are used, not computed for nothing): Qwen-Image, Z-Image, the self-attention of PixArt-Σ, SANA and SDXL
VIEW_PROCESSORS = frozenset({"QwenDoubleStreamAttnProcessor2_0", "ZSingleStreamAttnProcessor", "AttnProcessor2_0",
                             "SanaLinearAttnProcessor2_0",  # and norm_rope.py's around Qwen-Image's and Z-Image's:
                             "NormRopeQwenAttnProcessor", "NormRopeZImageAttnProcessor"})


class _FusedView:
    """The attention as its processor sees it for one call (see the module doc)."""

    def __init__(self, attn: nn.Module):
        self._attn = attn
        self._last: dict[str, tuple[torch.Tensor, tuple[torch.Tensor, ...]]] = {}

    def __getattr__(self, name):
        return getattr(self._attn, name)

    def _project(self, stream: int, index: int, x: torch.Tensor) -> torch.Tensor:
        fused_name, names = PROJECTIONS[stream]
        fused = self._attn.__dict__["_modules"].get(fused_name)
        if fused is None:
            return getattr(self._attn, names[index])(x)
        last = self._last.get(fused_name)
        if index == 0 or last is None or last[0] is not x:
            if index != 0:  # k or v of a tensor q was not computed for: the member alone
                return getattr(self._attn, names[index])(x)
            # by the members' widths: k and v may be narrower than q (fewer key/value heads)
            last = (x, fused(x).split([m.out_features for m in fused.members], dim=-1))
            self._last[fused_name] = last
        return last[1][index]

    def to_q(self, x):
        return self._project(0, 0, x)

    def to_k(self, x):
        return self._project(0, 1, x)

    def to_v(self, x):
        return self._project(0, 2, x)

    def add_q_proj(self, x):
        return self._project(1, 0, x)

    def add_k_proj(self, x):
        return self._project(1, 1, x)

    def add_v_proj(self, x):
        return self._project(1, 2, x)


class FusedViewProcessor:
    """diffusers' processor of the attention, called with a :class:`_FusedView` (make one with :func:`view_processor`).
    The attention backend that ``set_attention_backend`` writes on the processor goes to the wrapped one, which
    dispatches on it."""

    def __init__(self, inner):
        self.__dict__["inner"] = inner

    def __getattr__(self, name):
        inner = self.__dict__.get("inner")  # absent while copy / pickle probe a bare instance
        if inner is None:
            raise AttributeError(name)
        return getattr(inner, name)

    def __reduce__(self):  # copies and pickles rebuild through view_processor (its classes are made at run time)
        return view_processor, (self.__dict__["inner"],)

    def __setattr__(self, name, value):
        setattr(self.__dict__["inner"], name, value)


_VIEW_CLASSES: dict[type, type] = {}


def view_processor(inner) -> FusedViewProcessor:
    """``inner`` wrapped. Its class has ``inner``'s ``__call__`` signature: diffusers' ``Attention.forward`` passes a
    processor only the keyword arguments that ``inspect.signature(processor.__call__)`` names, and a class-level
    ``__call__`` is what ``torch.compile`` traces through."""
    cls = _VIEW_CLASSES.get(type(inner))
    if cls is None:
        def __call__(self, attn, *args, **kwargs):
            return self.__dict__["inner"](_FusedView(attn), *args, **kwargs)

        __call__.__signature__ = inspect.signature(type(inner).__call__)
        cls = type(f"FusedView{type(inner).__name__}", (FusedViewProcessor,), {"__call__": __call__})
        _VIEW_CLASSES[type(inner)] = cls
    return cls(inner)


def viewable(attn: nn.Module) -> bool:
    """A self-attention whose processor is one of :data:`VIEW_PROCESSORS` (a cross-attention's k and v read the
    text: stacking them with q would compute two projections for nothing)."""
    processor = getattr(attn, "processor", None)
    return type(processor).__name__ in VIEW_PROCESSORS and not getattr(attn, "is_cross_attention", False)
