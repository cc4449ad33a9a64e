"""``svdquant serve --replicas N``: the same app on Ray Serve, one replica per GPU.

Ray's HTTP proxy spreads requests over the replicas (no load balancer of ours); each replica builds the
app of ``app.py`` around its own engine, worker and bounded queue, so every replica behaves as one
``svdquant serve`` does. ``/metrics`` answers from whichever replica the request reached: scrape each
replica (Ray's own metrics export) for totals.
"""

from __future__ import annotations


def _build(model, device, dtype, loras, max_queue, max_batch, batch_wait_ms, app_options=None, engine_options=None):
    """Runs on each replica: load the model there (on the GPU Ray assigned it) and make the app."""
    from .app import create_app
    from .engine import load_engine

    engine = load_engine(model, device, dtype, loras, **(engine_options or {}))
    return create_app(engine, max_queue=max_queue, max_batch=max_batch, batch_wait_ms=batch_wait_ms,
                      warmup=lambda: engine.warmup(max_batch), **(app_options or {}))


def replicas_application(model: str = "tiny", *, replicas: int = 2, device: str = "cpu", dtype=None, loras=(),
                         max_queue: int = 16, max_batch: int = 4, batch_wait_ms: float = 10.0,
                         app_options: dict | None = None, engine_options: dict | None = None):
    """The Ray Serve application (for ``serve.run`` or a Serve config file). ``app_options``: more keyword
    arguments of :func:`~svdquant.serve.create_app` (API key, body limit, allowed hosts...), enforced by each
    replica's app; connection limits and header timeouts are then Ray's proxy's. ``engine_options``: more keyword
    arguments of :func:`~svdquant.serve.engine.load_engine` (``optimize``, ``attention``, ``compile``)."""
    from ray import serve

    gpu = device.startswith("cuda")
    args = (model, "cuda" if gpu else device, dtype, list(loras), max_queue, max_batch, batch_wait_ms, app_options,
            engine_options)

    # a builder, not an app: each replica evaluates it in its own process. A plain function, since Ray takes
    # any other callable (a functools.partial) for an ASGI app itself
    def build():
        return _build(*args)

    deployment = serve.deployment(serve.ingress(build)(), name="svdquant")
    # one GPU per replica: Ray sets CUDA_VISIBLE_DEVICES, so "cuda" is that replica's GPU
    return deployment.options(num_replicas=replicas, ray_actor_options={"num_gpus": 1 if gpu else 0}).bind()


def run_replicas(model: str = "tiny", *, host: str = "127.0.0.1", port: int = 8000, replicas: int = 2,
                 device: str = "cpu", dtype=None, loras=(), max_queue: int = 16, max_batch: int = 4,
                 batch_wait_ms: float = 10.0, app_options: dict | None = None, engine_options: dict | None = None,
                 log=print) -> None:
    import ray
    from ray import serve

    ray.init(include_dashboard=False, log_to_driver=False)
    # ours from here on: Ray's handler aborts the process on a SIGTERM that comes while Serve starts (a supervisor
    # may send it as soon as /health answers, before serve.run returns)
    stop = _stop_on_signals()
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(replicas_application(model, replicas=replicas, device=device, dtype=dtype, loras=loras,
                                       max_queue=max_queue, max_batch=max_batch, batch_wait_ms=batch_wait_ms,
                                       app_options=app_options, engine_options=engine_options),
                  route_prefix="/")
        log(f"serving {model} with {replicas} Ray Serve replicas on http://{host}:{port}", flush=True)
        while not stop.wait(1):
            pass
    finally:
        serve.shutdown()   # each replica's lifespan drains its queue
        ray.shutdown()


def _stop_on_signals():
    """An event that SIGINT or SIGTERM sets."""
    import signal
    import threading

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    return stop
