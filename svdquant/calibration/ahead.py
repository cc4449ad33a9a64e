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
import hashlib
from typing import Any

import torch
import torch.nn as nn

from .._memory import device_room, tensor_bytes
from ..models.text_encoders import text_encoders
from . import memory
from .offload import Streamed, _device_of


def call_key(args, kwargs) -> bytes:
    """A digest of a call's arguments by value (tensor contents, wherever they are; other values by ``repr``): the
    pass ahead and the calibration call give an encoder the same arguments, on whatever device the pipeline then
    makes its inputs."""
    h = hashlib.blake2b(digest_size=20)

    def feed(v):
        if torch.is_tensor(v):
            t = v.detach().reshape(-1).cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(v.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes())
        elif isinstance(v, dict):
            for k in v:
                h.update(repr(k).encode())
                feed(v[k])
        elif isinstance(v, (list, tuple)):
            h.update(f"L{len(v)}".encode())
            for x in v:
                feed(x)
        else:
            h.update(repr(v).encode())

    feed((args, kwargs))
    return h.digest()


def rebuilt(obj, device):
    """A copy of a nested output on ``device``, the structure new (transformers' ``ModelOutput`` and diffusers'
    ``BaseOutput`` rebuilt from their fields) and every tensor a new one: the copy kept and the one handed to the
    pipeline share nothing."""
    if torch.is_tensor(obj):
        return obj.detach().to(device, copy=True)
    if isinstance(obj, dict):
        fields = {k: rebuilt(v, device) for k, v in obj.items()}
        return fields if type(obj) is dict else type(obj)(**fields)
    if isinstance(obj, (list, tuple)):
        items = [rebuilt(v, device) for v in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
    return obj


def _nbytes(obj) -> int:
    return memory.nbytes(obj)


class EncodedAhead:
    """The pass ahead's outputs of ``encoders`` (of ``streamed``'s others), and the hooks that record and answer
    them. ``hold``: the encoders kept on the device through the pass ahead. ``calls``: how many pipeline calls the
    pass makes (to tell after the first whether all it keeps stays within
    :data:`~svdquant.calibration.memory.AHEAD_BYTES`; if not, nothing is answered)."""

    def __init__(self, streamed: Streamed, encoders: list[nn.Module], hold: list[nn.Module], calls: int):
        self.streamed, self.encoders, self.hold, self.calls = streamed, encoders, hold, calls
        self.outputs: dict[int, dict[bytes, Any]] = {id(e): {} for e in encoders}
        self.kept_bytes = 0
        self.dropped = False  # the outputs would not fit AHEAD_BYTES: the calibration calls run the encoders
        self.answered = 0  # encoder calls answered (what a test counts)

    @contextlib.contextmanager
    def recording(self):
        """Keep each encoder's output per input, the held encoders staying on the device between calls."""
        handles = []
        for e in self.encoders:
            pending: list[bytes] = []

            def pre(m, args, kwargs, pending=pending):  # before the streaming hook moves the inputs
                pending.append(call_key(args, kwargs))

            def post(m, args, kwargs, out, pending=pending):  # after it has brought the output back
                key = pending.pop()
                kept = self.outputs.get(id(m))
                if kept is not None and key not in kept:
                    kept[key] = rebuilt(out, self.streamed.home)
                    self.kept_bytes += _nbytes(kept[key])

            handles += [e.register_forward_pre_hook(pre, with_kwargs=True, prepend=True),
                        e.register_forward_hook(post, with_kwargs=True)]
        self.streamed.hold(self.hold)
        try:
            yield self
        finally:
            for h in handles:
                h.remove()
            self.streamed.let_go()

    def first_call_done(self) -> None:
        """After the pass's first pipeline call: drop everything if all the calls' outputs would not fit
        :data:`~svdquant.calibration.memory.AHEAD_BYTES` (Mistral 3's hidden states of every layer)."""
        if self.kept_bytes * self.calls > memory.AHEAD_BYTES:
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
        handles, swapped = [], []
        for e in self.encoders:
            ready: list[Any] = []

            def pre(m, args, kwargs, ready=ready):
                out = self.outputs[id(m)].get(call_key(args, kwargs))
                if out is not None:
                    ready.append(rebuilt(out, _device_of((args, kwargs), self.streamed.home)))
                    self.streamed.answer(m)
                    self.answered += 1

            handles.append(e.register_forward_pre_hook(pre, with_kwargs=True, prepend=True))
            swapped.append((e, e.__dict__.get("forward")))
            e.forward = _answering_forward(e.forward, ready)
        try:
            yield self
        finally:
            for h in handles:
                h.remove()
            for e, before in swapped:
                if before is None:
                    del e.forward
                else:
                    e.forward = before


def _answering_forward(forward, ready: list):
    def answered_or_run(*args, **kwargs):
        return ready.pop() if ready else forward(*args, **kwargs)

    return answered_or_run


def encode_ahead(pipe, streamed: Streamed | None, calls: int, cap: int | None) -> EncodedAhead | None:
    """The pass ahead for a calibration through ``pipe`` streamed by ``streamed`` in ``calls`` pipeline calls: its
    text encoders among the streamed others, those that fit held on the device (on a GPU: within the cap or what
    is free; elsewhere all of them). None when there is nothing to run ahead."""
    if streamed is None or pipe is None:
        return None
    others = {id(m) for m, _ in streamed.others}
    encoders = [e for e in text_encoders(pipe).values() if id(e) in others]
    if not encoders:
        return None
    device = streamed.device
    room = device_room(device, cap) if device.type == "cuda" else float("inf")
    hold = encoders[: memory.held_ahead([tensor_bytes(e) for e in encoders], room)]
    return EncodedAhead(streamed, encoders, hold, calls)
