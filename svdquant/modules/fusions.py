"""Every run-time fusion on one model, in one place: what :func:`svdquant.fuse` / :func:`svdquant.unfuse` do to each
model they are given and what :func:`svdquant.optimize` fuses (the same call, with q/k RMSNorm + RoPE on where it
was timed). Each fusion lives in its own module (``fused.py``, ``modulations.py``, ``norm_rope.py``); the latter
two import diffusers' FLUX (and Qwen-Image) classes, so they are imported here only when called."""

from __future__ import annotations

from torch import nn


def fuse_model(model: nn.Module, *, gelu: bool = True, compiled_activations: bool = False, modulations: bool = False,
               norm_rope: bool | tuple[str, ...] = False) -> dict[str, int]:
    """The fusions ``model`` takes, as :func:`svdquant.fuse` documents them; how many of each. ``norm_rope``: True
    for every architecture's attention the op takes, or the architectures' names (``norm_rope.ARCHITECTURES``)."""
    from .fused import fuse
    from .modulations import fuse_modulations
    from .norm_rope import ARCHITECTURES, fuse_norm_rope

    architectures = ARCHITECTURES if norm_rope is True else tuple(norm_rope or ())
    return {**fuse(model, gelu=gelu, compiled_activations=compiled_activations),
            "modulations": fuse_modulations(model) if modulations else 0,
            "norm_rope": fuse_norm_rope(model, architectures) if architectures else 0}


def unfuse_model(model: nn.Module) -> dict[str, int]:
    """Every fusion of ``model`` undone; how many of each."""
    from .fused import unfuse
    from .modulations import unfuse_modulations
    from .norm_rope import unfuse_norm_rope

    norm_rope = unfuse_norm_rope(model)  # first: undoing the q/k/v stacks gives back the processors they wrapped
    return {**unfuse(model), "modulations": unfuse_modulations(model), "norm_rope": norm_rope}


__all__ = ["fuse_model", "unfuse_model"]
