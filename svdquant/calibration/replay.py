"""Replaying blocks in 16 bits on the snapshots, recording what their linears read.

The quantize phase walks the blocks in order (:func:`replay_jobs`): each block replays on every snapshot, a
:class:`~svdquant.calibration.LinearInputRecorder` keeps its linears' inputs, and its 16-bit outputs become the
next block's inputs (the last block of a stack makes the next stack's entries when the model was checked to chain
so). On a GPU the next block replays in a worker thread on a side CUDA stream while this one is searched
(:class:`Replayer`).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch
import torch.nn as nn

from .._timing import StageClock
from .capture import LinearInputRecorder, keep_entry
from .chain import next_inputs
from .offload import move
from .replay_graph import TOTALS as GRAPH_TOTALS, CudaCapture, GraphedCalls

# the replays' side stream's CUDA priority (lower runs first; torch.cuda.Stream.priority_range() says how low):
# 0, torch's default. A higher one (-1), beside graphed replays and overlapped blocks, slowed the search more than
# it sped the replays (87.4 s against 80.4, an H100, NOTES-GPU.md session 26); ``quantize_flux.py
# --replay-priority`` is the A/B
REPLAY_PRIORITY = 0
# a block's replayed calls launched as one captured CUDA graph (svdquant.calibration.replay_graph). Off: on an H100
# they cut the replay thread's time by 28 % but the 57-block run only from 81.8 to 80.4 s, for 0.9 GB more at the
# peak (the replays wait for the GPU the search keeps busy, not for their launches; session 26);
# ``quantize_flux.py --replay-graphs on`` is the A/B
REPLAY_GRAPHS = False


@dataclass
class ReplayJob:
    """One block to replay: its name in the model, its groups, and where its inputs come from."""

    name: str
    block: nn.Module
    groups: list
    recorded: list[dict] | None  # the stack's recorded entries, for its first block
    last: bool  # the stack's last block: its outputs are no block's inputs...
    chain: bool  # ...unless they make the next stack's entries


def overlap_replays(device: torch.device) -> bool:
    """Replay the next block while this one is searched: on a GPU, where the search leaves it mostly idle
    (the search is bound by the host's kernel launches, ``benchmarks/quantize_search.py``)."""
    return device.type == "cuda"


class Replayer:
    """Each block in 16 bits on every snapshot, its linears' inputs recorded; with ``overlap``, in a worker
    thread on a side CUDA stream, so that a block's replays run while the previous block is searched.

    Tensors change streams at three points: a replay starts after the work the main stream has queued
    (:meth:`start`: the calibration's entries), its outputs, recordings and onloaded weights reach the search
    after the worker waited on the host for the replay to complete, and the main stream is drained
    (:meth:`settle`) before a searched block's tensors are freed; so neither stream reads what the other has
    not finished writing, and neither allocator hands out memory that a kernel queued on the other still
    reads. A replay usually ends before the search of the previous block does, so the waits cost nothing.
    ``overlap``: default :func:`overlap_replays`."""

    def __init__(self, adapter, streamed, device, home, spill, pin, store, tokens, seed, *,
                 overlap: bool | None = None):
        self.adapter, self.streamed, self.device, self.home = adapter, streamed, device, home
        self.spill, self.pin, self.store, self.tokens, self.seed = spill, pin, store, tokens, seed
        overlap = overlap_replays(device) if overlap is None else overlap
        self.overlap = overlap
        self.cuda = overlap and device.type == "cuda"
        self._pool = None
        if overlap:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(1, thread_name_prefix="svdquant-replay")
            self._side = torch.cuda.Stream(device, priority=REPLAY_PRIORITY) if self.cuda else None
        self._capture = self._graph_capture()

    def _graph_capture(self):
        """How a block's calls are captured (:mod:`svdquant.calibration.replay_graph`): with
        :data:`REPLAY_GRAPHS`, on the replays' side stream; else None (eager)."""
        return CudaCapture(self._side) if self.cuda and REPLAY_GRAPHS else None

    def start(self, job: ReplayJob, snaps: list[dict]):
        """Starts the replay (with ``overlap``; else it runs in :meth:`finish`: one block on the device at a
        time); returns what :meth:`finish` takes."""
        clock = StageClock(self.device)
        if not self.overlap:
            return job, snaps, None, clock
        if self.cuda:  # the side stream starts after what the main stream queued (the calibration's entries)
            self._side.wait_stream(torch.cuda.current_stream(self.device))

        def work():
            # grad mode is per thread: without no_grad the worker's forwards would record autograd graphs
            with torch.no_grad(), torch.cuda.stream(self._side) if self.cuda else contextlib.nullcontext():
                out = self.replay(job, snaps, clock)
            if self.cuda:  # complete before the search reads it: no tensor changes streams while one still uses it
                self._side.synchronize()
            return out

        return job, snaps, self._pool.submit(work), clock

    def finish(self, pending, clock: StageClock):
        """The replay's (recorder, next block's inputs), once the main stream may read them; its stage times
        go to ``clock`` (with ``overlap``, "waiting for replays" is what the search did not hide)."""
        job, snaps, future, own = pending
        if future is None:
            result = self.replay(job, snaps, own)
        else:
            t0 = time.perf_counter()
            result = future.result()
            clock.add("waiting for replays", time.perf_counter() - t0)
        for stage, seconds in own.flush().items():
            clock.add(stage, seconds)
        return result

    def settle(self) -> None:
        if self.cuda:
            torch.cuda.current_stream(self.device).synchronize()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)  # a replay still running (an error in the search) ends first
        if isinstance(self._capture, CudaCapture):
            self._capture.close()

    def replay(self, job: ReplayJob, snaps: list[dict], clock: StageClock):
        block, spill, pin, device, home = job.block, self.spill, self.pin, self.device, self.home
        if self.streamed is not None:
            with clock.stage("transfers"):
                self.streamed.unit(block).onload()
        firsts = {g.names[0]: block.get_submodule(g.names[0]) for g in job.groups}
        rec = LinearInputRecorder(firsts, len(snaps), self.tokens, self.seed, where=job.name)
        graphed = GraphedCalls(block, rec, self._capture) if self._capture is not None else None
        call = graphed if graphed is not None else (lambda entry: block(**entry))
        nxt = []
        try:
            for s in snaps:
                if spill:
                    with clock.stage("transfers"):
                        s_dev = move(s, device, non_blocking=pin)
                else:
                    s_dev = s
                with clock.stage("replays"):
                    out = call(s_dev)
                if not job.last:
                    if spill:
                        with clock.stage("transfers"):
                            out = move(out, home, pin=pin, non_blocking=pin)
                    nxt.append(next_inputs(s, out, self.adapter.outputs_of(job.name)))  # per stack
                elif job.chain:  # the next stack's entry, kept as the calibration keeps a recorded one
                    with clock.stage("transfers" if spill else "replays"):
                        nxt.append({**s, **keep_entry(next_inputs({}, out, self.adapter.outputs_of(job.name)),
                                                      self.store, pin)})
                del s_dev, out
        finally:
            if graphed is not None:
                graphed.close()
                GRAPH_TOTALS.add(graphed)
            rec.close()
        return rec, nxt


def replay_jobs(stacks, planned: list[tuple[str, nn.Module, list]], entries: dict[str, list[dict]],
                chained: bool) -> list[ReplayJob]:
    """One job per block of ``planned`` ((name, block, groups), in order), stack by stack: a stack's first block
    takes its recorded ``entries`` (taken out of the dict, so that they are freed with the job), or, ``chained``,
    the previous stack's last block makes them."""
    jobs: list[ReplayJob] = []
    for si, stack in enumerate(stacks):
        # recorded entries (else: made by the previous stack's last block, chained: the model was checked to
        # chain so)
        recorded = None if (chained and si > 0) else entries.pop(stack)
        chain_on = chained and si < len(stacks) - 1  # this stack's last block makes the next's
        stack_blocks = [(n, b, g) for n, b, g in planned if n.rsplit(".", 1)[0] == stack]
        for bi, (bname, block, groups) in enumerate(stack_blocks):
            last = bi == len(stack_blocks) - 1
            jobs.append(ReplayJob(bname, block, groups, recorded if bi == 0 else None, last, last and chain_on))
    return jobs
