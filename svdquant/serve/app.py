"""The FastAPI app: OpenAI's images route, models, health, Prometheus metrics and the web page."""

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

from .engine import Engine, RequestError
from .metrics import Metrics
from .schema import GenerationRequest, GenerationResponse, ImageData, error_body
from .worker import Cancelled, Job, OutOfMemory, QueueFull, Worker

PAGE = Path(__file__).with_name("page.html")
DISCONNECT_POLL_S = 0.1   # how soon a vanished client's queued job is dropped


def _one_line(exc: RequestValidationError) -> tuple[str, str | None]:
    """pydantic reports a list of errors; a client wants the first, said plainly."""
    err = exc.errors()[0]
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    msg = err.get("msg", "invalid request").removeprefix("Value error, ")
    if err.get("type") == "extra_forbidden":
        msg = f"unknown field {param!r}"
    elif err.get("type") == "missing":
        msg = f"{param} is required"
    elif param and err.get("type") != "value_error":  # our own validators' messages name the field already
        msg = f"{param}: {msg}"
    return msg, param


def create_app(engine: Engine, *, max_queue: int = 16, max_batch: int = 4, batch_wait_ms: float = 10.0) -> FastAPI:
    metrics = Metrics()
    worker = Worker(engine, metrics, max_queue=max_queue, max_batch=max_batch, batch_wait_ms=batch_wait_ms)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        worker.start()
        yield
        # uvicorn gets here on SIGTERM after the open requests have been answered; whatever is still
        # queued is sampled before the process exits
        await asyncio.to_thread(worker.stop)

    app = FastAPI(title="svdquant serve", lifespan=lifespan)
    app.state.worker, app.state.metrics, app.state.engine = worker, metrics, engine

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        msg, param = _one_line(exc)
        if request.url.path == "/v1/images/generations":
            metrics.errors.labels("invalid").inc()
        return JSONResponse(error_body(msg, param=param), status_code=422)

    @app.post("/v1/images/generations", response_model=GenerationResponse)
    async def generations(req: GenerationRequest, request: Request):
        try:
            settings = engine.settings(req)
        except RequestError as e:
            metrics.errors.labels("invalid").inc()
            return JSONResponse(error_body(str(e), param=e.param), status_code=400)
        # no seed: a fresh one, returned with the image so the client can draw it again
        base = req.seed if req.seed is not None else random.randrange(2**31)
        job = Job(settings, req.prompt, [base + i for i in range(req.n)], req.output_format)
        try:
            worker.submit(job)
        except QueueFull as e:
            metrics.errors.labels("queue_full").inc()
            return JSONResponse(error_body(str(e), "rate_limit_error"), status_code=429,
                                headers={"Retry-After": str(e.retry_after)})
        fut = asyncio.wrap_future(job.future)
        while True:
            done, _ = await asyncio.wait({fut}, timeout=DISCONNECT_POLL_S)
            if done:
                break
            if await request.is_disconnected():
                worker.cancel(job)
                # nobody reads the answer: consume it whenever it comes, so asyncio does not log it as lost
                fut.add_done_callback(lambda f: f.cancelled() or f.exception())
                return Response(status_code=499)   # nginx's "client closed request"; no one receives it
        try:
            blobs = fut.result()
        except Cancelled:
            return Response(status_code=499)
        except OutOfMemory as e:
            return JSONResponse(error_body(str(e), "server_error"), status_code=503, headers={"Retry-After": "10"})
        except Exception as e:  # noqa: BLE001 - counted by the worker; the message says what broke
            return JSONResponse(error_body(f"{type(e).__name__}: {e}", "server_error"), status_code=500)
        metrics.images.inc(len(blobs))
        metrics.latency.observe(time.monotonic() - job.accepted)
        return GenerationResponse(created=int(time.time()), data=[
            ImageData(b64_json=base64.b64encode(b).decode(), seed=s) for b, s in zip(blobs, job.seeds)])

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{**engine.describe(), "created": 0}]}

    @app.get("/health")
    async def health():
        alive = worker.alive
        body = {"status": "ok" if alive else "worker stopped", "queue": worker.depth,
                "max_queue": worker.max_queue}
        return JSONResponse(body, status_code=200 if alive else 503)

    @app.get("/metrics")
    async def prometheus():
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return PAGE.read_text(encoding="utf-8")

    return app
