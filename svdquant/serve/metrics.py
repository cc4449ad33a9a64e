"""Prometheus metrics of one server. Each app gets its own registry, so two apps in one process (tests,
Ray replicas) never share or clash over counters."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# the kinds of failure a client can see, so alerts can tell overload from bad input from a broken GPU
ERROR_KINDS = ("invalid", "queue_full", "cancelled", "out_of_memory", "internal")


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.queue_depth = Gauge("svdquant_queue_depth", "Requests waiting for the worker", registry=r)
        self.queue_peak = Gauge("svdquant_queue_depth_max", "Highest queue depth since start (size --max-queue by it)",
                                registry=r)
        self.in_flight = Gauge("svdquant_in_flight", "Requests being sampled by the worker now", registry=r)
        self.latency = Histogram("svdquant_request_latency_seconds",
                                 "Seconds from accepting a generation request to its images",
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300), registry=r)
        self.batch_size = Histogram("svdquant_batch_images", "Images sampled per pipeline call",
                                    buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)
        self.images = Counter("svdquant_images", "Images returned to clients", registry=r)
        self.errors = Counter("svdquant_errors", "Generation requests that ended without images, by kind",
                              ["kind"], registry=r)
        self._peak = 0
        for kind in ERROR_KINDS:  # every kind present from the start: a rate() needs the zero
            self.errors.labels(kind)

    def set_depth(self, depth: int) -> None:
        self.queue_depth.set(depth)
        if depth > self._peak:
            self._peak = depth
            self.queue_peak.set(depth)

    def render(self) -> bytes:
        return generate_latest(self.registry)
