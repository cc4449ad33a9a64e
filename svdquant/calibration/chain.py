"""Whether the block replays can derive a later stack's inputs from an earlier stack's outputs.

The replays (:mod:`svdquant.calibration.replay`) make each block's inputs from the previous block's outputs
(:func:`next_inputs`). Where a model chains its blocks that way (FLUX: the last double block returns what the first
single block takes), the calibration needs to record only the first stack's inputs, and its forwards may stop at
the first block; :class:`ChainCheck` verifies it, bit for bit (:func:`same`), on one forward.
"""

from __future__ import annotations

import inspect
from typing import Any, Sequence

import torch
import torch.nn as nn


def bound_arguments(module: nn.Module, args, kwargs) -> dict[str, Any]:
    """A hook's ``(args, kwargs)`` of a call of ``module``, by parameter name."""
    return dict(inspect.signature(module.forward).bind(*args, **kwargs).arguments)


def next_inputs(inputs: dict[str, Any], out, outputs: Sequence[str]) -> dict[str, Any]:
    """The next block's arguments as the replays make them: this block's ``inputs`` with its outputs (``out``, a
    tuple or one tensor, named by ``outputs`` in order) in place of the same-named ones."""
    return {**inputs, **dict(zip(outputs, out if isinstance(out, tuple) else (out,)))}


_SAME_WIDTH = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t: torch.Tensor) -> torch.Tensor:
    """``t`` read as integers of its width: equality of bits (NaN equals NaN, -0.0 differs from 0.0)."""
    width = _SAME_WIDTH.get(t.element_size()) if t.dtype.is_floating_point or t.dtype.is_complex else None
    if width is None:
        return t
    try:
        return t.view(width)
    except RuntimeError:  # a dtype torch will not reinterpret: its values then
        return t


def same(a, b) -> bool:
    """Bit for bit the same value: tensors of one dtype, shape, strides and device holding the same bits; dicts
    (same keys), lists and tuples of such, item by item; anything else by ``==``."""
    if torch.is_tensor(a) or torch.is_tensor(b):
        return (torch.is_tensor(a) and torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape
                and a.stride() == b.stride() and a.device == b.device and torch.equal(_bits(a), _bits(b)))
    if isinstance(a, dict) or isinstance(b, dict):
        return type(a) is type(b) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    try:
        return bool(a == b)
    except Exception:  # an == that does not give one truth value
        return False


def share_repeats(snap: dict[str, Any], first: dict[str, Any], skip) -> None:
    """Points each value of ``snap`` (but those named in ``skip``) that is bit for bit ``first``'s at ``first``'s
    object, in place."""
    for k, v in snap.items():
        if k not in skip and k in first and v is not first[k] and same(v, first[k]):
            snap[k] = first[k]


def _keep(v):
    """A copy of a tensor (in containers) with the same strides, so that :func:`same` can compare it later."""
    if torch.is_tensor(v):
        v = v.detach()
        try:
            return torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device=v.device).copy_(v)
        except RuntimeError:  # overlapping memory (an expanded tensor): a plain copy, whose strides then differ
            return v.clone()
    if isinstance(v, dict):
        return {k: _keep(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)) and not hasattr(v, "_fields"):
        return type(v)(_keep(x) for x in v)
    return v


def adds_between_blocks(kwargs: dict[str, Any]) -> bool:
    """Whether a model call passes residuals that the model adds between its blocks (diffusers' ControlNet inputs:
    ``controlnet_block_samples``, ``controlnet_single_block_samples``, ``block_controlnet_hidden_states``...). A
    chain check cannot vouch for such calls: at a step where a ControlNet is scaled to 0 (``control_guidance_start``)
    its residuals add nothing, and at the next they do."""
    return any("controlnet" in k and v is not None for k, v in kwargs.items())


class ChainCheck:
    """Whether a model chains its blocks the way the replays do, checked on one forward: each of ``blocks`` (in
    the order the model calls them; the first block of a later stack included) runs once, and its arguments are
    bit for bit the previous block's with its outputs put in (:func:`next_inputs`). Then the replays' outputs of
    a stack's last block give the next stack's entry, and the forward need not run past the first block. It
    fails on FLUX with ControlNet residuals, which the model adds to a block's outputs before the next block.

    Hooks the blocks until :meth:`close`; ``ok`` says the result once the forward has run. Holds one block's
    arguments and outputs (copies: an in-place change between two blocks would otherwise go unseen)."""

    def __init__(self, blocks: Sequence[nn.Module], outputs: Sequence[str]):
        self.outputs = tuple(outputs)
        self.n = len(blocks)
        self._ok, self._expect, self._done = True, 0, False
        self._args: dict[str, Any] | None = None
        self._derived: dict[str, Any] | None = None
        self._handles = []
        for i, b in enumerate(blocks):
            self._handles.append(b.register_forward_pre_hook(self._pre(i, b), with_kwargs=True))
            if i < self.n - 1:
                self._handles.append(b.register_forward_hook(self._post(i)))

    @property
    def ok(self) -> bool:
        return self._ok and self._done

    def _pre(self, i, block):
        def pre(module, args, kwargs):
            bound = bound_arguments(block, args, kwargs)
            if i != self._expect or self._done:  # out of order, or a block called twice
                self._ok = False
            elif i > 0:
                self._ok = self._ok and same(self._derived, bound)
            self._derived, self._expect = None, -1
            if i < self.n - 1:
                self._args = _keep(bound)
            else:
                self._done = True
        return pre

    def _post(self, i):
        def post(module, args, out):
            if self._args is None:
                self._ok = False
                return
            self._derived = next_inputs(self._args, _keep(out), self.outputs)
            self._args, self._expect = None, i + 1
        return post

    def close(self):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._args = self._derived = None
