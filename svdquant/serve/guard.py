"""What stands between the network and the app: plain ASGI middleware, so every route (and every server that
runs the app: uvicorn, Ray Serve's proxy) gets it.

Outermost first: :class:`AccessLog` (a request id for every answer, ``X-Request-Id``, one log line each),
:class:`HostCheck` (``Host`` and ``Origin`` against an allow-list: a web page cannot reach a local server through
DNS rebinding or a cross-site form), then CORS for the origins given (starlette's), then :class:`Gate` (the API
key, then the body: its size and how long it may take to arrive). Their refusals are OpenAI error objects,
counted in /metrics like the app's own.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import re
import time
import uuid

from .metrics import Metrics
from .schema import error_body

access_log = logging.getLogger("svdquant.serve.access")

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
# answered without the API key: the page holds no data, and probes carry no credentials
OPEN_PATHS = {"/", "/health", "/health/live", "/health/ready"}
_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


async def send_error(send, metrics: Metrics, status: int, message: str, kind: str, *, code: str | None = None,
                     headers: dict[str, str] | None = None) -> None:
    """An OpenAI error object as the whole response, counted under ``kind``."""
    metrics.errors.labels(kind).inc()
    body = json.dumps(error_body(message, "server_error" if status >= 500 else "invalid_request_error",
                                 None, code)).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def _header(scope, name: bytes) -> str | None:
    for k, v in scope.get("headers", ()):
        if k == name:
            return v.decode("latin-1")
    return None


class AccessLog:
    """Gives each request an id (the client's ``X-Request-Id`` if it is a plain token, else a fresh one), returns
    it in the ``X-Request-Id`` header and logs one line per answer: client, method, path, status, milliseconds."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = _header(scope, b"x-request-id")
        rid = given if given and _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex[:16]
        scope.setdefault("state", {})["request_id"] = rid
        status, t0 = 0, time.perf_counter()

        async def send_with_id(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", ()), (b"x-request-id", rid.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            client = scope.get("client") or ("-", 0)
            access_log.info('%s "%s %s" %s %.1f ms id=%s', client[0], scope["method"], scope["path"],
                            status or "-", (time.perf_counter() - t0) * 1000, rid)


def _hostname(netloc: str) -> str:
    """``host``, ``host:port``, ``[::1]:port`` -> the host, lower-cased, without brackets."""
    netloc = netloc.strip().lower()
    if netloc.startswith("["):
        return netloc[1:netloc.find("]")] if "]" in netloc else netloc
    return netloc.rsplit(":", 1)[0] if netloc.count(":") == 1 else netloc


class HostCheck:
    """``Host`` must name this server (``allowed``; None: any name), and an ``Origin``, when a browser sends one,
    must be this server itself (same scheme-less host and port as ``Host``) or one of ``cors_origins``. A page on
    evil.example whose name is rebound to 127.0.0.1 sends ``Host: evil.example``; a cross-site form or fetch sends
    its own ``Origin``: both are refused with 403 before anything else runs."""

    def __init__(self, app, metrics: Metrics, allowed: set[str] | None, cors_origins: set[str]):
        self.app, self.metrics = app, metrics
        self.allowed = None if allowed is None else {_hostname(h) for h in allowed}
        self.cors_origins = {o.rstrip("/").lower() for o in cors_origins}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        host = _header(scope, b"host") or ""
        if self.allowed is not None and _hostname(host) not in self.allowed:
            return await send_error(send, self.metrics, 403, f"Host {host[:100]!r} is not a name of this server "
                                    f"(it answers to {', '.join(sorted(self.allowed))}); start it with "
                                    "--allowed-host NAME to serve another name", "forbidden", code="host_not_allowed")
        origin = _header(scope, b"origin")
        if origin is not None:
            o = origin.rstrip("/").lower()
            same = o.split("://", 1)[-1] == host.strip().lower()
            if not same and o not in self.cors_origins:
                return await send_error(send, self.metrics, 403, f"requests from the web page at {origin[:100]!r} "
                                        "are not allowed; start the server with --cors-origin ORIGIN to allow that "
                                        "site", "forbidden", code="origin_not_allowed")
        await self.app(scope, receive, send)


class Gate:
    """The API key (``Authorization: Bearer KEY``, compared in constant time) on every path but OPEN_PATHS, then
    the body: refused with 413 when ``Content-Length`` says it is over ``max_body`` (before a byte of it is read)
    or when it grows past it, with 408 when it has not fully arrived ``read_timeout`` seconds after the headers
    (a client sending half a body would otherwise hold the request, and the server's exit, forever). The app
    gets the body from memory."""

    def __init__(self, app, metrics: Metrics, api_key: str | None, max_body: int, read_timeout: float):
        self.app, self.metrics = app, metrics
        self.key_digest = hashlib.sha256(api_key.encode()).digest() if api_key else None
        self.max_body, self.read_timeout = max_body, read_timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.key_digest is not None and scope["path"] not in OPEN_PATHS and scope["method"] != "OPTIONS":
            refused = self._refuse_key(_header(scope, b"authorization"))
            if refused:
                return await send_error(send, self.metrics, 401, refused[0], "unauthorized", code=refused[1],
                                        headers={"WWW-Authenticate": "Bearer"})
        length = _header(scope, b"content-length")
        chunked = "chunked" in (_header(scope, b"transfer-encoding") or "").lower()
        if length is None and not chunked:
            return await self.app(scope, receive, send)   # no body (GET): nothing to read
        if length is not None and (not length.strip().isdigit() or len(length.strip()) > 18):
            return await send_error(send, self.metrics, 400, f"Content-Length {length[:30]!r} is not a byte count",
                                    "malformed", headers={"Connection": "close"})
        if length is not None and int(length) > self.max_body:
            return await send_error(send, self.metrics, 413, self._too_large(f"{int(length)} bytes"), "too_large",
                                    headers={"Connection": "close"})
        chunks, size = [], 0
        deadline = time.monotonic() + self.read_timeout
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:  # TimeoutError itself from 3.11 on
                return await send_error(send, self.metrics, 408, f"the request body did not arrive within "
                                        f"{self.read_timeout:g} s; send it whole, promptly", "read_timeout",
                                        headers={"Connection": "close"})
            if message["type"] == "http.disconnect":
                self.metrics.errors.labels("cancelled").inc()
                return   # the client left while sending: no one to answer
            size += len(message.get("body", b""))
            if size > self.max_body:
                return await send_error(send, self.metrics, 413, self._too_large(f"more than {self.max_body} bytes"),
                                        "too_large", headers={"Connection": "close"})
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()   # then the real channel: a client that leaves is seen as http.disconnect

        await self.app(scope, replay, send)

    def _too_large(self, size: str) -> str:
        return (f"the request body is {size}; this server reads at most {self.max_body} bytes (--max-body-bytes): "
                "send a smaller request")

    def _refuse_key(self, authorization: str | None) -> tuple[str, str] | None:
        if not authorization:
            return ("this server needs an API key: send it as the header Authorization: Bearer YOUR_KEY",
                    "missing_api_key")
        scheme, _, given = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            return ("send the API key as Authorization: Bearer YOUR_KEY (Bearer auth)", "invalid_api_key")
        # digests of equal length: compare_digest's time then depends on neither the key nor its length
        if not hmac.compare_digest(hashlib.sha256(given.strip().encode()).digest(), self.key_digest):
            return ("incorrect API key provided; use the key the server was started with (--api-key or "
                    "SVDQUANT_API_KEY)", "invalid_api_key")
        return None
