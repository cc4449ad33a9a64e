"""Run one app with uvicorn: in the foreground (``svdquant serve``) or in a thread (tests, benchmarks).

Both run the same configuration (:func:`uvicorn_config`): uvicorn's h11 protocol with a deadline for a request's
headers and a cap on open connections (:class:`GuardedH11`), its keep-alive timeout, a bound on an incomplete
header, and a server whose shutdown first tells the app to drain (:class:`DrainingServer`), so SIGTERM ends the
process within ``--drain-timeout``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import threading
import time
from collections.abc import Iterator

import torch

from .app import DRAIN_TIMEOUT_S, MAX_CONNECTIONS, READ_TIMEOUT_S, create_app
from .engine import load_engine
from .guard import LOOPBACK_NAMES
from .schema import error_body

KEEP_ALIVE_S = 5                    # an idle keep-alive connection is closed after this
MAX_HEADER_BYTES = 16 * 1024        # h11 keeps at most this much of an incomplete request head

log = logging.getLogger("svdquant.serve")


class _HeadGuard:
    """What uvicorn's h11 protocol lacks, mixed into it by :func:`_protocol` (``GuardedH11``): a deadline for each
    request's headers (armed when a connection opens or a new request's first bytes arrive, disarmed once its head
    is complete; without it 1,000 half-open connections held 1,000 descriptors for good), a cap on open
    connections (one over it is closed at once), and its 400s (a malformed or oversized head) as OpenAI error
    objects, counted."""

    def __init__(self, config, server_state, app_state, _loop=None):
        super().__init__(config, server_state, app_state, _loop)
        self.header_timeout = getattr(config, "svdquant_header_timeout", READ_TIMEOUT_S)
        self.max_connections = getattr(config, "svdquant_max_connections", None)
        self.metrics = getattr(config, "svdquant_metrics", None)
        self._head_timer = None
        self._head_bytes = 0      # of the head now arriving

    def _count(self, kind: str) -> None:
        if self.metrics is not None:
            self.metrics.errors.labels(kind).inc()

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        if self.max_connections is not None and len(self.connections) > self.max_connections:
            self._count("too_many_connections")
            transport.close()
            return
        self._arm()

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        waiting_for_head = self.cycle is None or self.cycle.response_complete
        if waiting_for_head:
            if self._head_timer is None:
                self._arm()
            # h11 bounds only a head that is still incomplete; one that arrives whole in a chunk is counted here
            end = data.find(b"\r\n\r\n")
            self._head_bytes += len(data) if end < 0 else end + 4
            if self._head_bytes > MAX_HEADER_BYTES:
                return self._reply_and_close(431, b"Request Header Fields Too Large",
                                             f"the request's head is over {MAX_HEADER_BYTES} bytes; send fewer or "
                                             "shorter headers")
            if end >= 0:
                self._head_bytes = 0
        super().data_received(data)
        if self.cycle is not None and not self.cycle.response_complete:
            self._disarm()   # the head is in; the body has its own deadline (guard.Gate)

    def _arm(self) -> None:
        self._disarm()
        self._head_timer = self.loop.call_later(self.header_timeout, self._head_timed_out)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing():
            self._count("read_timeout")
            self.transport.close()

    def send_400_response(self, msg: str) -> None:
        self._reply_and_close(400, b"Bad Request", f"the request's HTTP head is malformed or over "
                              f"{MAX_HEADER_BYTES} bytes ({msg.rstrip('.')})")

    def _reply_and_close(self, status: int, reason: bytes, message: str) -> None:
        """An OpenAI error object written straight to the socket (h11 may be in no state to send one: the head
        was never parsed), then the connection closed."""
        self._count("malformed")
        self._disarm()
        body = json.dumps(error_body(message)).encode()
        self.transport.write(b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                             b"connection: close\r\n\r\n" % (status, reason, len(body)) + body)
        self.transport.close()


def _protocol():
    """uvicorn's h11 protocol with :class:`_HeadGuard`; uvicorn is imported only when a server is configured."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11(_HeadGuard, H11Protocol):
        __doc__ = _HeadGuard.__doc__

    return GuardedH11


def uvicorn_config(app, host: str, port: int, log_level: str = "warning"):
    """The uvicorn configuration ``app`` runs under, from the options ``create_app`` recorded on it."""
    import uvicorn

    opts = getattr(getattr(app, "state", None), "serve_options", {}) or {}
    read = opts.get("read_timeout", READ_TIMEOUT_S)
    drain = opts.get("drain_timeout", DRAIN_TIMEOUT_S)
    conns = opts.get("max_connections", MAX_CONNECTIONS)
    config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level, access_log=False, http=_protocol(),
        timeout_keep_alive=KEEP_ALIVE_S, h11_max_incomplete_event_size=MAX_HEADER_BYTES,
        # uvicorn answers 503 to a request beyond this many connections or running requests; GuardedH11 closes a
        # connection beyond max_connections as it opens
        limit_concurrency=conns + 1,
        # a backstop: the app's drain answers everyone by drain_timeout, a body read ends by read_timeout
        timeout_graceful_shutdown=drain + read + 5)
    config.svdquant_header_timeout = read
    config.svdquant_max_connections = conns
    config.svdquant_metrics = getattr(getattr(app, "state", None), "metrics", None)
    return config


def _server(config, app):
    import uvicorn

    class DrainingServer(uvicorn.Server):
        """A uvicorn server whose shutdown (SIGTERM, Ctrl-C, ``should_exit``) first starts the app's drain: from then
        on the app takes nothing new and answers what it cannot finish within its drain timeout with 503."""

        async def shutdown(self, sockets=None):
            begin = getattr(getattr(app, "state", None), "begin_drain", None)
            if begin is not None:
                begin()
            await super().shutdown(sockets)

    return DrainingServer(config)


def is_loopback(host: str) -> bool:
    return host in LOOPBACK_NAMES or host.startswith("127.")


def run_server(model: str = "tiny", *, host: str = "127.0.0.1", port: int = 8000, device: str = "cpu",
               dtype: torch.dtype | None = None, loras=(), max_queue: int = 16, max_batch: int = 4,
               batch_wait_ms: float = 10.0, api_key: str | None = None, allowed_hosts=(), cors_origins=(),
               max_body_bytes: int | None = None, read_timeout: float = READ_TIMEOUT_S,
               drain_timeout: float = DRAIN_TIMEOUT_S, max_connections: int = MAX_CONNECTIONS,
               allow_base_outside: bool = False, optimize: bool = True, attention: str | None = "auto",
               compile: bool | str = True, warmup=None, log=print) -> None:
    """``allowed_hosts``: names besides the loopback ones and ``host`` that clients may use (``"*"``: any).
    ``warmup``: run by the worker before it is ready (:func:`~svdquant.serve.create_app`); default: the engine's
    own (:meth:`Engine.warmup`: compile and capture the optimized pipeline at every batch size it will sample)."""
    from .app import MAX_BODY_BYTES

    _access_log_to_stdout()
    engine = load_engine(model, device, dtype, list(loras), allow_base_outside=allow_base_outside,
                         optimize=optimize, attention=attention, compile=compile)
    if warmup is None:
        warmup = lambda: engine.warmup(max_batch, log)  # noqa: E731
    names = None if "*" in allowed_hosts else [*LOOPBACK_NAMES, *allowed_hosts,
                                               *([host] if host not in ("0.0.0.0", "::", "") else [])]
    app = create_app(engine, max_queue=max_queue, max_batch=max_batch, batch_wait_ms=batch_wait_ms,
                     max_body_bytes=max_body_bytes or MAX_BODY_BYTES, api_key=api_key, allowed_hosts=names,
                     cors_origins=cors_origins, read_timeout=read_timeout, drain_timeout=drain_timeout,
                     max_connections=max_connections, warmup=warmup)
    if not is_loopback(host) and not api_key:
        print(f"svdquant serve: warning: listening on {host}, beyond this machine, without an API key: anyone who "
              "can reach it can use it; set SVDQUANT_API_KEY (or --api-key)", file=sys.stderr, flush=True)
    if names is not None and host in ("0.0.0.0", "::") and not allowed_hosts:
        print("svdquant serve: warning: clients must call it by a loopback name; add --allowed-host NAME for each "
              "name it is reached by (its DNS name, its address)", file=sys.stderr, flush=True)
    log(f"serving {engine.model_id} on http://{host}:{port} (page /, API /v1/images/generations, metrics /metrics)",
        flush=True)
    # uvicorn handles SIGINT/SIGTERM: DrainingServer starts the drain, uvicorn stops listening and lets open
    # requests finish (or get their 503 at the drain timeout), then the app's lifespan stops the worker
    _server(uvicorn_config(app, host, port), app).run()


def _access_log_to_stdout() -> None:
    """One line per answer on stdout (guard.AccessLog), as a server log should be."""
    logger = logging.getLogger("svdquant.serve.access")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


@contextlib.contextmanager
def serving(app, host: str = "127.0.0.1", port: int = 0, timeout: float = 30.0) -> Iterator[str]:
    """Serve ``app`` on a real uvicorn in a daemon thread, configured as ``svdquant serve`` runs it; yields its
    base URL (``http://host:port``).

    ``port=0`` takes a free port from the OS (read back from the listening socket, so no other process can
    take it between a probe and the bind). On exit uvicorn shuts down as on SIGTERM: the app drains (open
    requests are answered, within its drain timeout). Starting or stopping longer than ``timeout`` seconds
    raises RuntimeError rather than hanging the caller.
    """
    server = _server(uvicorn_config(app, host, port), app)
    thread = threading.Thread(target=server.run, name="svdquant-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError(f"uvicorn could not serve on {host}:{port} (is the port taken?)")
        if time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"uvicorn did not start within {timeout:g} s")
        time.sleep(0.02)
    bound = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound}"
    finally:
        server.should_exit = True
        thread.join(timeout)
        if thread.is_alive():
            raise RuntimeError(f"uvicorn did not stop within {timeout:g} s")
