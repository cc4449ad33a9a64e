"""Run one app with uvicorn: in the foreground (``svdquant serve``) or in a thread (tests, benchmarks)."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

import torch

from .app import create_app
from .engine import load_engine


def run_server(model: str = "tiny", *, host: str = "127.0.0.1", port: int = 8000, device: str = "cpu",
               dtype: torch.dtype | None = None, loras=(), max_queue: int = 16, max_batch: int = 4,
               batch_wait_ms: float = 10.0, log=print) -> None:
    import uvicorn

    engine = load_engine(model, device, dtype, list(loras))
    app = create_app(engine, max_queue=max_queue, max_batch=max_batch, batch_wait_ms=batch_wait_ms)
    log(f"serving {engine.model_id} on http://{host}:{port} (page /, API /v1/images/generations, metrics /metrics)",
        flush=True)
    # uvicorn handles SIGINT/SIGTERM: it stops listening, lets open requests finish, then the app's
    # lifespan drains the queue
    uvicorn.run(app, host=host, port=port, log_level="warning")


@contextlib.contextmanager
def serving(app, host: str = "127.0.0.1", port: int = 0, timeout: float = 30.0) -> Iterator[str]:
    """Serve ``app`` on a real uvicorn in a daemon thread; yields its base URL (``http://host:port``).

    ``port=0`` takes a free port from the OS (read back from the listening socket, so no other process can
    take it between a probe and the bind). On exit uvicorn shuts down as on SIGTERM: open requests are
    answered and the app's worker drains its queue. Starting or stopping longer than ``timeout`` seconds
    raises RuntimeError rather than hanging the caller.
    """
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
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
