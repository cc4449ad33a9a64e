"""``svdquant serve`` against hostile and careless clients (issue 24), on a live uvicorn on 127.0.0.1 configured
as the CLI runs it (:func:`svdquant.serve.serving`): bodies too large, half sent or not JSON, heads that never
end, connections that never speak, too many connections, coerced types, no key or the wrong one, foreign
Host / Origin, clients that leave mid-generation or set a deadline, a drain that runs out of time, a warm-up,
Retry-After against the real wait, and a burst of all of it. Every wait is bounded; the whole file takes ~30 s.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import socket
import threading
import time

import pytest
import tiny_models  # noqa: F401 - first: sets HF_HUB_OFFLINE before diffusers is imported
import torch

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from svdquant.serve import create_app, load_engine, serving  # noqa: E402

KEY = "hostile-test-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_BODY = 16384
READ_TIMEOUT = 1.0
MAX_CONNECTIONS = 40
ORIGIN = "https://app.example"


def metrics(base: str) -> dict[str, float]:
    out = {}
    for fam in text_string_to_metric_families(httpx.get(f"{base}/metrics", headers=AUTH, timeout=10).text):
        for s in fam.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def err(base: str, kind: str) -> float:
    return metrics(base)[f"svdquant_errors_total{{kind={kind}}}"]


def post(base, body=None, *, content=None, headers=None, timeout=60):
    h = {**AUTH, **(headers or {})}
    if content is None:
        return httpx.post(f"{base}/v1/images/generations", json=body, headers=h, timeout=timeout)
    return httpx.post(f"{base}/v1/images/generations", content=content, headers=h, timeout=timeout)


def addr(base: str) -> tuple[str, int]:
    host, port = base.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


def raw(base: str, data: bytes = b"", timeout: float = 5.0) -> socket.socket:
    s = socket.create_connection(addr(base), timeout=timeout)
    if data:
        s.sendall(data)
    return s


def read_all(s: socket.socket) -> bytes:
    out = b""
    while chunk := s.recv(65536):
        out += chunk
    return out


def head(method="POST", path="/v1/images/generations", **headers) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", f"Authorization: Bearer {KEY}"]
    lines += [f"{k.replace('_', '-')}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def wait_for(cond, what, limit=20.0):
    deadline = time.monotonic() + limit
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def engine():
    return load_engine("tiny", "cpu", torch.float32)


@pytest.fixture(scope="module")
def server(engine):
    app = create_app(engine, max_queue=2, max_batch=1, batch_wait_ms=0, max_body_bytes=MAX_BODY, api_key=KEY,
                     cors_origins=[ORIGIN], read_timeout=READ_TIMEOUT, drain_timeout=2.0,
                     max_connections=MAX_CONNECTIONS)
    with serving(app) as base:
        yield base


@pytest.fixture(autouse=True)
def idle(request):
    """Every test starts and ends with the worker idle (a long job left running would skew the next)."""
    if "server" in request.fixturenames:
        base = request.getfixturevalue("server")
        wait_for(lambda: metrics(base)["svdquant_in_flight"] == 0 and metrics(base)["svdquant_queue_depth"] == 0,
                 "an idle worker")
    yield


def check_error(r, status: int, *words, param="unset"):
    assert r.status_code == status, (r.status_code, r.text)
    e = r.json()["error"]
    assert set(e) == {"message", "type", "param", "code"}, e
    assert "\n" not in e["message"] and all(w in e["message"] for w in words), e["message"]
    if param != "unset":
        assert e["param"] == param, e
    return e


# ------------------------------------------------------------------------------------------------ bodies
MALFORMED = [  # (content, content type, status, kind, words, param): each answered in OpenAI's shape
    (b'{"prompt": "cat"', "application/json", 400, "malformed", ["not valid JSON", "column 17"], None),
    (b"", "application/json", 400, "malformed", ["body is empty"], None),
    (b'{"prompt": "\xff\xfe"}', "application/json", 400, "malformed", ["not UTF-8"], None),
    (b'{"prompt": "cat", "seed": ' + b"9" * 5000 + b"}", "application/json", 400, "malformed", ["ordinary size"],
     None),
    (b"[" * 3000 + b"]" * 3000, "application/json", 400, "malformed", ["nested deeper"], None),
    (b'{"prompt": "cat", "guidance_scale": NaN}', "application/json", 400, "malformed", ["NaN is not a JSON number"],
     None),
    (b'{"prompt": "cat", "guidance_scale": 1e999}', "application/json", 422, "invalid", ["finite"], "guidance_scale"),
    (b'{"prompt": "cat"}', "text/plain", 415, "unsupported_media_type", ["Content-Type: application/json",
                                                                         "text/plain", "its text is JSON"], None),
    (b"prompt=cat", "application/x-www-form-urlencoded", 415, "unsupported_media_type", ["application/json"], None),
    (b'{"prompt": "cat", "prompt": "dog"}', "application/json", 422, "invalid", ["'prompt' appears twice"], "prompt"),
    (b'{"prompt": "cat", "n": "2"}', "application/json", 422, "invalid", ["n: must be an integer", "string '2'"], "n"),
    (b'{"prompt": "cat", "n": true}', "application/json", 422, "invalid", ["n: must be an integer", "boolean true"],
     "n"),
    (b'{"prompt": "cat", "user": "' + b"u" * 300 + b'"}', "application/json", 422, "invalid", ["user", "256"], "user"),
    (b'["cat"]', "application/json", 422, "invalid", ["JSON object"], None),
    (b'{"prompt": "cat", "timeout": -1}', "application/json", 422, "invalid", ["timeout"], "timeout"),
]


def test_malformed_bodies_get_one_openai_error_each_counted_and_never_reach_the_worker(server):
    before = metrics(server)
    for content, ctype, status, kind, words, param in MALFORMED:
        check_error(post(server, content=content, headers={"Content-Type": ctype}), status, *words, param=param)
    after = metrics(server)
    for kind in {m[3] for m in MALFORMED}:
        key = f"svdquant_errors_total{{kind={kind}}}"
        assert after[key] - before[key] == sum(m[3] == kind for m in MALFORMED), kind
    assert after["svdquant_batch_images_count"] == before["svdquant_batch_images_count"]


def test_a_declared_300_mb_body_is_refused_before_it_is_sent(server):
    before = err(server, "too_large")
    s = raw(server, head(Content_Length=300_000_000, Content_Type="application/json"))
    t0 = time.monotonic()
    reply = read_all(s)
    s.close()
    assert reply.startswith(b"HTTP/1.1 413") and time.monotonic() - t0 < 2, reply[:200]
    body = json.loads(reply.split(b"\r\n\r\n", 1)[1])
    assert "at most 16384 bytes" in body["error"]["message"] and "--max-body-bytes" in body["error"]["message"]
    assert err(server, "too_large") == before + 1


def test_a_chunked_body_growing_past_the_limit_is_cut_off(server):
    s = raw(server, head(Transfer_Encoding="chunked", Content_Type="application/json"))
    for _ in range(9):
        s.sendall(b"800\r\n" + b"x" * 0x800 + b"\r\n")   # 9 x 2 KiB > 16 KiB
    reply = read_all(s)
    s.close()
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]


def test_half_a_body_gets_408_after_the_read_timeout(server):
    before = err(server, "read_timeout")
    s = raw(server, head(Content_Length=100, Content_Type="application/json") + b'{"prompt": ')
    t0 = time.monotonic()
    reply = read_all(s)
    took = time.monotonic() - t0
    s.close()
    assert reply.startswith(b"HTTP/1.1 408") and READ_TIMEOUT * 0.8 < took < READ_TIMEOUT + 2, (took, reply[:200])
    assert err(server, "read_timeout") == before + 1


# ------------------------------------------------------------------------------------------------ connections
def test_silent_and_slow_connections_are_closed_after_the_read_timeout(server):
    """30 connections that never send a byte, one that sends its head a line at a time: each is closed once
    READ_TIMEOUT has passed since it opened, and the descriptors they held come back."""
    base_fds = fds()
    silent = [raw(server) for _ in range(30)]
    slow = raw(server, b"POST /v1/images/generations HTTP/1.1\r\n")
    t0 = time.monotonic()
    closed_at = None
    while closed_at is None and time.monotonic() - t0 < READ_TIMEOUT + 3:
        try:
            slow.sendall(b"X-Drip: 1\r\n")
        except OSError:
            closed_at = time.monotonic()
            break
        slow.settimeout(0.2)
        try:
            if slow.recv(1024) == b"":
                closed_at = time.monotonic()
        except socket.timeout:
            pass
        except OSError:  # closed with our drip unread: the kernel resets the connection instead of ending it
            closed_at = time.monotonic()
    assert closed_at is not None and closed_at - t0 < READ_TIMEOUT + 1.5
    for s in silent:
        s.settimeout(READ_TIMEOUT + 3)
        assert s.recv(1024) == b""          # closed by the server, not by us
        s.close()
    slow.close()
    wait_for(lambda: fds() <= base_fds + 2, "the descriptors back", limit=5)


def test_connections_over_the_limit_are_closed_as_they_open(server):
    before = err(server, "too_many_connections")
    socks = [raw(server) for _ in range(MAX_CONNECTIONS + 10)]
    time.sleep(0.3)
    closed = 0
    for s in socks:
        s.settimeout(0.05)
        try:
            closed += s.recv(1) == b""
        except (socket.timeout, ConnectionResetError):
            pass
    for s in socks:
        s.close()
    assert closed >= 10 and err(server, "too_many_connections") - before >= 10
    wait_for(lambda: httpx.get(f"{server}/health", timeout=2).status_code == 200, "the server answering again")


@pytest.mark.parametrize("how", ["whole", "dripped"])
def test_a_head_over_16_kib_gets_a_json_431_and_a_garbled_one_a_400(server, how):
    before = err(server, "malformed")
    big = head(X_Big="a" * 20_000, Content_Type="application/json")
    s = raw(server, big if how == "whole" else b"")
    if how == "dripped":   # h11's own bound on an incomplete head
        for i in range(0, len(big), 4096):
            s.sendall(big[i:i + 4096])
            time.sleep(0.01)
    reply = read_all(s)
    s.close()
    assert reply.startswith(b"HTTP/1.1 431"), reply[:200]
    assert "over 16384 bytes" in json.loads(reply.split(b"\r\n\r\n", 1)[1])["error"]["message"]
    s = raw(server, b"NOT HTTP AT ALL\r\n\r\n")
    reply = read_all(s)
    s.close()
    assert reply.startswith(b"HTTP/1.1 400") and b'"error"' in reply, reply[:200]
    assert err(server, "malformed") == before + 2


# ------------------------------------------------------------------------------------------------ who may ask
def test_the_api_key_is_required_except_for_the_page_and_health(server):
    before = err(server, "unauthorized")
    r = httpx.post(f"{server}/v1/images/generations", json={"prompt": "cat"}, timeout=10)
    e = check_error(r, 401, "Authorization: Bearer")
    assert e["code"] == "missing_api_key" and r.headers["WWW-Authenticate"] == "Bearer"
    for bad in ("Bearer wrong-key-0123456789", "Basic " + KEY, f"bearer {KEY}x", "Bearer"):
        assert check_error(post(server, {"prompt": "cat"}, headers={"Authorization": bad}), 401)["code"] == \
            "invalid_api_key"
    assert httpx.get(f"{server}/metrics", timeout=10).status_code == 401
    assert httpx.get(f"{server}/v1/models", timeout=10).status_code == 401
    for path in ("/", "/health", "/health/live", "/health/ready"):
        assert httpx.get(f"{server}{path}", timeout=10).status_code == 200, path
    assert post(server, {"prompt": "cat", "num_inference_steps": 1}).status_code == 200
    assert err(server, "unauthorized") == before + 7


def test_foreign_hosts_and_origins_are_refused_and_cors_is_opt_in(server):
    before = err(server, "forbidden")
    e = check_error(post(server, {"prompt": "cat"}, headers={"Host": "evil.example"}), 403, "evil.example",
                    "--allowed-host")
    assert e["code"] == "host_not_allowed"                                  # DNS rebinding
    e = check_error(post(server, {"prompt": "cat"}, headers={"Origin": "http://evil.example"}), 403, "--cors-origin")
    assert e["code"] == "origin_not_allowed"                                # a cross-site fetch or form
    host, port = addr(server)
    ok = post(server, {"prompt": "cat", "num_inference_steps": 1}, headers={"Origin": f"http://{host}:{port}"})
    assert ok.status_code == 200                                             # the server's own page
    pre = httpx.options(f"{server}/v1/images/generations", timeout=10, headers={
        "Origin": ORIGIN, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})
    assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == ORIGIN
    r = post(server, {"prompt": "cat", "num_inference_steps": 1}, headers={"Origin": ORIGIN})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
    assert err(server, "forbidden") == before + 2


def test_unknown_routes_answer_in_openai_shape_with_a_request_id(server, caplog):
    caplog.set_level(logging.INFO, logger="svdquant.serve.access")
    r = httpx.get(f"{server}/v2/nothing", headers={**AUTH, "X-Request-Id": "abc-123"}, timeout=10)
    check_error(r, 404, "no route GET /v2/nothing", "POST /v1/images/generations")
    assert r.headers["x-request-id"] == "abc-123"
    r = httpx.get(f"{server}/v1/images/generations", headers=AUTH, timeout=10)
    check_error(r, 405)
    rid = r.headers["x-request-id"]
    assert len(rid) == 16
    assert httpx.get(f"{server}/health", headers={"X-Request-Id": "bad id\x7f"}, timeout=10).headers[
        "x-request-id"] != "bad id\x7f"
    lines = [rec.getMessage() for rec in caplog.records if rec.name == "svdquant.serve.access"]
    assert any('"GET /v2/nothing" 404' in ln and "id=abc-123" in ln for ln in lines), lines
    assert any(f"id={rid}" in ln and " 405 " in ln for ln in lines), lines


# ------------------------------------------------------------------------------------------------ work nobody waits for
def test_a_client_leaving_mid_generation_stops_its_batch_between_steps(server):
    """100 steps take ~15 s here; the client leaves after 1 s: the batch stops at the next step, is counted, and
    the next request is served at once."""
    before = metrics(server)
    with pytest.raises(httpx.ReadTimeout):
        post(server, {"prompt": "cat", "num_inference_steps": 100}, timeout=1.0)
    t0 = time.monotonic()
    wait_for(lambda: metrics(server)["svdquant_in_flight"] == 0, "the batch to stop", limit=5)
    stopped_in = time.monotonic() - t0
    after = metrics(server)
    assert after["svdquant_batches_stopped_total{why=cancelled}"] == before[
        "svdquant_batches_stopped_total{why=cancelled}"] + 1
    assert after["svdquant_errors_total{kind=cancelled}"] == before["svdquant_errors_total{kind=cancelled}"] + 1
    assert stopped_in < 3, stopped_in
    assert post(server, {"prompt": "cat", "num_inference_steps": 1}, timeout=10).status_code == 200


def test_a_request_timeout_stops_the_work_and_answers_504(server):
    before = metrics(server)
    t0 = time.monotonic()
    r = post(server, {"prompt": "dog", "num_inference_steps": 100, "timeout": 1.0}, timeout=30)
    assert time.monotonic() - t0 < 3
    e = check_error(r, 504, "timeout of 1 s")
    assert e["code"] == "timeout"
    wait_for(lambda: metrics(server)["svdquant_in_flight"] == 0, "the batch to stop", limit=5)
    after = metrics(server)
    assert after["svdquant_errors_total{kind=timeout}"] == before["svdquant_errors_total{kind=timeout}"] + 1
    assert after["svdquant_batches_stopped_total{why=timeout}"] == before["svdquant_batches_stopped_total{why=timeout}"] + 1


def test_retry_after_follows_the_measured_wait(server):
    """A running request and a full queue: the 429's Retry-After is the queued and running image-steps times the
    measured seconds per image-step, compared here with how long the queue then really takes to empty."""
    post(server, {"prompt": "cat", "num_inference_steps": 8, "seed": 1})          # measures seconds per step
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        futs = [pool.submit(post, server, {"prompt": "cat", "num_inference_steps": 8, "seed": s}) for s in (2,)]
        wait_for(lambda: metrics(server)["svdquant_in_flight"] == 1, "a running request")
        futs += [pool.submit(post, server, {"prompt": "cat", "num_inference_steps": 8, "seed": s}) for s in (3, 4)]
        wait_for(lambda: metrics(server)["svdquant_queue_depth"] == 2, "a full queue")
        r = post(server, {"prompt": "cat", "num_inference_steps": 8})
        t0 = time.monotonic()
        assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded"
        said = int(r.headers["Retry-After"])
        assert [f.result(60).status_code for f in futs] == [200, 200, 200]
        real = time.monotonic() - t0
    assert 0.4 * real <= said <= 2.5 * real + 1, (said, real)


# ------------------------------------------------------------------------------------------------ life cycle
def test_ready_only_after_the_warm_up_and_never_while_draining(engine):
    gate = threading.Event()
    app = create_app(engine, warmup=lambda: gate.wait(20), drain_timeout=5)
    with serving(app) as base:
        r = httpx.get(f"{base}/health/ready", timeout=5)
        assert r.status_code == 503 and r.json() == {"ready": False, "state": "warming up"}
        assert httpx.get(f"{base}/health/live", timeout=5).status_code == 200
        assert httpx.get(f"{base}/health", timeout=5).json()["status"] == "ok"   # as before
        gate.set()
        wait_for(lambda: httpx.get(f"{base}/health/ready", timeout=5).status_code == 200, "readiness")
        app.state.begin_drain()
        assert httpx.get(f"{base}/health/ready", timeout=5).json() == {"ready": False, "state": "draining"}
        r = httpx.post(f"{base}/v1/images/generations", json={"prompt": "cat"}, timeout=5)
        assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"


def test_the_drain_timeout_answers_503_and_the_server_exits(engine):
    """Shutdown (what SIGTERM starts) with a 100-step request running, two queued and a client stuck halfway
    through its body: at the drain timeout all three get 503 and the server is gone a moment later."""
    app = create_app(engine, max_batch=1, batch_wait_ms=0, drain_timeout=1.0, read_timeout=1.0)
    pool = concurrent.futures.ThreadPoolExecutor(3)
    body = {"prompt": "horse", "num_inference_steps": 100}
    with serving(app) as base:
        futs = [pool.submit(httpx.post, f"{base}/v1/images/generations", json=body, timeout=30) for _ in range(3)]
        wait_for(lambda: app.state.worker.depth == 2, "one running, two queued")
        stuck = raw(base, b"POST /v1/images/generations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                          b"application/json\r\nContent-Length: 50\r\n\r\n{")
        t0 = time.monotonic()
    took = time.monotonic() - t0    # the with block returns once uvicorn's thread has ended
    codes = sorted(f.result(5).status_code for f in futs)
    pool.shutdown()
    stuck.close()
    assert codes == [503, 503, 503] and took < 5, (codes, took)
    m = app.state.metrics
    assert m.errors.labels("shutting_down")._value.get() == 3
    assert m.batches_stopped.labels("shutting_down")._value.get() == 1


def test_a_burst_of_good_and_hostile_clients(server):
    """120 requests from 24 threads: valid ones, malformed ones, unauthenticated ones, oversized ones. Each gets
    its own answer (images, 429 with Retry-After, or its 4xx), the server stays up and its counts add up."""
    before = metrics(server)
    kinds = ["ok", "bad-json", "no-key", "too-big", "coerced"]

    def one(i):
        kind = kinds[i % len(kinds)]
        if kind == "ok":
            r = post(server, {"prompt": "ship", "num_inference_steps": 1, "seed": i})
            assert r.status_code in (200, 429), r.text
            if r.status_code == 429:
                assert int(r.headers["Retry-After"]) >= 1
        elif kind == "bad-json":
            r = post(server, content=b'{"prompt": ', headers={"Content-Type": "application/json"})
            assert r.status_code == 400
        elif kind == "no-key":
            r = httpx.post(f"{server}/v1/images/generations", json={"prompt": "ship"}, timeout=30)
            assert r.status_code == 401
        elif kind == "too-big":
            r = post(server, content=b"x" * (MAX_BODY + 1), headers={"Content-Type": "application/json"})
            assert r.status_code == 413
        else:
            r = post(server, {"prompt": "ship", "n": "1"})
            assert r.status_code == 422
        assert r.headers.get("x-request-id")
        return kind, r.status_code

    with concurrent.futures.ThreadPoolExecutor(24) as pool:
        results = list(pool.map(one, range(120)))
    after = metrics(server)
    ok = sum(1 for k, s in results if k == "ok" and s == 200)
    full = sum(1 for k, s in results if k == "ok" and s == 429)
    assert ok >= 1 and ok + full == 24
    assert after["svdquant_images_total"] - before["svdquant_images_total"] == ok
    for kind, label in (("bad-json", "malformed"), ("no-key", "unauthorized"), ("too-big", "too_large"),
                        ("coerced", "invalid")):
        key = f"svdquant_errors_total{{kind={label}}}"
        assert after[key] - before[key] == 24, kind
    assert after["svdquant_errors_total{kind=queue_full}"] - before["svdquant_errors_total{kind=queue_full}"] == full
    assert after["svdquant_queue_seconds_count"] - before["svdquant_queue_seconds_count"] == ok
    assert after["svdquant_compute_seconds_count"] - before["svdquant_compute_seconds_count"] == ok
    assert httpx.get(f"{server}/health/ready", timeout=5).status_code == 200
