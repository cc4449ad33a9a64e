"""``svdquant serve``: an OpenAI-compatible text-to-image HTTP service and web page.

    from svdquant.serve import create_app, load_engine, serving
    app = create_app(load_engine("tiny"), max_queue=16, max_batch=4)   # any ASGI server runs it
    with serving(app) as base: ...        # or a uvicorn in a thread, on a free 127.0.0.1 port

FastAPI + uvicorn serve it; one worker thread owns the pipeline (``worker.py``); ``schema.py`` is the
request and how a body becomes one; ``engine.py`` what the loaded model can draw; ``metrics.py`` the Prometheus
metrics; ``guard.py`` the ASGI middleware between the network and the app (request ids and the access log,
Host / Origin, the API key, body limits); ``server.py`` how uvicorn runs it (head timeouts, the connection cap,
the drain on SIGTERM).
"""

from .app import create_app
from .engine import Engine, load_engine
from .server import run_server, serving

__all__ = ["create_app", "load_engine", "Engine", "run_server", "serving"]
