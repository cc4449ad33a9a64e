"""The FastAPI app: OpenAI's images route, models, health (liveness, readiness), Prometheus metrics and the page,
behind the guards of ``guard.py``."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import random
import time
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware

from .engine import Engine, RequestError
from .guard import LOOPBACK_NAMES, AccessLog, Gate, HostCheck
from .metrics import Metrics
from .schema import GenerationResponse, ImageData, RequestRefused, error_body, one_line, parse_request
from .worker import Cancelled, Job, OutOfMemory, QueueFull, ShuttingDown, TimedOut, Worker

PAGE = Path(__file__).with_name("page.html")
DISCONNECT_POLL_S = 0.1   # how soon a vanished client's job is dropped (queued) or marked (running)
MAX_BODY_BYTES = 1 << 20  # a request is a few hundred bytes of JSON; 1 MiB leaves room for a 2,000-character prompt
READ_TIMEOUT_S = 10.0     # for a request's headers, and for its body once the headers are in
DRAIN_TIMEOUT_S = 30.0
MAX_CONNECTIONS = 128


def create_app(engine: Engine, *, max_queue: int = 16, max_batch: int = 4, batch_wait_ms: float = 10.0,
               max_body_bytes: int = MAX_BODY_BYTES, api_key: str | None = None,
               allowed_hosts=LOOPBACK_NAMES, cors_origins=(), read_timeout: float = READ_TIMEOUT_S,
               drain_timeout: float = DRAIN_TIMEOUT_S, max_connections: int = MAX_CONNECTIONS,
               warmup=None) -> FastAPI:
    """The app around ``engine``. ``api_key``: required as ``Authorization: Bearer`` on all but the page and the
    health routes. ``allowed_hosts``: the names clients may reach it by (``Host``; None: any); ``cors_origins``:
    other web origins whose pages may call it. ``read_timeout``, ``drain_timeout`` and ``max_connections`` are
    applied by the server that runs it (:func:`svdquant.serve.serving`, ``svdquant serve``). ``warmup``: a callable
    the worker runs before its first batch (compilation, CUDA graphs); ``/health/ready`` says 503 until it returns."""
    metrics = Metrics()
    worker = Worker(engine, metrics, max_queue=max_queue, max_batch=max_batch, batch_wait_ms=batch_wait_ms,
                    warmup=warmup)
    app = FastAPI(title="svdquant serve", lifespan=_lifespan(worker))
    app.state.worker, app.state.metrics, app.state.engine = worker, metrics, engine
    # what the server running the app applies (serving(), svdquant serve): timeouts and the connection limit
    app.state.serve_options = {"read_timeout": read_timeout, "drain_timeout": drain_timeout,
                               "max_connections": max_connections}
    app.state.begin_drain = lambda: worker.begin_drain(drain_timeout)
    _add_routes(app, _Routes(engine, worker, metrics))
    # added innermost first: a request meets AccessLog, HostCheck, CORS, Gate, then the routes
    app.add_middleware(Gate, metrics=metrics, api_key=api_key, max_body=max_body_bytes, read_timeout=read_timeout)
    if cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type", "X-Request-Id"],
                           expose_headers=["Retry-After", "X-Request-Id"])
    app.add_middleware(HostCheck, metrics=metrics, allowed=None if allowed_hosts is None else set(allowed_hosts),
                       cors_origins=set(cors_origins))
    app.add_middleware(AccessLog)
    return app


def _lifespan(worker: Worker):
    @contextlib.asynccontextmanager
    async def lifespan(app):
        worker.start()
        yield
        # uvicorn gets here on SIGTERM after the open requests have been answered (or the drain timed out);
        # whatever is still queued is sampled before the process exits
        await asyncio.to_thread(worker.stop)

    return lifespan


def _add_routes(app: FastAPI, routes: _Routes) -> None:
    app.exception_handler(StarletteHTTPException)(routes.http_error)
    app.exception_handler(RequestValidationError)(routes.invalid)
    app.post("/v1/images/generations", response_model=GenerationResponse)(routes.generations)
    app.get("/v1/models")(routes.models)
    app.get("/health")(routes.health)
    app.get("/health/live")(routes.live)
    app.get("/health/ready")(routes.ready)
    app.get("/metrics")(routes.prometheus)
    app.get("/", response_class=HTMLResponse)(routes.page)


class _Routes:
    """The app's handlers, around one engine, the worker that owns it and the metrics they count into."""

    def __init__(self, engine: Engine, worker: Worker, metrics: Metrics):
        self.engine, self.worker, self.metrics = engine, worker, metrics

    def refuse(self, e: RequestRefused) -> JSONResponse:
        self.metrics.errors.labels(e.kind).inc()
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    async def http_error(self, request: Request, exc: StarletteHTTPException):
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "invalid")
        msg = (f"no route {request.method} {request.url.path}; the API is POST /v1/images/generations, "
               "GET /v1/models, /health, /metrics" if exc.status_code in (404, 405) else str(exc.detail))
        return self.refuse(RequestRefused(exc.status_code, msg, kind))

    async def invalid(self, request: Request, exc: RequestValidationError):
        msg, param = one_line(exc)
        return self.refuse(RequestRefused(422, msg, "invalid", param))

    async def generations(self, request: Request):
        try:
            req = parse_request(await request.body(), request.headers.get("content-type"))
            settings = self.engine.settings(req)
        except RequestRefused as e:
            return self.refuse(e)
        except RequestError as e:
            return self.refuse(RequestRefused(400, str(e), "invalid", e.param))
        # no seed: a fresh one, returned with the image so the client can draw it again
        base = req.seed if req.seed is not None else random.randrange(2**31)
        job = Job(settings, req.prompt, [base + i for i in range(req.n)], req.output_format)
        try:
            self.worker.submit(job)
        except QueueFull as e:
            return self.refuse(RequestRefused(429, str(e), "queue_full", code="rate_limit_exceeded",
                                              headers={"Retry-After": str(e.retry_after)}))
        except ShuttingDown as e:
            return self.refuse(RequestRefused(503, str(e), "shutting_down", code="shutting_down",
                                              headers={"Retry-After": str(self.worker.retry_after())}))
        fut = asyncio.wrap_future(job.future)
        # nobody may read the answer (a client gone, a deadline passed): consume it, so asyncio does not log it lost
        fut.add_done_callback(lambda f: f.cancelled() or f.exception())
        gone = await self._wait(request, req, job, fut)
        return gone if gone is not None else self._answer(req, job, fut)

    async def _wait(self, request: Request, req, job: Job, fut) -> Response | None:
        """Until the job is done; or the answer to a request whose deadline passed or whose client went away."""
        deadline = job.accepted + req.timeout if req.timeout is not None else None
        while True:
            wait = DISCONNECT_POLL_S if deadline is None else min(DISCONNECT_POLL_S, deadline - time.monotonic())
            done, _ = await asyncio.wait({fut}, timeout=max(0.0, wait))
            if done:
                return None
            if deadline is not None and time.monotonic() >= deadline:
                self.worker.cancel(job, "timeout")
                return JSONResponse(error_body(f"the request did not finish within its timeout of {req.timeout:g} s "
                                               "(queue included); ask with a longer timeout, fewer steps or images",
                                               "server_error", "timeout", "timeout"), status_code=504)
            if await request.is_disconnected():
                self.worker.cancel(job, "cancelled")
                return Response(status_code=499)   # nginx's "client closed request"; no one receives it

    def _answer(self, req, job: Job, fut):
        """The finished job's images, or what kept it from them."""
        try:
            blobs = fut.result()
        except Cancelled:
            return Response(status_code=499)
        except TimedOut:
            return JSONResponse(error_body(f"the request did not finish within its timeout of {req.timeout:g} s",
                                           "server_error", "timeout", "timeout"), status_code=504)
        except ShuttingDown as e:
            return JSONResponse(error_body(str(e), "server_error", None, "shutting_down"), status_code=503)
        except OutOfMemory as e:
            return JSONResponse(error_body(str(e), "server_error"), status_code=503,
                                headers={"Retry-After": str(self.worker.retry_after())})
        except Exception as e:  # noqa: BLE001 - counted by the worker; the message says what broke
            return JSONResponse(error_body(f"{type(e).__name__}: {e}", "server_error"), status_code=500)
        self.metrics.images.inc(len(blobs))
        self.metrics.latency.observe(time.monotonic() - job.accepted)
        return GenerationResponse(created=int(time.time()), data=[
            ImageData(b64_json=base64.b64encode(b).decode(), seed=s) for b, s in zip(blobs, job.seeds)])

    async def models(self):
        return {"object": "list", "data": [{**self.engine.describe(), "created": 0}]}

    async def health(self):
        worker = self.worker
        alive = worker.alive
        body = {"status": "ok" if alive else "worker stopped", "state": worker.state, "queue": worker.depth,
                "max_queue": worker.max_queue, "warmup_seconds": getattr(self.engine, "warmup_seconds", None)}
        return JSONResponse(body, status_code=200 if alive else 503)

    async def live(self):
        # the process answers; 503 only when the worker died on its own (a drain ends it on purpose): restart me
        return JSONResponse({"live": not self.worker.died}, status_code=503 if self.worker.died else 200)

    async def ready(self):
        state = self.worker.state
        return JSONResponse({"ready": state == "ready", "state": state}, status_code=200 if state == "ready" else 503)

    async def prometheus(self):
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(self.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    async def page(self):
        return PAGE.read_text(encoding="utf-8")
