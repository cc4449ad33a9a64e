"""How :func:`svdquant.optimize` compiles a denoiser (its ``compile=`` argument).

* ``"blocks"`` (``True``, the default): each repeated block through ``torch.compile`` on its own, as diffusers'
  ``compile_repeated_blocks`` does. The blocks share one compiled graph per block class, so the first call is
  shorter.
* ``"model"``: the denoiser's whole forward as one graph, as flux-fast compiles FLUX. Inductor then also fuses
  across the blocks, e.g. a block's last gated residual add into the next block's LayerNorm, which a regional compile
  keeps apart. On an H100 the same graph (compiled by a benchmark's variant, not yet through ``optimize``) took a
  FLUX.1-dev step from 91.1 to 89.0 ms (its elementwise kernels from 11.7 to 9.8 ms), and its first call 165 s after
  the blocks' 77 s in one process (BENCHMARKS.md, "Session 34").

Both run inductor with :data:`COMPILE_OPTIONS` and static shapes. A call through hooks that move weights or skip
blocks (offloading, a cache added later) runs the whole forward eagerly: a graph traced without them would ignore
them (dynamo does not guard on module hooks by default).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from ..integrations.diffusers.compat import has_hooks, repeated_block_names
from .graphs import StepGraphs

# Inductor's coordinate-descent search of block sizes for the Triton kernels it writes around the quantized ones (the
# norms and modulations, q/k RMSNorm + RoPE, the gated residual adds). On an H100 it took that class of a FLUX.1-dev
# step from 8.45 to 6.44 ms (BENCHMARKS.md, "Session 30"); its cost is a longer first compile, and inductor caches
# what it found. torchao's quantize_ turns the same two flags on process-wide (its recommended_inductor_config_setter);
# here they apply to what svdquant compiles and nothing else.
COMPILE_OPTIONS = {"coordinate_descent_tuning": True, "coordinate_descent_check_all_directions": True}
BLOCKS, MODEL = "blocks", "model"


def compile_mode(compile) -> str | None:
    """``compile=`` of :func:`svdquant.optimize` as a mode (``"blocks"``, ``"model"`` or None), checked."""
    if compile is True or compile == BLOCKS:
        return BLOCKS
    if compile is False:
        return None
    if compile == MODEL:
        return MODEL
    raise ValueError(f"compile={compile!r}: use True (each repeated block: the default), {MODEL!r} (the whole "
                     "denoiser as one graph: a faster step, a longer first call) or False")


def hooked(modules) -> bool:
    """Hooks that move weights between calls (accelerate's offload, diffusers' group offloading) or decide on the
    host what runs (diffusers' caches: First-Block Cache skips blocks by comparing tensors): a graph would replay
    stale memory or one fixed path. Checked at every call, on every module (a hook may be added after optimize)."""
    return any(map(has_hooks, modules))


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks to compile: the adapter's stacks where svdquant knows the model, else diffusers'."""
    from ..models import get_adapter

    try:
        adapter = get_adapter(model)
    except (TypeError, ValueError):
        adapter = None
    if adapter is not None and adapter.stacks:
        return [block for _, block in adapter.blocks(model)]
    names = repeated_block_names(model)
    return [m for m in model.modules() if type(m).__name__ in names]


class CompiledForward:
    """A denoiser's forward compiled as one graph; calls through hooks run the ``eager`` forward instead."""

    def __init__(self, model: nn.Module, eager: Callable, options: dict):
        self.eager, self.modules = eager, list(model.modules())
        self.compiled = torch.compile(eager, dynamic=False, options=options)

    def __call__(self, *args, **kwargs):
        if hooked(self.modules):
            return self.eager(*args, **kwargs)
        return self.compiled(*args, **kwargs)

    def __deepcopy__(self, memo):
        # the compiled function belongs to this model's forward: a copy holding it would run the original's weights
        raise TypeError("a model svdquant.optimize compiled as a whole (compile='model') cannot be deep-copied: copy "
                        "it before optimize, or call svdquant.deoptimize(model) first")


def compile_blocks(model: nn.Module, options: dict | None = None) -> int:
    """``torch.compile`` each repeated block in place (static shapes; inductor ``options``, default
    :data:`COMPILE_OPTIONS`: ``{}`` compiles at inductor's defaults, as a benchmark's 16-bit baseline does); returns
    how many. A whole-model compile made before goes."""
    options = dict(COMPILE_OPTIONS if options is None else options)
    changed = _uncompile_model(model)
    blocks = repeated_blocks(model)
    for block in blocks:
        if getattr(block, "_compiled_call_impl", None) is None:
            block.compile(dynamic=False, options=options)
            changed = True
    if changed:
        _drop_graphs(model)
    return len(blocks)


def compile_model(model: nn.Module, options: dict | None = None) -> None:
    """``model``'s whole forward as one ``torch.compile`` graph (inductor ``options``, default
    :data:`COMPILE_OPTIONS`), under its CUDA-graph cache if it has one. Compiled blocks made before go back to eager
    (one graph, not graphs inside a graph)."""
    changed = uncompile_blocks(model)
    holder = _holder(model)
    if not isinstance(holder.forward, CompiledForward):
        holder.forward = CompiledForward(model, holder.forward, dict(COMPILE_OPTIONS if options is None else options))
        changed = True
    if changed:
        _drop_graphs(model)


def uncompile(model: nn.Module) -> None:
    """Both kinds of compile undone on ``model``."""
    if uncompile_blocks(model) | _uncompile_model(model):
        _drop_graphs(model)


def uncompile_blocks(model: nn.Module) -> bool:
    """Compiled blocks back to eager; whether there were any."""
    found = False
    for block in repeated_blocks(model):
        if getattr(block, "_compiled_call_impl", None) is not None:
            block._compiled_call_impl, found = None, True
    return found


def _uncompile_model(model: nn.Module) -> bool:
    """The forward :func:`compile_model` wrapped, given back; whether there was one."""
    holder = _holder(model)
    compiled = holder.forward
    if not isinstance(compiled, CompiledForward):
        return False
    own = getattr(compiled.eager, "__self__", None) is model and \
        getattr(compiled.eager, "__func__", None) is type(model).forward
    if holder is model and own:
        del model.__dict__["forward"]
    else:  # a hook's wrapper that was there before (diffusers' hooks set the instance's forward), or the graphs'
        holder.forward = compiled.eager
    return True


def _holder(model: nn.Module):
    """What the model's calls find their forward on: its CUDA-graph cache (:class:`StepGraphs`), else the model."""
    graphs = model.__dict__.get("forward")
    return graphs if isinstance(graphs, StepGraphs) else model


def _drop_graphs(model: nn.Module) -> None:
    """Graphs captured with the previous compile replay its kernels: the next call captures again."""
    graphs = model.__dict__.get("forward")
    if isinstance(graphs, StepGraphs):
        graphs.clear()
