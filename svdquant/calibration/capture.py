"""Capturing calibration data with forward hooks.

A *snapshot* is one call of the model being quantized (one denoising step of one
prompt). :func:`run_calibration` drives the pipeline over the prompts and, through a
pre-hook on the model, marks the calls that were drawn as snapshots (a fixed-seed draw
of ``snapshots`` (prompt, call) pairs) and stops each prompt after its last drawn call.
Other hooks record only while a drawn call runs:

* :class:`EntryRecorder` keeps the arguments of the first block of each stack, so
  blocks can later be replayed one at a time (:mod:`svdquant.quantize`);
* :class:`LinearInputRecorder` keeps, per group of linears that share an input, the
  running ``max |X_j|`` over every token and a fixed-seed random subset of tokens.
"""

from __future__ import annotations

import inspect
import math
import random
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .offload import move
from .prompts import DEFAULT_PROMPTS


@dataclass
class Calibration:
    """What to run to calibrate.

    prompts: captions (default: the 128 of :data:`DEFAULT_PROMPTS`); ``num_prompts``
        takes the first N.
    steps: denoising steps per prompt (the pipeline's ``num_inference_steps``).
    snapshots: (prompt, step) calls drawn at random as samples (the paper uses 128).
    tokens_per_layer: tokens kept per layer input over all snapshots (``None``: the
        recipe's ``eval_tokens``); ``max |X_j|`` always covers every token.
    pipeline_kwargs: extra arguments for every pipeline call (height, width, guidance...).
    inputs: instead of a pipeline, a list of keyword-argument dicts for the model's
        forward, one snapshot each (for bare models, and for tests).
    """

    prompts: Sequence[str] | None = None
    num_prompts: int | None = None
    steps: int = 8
    snapshots: int = 128
    tokens_per_layer: int | None = None
    seed: int = 0
    pipeline_kwargs: dict[str, Any] = field(default_factory=dict)
    inputs: list[dict[str, Any]] | None = None

    # set by the calibration itself; in pipeline_kwargs they would collide with it
    _RESERVED = ("prompt", "num_inference_steps", "generator", "output_type")

    def __post_init__(self):
        # Checked here so a bad value fails when the Calibration is made, not minutes into a run.
        from .. import _checks

        if self.prompts is not None:
            if isinstance(self.prompts, str):  # iterating it would calibrate on single characters
                raise ValueError("prompts= takes a list of prompts, got one string; use prompts=[...]")
            if not all(isinstance(p, str) and p.strip() for p in self.prompts):
                raise ValueError("prompts= must be non-empty strings")
            if not self.prompts:
                raise ValueError("prompts=[] is empty; give at least one prompt, or None for the built-in 128")
        if self.num_prompts is not None:
            _checks.count("num_prompts", self.num_prompts)
        _checks.steps("steps", self.steps)
        _checks.count("snapshots", self.snapshots)
        if self.tokens_per_layer is not None:
            _checks.count("tokens_per_layer", self.tokens_per_layer, why=" (None: the recipe's eval_tokens)")
        _checks.seed("seed", self.seed)
        if not isinstance(self.pipeline_kwargs, dict):
            raise ValueError(f"pipeline_kwargs= must be a dict, got {type(self.pipeline_kwargs).__name__}")
        clash = sorted(set(self.pipeline_kwargs) & set(self._RESERVED))
        if clash:
            raise ValueError(f"pipeline_kwargs sets {clash}, which calibration sets itself; use prompts=, steps=, "
                             "seed=")
        if self.inputs is not None:
            if not self.inputs or not all(isinstance(kw, dict) for kw in self.inputs):
                raise ValueError("inputs= must be a non-empty list of forward keyword-argument dicts")

    def prompt_list(self) -> list[str]:
        prompts = list(self.prompts if self.prompts is not None else DEFAULT_PROMPTS)
        if self.num_prompts is not None:
            if self.num_prompts > len(prompts):  # taking fewer than asked would pass unnoticed
                raise ValueError(f"num_prompts={self.num_prompts}, but there are only {len(prompts)} prompts; "
                                 f"use at most {len(prompts)}")
            prompts = prompts[: self.num_prompts]
        if not prompts:
            raise ValueError("calibration needs at least one prompt")
        return prompts


class _StopPrompt(Exception):
    """Raised from the model's pre-hook once a prompt's last drawn call has run."""


class CallSelector:
    """Counts the model's calls per prompt and says whether the current one is a snapshot."""

    def __init__(self, model: nn.Module, plan: dict[int, set[int]]):
        self.plan, self.prompt, self.call, self.active = plan, 0, -1, False
        self.n_active = 0
        self._handle = model.register_forward_pre_hook(self._pre)

    def start_prompt(self, i: int):
        self.prompt, self.call, self.active = i, -1, False

    def _pre(self, module, args):
        self.call += 1
        wanted = self.plan.get(self.prompt, set())
        if not wanted or self.call > max(wanted):
            raise _StopPrompt
        self.active = self.call in wanted
        self.n_active += self.active

    def close(self):
        self._handle.remove()


def _bind(module: nn.Module, args, kwargs) -> dict[str, Any]:
    bound = inspect.signature(module.forward).bind(*args, **kwargs)
    return dict(bound.arguments)


def to_device(obj, device):
    """Move every tensor of a nested args structure."""
    if torch.is_tensor(obj):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


class EntryRecorder:
    """Records the (bound) arguments of the first block of each stack on drawn calls."""

    def __init__(self, model: nn.Module, stacks: Sequence[str], selector: CallSelector | None, store_device,
                 pin: bool = False):
        self.entries: dict[str, list[dict[str, Any]]] = {s: [] for s in stacks}
        self.selector, self.store_device, self.pin = selector, store_device, pin
        self._handles = []
        for s in stacks:
            first = model.get_submodule(s)[0]
            self._handles.append(first.register_forward_pre_hook(self._hook(s, first), with_kwargs=True))

    def _hook(self, stack, block):
        def pre(module, args, kwargs):
            if self.selector is None or self.selector.active:
                snap = _bind(block, args, kwargs)
                snap = {k: _detach(v) for k, v in snap.items()}
                # pinned: a streaming run copies each snapshot back to the GPU asynchronously
                self.entries[stack].append(move(snap, self.store_device, pin=self.pin) if self.pin
                                           else to_device(snap, self.store_device))
        return pre

    def close(self):
        for h in self._handles:
            h.remove()


def _detach(v):
    if torch.is_tensor(v):
        return v.detach().clone()
    if isinstance(v, (list, tuple)):
        return type(v)(_detach(t) for t in v)
    return v


def tokens_of(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The input of a linear (``[..., K]``) or a 1×1 conv (``[B, C, H, W]``) as ``[tokens, K]``."""
    if isinstance(module, nn.Conv2d):
        return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
    return x.reshape(-1, x.shape[-1])


class LinearInputRecorder:
    """Per group (keyed by its first member's full name): running amax and a random token subset."""

    def __init__(self, modules: dict[str, nn.Module], n_snapshots: int, tokens_per_layer: int, seed: int,
                 selector: CallSelector | None = None):
        self.per_call = max(1, math.ceil(tokens_per_layer / max(1, n_snapshots)))
        self.cap = tokens_per_layer
        self.selector, self.seed = selector, seed
        self.samples: dict[str, list[torch.Tensor]] = {k: [] for k in modules}
        self.amax: dict[str, torch.Tensor] = {}
        self.calls = {k: 0 for k in modules}
        self._handles = [m.register_forward_pre_hook(self._hook(k, m)) for k, m in modules.items()]

    def _hook(self, key, module):
        def pre(mod, args):
            if self.selector is not None and not self.selector.active:
                return
            x = tokens_of(module, args[0].detach())
            am = x.abs().amax(0).float()
            self.amax[key] = am if key not in self.amax else torch.maximum(self.amax[key], am)
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.calls[key])
            self.calls[key] += 1
            take = min(self.per_call, x.shape[0])
            idx = torch.randperm(x.shape[0], generator=g)[:take].to(x.device)
            self.samples[key].append(x[idx].clone())
        return pre

    def inputs(self, key) -> tuple[torch.Tensor, torch.Tensor]:
        """``([tokens, K], amax [K])`` for a group; raises if its layer never ran."""
        if not self.samples[key]:
            raise RuntimeError(
                f"calibration never reached {key}: the layer did not run during the calibration calls "
                "(is it used by this model's forward?)"
            )
        x = torch.cat(self.samples[key], 0)
        return x[: self.cap], self.amax[key]

    def close(self):
        for h in self._handles:
            h.remove()


def draw_plan(n_prompts: int, steps: int, snapshots: int, seed: int) -> dict[int, set[int]]:
    """A fixed-seed draw of ``snapshots`` (prompt, call) pairs out of ``n_prompts × steps``."""
    pairs = [(p, s) for p in range(n_prompts) for s in range(steps)]
    rng = random.Random(seed)
    chosen = pairs if snapshots >= len(pairs) else rng.sample(pairs, snapshots)
    plan: dict[int, set[int]] = {}
    for p, s in chosen:
        plan.setdefault(p, set()).add(s)
    return plan


def run_calibration(runner, model: nn.Module, calib: Calibration, selector_hooks, progress: bool = True) -> int:
    """Run the calibration calls; ``selector_hooks(selector)`` installs recorders and returns a closer.

    ``runner`` is a pipeline (called with ``prompt=`` per prompt) or ``None`` when
    ``calib.inputs`` holds forward kwargs for ``model``. Returns the number of snapshots.
    """
    if calib.inputs is not None:
        close = selector_hooks(None)
        try:
            for kw in tqdm(calib.inputs, desc="calibrating", disable=None if progress else True, leave=False):
                model(**kw)
        finally:
            close()
        return len(calib.inputs)
    if runner is None:
        raise ValueError(
            "calibrating a bare model needs Calibration(inputs=[forward kwargs, ...]); or pass the whole "
            "diffusers pipeline so svdquant can run it on prompts"
        )
    prompts = calib.prompt_list()
    plan = draw_plan(len(prompts), calib.steps, calib.snapshots, calib.seed)
    selector = CallSelector(model, plan)
    close = selector_hooks(selector)
    try:
        gen_device = "cpu"
        for i in tqdm([i for i in range(len(prompts)) if i in plan], desc="calibrating (prompts)",
                      disable=None if progress else True, leave=False):
            selector.start_prompt(i)
            gen = torch.Generator(gen_device).manual_seed(calib.seed + i)
            try:
                runner(prompt=prompts[i], num_inference_steps=calib.steps, generator=gen, output_type="latent",
                       **calib.pipeline_kwargs)
            except _StopPrompt:
                pass
    finally:
        close()
        selector.close()
        _forget_hook_registry_cache(model)
    return selector.n_active


def _forget_hook_registry_cache(model: nn.Module) -> None:
    """Leave diffusers' hook registry as an uncalled pipeline has it.

    diffusers 0.42 caches, on the first ``cache_context()`` (FluxPipeline opens one per step), the list of
    hook registries under the transformer (``HookRegistry._get_child_registries`` in ``hooks/hooks.py``),
    and only ``enable_cache()`` clears it: a First-Block Cache added with ``apply_first_block_cache``
    after any pipeline call, our calibration's included, then fails with "No cache context is set".
    """
    registry = getattr(model, "_diffusers_hook", None)
    if registry is not None and hasattr(registry, "invalidate_child_registries_cache"):
        registry.invalidate_child_registries_cache()
