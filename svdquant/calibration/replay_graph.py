"""A block's replayed calls as one CUDA graph: captured once per block, launched once per snapshot.

A one-image replay of a FLUX.1-dev block is ~150-280 operators launched from Python (diffusers' block and the
recorders' hooks) for ~2-3 ms of BF16 arithmetic: 5.3 ms a call alone and 7.5 ms beside the three search threads
(NOTES-GPU.md, sessions 11 and 25), when the replays set the quantize phase's pace. Captured, a call is a few copies
and one graph launch (the CUDA programming guide, "CUDA Graphs"; ``torch.cuda.CUDAGraph``). Measured on an H100
(session 26), the graphs cut the replay thread's time by 28 %, but a graphed call still took ~6.4 ms beside the
search: the replays wait for the GPU the search keeps busy more than for their launches, and the 57-block run went
from 81.8 to 80.4 s for 0.9 GB more at the peak. So they are opt-in (:data:`svdquant.calibration.replay.REPLAY_GRAPHS`).

How a call runs (:class:`GraphedCalls`):

* the first call of a block runs eagerly: it is the warm-up a capture needs (cuBLAS handles and workspaces, Triton
  compiles, the recorders' token subsets made), and it tells each recorder key its token count;
* the second is captured (not run) from static copies of its arguments, with the recorders' hooks in their static
  form (:class:`StaticRecords`): max|x| folded into a running fp32 buffer, the call's token subset gathered through
  a static index set before every launch. Capture runs in the replay thread's own mode
  (``capture_error_mode="thread_local"``): the search threads keep launching on their streams meanwhile;
* every call whose arguments have the captured call's structure (tensors of the same shapes, dtypes, strides and
  devices; every other value the same) then copies its tensors into the static ones, launches the graph, and takes
  a clone of the outputs and of each key's gathered tokens; any other call runs eagerly, in order.

Bit for bit the eager replay's records and outputs: the same kernels on the same values, max folded in any order
being the same max. A block whose capture fails (an operator a graph cannot hold: a host sync, a copy from
pageable memory, a layer called twice a call) replays eagerly, as before. Graphs of successive blocks share one
memory pool, never launched at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn
from torch.utils import _pytree as pytree

from .capture import LinearInputRecorder, token_subset
from .chain import same


class NotCapturable(RuntimeError):
    """A call the static records cannot hold: the capture is given up, the block replays eagerly."""


class StaticRecords:
    """The recorders' hooks in a captured call: per key (the group's first linear), a running max|x| buffer
    (fp32, from zeros: max|x| ≥ 0), a static index of the call's token subset and the buffer it gathers into.
    Made from the warm-up call's token counts (:attr:`LinearInputRecorder.seen`)."""

    def __init__(self, rec: LinearInputRecorder, device: torch.device):
        self.rec, self.device = rec, device
        self.slots: dict[str, dict[str, Any]] = {}
        for key, (n, k, dtype) in rec.seen.items():
            take = min(rec.per_call, n)
            self.slots[key] = dict(n=n, take=take, amax=torch.zeros(k, dtype=torch.float32, device=device),
                                   idx=torch.zeros(take, dtype=torch.long, device=device),
                                   sample=torch.empty(take, k, dtype=dtype, device=device), launches=0)
        self._captured: set[str] = set()  # the keys recorded in the call captured

    def record(self, key: str, x: torch.Tensor) -> None:
        """The hook's work while the graph is captured: only operators on the static buffers."""
        slot = self.slots.get(key)
        if slot is None or key in self._captured or x.shape[0] != slot["n"] or x.dtype != slot["sample"].dtype:
            raise NotCapturable(f"{key}: not as in the warm-up call (called twice, or other tokens)")
        self._captured.add(key)
        am = torch.maximum(x.amax(0), x.amin(0).neg()).float()
        torch.maximum(slot["amax"], am, out=slot["amax"])
        torch.index_select(x, 0, slot["idx"], out=slot["sample"])

    def begin(self) -> None:
        self._captured = set()

    def check_captured(self) -> None:
        missing = set(self.slots) - self._captured
        if missing:
            raise NotCapturable(f"{sorted(missing)}: recorded in the warm-up call, not in the captured one")

    def before_launch(self) -> None:
        """Each key's token subset for the call about to launch (the recorder's next call count)."""
        rec = self.rec
        for key, slot in self.slots.items():
            slot["idx"].copy_(token_subset(rec.seed * 1_000_003 + rec.calls[key], slot["n"], slot["take"],
                                           self.device))

    def after_launch(self) -> None:
        rec = self.rec
        for key, slot in self.slots.items():
            rec.calls[key] += 1
            rec.samples[key].append(slot["sample"].clone())
            slot["launches"] += 1

    def fold(self) -> None:
        """The launches' max|x| into the recorder's (after the block's last call)."""
        rec = self.rec
        for key, slot in self.slots.items():
            if slot["launches"]:
                rec.amax[key] = torch.maximum(rec.amax[key], slot["amax"]) if key in rec.amax else slot["amax"]


@dataclass
class ReplayGraphStats:
    """How the replays ran, for benchmarks (``quantize_flux.py`` reports :data:`TOTALS`, summed over the process):
    blocks captured, calls launched from a graph and run eagerly, and why captures failed (the first few)."""

    blocks: int = 0
    captured: int = 0
    launches: int = 0
    eager: int = 0
    failures: list[str] = field(default_factory=list)

    def add(self, g: "GraphedCalls") -> None:
        self.blocks += 1
        self.captured += g.failure is None and g.launches > 0
        self.launches += g.launches
        self.eager += g.calls - g.launches
        if g.failure is not None and len(self.failures) < 8:
            self.failures.append(g.failure)


TOTALS = ReplayGraphStats()


def _signature(entry: dict[str, Any]):
    leaves, spec = pytree.tree_flatten(entry)
    tensors = tuple((t.shape, t.dtype, t.stride(), t.device) if torch.is_tensor(t) else None for t in leaves)
    return spec, tensors, [v for v in leaves if not torch.is_tensor(v)]


class CudaCapture:
    """Captures ``fn`` on ``stream`` into a CUDA graph: ``capture(fn) -> (its static outputs, the launch)``.

    The graphs of successive blocks share one memory pool (never launched at once: one replay thread). torch's
    allocator lets a pool be shared only while a graph still holds it (``create_or_incref_pool`` asserts a use count
    above zero), so each graph is held until the next one has been captured into the pool, then let go; after a
    capture that failed, the next one starts a pool of its own."""

    def __init__(self, stream: torch.cuda.Stream):
        self.stream = stream
        self.pool = torch.cuda.graph_pool_handle()
        self._held = None

    def __call__(self, fn: Callable[[], Any]) -> tuple[Any, Callable[[], None]]:
        graph = torch.cuda.CUDAGraph()
        ok = False
        try:
            with torch.cuda.stream(self.stream):
                graph.capture_begin(pool=self.pool, capture_error_mode="thread_local")
                try:
                    out = fn()
                finally:
                    graph.capture_end()  # ends the capture even after an error (then raises its own, if invalid)
            ok = True
        finally:
            if not ok:
                self.pool = torch.cuda.graph_pool_handle()
        self._held = graph
        return out, graph.replay

    def close(self) -> None:
        self._held = None


class GraphedCalls:
    """``block``'s calls for one replay (its recorder ``rec``): eager, then captured and launched (module
    docstring). ``capture(fn) -> (static outputs, launch)``: a :class:`CudaCapture` on a GPU. After the last call,
    :meth:`close` folds the launches' max|x| into the recorder and lets the graph go."""

    def __init__(self, block: nn.Module, rec: LinearInputRecorder, capture):
        self.block, self.rec, self._capture = block, rec, capture
        self.calls = self.launches = 0
        self._state = "warm-up"
        self._static_in = self._static_out = self._launch = self._records = self._sig = None
        self.failure: str | None = None

    def __call__(self, entry: dict[str, Any]):
        self.calls += 1
        if self._state == "warm-up":
            self._state = "capture"
            return self.block(**entry)
        if self._state == "capture":
            self._state = "off"
            try:
                self._capture_from(entry)
            except Exception as e:  # the block replays eagerly: a capture is an optimization, never a failure
                self._drop(f"{type(e).__name__}: {e}")
            else:
                self._state = "graph"
        if self._state == "graph" and self._fits(entry):
            return self._launched(entry)
        return self.block(**entry)

    def _capture_from(self, entry: dict[str, Any]) -> None:
        self._sig = _signature(entry)
        self._static_in = pytree.tree_map(lambda v: v.clone() if torch.is_tensor(v) else v, entry)
        device = next(t.device for t in pytree.tree_leaves(entry) if torch.is_tensor(t))
        self._records = StaticRecords(self.rec, device)
        self._static_out, self._launch = self._capture(self._static_call)
        self._records.check_captured()

    def _static_call(self):
        """The call a graph holds: the block on the static arguments, its recorders' hooks in their static form."""
        self._records.begin()
        self.rec.static = self._records
        try:
            return self.block(**self._static_in)
        finally:
            self.rec.static = None

    def _fits(self, entry: dict[str, Any]) -> bool:
        spec, tensors, plain = _signature(entry)
        return spec == self._sig[0] and tensors == self._sig[1] and all(
            same(a, b) for a, b in zip(plain, self._sig[2]))

    def _launched(self, entry: dict[str, Any]):
        for dst, src in zip(pytree.tree_leaves(self._static_in), pytree.tree_leaves(entry)):
            if torch.is_tensor(dst):
                dst.copy_(src)
        self._records.before_launch()
        self._launch()
        self._records.after_launch()
        self.launches += 1
        return pytree.tree_map(lambda v: v.clone() if torch.is_tensor(v) else v, self._static_out)

    def _drop(self, why: str) -> None:
        self.failure = why
        self._static_in = self._static_out = self._launch = self._records = None

    def close(self) -> None:
        if self._records is not None:
            self._records.fold()
        self._static_in = self._static_out = self._launch = self._records = None
