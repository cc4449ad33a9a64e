"""The text encoders run ahead of a streamed pipeline calibration's denoising calls.

Streaming a pipeline through a capped GPU, each calibration call ran its text encoders between the denoiser's
forwards: T5-XXL's 9.5 GB crossed PCIe at every one of FLUX.1-dev's 39 calls, and an encoder too large to run beside
the resident blocks (Qwen2.5-VL-7B) also sent them home and brought them back each time. The pass ahead runs every
calibration call once up to the denoiser's first call, the encoders held on the device from call to call where they
fit (:func:`~svdquant.calibration.memory.held_ahead`), and keeps, at home, what each encoder returned for each input.
The calibration calls then get those outputs without running the encoders. They are the same calls, hence the same
encoder inputs, so the outputs are the ones the encoder would have computed there (bit for bit on one device).
An input not seen ahead runs the encoder as before.
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn

from .._memory import device_room, tensor_bytes
from ..models.text_encoders import text_encoders
from . import memory
from .offload import Streamed, _device_of


class Unkept(Exception):
    """A call the pass ahead does not keep: an argument it cannot compare by value, or an output holding an object
    it cannot copy. That call runs its encoder in the calibration call, as without the pass."""


# plain values compared by repr; anything else (an object whose repr summarizes or shows an address) is not keyed
_SCALARS = (type(None), bool, int, float, str, torch.dtype, torch.device, enum.Enum)


def call_key(args, kwargs) -> bytes:
    """A digest of a call's arguments by value (tensor contents, wherever they are; plain values by ``repr``): the
    pass ahead and the calibration call give an encoder the same arguments, on whatever device the pipeline then
    makes its inputs. Raises :class:`Unkept` for an argument of another kind."""
    h = hashlib.blake2b(digest_size=20)

    def feed(v):
        if torch.is_tensor(v):
            t = v.detach().reshape(-1).cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(v.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes())
        elif isinstance(v, Mapping):
            h.update(f"M{len(v)}".encode())
            for k in v:
                h.update(f"K{k!r}".encode())
                feed(v[k])
        elif isinstance(v, (list, tuple)):
            h.update(f"L{type(v).__name__}{len(v)}".encode())
            for x in v:
                feed(x)
        elif isinstance(v, _SCALARS):
            h.update(f"S{type(v).__name__}:{v!r}".encode())
        else:
            raise Unkept(type(v).__name__)

    feed((args, kwargs))
    return h.digest()


# An encoder's language-model logits and key / value cache: no diffusers pipeline reads them from a text encoder,
# and Qwen2.5-VL returns both (its logits alone outweigh its 29 hidden states; its cache lives on the GPU).
_NOT_KEPT = ("logits", "past_key_values")


def _is_cache(obj) -> bool:
    return any(c.__name__ == "Cache" for c in type(obj).__mro__)  # transformers.cache_utils.Cache, not imported


def rebuilt(obj, device):
    """A copy of a nested output on ``device``, the structure new (transformers' ``ModelOutput`` and diffusers'
    ``BaseOutput`` rebuilt from their fields, less :data:`_NOT_KEPT`) and every tensor a new one: the copy kept and
    the one handed to the pipeline share nothing. Raises :class:`Unkept` for an object it cannot copy."""
    if torch.is_tensor(obj):
        return obj.detach().to(device, copy=True)
    if isinstance(obj, dict):
        fields = {k: rebuilt(v, device) for k, v in obj.items() if type(obj) is dict or k not in _NOT_KEPT}
        return fields if type(obj) is dict else type(obj)(**fields)
    if isinstance(obj, (list, tuple)):
        items = [rebuilt(v, device) for v in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
    if _is_cache(obj):
        return None
    if isinstance(obj, _SCALARS):
        return obj
    raise Unkept(type(obj).__name__)


class EncodedAhead:
    """The pass ahead's outputs of ``encoders`` (of ``streamed``'s others), and the hooks that record and answer
    them. ``hold``: the encoders kept on the device through the pass ahead. ``rows``: how many prompts the pass's
    calls hold in all (to tell, from the first call's outputs per prompt, whether all it keeps stays within
    :data:`~svdquant.calibration.memory.AHEAD_BYTES`; it also stops keeping once past it; then nothing is
    answered)."""

    def __init__(self, streamed: Streamed, encoders: list[nn.Module], hold: list[nn.Module], rows: int):
        self.streamed, self.encoders, self.hold, self.rows = streamed, encoders, hold, rows
        self.outputs: dict[int, dict[bytes, Any]] = {id(e): {} for e in encoders}
        self.kept_bytes = 0
        self.dropped = False  # the outputs would not fit AHEAD_BYTES: the calibration calls run the encoders
        self.answered = 0  # encoder calls answered (what a test counts)

    @contextlib.contextmanager
    def recording(self):
        """Keep each encoder's output per input (what its forward returns, before any forward hook), the held
        encoders staying on the device between calls."""
        handles, swapped = [], []
        try:
            for e in self.encoders:
                keys: list[bytes | None] = []

                def pre(m, args, kwargs, keys=keys):  # before the streaming hook moves the inputs
                    try:
                        keys[:] = [call_key(args, kwargs)]
                    except Unkept:
                        keys[:] = [None]

                handles.append(e.register_forward_pre_hook(pre, with_kwargs=True, prepend=True))
                swapped.append((e, e.__dict__.get("forward")))
                e.forward = _recording_forward(e.forward, keys, self._keep(e))
            self.streamed.hold(self.hold)
            yield self
        finally:
            _restore(handles, swapped)
            self.streamed.let_go()

    def _keep(self, e: nn.Module):
        def keep(key, out):
            kept = self.outputs.get(id(e))
            if kept is None or key is None or key in kept:
                return
            try:
                kept[key] = rebuilt(out, self.streamed.home)
            except Unkept:
                return
            self.kept_bytes += memory.nbytes(kept[key])
            if self.kept_bytes > memory.AHEAD_BYTES:
                self.drop()
        return keep

    def not_encoders(self) -> list[nn.Module]:
        """The streamed models that are not its encoders (a two-expert pipeline's other denoiser, a ControlNet, an
        image encoder, the VAE, whose ``encode`` is a call too): the pass stops at their first call, as at the
        denoiser's."""
        ids = {id(e) for e in self.encoders}
        return [m for m, _ in self.streamed.others if id(m) not in ids]

    def call_done(self, first_rows: int | None = None) -> None:
        """After a pipeline call of the pass; after the first (``first_rows`` prompts): drop everything if all the
        calls' outputs, at this call's bytes per prompt, would not fit :data:`~svdquant.calibration.memory.AHEAD_BYTES`
        (FLUX.2 [dev]'s Mistral 3 hidden states of every layer)."""
        if first_rows and self.kept_bytes / first_rows * self.rows > memory.AHEAD_BYTES:
            self.drop()

    def drop(self) -> None:
        self.outputs = {}
        self.kept_bytes, self.dropped = 0, True

    @contextlib.contextmanager
    def answering(self):
        """The encoders' calls whose input the pass ahead saw return its output, moved to where the inputs are;
        the streaming hooks move nothing for them."""
        if self.dropped:
            yield self
            return
        handles, swapped, pending = [], [], []
        try:
            for e in self.encoders:
                ready: list[Any] = []
                pending.append(ready)

                def pre(m, args, kwargs, ready=ready):
                    ready.clear()
                    try:
                        out = self.outputs[id(m)].get(call_key(args, kwargs))
                    except Unkept:
                        out = None
                    if out is not None:
                        ready.append(rebuilt(out, _device_of((args, kwargs), self.streamed.home)))
                        self.streamed.answer(m)
                        self.answered += 1

                handles.append(e.register_forward_pre_hook(pre, with_kwargs=True, prepend=True))
                swapped.append((e, e.__dict__.get("forward")))
                e.forward = _answering_forward(e.forward, ready)
            yield self
        finally:
            _restore(handles, swapped)
            for ready in pending:
                ready.clear()
            self.streamed.answered_none()


def _recording_forward(forward, keys: list, keep):
    def run_and_keep(*args, **kwargs):
        out = forward(*args, **kwargs)
        keep(keys.pop() if keys else None, out)
        return out

    return run_and_keep


def _answering_forward(forward, ready: list):
    def answered_or_run(*args, **kwargs):
        return ready.pop() if ready else forward(*args, **kwargs)

    return answered_or_run


def _restore(handles, swapped) -> None:
    for h in handles:
        h.remove()
    for e, before in swapped:
        if before is None:
            e.__dict__.pop("forward", None)
        else:
            e.forward = before


def encode_ahead(pipe, streamed: Streamed | None, rows: int, cap: int | None) -> EncodedAhead | None:
    """The pass ahead for a calibration through ``pipe`` streamed by ``streamed``, its calls holding ``rows``
    prompts in all: its text encoders among the streamed others (each once, whatever attributes name it), those that
    fit held on the device (on a GPU: within the cap or what is free; elsewhere all of them). None when there is
    nothing to run ahead."""
    if streamed is None or pipe is None:
        return None
    others = {id(m) for m, _ in streamed.others}
    encoders = list({id(e): e for e in text_encoders(pipe).values() if id(e) in others}.values())
    if not encoders:
        return None
    device = streamed.device
    room = device_room(device, cap) if device.type == "cuda" else float("inf")
    hold = encoders[: memory.held_ahead([tensor_bytes(e) for e in encoders], room)]
    return EncodedAhead(streamed, encoders, hold, rows)
