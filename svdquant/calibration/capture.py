"""Capturing calibration data with forward hooks.

A *snapshot* is one denoising step of one prompt: a call of the model being quantized, or one prompt's rows of a
batched call. :func:`run_calibration` drives the pipeline over the prompts (those drawn at the same steps together,
:func:`calibration_batches`) and, through a pre-hook on the model, marks the calls that were drawn (a fixed-seed
draw of ``snapshots`` (prompt, step) pairs) and stops each pipeline call after its last drawn step.
A step is a run of calls at one timestep: a pipeline that runs classifier-free guidance as two calls per step
(Wan; Qwen-Image with a negative prompt) would otherwise have its draws cover only the first half of the
denoising, the noisiest steps; the snapshot is the step's first call (the conditional one in diffusers' pipelines).
Other hooks record only while a drawn call runs:

* :class:`EntryRecorder` keeps the arguments of the first block of each stack, so
  blocks can later be replayed one at a time (:mod:`svdquant.calibration.replay`); with ``stop``
  it ends the forward right there (:func:`run_inputs` catches it): calibrating on
  forward inputs, nothing after the first block is needed when the replays can derive
  the later stacks' entries, which :class:`~svdquant.calibration.chain.ChainCheck` verifies on one full
  forward. Through a pipeline, with ``finish_calls``, it ends the call's last drawn forward once it holds that
  forward's entries: nothing later in the call is needed, the denoising trajectory included;
* :class:`LinearInputRecorder` keeps, per group of linears that share an input, the
  running ``max |X_j|`` over every token and a fixed-seed random subset of tokens.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Any, Sequence

import torch
import torch.nn as nn

from .._progress import progress as progress_bar
from ..integrations.diffusers.compat import forget_hook_registry_cache
from ..models.pipeline_needs import second_expert, steps_of
from .chain import bound_arguments, same, share_repeats
from .config import Calibration
from .draw import calibration_batches, draw_plan, prompt_call
from .inputs import image_for
from .offload import move


class _StopPrompt(Exception):
    """Raised from the model's pre-hook once a prompt's last drawn call has run, or by a recorder that holds all it
    needs of the last drawn call (:attr:`CallSelector.last`)."""


class CallSelector:
    """Counts the model's denoising steps in the current pipeline call (a new step where the timestep it is called
    with changes; every call is a step for a model called without one) and says whether the current model call is a
    snapshot: the first call of a drawn step. A pipeline call runs one batch of :func:`calibration_batches` (one
    prompt, or several drawn at the same steps); :meth:`start` is told its drawn steps and how many prompts it holds.

    ``calls``: the model calls the batches draw (what a recorder spreads its tokens over); ``n_active``: the
    (prompt, step) pairs recorded so far, a batched call counting each of its prompts; ``last``: the current model
    call is the snapshot of the pipeline call's last drawn step (a recorder that has what it needs of it may end
    the pipeline call there).

    Its hooks come before any other on the model (a streamed model's onload included): a call it ends is not
    moved to the device for nothing."""

    def __init__(self, model: nn.Module, batches: Sequence[tuple[list[int], set[int]]], after: nn.Module | None = None):
        """``after``: a model whose call means ``model``'s steps are over (the low-noise expert of a two-expert
        pipeline, when the high-noise one calibrates): the call stops there rather than run the rest for nothing."""
        self.calls = sum(len(steps) for _, steps in batches)
        self.active, self.last, self.n_active = False, False, 0
        self.start(set(), 1)
        self._handles = [model.register_forward_pre_hook(self._pre, with_kwargs=True, prepend=True)]
        if after is not None:
            self._handles.append(after.register_forward_pre_hook(self._stop, prepend=True))

    def start(self, steps: set[int], rows: int):
        """A new pipeline call: its drawn ``steps``, for ``rows`` prompts."""
        self.wanted, self.rows, self.step, self.active, self.last, self._t = steps, rows, -1, False, False, None

    def _pre(self, module, args, kwargs):
        t = timestep_of(module, args, kwargs)
        if t is None or self._t is None or not same(t, self._t):
            self.step += 1
            if not self.wanted or self.step > max(self.wanted):
                raise _StopPrompt
            self.active = self.step in self.wanted
            self.last = self.active and self.step == max(self.wanted)
            self.n_active += self.rows if self.active else 0
        else:  # the step's second call (the unconditional one): its first was the snapshot
            self.active = self.last = False
        self._t = t

    def _stop(self, module, args):
        raise _StopPrompt

    def close(self):
        for h in self._handles:
            h.remove()


# what diffusers' denoisers call their timestep argument (Z-Image: ``t``; SDXL's UNet takes it second, positionally)
TIMESTEP_ARGS = ("timestep", "t")


def timestep_of(module: nn.Module, args, kwargs):
    """The timestep ``module`` is called with, or None for a model that takes none (or a call it cannot bind)."""
    if not any(name in kwargs for name in TIMESTEP_ARGS):
        try:
            kwargs = bound_arguments(module, args, kwargs)
        except TypeError:
            return None
    return next((kwargs[name] for name in TIMESTEP_ARGS if kwargs.get(name) is not None), None)


def to_device(obj, device):
    """Move every tensor of a nested args structure."""
    if torch.is_tensor(obj):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


class _EntryRecorded(Exception):
    """Raised from the first block's pre-hook by an :class:`EntryRecorder` with ``stop``: the entry is kept, the
    rest of the forward is not needed."""


def keep_entry(snap: dict[str, Any], store_device, pin: bool = False) -> dict[str, Any]:
    """A block's arguments as a snapshot: detached copies on ``store_device`` (pinned CPU memory with ``pin``: a
    streaming run copies each snapshot back to the GPU asynchronously)."""
    snap = {k: _detach(v) for k, v in snap.items()}
    return move(snap, store_device, pin=pin)


class EntryRecorder:
    """Records the (bound) arguments of the first block of each stack on drawn calls.

    stop: raise ``_EntryRecorded`` once the entry is kept, so that the forward ends there (one stack only; the
        hook is put before every other hook of the block, so that a streamed block is not even onloaded).
    share_except: a value of a new snapshot that is bit for bit the first snapshot's (:func:`same`; FLUX's
        rotary embedding, the same for every call at one resolution) is replaced by the first's object, so
        that one copy is held, not one per snapshot; the names given (the block outputs) are never compared.
    first: snapshots already recorded, per stack (they come first and are the ones shared with).
    finish_calls: end a forward once every stack recorded has its entry of it: through a pipeline (``selector``)
        only the call's last drawn forward (:attr:`CallSelector.last`), ending the pipeline call (``_StopPrompt``);
        on forward inputs every forward (``_EntryRecorded``, which :func:`run_inputs` catches). Settable: the
        pipeline calibration turns it on once the first forward has shown which stacks it must record.

    The hooks come before any other on the block (a streamed block's onload included) where the forward may end
    there: a block is not moved to the device for nothing, and the arguments kept are the ones the block is called
    with, before another pre-hook of the block changes them (the replays call the block, so such a hook runs
    there, once).
    """

    def __init__(self, model: nn.Module, stacks: Sequence[str], selector: CallSelector | None, store_device,
                 pin: bool = False, *, stop: bool = False, share_except: Sequence[str] | None = None,
                 first: dict[str, list[dict[str, Any]]] | None = None, finish_calls: bool = False):
        if stop and len(stacks) != 1:
            raise ValueError("EntryRecorder(stop=True) records one stack")
        self.entries: dict[str, list[dict[str, Any]]] = {s: list((first or {}).get(s, [])) for s in stacks}
        self.selector, self.store_device, self.pin, self.stop = selector, store_device, pin, stop
        self.finish_calls = finish_calls
        self.share_except = None if share_except is None else set(share_except)
        self._seen: set[str] = set()  # the stacks recorded in the current forward
        self._handles = {}
        for s in stacks:
            block = model.get_submodule(s)[0]
            self._handles[s] = block.register_forward_pre_hook(
                self._hook(s, block), with_kwargs=True, prepend=stop or finish_calls or selector is not None)

    def _hook(self, stack, block):
        def pre(module, args, kwargs):
            if self.selector is None or self.selector.active:
                snap = keep_entry(bound_arguments(block, args, kwargs), self.store_device, self.pin)
                kept = self.entries[stack]
                if kept and self.share_except is not None:
                    share_repeats(snap, kept[0], self.share_except)
                kept.append(snap)
                if self.stop:
                    raise _EntryRecorded
                if self.finish_calls and (self.selector is None or self.selector.last):
                    if stack == next(iter(self.entries)):  # stacks run in order: the first begins a forward
                        self._seen = set()
                    self._seen.add(stack)
                    if self._seen >= self.entries.keys():
                        raise _EntryRecorded if self.selector is None else _StopPrompt
        return pre

    def keep(self, stacks: Sequence[str]) -> None:
        """Record only ``stacks`` from now on, and drop what was recorded of the others (the replays derive them)."""
        for s in [s for s in self.entries if s not in stacks]:
            del self.entries[s]
            self._handles.pop(s).remove()

    def close(self):
        for h in self._handles.values():
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


@functools.lru_cache(maxsize=8192)
def token_subset(seed: int, n: int, take: int, device: torch.device) -> torch.Tensor:
    """The ``take`` tokens of ``n`` that a recorder keeps for the call with this seed: a fixed-seed permutation
    drawn on the CPU (the same subset wherever the model runs), made once per (seed, n, take, device) and kept on
    the device (a few integers each). Every group of a block, and every block, draws the same subset for its c-th call, so a replay
    reuses them: a new index tensor copied from pageable memory would make the host wait for the replay's queued
    kernels at every layer. Read only."""
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:take]
    idx = idx.to(device)
    if device.type == "cuda":  # complete before any stream reads it (once per entry)
        torch.cuda.current_stream(device).synchronize()
    return idx


class LinearInputRecorder:
    """Per group (keyed by its first member's name): running amax and a random token subset. ``where``: the block
    the names are relative to, for messages (``"blocks.3"``; empty for names in the whole model)."""

    def __init__(self, modules: dict[str, nn.Module], n_snapshots: int, tokens_per_layer: int, seed: int,
                 selector: CallSelector | None = None, where: str = ""):
        self.where = where
        self.per_call = max(1, math.ceil(tokens_per_layer / max(1, n_snapshots)))
        self.cap = tokens_per_layer
        self.selector, self.seed = selector, seed
        self.samples: dict[str, list[torch.Tensor]] = {k: [] for k in modules}
        self.amax: dict[str, torch.Tensor] = {}
        self.calls = {k: 0 for k in modules}
        self.seen: dict[str, tuple[int, int, torch.dtype]] = {}  # per key, the last eager call's (tokens, K, dtype)
        self.static = None  # a CUDA graph's capture under way (svdquant.calibration.replay_graph.StaticRecords)
        self._handles = [m.register_forward_pre_hook(self._hook(k, m)) for k, m in modules.items()]

    def _hook(self, key, module):
        def pre(mod, args):
            if self.selector is not None and not self.selector.active:
                return
            x = tokens_of(module, args[0].detach())
            if x.shape[0] == 0:  # a call in which the layer read no tokens (an empty stream) adds nothing
                return
            if self.static is not None:  # captured, not run: only operators on the graph's static buffers
                self.static.record(key, x)
                return
            self.seen[key] = (x.shape[0], x.shape[1], x.dtype)
            # max|x| as max(max x, -min x): two reductions, no |x| copy (a joined replay's fc2 input is 453 MB)
            am = torch.maximum(x.amax(0), x.amin(0).neg()).float()
            self.amax[key] = am if key not in self.amax else torch.maximum(self.amax[key], am)
            idx = token_subset(self.seed * 1_000_003 + self.calls[key], x.shape[0], min(self.per_call, x.shape[0]),
                               x.device)
            self.calls[key] += 1
            self.samples[key].append(x[idx].clone())
        return pre

    def inputs(self, key) -> tuple[torch.Tensor, torch.Tensor]:
        """``([tokens, K], amax [K])`` for a group; raises if its layer never ran."""
        if not self.samples[key]:
            raise RuntimeError(
                f"calibration never reached {self.where + '.' if self.where else ''}{key}: the layer did not run, or read no tokens, during the "
                "calibration calls (is it used by this model's forward with these inputs?)"
            )
        x = torch.cat(self.samples[key], 0)
        return x[: self.cap], self.amax[key]

    def close(self):
        for h in self._handles:
            h.remove()


def run_calibration(runner, model: nn.Module, calib: Calibration, selector_hooks, progress: bool = True,
                    desc: str = "calibrating", streaming: bool = False, on_stop=None, ahead=None) -> int:
    """Run the calibration calls; ``selector_hooks(selector)`` installs recorders and returns a closer.

    ``runner`` is a pipeline (called with ``prompt=``, one prompt or a batch of them: :func:`calibration_batches`,
    :meth:`Calibration.batch_for`; ``streaming``: the model streams to a GPU) or ``None`` when ``calib.inputs`` holds
    forward kwargs for ``model``. Returns the number of snapshots ((prompt, step) pairs recorded). ``desc``: the
    progress bar's title (which expert of a two-expert pipeline). ``on_stop()`` cleans up after a call that a hook
    ended inside the model's forward (a streamed block left on the device). ``ahead(rows)``: the text encoders'
    pass ahead of the calls (:func:`svdquant.calibration.ahead.encode_ahead`, given how many prompts the calls hold
    in all), or None for none.
    """
    calib = calib.for_pipeline(runner)
    if calib.inputs is not None:
        close = selector_hooks(None)
        try:
            run_inputs(model, calib.inputs, progress=progress)
        finally:
            close()
        return len(calib.inputs)
    if runner is None:
        raise ValueError(
            "calibrating a bare model needs Calibration(inputs=[forward kwargs, ...]); or pass the whole "
            "diffusers pipeline so svdquant can run it on prompts"
        )
    prompts = calib.prompt_list()
    # an expert of a two-expert pipeline is drawn from its own steps: draws past them would record nothing
    plan = draw_plan(len(prompts), steps_of(runner, model, calib.steps), calib.snapshots, calib.seed)
    batches = calibration_batches(plan, calib.batch_for(runner, streaming))
    second = second_expert(runner)
    encoded = ahead(sum(len(rows) for rows, _ in batches)) if ahead is not None else None
    if encoded is not None:  # the streamed others hold every other model of the pipeline (a second expert too)
        run_ahead(runner, [model, *encoded.not_encoders()], calib, prompts, batches, encoded, progress)
    # Wan 2.2 runs its high-noise steps first: once the low-noise expert is called, the high-noise one is done
    selector = CallSelector(model, batches, after=second if second is not None and second is not model else None)
    close = selector_hooks(selector)
    try:
        with progress_bar(total=len(plan), desc=desc, unit="prompt", enabled=progress, leave=False) as bar, \
                encoded.answering() if encoded is not None else contextlib.nullcontext():
            for rows, steps in batches:
                selector.start(steps, len(rows))
                try:
                    _pipeline_call(runner, calib, prompts, rows)
                except _StopPrompt:
                    if on_stop is not None:
                        on_stop()
                bar.update(len(rows))
    finally:
        close()
        selector.close()
        forget_hook_registry_cache(model)  # h-diffusers: diffusers' hook registry through compat
    return selector.n_active


def _pipeline_call(runner, calib: Calibration, prompts: list[str], rows: list[int]) -> None:
    kw = prompt_call(prompts, rows, calib.seed, calib.pipeline_kwargs)
    runner(num_inference_steps=calib.steps, output_type="latent", **image_for(calib.images, rows[0]), **kw)


def run_ahead(runner, stops: list[nn.Module], calib: Calibration, prompts: list[str], batches, encoded,
              progress: bool) -> None:
    """The text encoders' pass ahead (:mod:`svdquant.calibration.ahead`): each calibration call up to the first
    call of one of ``stops`` (the denoisers and the other models that are not text encoders; a hook that comes
    before their streaming ones: nothing of them moves)."""
    def stop(module, args):
        raise _StopPrompt

    handles = [m.register_forward_pre_hook(stop, prepend=True) for m in stops]
    try:
        with encoded.recording(), progress_bar(total=len(batches), desc="encoding prompts", unit="call",
                                               enabled=progress, leave=False) as bar:
            for i, (rows, _) in enumerate(batches):
                try:
                    _pipeline_call(runner, calib, prompts, rows)
                except _StopPrompt:
                    pass
                encoded.call_done(len(rows) if i == 0 else None)
                if encoded.dropped:
                    break
                bar.update(1)
    finally:
        for h in handles:
            h.remove()


def record_inputs(pipe, model: nn.Module, calib: Calibration, progress: bool = True) -> list[dict[str, Any]]:
    """``model``'s forward arguments, as keyword arguments, on the calls that calibrating through ``pipe`` draws:
    what ``Calibration(inputs=...)`` takes. Several quantizations of one model then share one pass through the
    pipeline (the demo's variants), each calibrating on exactly the snapshots it would have drawn itself."""
    if calib.inputs is not None:
        return list(calib.inputs)
    calib = calib.for_pipeline(pipe)
    recorded: list[dict[str, Any]] = []

    def hooks(selector):
        def pre(module, args, kwargs):
            if selector.active:
                recorded.append(keep_entry(bound_arguments(module, args, kwargs), next(module.parameters()).device))
                if selector.last:  # the call's last drawn forward: what it would compute is not needed
                    raise _StopPrompt
        handle = model.register_forward_pre_hook(pre, with_kwargs=True)
        return handle.remove

    # one prompt a call unless asked: Calibration(inputs=) counts each recorded call as one snapshot
    run_calibration(pipe, model, calib, hooks, progress=progress)
    return recorded


def stop_forward(module: nn.Module, args) -> None:
    """A forward pre-hook that ends the forward at its module (:func:`run_inputs` catches it), once the hooks before
    it have kept what is needed of the forward."""
    raise _EntryRecorded


def run_inputs(model: nn.Module, inputs: Sequence[dict[str, Any]], on_stop=None, progress: bool = True) -> None:
    """``model(**kw)`` for each of ``inputs``; a forward that an :class:`EntryRecorder` with ``stop`` ended is
    not an error, and ``on_stop()`` then cleans up what the forward's unfinished hooks left (a streamed model's
    rest still on the device)."""
    for kw in progress_bar(inputs, desc="calibrating", unit="input", enabled=progress, leave=False):
        try:
            model(**kw)
        except _EntryRecorded:
            if on_stop is not None:
                on_stop()
