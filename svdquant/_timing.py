"""Seconds per stage of a long job, summed (the quantizer's profile: where the time of a run goes).

On a CUDA device a stage is timed between two events recorded on the current stream, read when the
clock is flushed: timing a copy or a block replay this way adds no host synchronization, which would
stall the CPU from queueing the next kernels and so change what is measured. On the CPU, wall time.

Each stage is also a ``torch.profiler`` range named ``svdquant::<stage>`` (as are the per-group stages of
:func:`svdquant.algorithm.layer.quantize_linears`): under a profiler, the GPU time of the kernels a stage
launched sums up under its name (``benchmarks/quantize_flux.py --profile``); without one a range costs about a
microsecond.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch


class StageClock:
    def __init__(self, device: torch.device | str | None = None):
        self.cuda = device is not None and torch.device(device).type == "cuda"
        self.seconds: dict[str, float] = {}
        self._pending: list[tuple[str, object, object]] = []

    def add(self, stage: str, seconds: float) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds

    @contextmanager
    def stage(self, name: str):
        with torch.profiler.record_function(f"svdquant::{name}"):
            yield from self._timed(name)

    def _timed(self, name: str):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            try:
                yield
            finally:
                end.record()
                self._pending.append((name, start, end))
        else:
            t0 = time.perf_counter()
            try:
                yield
            finally:
                self.add(name, time.perf_counter() - t0)

    def flush(self) -> dict[str, float]:
        """Adds the stages still in flight on the GPU (waits for them) and returns the totals."""
        if self._pending:
            self._pending[-1][2].synchronize()
            for name, start, end in self._pending:
                self.add(name, start.elapsed_time(end) / 1e3)
            self._pending.clear()
        return self.seconds
