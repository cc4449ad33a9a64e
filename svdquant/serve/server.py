"""Run one app with uvicorn (``svdquant serve``)."""

from __future__ import annotations

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
