"""Several groups of one block quantized at once on a GPU, each in a worker thread on its own CUDA stream.

Why: one group's search, refinement and GPTQ are bound by the host. Each candidate batch is dozens of small
launches ending in a copy to the host (an eigendecomposition there, then the errors), so one thread leaves the
GPU idle most of the time: ``benchmarks/quantize_search.py`` measured 419 ms of CPU against 137 ms of GPU for a
FLUX q/k/v group. PyTorch releases the GIL while it dispatches and launches an op and while it waits for a copy,
so one worker launches while another waits on its stream, and their kernels overlap on the GPU.

What keeps it safe:

* the groups of a block are independent: each reads its own recorded inputs and weights and only returns its
  result; the modules are swapped in by the caller, in the block's order, after every group is done;
* each worker waits for what the caller's stream had queued when the groups were submitted, and synchronizes its
  stream before returning, so the caller reads only finished tensors; the caller starts no new workers before
  its own stream is drained (the block loop settles it), so no allocator hands out memory a kernel queued on
  another stream still reads;
* the first block of each stack runs its groups one at a time (``concurrent=False``): it compiles the Triton
  kernels of the search once (Triton's JIT is not safe to enter from two threads for one new kernel);
* a group that runs out of GPU memory beside the others runs again alone after them; any other error cancels
  the groups not yet started and is raised once the running ones end.

Grad mode is per thread: every worker runs under ``torch.no_grad()``.
"""

from __future__ import annotations

import contextlib
import queue
import time
from concurrent.futures import ThreadPoolExecutor, as_completed, wait
from typing import Callable, Sequence

import torch

_OUT_OF_MEMORY = object()  # what a worker returns for a group that ran out of GPU memory

# Groups at once on a GPU by default. Measured on an H200 (BENCHMARKS.md, "FLUX.1-dev on one H200 (part 2)"):
# a 9-block FLUX.1-dev-size model took 18.6 / 15.7 / 15.3 / 15.5 s with 1 / 2 / 3 / 4 workers, and the 57-block
# one 103.6 s with one, 82.6 s with three.
DEFAULT_GPU_WORKERS = 3


def default_workers(device: torch.device) -> int:
    """Groups quantized at once when ``quantize(workers=None)``: one on the CPU (the torch threads already use
    every core), :data:`DEFAULT_GPU_WORKERS` on a GPU."""
    return DEFAULT_GPU_WORKERS if device.type == "cuda" else 1


class GroupWorkers:
    """Runs the tasks of one block (each quantizes one group) ``workers`` at a time; ``run`` returns their results
    in order. With one worker (or ``concurrent=False``) the tasks run in the caller's thread, one after the
    other, as they always did."""

    def __init__(self, device: torch.device, workers: int):
        self.device, self.workers = device, workers
        self.cuda = device.type == "cuda"
        self._pool = None
        if workers > 1:
            self._pool = ThreadPoolExecutor(workers, thread_name_prefix="svdquant-group")
            self._streams: queue.SimpleQueue = queue.SimpleQueue()
            for _ in range(workers):
                self._streams.put(torch.cuda.Stream(device) if self.cuda else None)

    def run(self, tasks: Sequence[Callable[[], object]], done: Callable[[int], None] | None = None,
            concurrent: bool = True, costs: Sequence[float] | None = None) -> tuple[list, float]:
        """``[task() for task in tasks]`` and the wall seconds the tasks ran at once (0.0 when they ran one after
        the other); ``done(i)`` is called in the caller's thread as task ``i`` finishes. ``costs``: each task's
        expected time; at once, the costliest start first (longest processing time first: a long task started
        last would keep the block waiting on it alone)."""
        return self.submit(tasks, done, concurrent, costs).result()

    def submit(self, tasks: Sequence[Callable[[], object]], done: Callable[[int], None] | None = None,
               concurrent: bool = True, costs: Sequence[float] | None = None) -> "Batch":
        """:meth:`run`, returning once the tasks are queued (at once) or done (one after the other): the caller
        may queue the next block's before it takes this one's results (:meth:`Batch.result`)."""
        if self._pool is None or not concurrent or len(tasks) < 2:
            out = []
            for i, task in enumerate(tasks):
                out.append(task())
                if done is not None:
                    done(i)
            return Batch(tasks, done, self.cuda, results=out)
        ready = None
        if self.cuda:  # what the caller's stream queued (inputs, weights) comes before the workers' reads
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(self.device))
        order = sorted(range(len(tasks)), key=lambda i: -costs[i]) if costs is not None else range(len(tasks))
        batch = Batch(tasks, done, self.cuda)
        batch.futures = {self._pool.submit(self._work, tasks[i], ready): i for i in order}  # started in order
        return batch

    def _work(self, task, ready):
        stream = self._streams.get()
        try:
            with torch.no_grad(), torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                if ready is not None:
                    stream.wait_event(ready)
                try:
                    return task()
                except torch.OutOfMemoryError:
                    # a marker, not the exception: its traceback would hold the failed attempt's tensors (the
                    # group's fp32 problem, a candidate batch) until the caller drops it, through the retry
                    pass
            return _OUT_OF_MEMORY
        finally:
            if stream is not None:  # finished (or failed) before the caller reads the result or frees the inputs
                stream.synchronize()
            self._streams.put(stream)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


class Batch:
    """One block's tasks under way (:meth:`GroupWorkers.submit`)."""

    def __init__(self, tasks, done, cuda: bool, results: list | None = None):
        self.tasks, self.done, self.cuda = tasks, done, cuda
        self.futures: dict | None = None
        self._results = results
        self.t0 = time.perf_counter()

    def result(self) -> tuple[list, float]:
        """The tasks' results in order and the wall seconds from their submission (0.0 when they ran one after the
        other). A task that ran out of GPU memory beside the others runs again here, in the caller's thread; any
        other error cancels the tasks not started and is raised once the running ones end."""
        if self.futures is None:
            return self._results, 0.0
        tasks, done, futures = self.tasks, self.done, self.futures
        out: list = [None] * len(tasks)
        again = []
        try:
            for f in as_completed(futures):
                i = futures[f]
                res = f.result()  # an error: the groups not started are cancelled below, the running ones end
                if res is _OUT_OF_MEMORY:
                    again.append(i)  # beside the others; alone below
                    continue
                out[i] = res
                if done is not None:
                    done(i)
        except BaseException:
            self.cancel()
            raise
        finally:
            self.futures = futures = f = None
        wall = time.perf_counter() - self.t0
        if again and self.cuda:
            torch.cuda.empty_cache()  # the failed attempts' memory: nothing refers to it any more (see _work)
        for i in sorted(again):
            out[i] = tasks[i]()
            if done is not None:
                done(i)
        return out, wall

    def cancel(self) -> None:
        """Cancels the tasks not started and waits for the running ones: no worker still reads this block's
        tensors when the caller unwinds."""
        if self.futures:
            for f in self.futures:
                f.cancel()
            wait(self.futures)
        self.futures = None

