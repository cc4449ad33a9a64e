"""FLUX.1's adaLN modulations, all computed at the start of the step in one weight-only GEMV.

Every adaLN linear of FLUX.1 (each double block's ``norm1`` and ``norm1_context``, each single block's ``norm``)
reads the same ``silu(temb)``: one token per image and 3,072 channels, into 18,432 or 9,216 modulation rows, ~1 M
rows in all (1.6 GB of 4-bit codes). Run where diffusers runs them, they are 76 launches of a latency-bound GEMV:
2.8 ms of a 96 ms FLUX.1-dev step on an H200 for bytes that take ~0.4 ms to read (NOTES-GPU.md, session 23).
:func:`fuse_modulations` stacks them (:class:`~svdquant.modules.fused.FusedSVDQLinear` over the W4A16 runners: one
launch over all rows, the members' codes rows of the stack's), and the model's timestep embedding returns
``[silu(temb) | every modulation]`` (a forward hook on ``time_text_embed``). Each norm then reads its row of that
(each norm type's modulations a region of equal rows) instead of running its linear, and ``norm_out`` (16-bit)
applies its linear to the ``silu(temb)`` columns (their classes swapped to ``compat.modulations_ahead_class``'s:
diffusers' forwards of the three norms, reading precomputed modulations; one class per norm type, so a regional
compile traces each once). The same math: each modulation row is the same dot product of the same input, so up to
16 images a call the step's output is bit for bit the same; beyond, the stack runs 16 images a launch where its
members each dequantize for cuBLAS (within bf16 rounding).

Applies to a FLUX.1 transformer (``FluxTransformer2DModel``) whose adaLN linears are weight-only SVDQLinear layers
without a branch and whose modules carry no offload hook (the stack stays where the layers are); otherwise nothing
changes (it returns 0). A LoRA added to one of them later runs the members in turn (one launch again once it is
gone). Offloading enabled after fusing would rebuild the stack at every onload (a 1.6 GB concatenation beside the
members' codes): unfuse first. :func:`unfuse_modulations` undoes it; the layers stay the modules of record (state
dict, checkpoints, LoRAs).
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._state import peek, state, take
from ..integrations.diffusers import compat  # diffusers' internals go through compat
from .fused import FusedSVDQLinear, _release
from .linear import SVDQLinear, bump_revision


def _norms(model: nn.Module):
    """``([norm], norm_out)`` of a FLUX.1 transformer, its blocks' norms in order; None for another model or one
    whose norms diffusers' FLUX.1 would not build."""
    from diffusers.models.normalization import AdaLayerNormContinuous, AdaLayerNormZero, AdaLayerNormZeroSingle
    from diffusers.models.transformers.transformer_flux import FluxTransformer2DModel

    if type(model) is not FluxTransformer2DModel or type(getattr(model, "norm_out", None)) is not \
            AdaLayerNormContinuous:
        return None
    found = []
    for block in model.transformer_blocks:
        for norm in (block.norm1, block.norm1_context):
            if type(norm) is not AdaLayerNormZero or norm.emb is not None:
                return None
            found.append(norm)
    for block in model.single_transformer_blocks:
        if type(block.norm) is not AdaLayerNormZeroSingle:
            return None
        found.append(block.norm)
    return found, model.norm_out


def _applies(model: nn.Module, norms) -> bool:
    """Blocks whose adaLN linears are all weight-only quantized layers without a branch (a LoRA), no offload hook
    anywhere (the stack would stay on the device), and no norm whose forward something else replaced."""
    members = [n.linear for n in norms]
    return bool(members) and all(isinstance(m, SVDQLinear) and m.activations is None and m.branch()[0] is None
                                 for m in members) \
        and not any(compat.has_hooks(m) for m in model.modules()) \
        and not any("forward" in n.__dict__ for n in [*norms, model.norm_out])


def fuse_modulations(model: nn.Module) -> int:
    """Compute ``model``'s adaLN modulations ahead in one stacked GEMV (see the module doc); returns how many adaLN
    linears that covers (0: not a FLUX.1 transformer this applies to; the count again if already done)."""
    done = peek(model).modulations
    if done is not None:
        return len(done[0].members)
    plan = _norms(model)
    if plan is None or not _applies(model, plan[0]):
        return 0
    norms, norm_out = plan
    members = [n.linear for n in norms]
    types = list(dict.fromkeys(type(n) for n in norms))  # the double blocks' norms, then the single blocks'
    if any(len({n.linear.out_features for n in norms if type(n) is t}) > 1 for t in types):
        return 0  # a norm type's rows of unequal widths: no region of equal rows
    try:
        stack = FusedSVDQLinear(members)
    except ValueError:  # layers of two formats or group sizes
        return 0
    width = members[0].in_features
    start = width  # the modulations follow silu(temb) in the embedding's output, each norm type's in one region
    swapped = {}
    for t in types:
        group = [n for n in norms if type(n) is t]  # consecutive in the stack, as in the blocks
        for row, norm in enumerate(group):
            # the row a buffer, the region ints shared by the type: ints of its own would be constants of the
            # compiled block, one compile per block
            norm.register_buffer("svdq_row", torch.tensor([row], device=norm.linear.device), persistent=False)
            norm.svdq_region = (start, len(group))
        start += len(group) * group[0].linear.out_features
    norm_out.svdq_width = width
    for norm in [*norms, norm_out]:
        swapped[norm] = type(norm)
        norm.__class__ = compat.modulations_ahead_class(type(norm))  # h-diffusers
    hook = model.time_text_embed.register_forward_hook(functools.partial(_ahead, stack))
    state(model).modulations = (stack, hook, swapped)
    bump_revision()  # forwards were swapped: captured CUDA graphs are stale
    return len(members)


def _ahead(stack: FusedSVDQLinear, module: nn.Module, args, temb: torch.Tensor) -> torch.Tensor:
    """The timestep embedding's output replaced by ``[silu(temb) | every adaLN modulation]``."""
    s = F.silu(temb)
    return torch.cat([s, stack(s)], -1)


def unfuse_modulations(model: nn.Module) -> int:
    """Undo :func:`fuse_modulations`; returns how many adaLN linears run on their own again."""
    done = peek(model).modulations
    if done is None:
        return 0
    stack, hook, swapped = done
    wrapped = [cls.__name__ for n, cls in swapped.items() if "forward" in n.__dict__]
    if wrapped:
        raise RuntimeError(f"a hook replaced the forward of a fused {wrapped[0]} after svdquant.fuse(modulations=True) "
                           "(a cache or offload hook): remove it before unfusing")
    take(model, "modulations")
    hook.remove()
    for norm, cls in swapped.items():
        norm.__class__ = cls
        norm._buffers.pop("svdq_row", None)
        norm.__dict__.pop("svdq_region", None)
        norm.__dict__.pop("svdq_width", None)
    _release(stack)  # back to their own codes
    bump_revision()
    return len(stack.members)
