"""Prometheus metrics of one server. Each app gets its own registry, so two apps in one process (tests,
Ray replicas) never share or clash over counters."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Every answer that is not a success, by why, so alerts can tell overload from bad input from attacks from a
# broken GPU. Client errors: invalid (a field), malformed (not JSON, not UTF-8, empty), too_large (413),
# unsupported_media_type (415), unauthorized (401), forbidden (403: Host / Origin not allowed), not_found,
# method_not_allowed, read_timeout (408: a body, or a connection closed: a head, did not arrive in time),
# cancelled (the client left), timeout (the request's own deadline, 504). Server side: queue_full (429),
# too_many_connections (closed as it opened), shutting_down (503 while draining), out_of_memory (503),
# internal (500).
ERROR_KINDS = ("invalid", "malformed", "too_large", "unsupported_media_type", "unauthorized", "forbidden",
               "not_found", "method_not_allowed", "read_timeout", "cancelled", "timeout", "queue_full",
               "too_many_connections", "shutting_down", "out_of_memory", "internal")
_SECONDS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.queue_depth = Gauge("svdquant_queue_depth", "Requests waiting for the worker", registry=r)
        self.queue_peak = Gauge("svdquant_queue_depth_max", "Highest queue depth since start (size --max-queue by it)",
                                registry=r)
        self.in_flight = Gauge("svdquant_in_flight", "Requests being sampled by the worker now", registry=r)
        self.ready = Gauge("svdquant_ready", "1 when the server takes work (warmed up, not draining)", registry=r)
        self.latency = Histogram("svdquant_request_latency_seconds",
                                 "Seconds from accepting a generation request to its images",
                                 buckets=_SECONDS, registry=r)
        self.queue_time = Histogram("svdquant_queue_seconds", "Seconds a request waited before its batch started",
                                    buckets=_SECONDS, registry=r)
        self.compute_time = Histogram("svdquant_compute_seconds",
                                      "Seconds from a request's batch start to its encoded images",
                                      buckets=_SECONDS, registry=r)
        self.batch_size = Histogram("svdquant_batch_images", "Images sampled per pipeline call",
                                    buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)
        self.images = Counter("svdquant_images", "Images returned to clients", registry=r)
        self.errors = Counter("svdquant_errors", "Requests answered with an error (or not at all), by kind",
                              ["kind"], registry=r)
        self.batches_stopped = Counter("svdquant_batches_stopped",
                                       "Pipeline calls stopped between steps, by why (every client gone, "
                                       "deadlines passed, the drain timed out)", ["why"], registry=r)
        self._peak = 0
        for kind in ERROR_KINDS:  # every kind present from the start: a rate() needs the zero
            self.errors.labels(kind)
        for why in ("cancelled", "timeout", "shutting_down"):
            self.batches_stopped.labels(why)

    def set_depth(self, depth: int) -> None:
        self.queue_depth.set(depth)
        if depth > self._peak:
            self._peak = depth
            self.queue_peak.set(depth)

    def render(self) -> bytes:
        return generate_latest(self.registry)
