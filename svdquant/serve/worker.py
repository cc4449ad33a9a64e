"""One worker thread that owns the pipeline and drains a bounded queue in micro-batches.

One thread, because one GPU runs one pipeline call at a time; batching several requests into one call
is what raises throughput. The queue is a deque under a condition variable rather than ``queue.Queue``
because the worker takes *compatible* jobs from anywhere in it (same size, steps, guidance and LoRA
strengths), not only from its head.
"""

from __future__ import annotations

import collections
import concurrent.futures
import math
import threading
import time
from dataclasses import dataclass, field

import torch

from .engine import Engine, Settings, encode
from .metrics import Metrics

# torch >= 2.5 names it torch.OutOfMemoryError; older builds only have the CUDA one
OOM_ERRORS = tuple({getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError), torch.cuda.OutOfMemoryError})


class QueueFull(Exception):
    def __init__(self, retry_after: int):
        super().__init__(f"the queue is full; retry in {retry_after} s")
        self.retry_after = retry_after


class OutOfMemory(Exception):
    """The request does not fit on the device even alone: HTTP 503."""


class Cancelled(Exception):
    """The client went away before its job was sampled."""


@dataclass(eq=False)  # a job is itself: queue removal must not match another job with equal fields
class Job:
    settings: Settings
    prompt: str
    seeds: list[int]
    output_format: str
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    cancelled: threading.Event = field(default_factory=threading.Event)
    accepted: float = field(default_factory=time.monotonic)


class Worker:
    def __init__(self, engine: Engine, metrics: Metrics, max_queue: int = 16, max_batch: int = 4,
                 batch_wait_ms: float = 10.0):
        self.engine, self.metrics = engine, metrics
        self.max_queue, self.max_batch, self.batch_wait = max_queue, max_batch, batch_wait_ms / 1000
        self._jobs: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._seconds_per_image = 1.0     # running estimate, for Retry-After
        self._thread = threading.Thread(target=self._run, name="svdquant-worker", daemon=True)

    # -- the request handlers' side --------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def depth(self) -> int:
        return len(self._jobs)

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> None:
        """Queue ``job`` or raise QueueFull at once: an overloaded server answers 429, it never hangs."""
        with self._cond:
            if self._stopping or len(self._jobs) >= self.max_queue:
                waiting = sum(len(j.seeds) for j in self._jobs) + self.max_batch
                raise QueueFull(max(1, math.ceil(waiting * self._seconds_per_image / self.max_batch)))
            self._jobs.append(job)
            self.metrics.set_depth(len(self._jobs))
            self._cond.notify()

    def cancel(self, job: Job) -> None:
        """The client disconnected: drop the job if it is still queued (a batch already running finishes)."""
        with self._cond:
            job.cancelled.set()
            if job in self._jobs:
                self._jobs.remove(job)
                self.metrics.set_depth(len(self._jobs))
                self.metrics.errors.labels("cancelled").inc()
                job.future.set_exception(Cancelled())

    def stop(self, timeout: float | None = None) -> None:
        """Stop taking requests, finish the queued ones, and wait for the worker (SIGTERM, shutdown)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # -- the worker thread -------------------------------------------------------------------------------
    def _take_batch(self) -> list[Job] | None:
        """The oldest job plus compatible ones, up to max_batch images, waiting up to batch_wait for more.
        None when stopping with nothing left."""
        with self._cond:
            while not self._jobs:
                if self._stopping:
                    return None
                self._cond.wait(0.5)
            first = self._jobs.popleft()
            batch, images = [first], len(first.seeds)
            deadline = time.monotonic() + self.batch_wait
            while images < self.max_batch:
                for job in list(self._jobs):
                    if job.settings == first.settings and images + len(job.seeds) <= self.max_batch:
                        self._jobs.remove(job)
                        batch.append(job)
                        images += len(job.seeds)
                left = deadline - time.monotonic()
                if images >= self.max_batch or left <= 0 or self._stopping:
                    break
                self._cond.wait(left)
            self.metrics.set_depth(len(self._jobs))
            return batch

    def _run(self) -> None:
        while (batch := self._take_batch()) is not None:
            self.metrics.in_flight.set(len(batch))
            try:
                self._run_batch(batch)
            finally:
                self.metrics.in_flight.set(0)

    def _run_batch(self, batch: list[Job]) -> None:
        try:
            self._sample(batch)
        except OOM_ERRORS:
            self._free()
            if len(batch) == 1:
                self._fail(batch[0], "out_of_memory", OutOfMemory(
                    "out of memory on the device for this request; ask for fewer or smaller images"))
                return
            for job in batch:   # the batch did not fit: one by one, so only what cannot fit fails
                self._run_batch([job])
        except Exception as e:  # noqa: BLE001 - the server stays up; the client gets a 500 that says what
            for job in batch:
                self._fail(job, "internal", e)

    def _sample(self, batch: list[Job]) -> None:
        prompts = [j.prompt for j in batch for _ in j.seeds]
        seeds = [s for j in batch for s in j.seeds]
        t0 = time.monotonic()
        images = self.engine.generate(batch[0].settings, prompts, seeds)
        self.metrics.batch_size.observe(len(images))
        per_image = (time.monotonic() - t0) / len(images)
        self._seconds_per_image = 0.8 * self._seconds_per_image + 0.2 * per_image
        i = 0
        for job in batch:
            mine = images[i:i + len(job.seeds)]
            i += len(job.seeds)
            job.future.set_result([encode(im, job.output_format) for im in mine])

    def _fail(self, job: Job, kind: str, exc: Exception) -> None:
        self.metrics.errors.labels(kind).inc()
        job.future.set_exception(exc)

    def _free(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
