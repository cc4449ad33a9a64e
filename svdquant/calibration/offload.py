"""Running a model kept in CPU memory on a GPU, one piece at a time (streaming quantization, issue 16).

A :class:`DeviceUnit` is the own tensors of some modules (a block; a model minus its blocks; a text
encoder). They stay at home (in pinned CPU memory with ``pin``), and :meth:`DeviceUnit.onload`
points the modules at device copies; :meth:`DeviceUnit.offload` points them back at the home tensors and
so frees the copies with no transfer back: nothing changes a weight during calibration. Where the
device is the home (``device="cpu"`` with a model on the CPU) every move is a no-op, the same code runs,
and the results are bit for bit those of the unstreamed path.

:class:`Streamed` puts units on a model's blocks, on the rest of the model and on a pipeline's other
models (text encoders, layer by layer where their layers are known...), each on the device only during its own
forward (but the resident blocks, which stay between calls, and the next block, which with pinned memory is copied on
a side stream during this block's compute: prefetch), and the transformer's peak is two streamed blocks plus the
resident ones and the small embedders.
Inputs go to the device at each model's entry and outputs come back home, so the pipeline itself runs on the CPU
(latents, scheduler: small tensors), as under accelerate's offload hooks. A model's entry is its forward, and for the
others also the methods a pipeline calls instead (an autoencoder's ``encode`` and ``decode``), which
:class:`~svdquant.calibration.entry.CallThrough` runs as calls of the model, its forward hooks around them.
"""

from __future__ import annotations

import copy
import time

import torch
import torch.nn as nn

from .._timing import StageClock
from .entry import CallThrough, entry_methods


def move(obj, device, pin: bool = False, non_blocking: bool = False, memo: dict | None = None):
    """Every tensor of a nested structure on ``device``; to pinned CPU memory with ``pin`` (so that the
    copy back to the GPU can be asynchronous). Model outputs (diffusers' and transformers' ``BaseOutput`` /
    ``ModelOutput``, ordered dicts that also carry their fields as attributes) are updated in place, so
    they keep their type and attributes; another object's own tensors (not those of its lists or dicts) are moved
    in a shallow copy (a VAE's ``latent_dist``, a ``DiagonalGaussianDistribution``). ``memo`` (a dict): a tensor
    met again is moved once, so that tensors shared between snapshots stay shared."""
    if torch.is_tensor(obj):
        if memo is not None and id(obj) in memo:
            return memo[id(obj)][1]
        if obj.device == torch.device(device) and not (pin and not obj.is_pinned()):
            out = obj
        elif pin and torch.device(device).type == "cpu":
            out = torch.empty(obj.shape, dtype=obj.dtype, pin_memory=True).copy_(obj, non_blocking=non_blocking)
        else:
            out = obj.to(device, non_blocking=non_blocking)
        if memo is not None:
            memo[id(obj)] = (obj, out)  # the source kept alive: its id stays its own
        return out
    if isinstance(obj, dict):
        if type(obj) is dict:
            return {k: move(v, device, pin, non_blocking, memo) for k, v in obj.items()}
        for k in list(obj.keys()):
            obj[k] = move(obj[k], device, pin, non_blocking, memo)
        return obj
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(move(v, device, pin, non_blocking, memo) for v in obj)
    if hasattr(obj, "__dict__") and not isinstance(obj, (type, nn.Module)):
        # an object holding tensors (a VAE's latent_dist): a copy with them moved; the original is left as it is
        moved = {k: move(v, device, pin, non_blocking, memo) for k, v in vars(obj).items() if torch.is_tensor(v)}
        if any(v is not vars(obj)[k] for k, v in moved.items()):
            obj = copy.copy(obj)
            vars(obj).update(moved)
    return obj


def _device_of(obj, default) -> torch.device:
    """The device of the first tensor in a nested structure of arguments, else ``default``."""
    if torch.is_tensor(obj):
        return obj.device
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        for v in obj:
            d = _device_of(v, None)
            if d is not None:
                return d
    return default


class DeviceUnit:
    """The own parameters and buffers of ``modules`` (not of their children unless listed).

    Onloading puts a new ``Parameter`` holding the device copy in each owner's slot, and offloading puts the
    original back (its ``.data`` the home tensor), rather than assigning ``.data``: that works for every
    device (``meta`` included) and the home tensors are never touched by the move."""

    def __init__(self, modules, device, pin: bool, pin_later: bool = False):
        """``pin``: pin the home tensors now; ``pin_later``: pin them when the unit crosses a second time (a text
        encoder, which crosses once when the calibration's pass ahead keeps its outputs, else at every call)."""
        self.device = torch.device(device)
        self.loaded = False
        self.pin_later, self.crossed = pin_later, False
        self._pending = None  # the event of a copy on a side stream
        self.pinned = False
        self._params: dict[int, tuple[nn.Parameter, list[tuple[nn.Module, str]]]] = {}
        self._buffers: list[tuple[nn.Module, str, torch.Tensor]] = []
        for m in modules:
            for name, p in m._parameters.items():
                if p is None:
                    continue
                if id(p) not in self._params:
                    self._params[id(p)] = (p, [])
                self._params[id(p)][1].append((m, name))  # a tied weight (T5's embedding): every owner
            for name, b in m._buffers.items():
                if b is not None:
                    self._buffers.append((m, name, b))
        if pin:
            self.pin_home()

    def pin_home(self) -> None:
        """The home tensors moved to pinned CPU memory (once; while the unit is at home): copies from there can be
        asynchronous and run at full speed. One tensor at a time, each replacing its pageable original: never the
        model twice in memory."""
        if self.pinned:
            return
        for p, _ in self._params.values():
            p.data = _pinned(p.data)
        self._buffers = [(m, name, _pinned(b)) for m, name, b in self._buffers]
        for m, name, b in self._buffers:
            m._buffers[name] = b
        self.pinned = True

    def onload(self, stream=None) -> None:
        """The device copies in place; with a CUDA ``stream`` (a side stream), copied there from pinned memory,
        asynchronously, into memory allocated on the current (compute) stream: the copy first waits for what the
        compute stream has queued (the memory may be a block it just freed), and the compute stream's allocator
        reuses it in its own order, so prefetching never holds more than the blocks themselves. :meth:`ready_for`
        then makes the compute stream wait for the copy before it reads it."""
        if self.loaded:
            return
        if self.pin_later and self.crossed:
            self.pin_home()  # once: a no-op when pinned
        self.crossed = True
        if stream is None:
            for p, owners in self._params.values():
                self._point(owners, p, p.data.to(self.device, non_blocking=True))
            for m, name, b in self._buffers:
                m._buffers[name] = b.to(self.device, non_blocking=True)
        else:
            params = [(p, owners, torch.empty_like(p.data, device=self.device)) for p, owners in self._params.values()]
            buffers = [(m, name, b, torch.empty_like(b, device=self.device)) for m, name, b in self._buffers]
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for p, owners, t in params:
                    self._point(owners, p, t.copy_(p.data, non_blocking=True))
                for m, name, b, t in buffers:
                    m._buffers[name] = t.copy_(b, non_blocking=True)
                event = torch.cuda.Event()
                event.record(stream)
            self._pending = event
        self.loaded = True

    @staticmethod
    def _point(owners, p: nn.Parameter, t: torch.Tensor) -> None:
        moved = nn.Parameter(t, requires_grad=p.requires_grad)
        for m, name in owners:
            m._parameters[name] = moved

    def ready_for(self, stream) -> None:
        """``stream`` waits for the copy :meth:`onload` made on a side stream."""
        if self._pending is not None:
            stream.wait_event(self._pending)
            self._pending = None

    def offload(self) -> None:
        self._pending = None
        for p, owners in self._params.values():
            for m, name in owners:
                m._parameters[name] = p
        for m, name, b in self._buffers:
            m._buffers[name] = b
        self.loaded = False

    def release(self) -> None:
        """Forget the tensors: once a block's linears are replaced, the home copies of their 16-bit weights
        would otherwise stay alive (12 GB of pinned memory by the end of FLUX)."""
        self._params, self._buffers = {}, []
        self.loaded = False


def _streamed_after(units: list[DeviceUnit], resident: int, i: int) -> DeviceUnit | None:
    """The unit to prefetch when block ``i`` is called: the next block that is not resident (from the first block:
    not from the model's entry, where a calibration forward that ends at the first block would have it cross for
    nothing)."""
    j = max(i + 1, resident)
    return units[j] if j < len(units) else None


def _pinned(t: torch.Tensor) -> torch.Tensor:
    if t.device.type != "cpu" or t.is_pinned():
        return t
    return t.pin_memory()


def own_modules(root: nn.Module, exclude: list[nn.Module]) -> list[nn.Module]:
    """``root`` and its submodules that are not inside one of ``exclude`` (the blocks)."""
    skip = {id(m) for e in exclude for m in e.modules()}
    return [m for m in root.modules() if id(m) not in skip]


class Streamed:
    """Hooks that run ``model`` (and ``others``: a pipeline's other models) on ``device`` while their tensors
    stay at home. ``blocks``: the model's blocks, each its own unit; the rest of the model is one unit.
    Transfers are timed on ``clock`` as the stage ``transfers``. Use as a context manager: on exit every
    unit is offloaded and every hook removed.

    resident: how many of ``blocks`` (the first ones) stay on the device between the model's calls once they
    have been there: through a pipeline the model runs once per denoising step, and each resident block then
    crosses once per prompt instead of once per step. They make room, with the rest of the model, whenever one
    of ``others`` (a text encoder) runs, and come back at the model's next call, unless that one runs beside them.
    other_blocks: ``{id(model): its blocks}`` for those of ``others`` that stream block by block (Wan 2.2's other
    expert, which runs the steps it owns while this one is calibrated; a text encoder's layers): each of those
    blocks is its own unit, on the device only during its forward, so a 14B expert never needs its 28 GB on the
    device at once.
    beside: the ids of those of ``others`` that run beside the resident blocks, one of their blocks at a time in the
    room the model's forward leaves (:func:`svdquant.calibration.memory.runs_beside`): at each pipeline call T5-XXL
    would otherwise send FLUX.1-dev's 17 resident GB home and bring them back.
    pin: move the home tensors to pinned CPU memory first (default: when streaming from the CPU to a GPU).
    Pinning costs about a second per GB up front and pays back on every copy after, so it pays when each
    block crosses many times (calibrating through a pipeline: one forward per denoising step), not when
    each crosses about twice (calibrating on forward inputs, where the forwards stop at the first block).
    The resident blocks (and the rest with them) are pinned only once something sends them home (a model that does
    not run beside them): until then they cross once, and pinning them would cost more than that crossing (about a
    second per GB: 17 s for FLUX.1-dev's resident 17 GB at a 24 GB cap). The others are pinned when they cross a
    second time: a text encoder whose outputs the calibration's pass ahead keeps crosses once.
    prefetch: when a block is called, the next streamed (not resident) block's copy starts, on a
    side CUDA stream, so that it crosses while this one computes; the next block then waits for it (default: with
    ``pin`` on a GPU, where copies can be asynchronous; forced elsewhere, the copies are made then and there, in the
    same order). It holds one more block on the device: the margin counts four.
    keep_rest: the rest of the model stays on the device between calls (and after a call stopped early,
    :meth:`settle`): calibrating on forward inputs, every call runs the embedders and stops at the first block, so
    FLUX.1-dev's 0.13 GB rest would otherwise cross 128 times, pageable (~2 s of an H100 run's 5 s of calibration
    transfers, NOTES-GPU.md session 26)."""

    def __init__(self, model: nn.Module, blocks: list[nn.Module], device, home, *, others=(),
                 other_blocks: dict[int, list[nn.Module]] | None = None, clock: StageClock | None = None,
                 pin: bool | None = None, resident: int = 0, beside=(), prefetch: bool | None = None,
                 keep_rest: bool = False):
        self.device, self.home = torch.device(device), torch.device(home)
        self.clock = clock or StageClock(self.device)
        if pin is None:
            pin = self.device.type == "cuda" and self.home.type == "cpu"
        self.pin = pin
        if prefetch is None:
            prefetch = pin and self.device.type == "cuda"
        self._copies = torch.cuda.Stream(self.device) if prefetch and self.device.type == "cuda" else None
        self._prefetch = prefetch
        self.blocks = {id(b): DeviceUnit(list(b.modules()), device, pin and i >= resident)
                       for i, b in enumerate(blocks)}
        self.rest = DeviceUnit(own_modules(model, blocks), device, pin and not resident)
        self.keep_rest = keep_rest
        other_blocks = other_blocks or {}
        # the others (text encoders) cross once when the pass ahead keeps their outputs: pinned if they cross again
        self.others = [(m, DeviceUnit(own_modules(m, other_blocks.get(id(m), [])), device, False, pin_later=pin))
                       for m in others]
        self._handles = []
        self._held: set[int] = set()  # others that stay on the device after their calls (:meth:`hold`)
        self._answered: set[int] = set()  # others whose current call runs nothing (:meth:`answer`)
        self._calls: dict[int, list] = {}  # per model, its calls under way (:meth:`_entry`)
        self.resident = [self.blocks[id(b)] for b in blocks[:resident]]
        if self.resident:
            self.resident.append(self.rest)
        units = [self.blocks[id(b)] for b in blocks]
        self._entry(model, self.rest, keep=bool(self.resident) or keep_rest)
        for i, (b, unit) in enumerate(zip(blocks, units)):
            self._stream_block(b, unit, offload_after=i >= resident, then=_streamed_after(units, resident, i))
        self.other_block_units = []
        for m, unit in self.others:
            own = [DeviceUnit(list(b.modules()), device, False, pin_later=pin) for b in other_blocks.get(id(m), [])]
            self._entry(m, unit, make_room=id(m) not in beside)
            self._handles += [CallThrough(m, name) for name in entry_methods(m)]
            for i, (b, u) in enumerate(zip(other_blocks.get(id(m), []), own)):
                self._stream_block(b, u, then=own[i + 1] if i + 1 < len(own) else None, owner=id(m))
            self.other_block_units += own

    def _stream_block(self, block: nn.Module, unit: DeviceUnit, offload_after: bool = True,
                      then: DeviceUnit | None = None, owner: int | None = None) -> None:
        # prepended, as at the model's entry: hooks registered on the block before streaming began see it loaded
        # (a snapshot recorder that may end the forward there goes first: it reads only the block's arguments)
        def pre(m, a):
            self._onload(unit)
            self._start(then)

        self._handles.append(block.register_forward_pre_hook(pre, prepend=True))
        if offload_after:
            self._handles.append(block.register_forward_hook(
                lambda m, a, o: None if owner in self._held else unit.offload()))

    def unit(self, block: nn.Module) -> DeviceUnit:
        return self.blocks[id(block)]

    def _onload(self, unit: DeviceUnit) -> None:
        if not unit.loaded:
            with self.clock.stage("transfers"):
                unit.onload()
        elif self._copies is not None:  # prefetched: the copy was queued on the side stream
            with self.clock.stage("transfers"):  # what the compute stream waits for it
                unit.ready_for(torch.cuda.current_stream(self.device))

    def _start(self, unit: DeviceUnit | None) -> None:
        """The prefetch of ``unit`` (the next streamed block), if it is not on the device already."""
        if self._prefetch and unit is not None and not unit.loaded:
            with self.clock.stage("transfers"):
                unit.onload(self._copies)

    def _entry(self, module: nn.Module, unit: DeviceUnit, keep: bool = False, make_room: bool = False) -> None:
        # per call under way, where the caller's inputs were (its outputs go back there), None for a call inside a
        # call of the module (AutoencoderKL's forward calls its encode): that one moves nothing
        calls = self._calls.setdefault(id(module), [])

        def pre(m, args, kwargs):
            if id(m) in self._answered:
                return None
            if calls:
                calls.append(None)
                return None
            if make_room:
                for u in [u for u in self.resident if u.loaded]:
                    u.offload()
                    if self.pin and not u.pinned:  # they will cross again at every call: pinned from now on
                        t0 = time.perf_counter()
                        u.pin_home()
                        self.clock.add("pin memory", time.perf_counter() - t0)
            self._onload(unit)
            calls.append(_device_of((args, kwargs), self.home))
            return move(args, self.device, non_blocking=self.pin), move(kwargs, self.device, non_blocking=self.pin)

        def post(m, args, kwargs, out):
            if id(m) in self._answered:
                self._answered.discard(id(m))
                return None
            caller = calls.pop() if calls else self.home
            if caller is None:
                return None
            if not keep and id(m) not in self._held:
                unit.offload()
            # Not always home: a pipeline asks its modules' device for where to make latents, and with resident
            # blocks on the GPU between calls it answers the GPU; the scheduler then needs the output there too.
            return move(out, caller)

        # prepend: the pre-hook runs before hooks a caller registered earlier, which then see device inputs
        self._handles.append(module.register_forward_pre_hook(pre, with_kwargs=True, prepend=True))
        self._handles.append(module.register_forward_hook(post, with_kwargs=True))

    def hold(self, models) -> None:
        """``models`` (of ``others``) stay on the device after their calls, their blocks too, until :meth:`let_go`:
        the text encoders of the calibration's pass ahead (:mod:`svdquant.calibration.ahead`), in which no
        denoiser call needs the room."""
        self._held = {id(m) for m in models}

    def let_go(self) -> None:
        """The held models back home (and held no more)."""
        self._held = set()
        for unit in [*(u for _, u in self.others), *self.other_block_units]:
            if unit.loaded:
                unit.offload()

    def answer(self, model: nn.Module) -> None:
        """``model``'s current call (one of ``others``, told by a pre-hook that runs before this one's) moves
        nothing: its output is known and its forward only returns it (:mod:`svdquant.calibration.ahead`)."""
        self._answered.add(id(model))

    def answered_none(self) -> None:
        """Forget calls marked answered (:meth:`answer`) whose forward never ran: a hook that raised in between."""
        self._answered = set()

    def offload(self) -> None:
        """Every unit back home: after a forward that ended early (an exception, or the calibration stopping it
        at the first block), whose forward hooks did not run, and, through a pipeline, before the quantize phase's
        snapshots are sized to the room left (:func:`svdquant.calibration.calibrate_stacks`)."""
        self._ended()
        for unit in self._units():
            if unit.loaded:
                unit.offload()

    def settle(self) -> None:
        """After a forward the calibration ended early: every unit its end would have sent home goes home; the
        resident blocks (and the rest with them) stay for the next call, as after a whole forward."""
        self._ended()
        stay = {id(u) for u in self.resident} | ({id(self.rest)} if self.keep_rest else set())
        for unit in self._units():
            if unit.loaded and id(unit) not in stay:
                unit.offload()

    def _ended(self) -> None:
        """The calls under way ended (their forward hooks will not run)."""
        for calls in self._calls.values():
            calls.clear()

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for unit in self._units():
            unit.offload()

    def _units(self) -> list[DeviceUnit]:
        return [*self.blocks.values(), self.rest, *(u for _, u in self.others), *self.other_block_units]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def finish_block(unit: DeviceUnit, block: nn.Module, home: torch.device, keep_on_device: bool,
                 clock: StageClock) -> None:
    """A quantized block's place: back home (its 16-bit leftovers point at their home copies again, its new
    quantized layers move), or kept on the device."""
    with clock.stage("transfers"):
        if not keep_on_device:
            unit.offload()
            block.to(home)
        unit.release()
