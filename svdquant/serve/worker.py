"""One worker thread that owns the pipeline and drains a bounded queue in micro-batches.

One thread, because one GPU runs one pipeline call at a time; batching several requests into one call
is what raises throughput. The queue is a deque under a condition variable rather than ``queue.Queue``
because the worker takes *compatible* jobs from anywhere in it (same size, steps, guidance and LoRA
strengths), not only from its head.

A job ends exactly once: images, or an exception the request handler turns into its answer. A running batch
stops between two denoising steps when no one waits for it any more (every client of the batch gone or past
its deadline) or when a drain runs out of time (:meth:`Worker.begin_drain`). Before the first batch an
optional ``warmup`` callable runs in this thread (compilation, CUDA graphs): until it returns the server is
alive but not ready.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import math
import threading
import time
from dataclasses import dataclass, field

import torch

from .engine import Engine, Settings, StopSampling, encode
from .metrics import Metrics

log = logging.getLogger("svdquant.serve")

# torch >= 2.5 names it torch.OutOfMemoryError; older builds only have the CUDA one
OOM_ERRORS = tuple({getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError), torch.cuda.OutOfMemoryError})
# Retry-After before anything was measured: a guess per image and step (a FLUX.1-dev step on an H100 is ~0.1 s,
# the tiny model's on a CPU about as long); the moving average replaces it after the first batch
FIRST_GUESS_S = 0.25
EMA_WEIGHT = 0.3   # of the newest batch in the moving average: follows a change of load within a few batches


class QueueFull(Exception):
    def __init__(self, retry_after: int):
        super().__init__(f"the queue is full; retry in {retry_after} s (the time the queued work needs, measured)")
        self.retry_after = retry_after


class ShuttingDown(Exception):
    """The server is draining (SIGTERM): not taken, or not finished within --drain-timeout: HTTP 503."""


class OutOfMemory(Exception):
    """The request does not fit on the device even alone: HTTP 503."""


class Cancelled(Exception):
    """The client went away before its job was done."""


class TimedOut(Exception):
    """The request's own deadline (its ``timeout``) passed before its images were done: HTTP 504."""


@dataclass(eq=False)  # a job is itself: queue removal must not match another job with equal fields
class Job:
    settings: Settings
    prompt: str
    seeds: list[int]
    output_format: str
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    cancelled: threading.Event = field(default_factory=threading.Event)
    accepted: float = field(default_factory=time.monotonic)
    reason: str | None = None          # why it was cancelled: "cancelled" (client left) or "timeout"
    started: float | None = None       # when its batch started

    @property
    def cost(self) -> int:
        """Image-steps: what the worker's time is proportional to."""
        return len(self.seeds) * self.settings.steps


class Worker:
    def __init__(self, engine: Engine, metrics: Metrics, max_queue: int = 16, max_batch: int = 4,
                 batch_wait_ms: float = 10.0, warmup=None):
        self.engine, self.metrics = engine, metrics
        self.max_queue, self.max_batch, self.batch_wait = max_queue, max_batch, batch_wait_ms / 1000
        self._jobs: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._drain_deadline: float | None = None   # set by begin_drain
        self._warmup = warmup
        self._warm = threading.Event()
        self._failed = False
        self._seconds_per_step: float | None = None  # per image and step, moving average (Retry-After)
        self._running: list[Job] = []
        self._running_until = 0.0                    # when the running batch is expected to end
        self._thread = threading.Thread(target=self._run, name="svdquant-worker", daemon=True)

    # -- the request handlers' side --------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def state(self) -> str:
        """``warming up``, ``ready``, ``draining``, ``stopped`` or ``failed`` (the warm-up raised): only ``ready``
        takes traffic."""
        if self._failed:
            return "failed"
        if self._drain_deadline is not None or self._stopping:
            return "draining"   # also once the thread has ended: the process is on its way out
        if not self.alive:
            return "stopped"
        return "ready" if self._warm.is_set() else "warming up"

    @property
    def died(self) -> bool:
        """The thread ended on its own (a failed warm-up), not by a drain or stop: liveness fails, so a supervisor
        restarts the process."""
        return self._failed or (self._thread.ident is not None and not self.alive and not self._stopping
                                and self._drain_deadline is None)

    @property
    def depth(self) -> int:
        return len(self._jobs)

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> None:
        """Queue ``job`` or raise at once (QueueFull, ShuttingDown): an overloaded server answers, it never hangs."""
        with self._cond:
            if self._stopping or self._drain_deadline is not None:
                raise ShuttingDown("the server is shutting down and takes no new requests; retry on another "
                                   "instance or after its restart")
            if len(self._jobs) >= self.max_queue:
                raise QueueFull(self.retry_after())
            self._jobs.append(job)
            self.metrics.set_depth(len(self._jobs))
            self._cond.notify()

    def retry_after(self) -> int:
        """Seconds until the work now queued and running is done: the image-steps ahead times the measured
        seconds per image-step (moving average over batches), plus what the running batch has left."""
        with self._cond:
            per = self._seconds_per_step if self._seconds_per_step is not None else FIRST_GUESS_S
            ahead = sum(j.cost for j in self._jobs) * per + max(0.0, self._running_until - time.monotonic())
        return max(1, math.ceil(ahead))

    def cancel(self, job: Job, reason: str = "cancelled") -> None:
        """The client left (``cancelled``) or the request's deadline passed (``timeout``): a queued job is dropped;
        a running one is marked, and its batch stops at the next step once no job of it is still wanted."""
        with self._cond:
            if job.future.done() or job.cancelled.is_set():
                return
            job.reason = reason
            job.cancelled.set()
            self.metrics.errors.labels(reason).inc()
            if job in self._jobs:
                self._jobs.remove(job)
                self.metrics.set_depth(len(self._jobs))
                job.future.set_exception(Cancelled() if reason == "cancelled" else TimedOut())

    def begin_drain(self, timeout: float) -> None:
        """SIGTERM: take nothing new; finish what is queued and running for ``timeout`` seconds, then answer the
        rest with ShuttingDown (503), stopping the running batch at its next step, and let the thread end."""
        with self._cond:
            if self._drain_deadline is None:
                self._drain_deadline = time.monotonic() + timeout
                self.metrics.ready.set(0)
            self._cond.notify_all()

    def stop(self, timeout: float | None = None) -> None:
        """Stop taking requests, finish the queued ones, and wait for the worker (shutdown; after a drain, at once)."""
        with self._cond:
            self._stopping = True
            self.metrics.ready.set(0)
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # -- the worker thread -------------------------------------------------------------------------------
    def _drain_expired(self) -> bool:
        return self._drain_deadline is not None and time.monotonic() >= self._drain_deadline

    def _take_batch(self) -> list[Job] | None:
        """The oldest job plus compatible ones, up to max_batch images, waiting up to batch_wait for more.
        None when stopping with nothing left, or when a drain ran out of time (the queue then answered)."""
        with self._cond:
            while not self._jobs or self._drain_expired():
                if self._drain_expired():
                    while self._jobs:
                        self._fail(self._jobs.popleft(), "shutting_down", ShuttingDown(
                            "the server shut down before this request was taken (--drain-timeout); retry"))
                    self.metrics.set_depth(0)
                    return None
                if self._stopping or self._drain_deadline is not None:
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
                if images >= self.max_batch or left <= 0 or self._stopping or self._drain_deadline is not None:
                    break
                self._cond.wait(left)
            self.metrics.set_depth(len(self._jobs))
            return batch

    def _run(self) -> None:
        if self._warmup is not None:
            try:
                self._warmup()
            except Exception:  # noqa: BLE001 - logged; the server stays alive but never ready, and says so
                log.exception("the warm-up failed; the server will not become ready")
                with self._cond:
                    self._failed = self._stopping = True
                    while self._jobs:
                        self._fail(self._jobs.popleft(), "internal", RuntimeError("the server's warm-up failed"))
                return
        self._warm.set()
        self.metrics.ready.set(1)
        while (batch := self._take_batch()) is not None:
            self.metrics.in_flight.set(len(batch))
            try:
                self._run_batch(batch)
            finally:
                self.metrics.in_flight.set(0)
                with self._cond:
                    self._running, self._running_until = [], 0.0

    def _run_batch(self, batch: list[Job]) -> None:
        try:
            self._sample(batch)
        except StopSampling:
            self._stopped(batch)
        except OOM_ERRORS:
            self._free()
            if len(batch) == 1:
                self._fail(batch[0], "out_of_memory", OutOfMemory(
                    "out of memory on the device for this request; ask for fewer or smaller images"))
                return
            for job in batch:   # the batch did not fit: one by one, so only what cannot fit fails
                if job.cancelled.is_set():
                    self._settle(job, Cancelled() if job.reason == "cancelled" else TimedOut())
                else:
                    self._run_batch([job])
        except Exception as e:  # noqa: BLE001 - the server stays up; the client gets a 500 that says what
            for job in batch:
                self._fail(job, "internal", e)

    def _should_stop(self, batch: list[Job]) -> bool:
        """Checked after every denoising step: nobody waits for this batch any more, or the drain ran out."""
        return self._drain_expired() or all(j.cancelled.is_set() for j in batch)

    def _stopped(self, batch: list[Job]) -> None:
        why = "shutting_down" if self._drain_expired() else (
            "timeout" if all(j.reason == "timeout" for j in batch) else "cancelled")
        self.metrics.batches_stopped.labels(why).inc()
        for job in batch:
            if job.reason is not None:   # counted when it was cancelled
                self._settle(job, Cancelled() if job.reason == "cancelled" else TimedOut())
            else:
                self._fail(job, "shutting_down", ShuttingDown(
                    "the server shut down before this request was done (--drain-timeout); retry"))

    def _sample(self, batch: list[Job]) -> None:
        live = [j for j in batch if not j.cancelled.is_set()]
        if not live:
            return self._stopped(batch)
        prompts = [j.prompt for j in live for _ in j.seeds]
        seeds = [s for j in live for s in j.seeds]
        t0 = time.monotonic()
        cost = sum(j.cost for j in live)
        with self._cond:
            per = self._seconds_per_step if self._seconds_per_step is not None else FIRST_GUESS_S
            self._running, self._running_until = live, t0 + cost * per
        for j in live:
            j.started = t0
            self.metrics.queue_time.observe(t0 - j.accepted)
        self.engine.stop_check = lambda: self._should_stop(live)
        try:
            images = self.engine.generate(live[0].settings, prompts, seeds)
        finally:
            self.engine.stop_check = None
        self.metrics.batch_size.observe(len(images))
        per_step = (time.monotonic() - t0) / max(1, cost)
        with self._cond:
            old = self._seconds_per_step
            self._seconds_per_step = per_step if old is None else (1 - EMA_WEIGHT) * old + EMA_WEIGHT * per_step
        i = 0
        for job in live:
            mine = images[i:i + len(job.seeds)]
            i += len(job.seeds)
            blobs = [encode(im, job.output_format) for im in mine]
            self.metrics.compute_time.observe(time.monotonic() - t0)
            self._settle(job, blobs)

    def _settle(self, job: Job, result) -> None:
        """End ``job`` with images or an exception, once (a client that left already has its answer)."""
        if job.future.done():
            return
        if isinstance(result, BaseException):
            job.future.set_exception(result)
        else:
            job.future.set_result(result)

    def _fail(self, job: Job, kind: str, exc: Exception) -> None:
        if job.future.done():
            return
        if job.reason is None:   # a cancelled job was counted when its client left
            self.metrics.errors.labels(kind).inc()
        job.future.set_exception(exc)

    def _free(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
