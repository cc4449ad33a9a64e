"""Calibration scheduling: which calibration calls run, how far, and what they leave for the block replays.

:func:`calibrate_stacks` runs the calibration calls and keeps each stack's first-block arguments (the snapshots),
on the device or at home as the memory policy says (:mod:`svdquant.calibration.memory`). Calibrating on forward
inputs, the whole forwards would compute nothing the replays do not compute again: once one forward has shown
that the model chains its stacks as the replays do (each stack's last block returns what the next stack's first
takes: FLUX's double and single blocks), the other forwards stop at the first block and the last block of a
stack makes the next stack's inputs (if not, they stop at the last stack's first block). Through a pipeline the
forwards before a call's last drawn step must run whole (they make the denoising trajectory), but its last drawn
forward stops as soon as it has given what is recorded: at the first block when the stacks chain.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from .._memory import tensor_bytes
from .._timing import StageClock
from . import memory
from .ahead import encode_ahead
from .capture import EntryRecorder, run_calibration, run_inputs, stop_forward
from .chain import ChainCheck, adds_between_blocks
from .offload import move


@dataclass
class Calibrated:
    """What the calibration leaves for the block replays."""

    entries: dict[str, list[dict]]  # per stack, one dict of first-block arguments per snapshot
    chained: bool  # only the first stack's entries: each stack's last block makes the next stack's
    on_device: bool  # the snapshots stay on the device for the whole quantize phase (else at home, moved per block)
    count: int  # snapshots

    def move_entries(self, device, clock: StageClock) -> None:
        """The entries on ``device`` at once (recorded at home through a pipeline, held on the device): one
        crossing for all blocks."""
        with clock.stage("transfers"):
            memo: dict = {}  # a value shared by all snapshots (rotary embedding) crosses once
            self.entries = {k: move(v, device, memo=memo) for k, v in self.entries.items()}


def calibrate_stacks(pipe, model, adapter, calib, blocks, streamed, *, device, home, stream: bool, cap: int | None,
                     progress: bool, desc: str = "calibrating", search_bytes: int = 0) -> Calibrated:
    """Runs the calibration calls, keeping the arguments of each stack's first block (the snapshots).

    Through a pipeline, a call's forwards run whole up to its last drawn step (the denoising trajectory needs
    them), and the first of them is checked as below: if the model chains its stacks, only the first stack's
    entries are kept (those recorded before the check ended included) and every call's last drawn forward stops
    at the first block; if not, each stack's entry is recorded and that forward stops at the last stack's first
    block. A one-stack model's calls stop at the first block from the start. On forward inputs
    (``Calibration(inputs=)``), the whole forward computes nothing the block replays do not compute again: the
    first input runs under a :class:`ChainCheck` as far as the last stack's first block (:func:`record_first`), and
    if the model chains its blocks and stacks the way the replays do (FLUX: each stack's last block returns what
    the next stack's first block takes) and no input passes ControlNet residuals, the other inputs stop at the
    first block and only the first stack's entries are kept; otherwise (residuals added between blocks, FLUX.2's
    and Z-Image's stacks) they stop at the last stack's first block. Either way the replays then see the same
    block inputs (bit for bit on the CPU). ``blocks``: the model's (name, block) pairs; ``streamed``: its
    :class:`~svdquant.calibration.offload.Streamed` hooks when streaming, else None; ``desc``: the progress bar's
    title; ``search_bytes``: what a block's groups quantized at once hold
    (:func:`svdquant.calibration.memory.snapshots_fit`).
    """
    stacks = adapter.stacks
    home_pin = stream and device.type == "cuda"  # snapshots left at home wait in pinned memory
    home_store = home if stream else device
    block_bytes = max(tensor_bytes(b) for _, b in blocks)
    on_stop = streamed.settle if streamed is not None else None  # what stays between calls stays (Streamed)
    if calib.inputs is None:
        holder: dict = {}  # the recorder, and the check of the first forward

        def hooks(selector):
            rec = holder["r"] = EntryRecorder(model, stacks, selector, home_store, pin=home_pin,
                                              share_except=adapter.outputs, finish_calls=len(stacks) == 1)
            if len(stacks) == 1:
                return rec.close
            holder["chain"] = FirstForwardCheck(model, adapter, rec)
            return lambda: (holder["chain"].close(), rec.close())

        # batched where each call streams the blocks to a GPU (Calibration.batch_for)
        to_gpu = stream and device.type == "cuda"
        count = run_calibration(pipe, model, calib, hooks, progress, desc, streaming=to_gpu,
                                on_stop=streamed.settle if streamed is not None else None,
                                ahead=functools.partial(encode_ahead, pipe, streamed, cap=cap))
        entries = holder["r"].entries
        chained = "chain" in holder and holder["chain"].chained
        held = memory.nbytes(entries) + max(memory.nbytes(e) for e in entries.values())  # and one stack's outputs
        if streamed is not None:  # the resident blocks' room is the quantize phase's: asked without them there
            streamed.offload()
        on_device = memory.hold_snapshots(device, cap, stream, held, block_bytes, search_bytes)
        return Calibrated(entries, chained, on_device, count)
    first, chained = record_first(model, adapter, calib.inputs[0], home_store, on_stop)
    chained = chained and not any(adds_between_blocks(kw) for kw in calib.inputs)
    count = len(calib.inputs)
    one = max(memory.nbytes(e) for e in first.values())  # one snapshot of one stack
    # held at once: one stack's entries and the outputs made from them (and, recording every stack, all of them),
    # scaled from the first input to all of them by their own sizes (inputs may hold different batches)
    scale = sum(memory.nbytes(kw) for kw in calib.inputs) / max(1, memory.nbytes(calib.inputs[0]))
    held = int(scale * (2 * one if chained else memory.nbytes(first) + one))
    on_device = memory.hold_snapshots(device, cap, stream, held, block_bytes, search_bytes)
    store, pin = (device, False) if on_device or not stream else (home, home_pin)
    kept = stacks[:1] if chained else stacks
    # every forward ends once it has given its entries: at the first block when chained, else at the last stack's
    rec = EntryRecorder(model, kept, None, store, pin, finish_calls=True, share_except=adapter.outputs,
                        first={s: [move(e, store, pin=pin) for e in first[s]] for s in kept})
    try:
        run_inputs(model, calib.inputs[1:], on_stop=on_stop, progress=progress)
    finally:
        rec.close()
    return Calibrated(rec.entries, chained, on_device, count)


def chain_check(model, adapter) -> ChainCheck:
    """A :class:`ChainCheck` over every block up to the last stack's first."""
    seqs = [model.get_submodule(s) for s in adapter.stacks]
    return ChainCheck([b for seq in seqs[:-1] for b in seq] + [seqs[-1][0]], adapter.outputs)


class FirstForwardCheck:
    """Through a pipeline: checks the model's first forward (:func:`chain_check`, and no ControlNet residuals in its
    call: :func:`~svdquant.calibration.chain.adds_between_blocks`); once it has run, ``rec`` keeps the first stack
    only if the stacks chain (``chained``), and ends each call's last drawn forward as soon as it holds that
    forward's entries. ``close()`` removes the check's hooks (after the first forward, or at the end)."""

    def __init__(self, model, adapter, rec: EntryRecorder):
        self.chained = False
        self._check = chain_check(model, adapter)
        self._residuals = False

        def before_first(module, args, kwargs):
            self._residuals = adds_between_blocks(kwargs)

        def after_first(module, args, out):
            self.close()
            self.chained = self._check.ok and not self._residuals
            if self.chained:
                rec.keep(adapter.stacks[:1])
            rec.finish_calls = True

        self._handles = [model.register_forward_pre_hook(before_first, with_kwargs=True),
                         model.register_forward_hook(after_first)]

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._check.close()


def record_first(model, adapter, kw: dict, store, on_stop) -> tuple[dict[str, list[dict]], bool]:
    """The first snapshot's entry of every stack (a list each: empty if the model never called the stack), from
    one forward on ``kw``, and whether the replays may derive the later stacks' entries (:class:`ChainCheck`
    over every block up to the last stack's first). The forward stops at the last stack's first block, once the
    check has read its arguments and its entry is kept: nothing after it is needed (one stack: at the first block,
    with nothing to derive). FLUX.1-dev streamed: its 37 other single blocks (11.5 GB) no longer cross."""
    stacks = adapter.stacks
    if len(stacks) == 1:
        rec = EntryRecorder(model, stacks, None, store, stop=True)
        try:
            run_inputs(model, [kw], on_stop=on_stop, progress=False)
        finally:
            rec.close()
        return rec.entries, True
    check = chain_check(model, adapter)
    rec = EntryRecorder(model, stacks, None, store)
    # after the check's and the recorder's hooks (registered before it), the forward ends at the last stack's start
    stop = model.get_submodule(stacks[-1])[0].register_forward_pre_hook(stop_forward)
    try:
        run_inputs(model, [kw], on_stop=on_stop, progress=False)
    finally:
        stop.remove()
        rec.close()
        check.close()
    return rec.entries, check.ok
