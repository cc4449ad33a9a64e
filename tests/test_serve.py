"""``svdquant serve`` against a live uvicorn on 127.0.0.1 (CPU, the shipped tiny model).

Every server here listens on a free local port, is started in a thread (or, for the CLI and SIGTERM,
a subprocess) and stopped at the end; every wait is bounded.
"""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import io
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tiny_models as tm  # first: sets HF_HUB_OFFLINE before diffusers is imported
import torch
from safetensors.torch import save_file

httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")
from PIL import Image  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from svdquant import cli  # noqa: E402
from svdquant.pipelines import CIFAR10_CLASSES  # noqa: E402
from svdquant.serve import Engine, create_app, load_engine, serving  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
STEPS = 1  # the tiny model's images at 1 Euler step are enough to test the plumbing, and fast


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def live(app):
    """``app`` on a real uvicorn in a thread on a free port; yields its base URL; stops it (bounded) afterwards."""
    return serving(app, timeout=30)


def metrics(base: str) -> dict[str, float]:
    """``/metrics`` as {sample name{labels}: value}."""
    out = {}
    for fam in text_string_to_metric_families(httpx.get(f"{base}/metrics").text):
        for s in fam.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def post(base, timeout=60, **body):
    body.setdefault("num_inference_steps", STEPS)
    return httpx.post(f"{base}/v1/images/generations", json=body, timeout=timeout)


def decode(item) -> Image.Image:
    im = Image.open(io.BytesIO(base64.b64decode(item["b64_json"])))
    im.load()
    return im


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory):
    """A small random LoRA on one attention projection, so the page has a strength slider."""
    g = torch.Generator().manual_seed(0)
    path = tmp_path_factory.mktemp("lora") / "style.safetensors"
    save_file({"transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(4, 256, generator=g) * 0.05,
               "transformer_blocks.0.attn.to_q.lora_B.weight": torch.randn(256, 4, generator=g) * 0.05}, str(path))
    return path


@pytest.fixture(scope="module")
def engine(lora_file):
    return load_engine("tiny", "cpu", torch.float32, [(str(lora_file), 1.0)])


@pytest.fixture(scope="module")
def server(engine):
    with live(create_app(engine, max_queue=8, max_batch=4, batch_wait_ms=20)) as base:
        yield base


# ------------------------------------------------------------------------------------------------ API
@pytest.mark.parametrize("fmt,pil", [("png", "PNG"), ("jpeg", "JPEG"), ("webp", "WEBP")])
def test_generation_returns_decodable_image(server, fmt, pil):
    r = post(server, prompt="a cat", size="32x32", output_format=fmt, seed=11, n=2)
    assert r.status_code == 200, r.text
    body = r.json()
    assert isinstance(body["created"], int) and len(body["data"]) == 2
    assert [d["seed"] for d in body["data"]] == [11, 12]
    for d in body["data"]:
        im = decode(d)
        assert im.format == pil and im.size == (32, 32) and im.mode == "RGB"


def test_same_seed_same_image(server):
    a = post(server, prompt="ship", seed=5).json()["data"][0]
    b = post(server, prompt="ship", seed=5).json()["data"][0]
    c = post(server, prompt="ship", seed=6).json()["data"][0]
    assert a["b64_json"] == b["b64_json"]
    assert a["b64_json"] != c["b64_json"]
    # a LoRA strength is part of the request: 0 changes the image, the loaded default (1) does not
    assert post(server, prompt="ship", seed=5, loras={"style": 1.0}).json()["data"][0]["b64_json"] == a["b64_json"]
    assert post(server, prompt="ship", seed=5, loras={"style": 0.0}).json()["data"][0]["b64_json"] != a["b64_json"]
    # the second image of an n=2 request is the n=1 image of its returned seed (noise is drawn per image)
    pair = post(server, prompt="ship", seed=4, n=2).json()["data"]
    assert pair[1]["seed"] == 5
    diff = (np.asarray(decode(pair[1]), dtype=int) - np.asarray(decode(a), dtype=int)).__abs__()
    assert diff.max() <= 1  # batched vs alone: float sums may round one code apart


def test_models_health_and_page(server):
    m = httpx.get(f"{server}/v1/models").json()["data"][0]
    assert m["id"] == "tiny" and m["default_size"] == "32x32" and m["classes"] == list(CIFAR10_CLASSES)
    assert m["loras"] == {"style": 1.0}
    assert httpx.get(f"{server}/health").json()["status"] == "ok"
    page = httpx.get(f"{server}/").text
    assert 'id="generate"' in page and "/v1/images/generations" in page
    assert "http://" not in page and "https://" not in page  # no CDN: the page works offline


BAD = [  # (request body, status, words the one message must hold)
    ({"prompt": "a dragon"}, 400, ["airplane", "automobile", "truck"]),
    ({"prompt": "   "}, 422, ["empty"]),
    ({"prompt": "cat " * 600}, 422, ["2000"]),
    ({}, 422, ["prompt", "required"]),
    ({"prompt": "cat", "size": "40x32"}, 422, ["multiple of 16"]),
    ({"prompt": "cat", "size": "0x0"}, 422, ["between 16 and 2048"]),
    ({"prompt": "cat", "size": "4096x4096"}, 422, ["between 16 and 2048"]),
    ({"prompt": "cat", "size": "big"}, 422, ["WIDTHxHEIGHT"]),
    ({"prompt": "cat", "size": "64x64"}, 400, ["32x32"]),
    ({"prompt": "cat", "num_inference_steps": 0}, 422, ["num_inference_steps"]),
    ({"prompt": "cat", "num_inference_steps": 101}, 422, ["num_inference_steps"]),
    ({"prompt": "cat", "n": 0}, 422, ["n:"]),
    ({"prompt": "cat", "n": 5}, 422, ["n:", "4"]),
    ({"prompt": "cat", "guidance_scale": -1}, 422, ["guidance_scale"]),
    ({"prompt": "cat", "guidance_scale": 31}, 422, ["guidance_scale"]),
    ({"prompt": "cat", "output_format": "gif"}, 422, ["output_format", "png"]),
    ({"prompt": "cat", "response_format": "url"}, 422, ["response_format", "b64_json"]),
    ({"prompt": "cat", "seed": -1}, 422, ["seed"]),
    ({"prompt": "cat", "num_steps": 3}, 422, ["unknown field", "num_steps"]),
    ({"prompt": "cat", "model": "dall-e-3"}, 400, ["tiny", "/v1/models"]),
    ({"prompt": "cat", "loras": {"nope": 1}}, 400, ["nope", "style"]),
    ({"prompt": "cat", "loras": {"style": 9}}, 422, ["style", "between"]),
]


def test_bad_inputs_get_their_status_and_never_reach_the_worker(server):
    before = metrics(server)
    for body, status, words in BAD:
        r = httpx.post(f"{server}/v1/images/generations", json=body, timeout=10)
        assert r.status_code == status, (body, r.status_code, r.text)
        msg = r.json()["error"]["message"]
        assert "\n" not in msg and all(w in msg for w in words), (body, msg)
    r = httpx.post(f"{server}/v1/images/generations", content=b"{not json", timeout=10,
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    after = metrics(server)
    assert after['svdquant_errors_total{kind=invalid}'] - before['svdquant_errors_total{kind=invalid}'] == len(BAD)
    assert after['svdquant_errors_total{kind=malformed}'] - before['svdquant_errors_total{kind=malformed}'] == 1
    assert after["svdquant_batch_images_count"] == before["svdquant_batch_images_count"]  # no sampling happened


def test_a_diffusers_pipeline_folder_is_served(tmp_path):
    """MODEL may be a 16-bit diffusers folder: any prompt, sizes in multiples of 16, batched per-image seeds."""
    engine = load_engine(str(tm.save_flux_pipeline(tmp_path / "flux")), "cpu", torch.float32)
    with live(create_app(engine, max_queue=4, max_batch=4, batch_wait_ms=0)) as base:
        r = post(base, prompt="a red fox", size="48x32", seed=3, n=2, output_format="jpeg")
        assert r.status_code == 200, r.text
        assert [decode(d).size for d in r.json()["data"]] == [(48, 32)] * 2
        alone = post(base, prompt="a red fox", size="48x32", seed=4, output_format="jpeg").json()["data"][0]
        assert alone["seed"] == 4
        a, b = (np.asarray(decode(d), dtype=int) for d in (r.json()["data"][1], alone))
        assert np.abs(a - b).max() <= 2  # the n=2 request's second image is seed 4's (jpeg: near, not exact)
        assert np.abs(np.asarray(decode(r.json()["data"][0]), dtype=int) - b).max() > 2  # seed 3's is another
        assert post(base, prompt="a red fox", size="40x32").status_code == 422


# ------------------------------------------------------------------------------------------------ load
def test_load_every_request_ends_in_an_image_or_429(engine):
    max_queue, clients, per_client = 4, 12, 5
    with live(create_app(engine, max_queue=max_queue, max_batch=4, batch_wait_ms=20)) as base:
        def client(i):
            seen = []
            with httpx.Client(base_url=base, timeout=60) as c:
                for j in range(per_client):
                    r = c.post("/v1/images/generations", json={
                        "prompt": CIFAR10_CLASSES[(i + j) % 10], "seed": 100 * i + j, "num_inference_steps": STEPS})
                    if r.status_code == 429:
                        assert int(r.headers["Retry-After"]) >= 1
                    else:
                        assert r.status_code == 200, r.text
                        assert decode(r.json()["data"][0]).size == (32, 32)
                    seen.append(r.status_code)
            return seen

        t0 = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(clients) as pool:
            results = [s for f in [pool.submit(client, i) for i in range(clients)] for s in f.result(timeout=120)]
        took = time.monotonic() - t0
        m = metrics(base)
    ok, full = results.count(200), results.count(429)
    assert len(results) == clients * per_client and ok + full == len(results), results  # none lost
    assert ok >= clients and took < 120
    assert 1 <= m["svdquant_queue_depth_max"] <= max_queue  # the queue was used, never over its bound
    assert m["svdquant_queue_depth"] == 0 and m["svdquant_in_flight"] == 0
    assert m["svdquant_images_total"] == ok and m["svdquant_request_latency_seconds_count"] == ok
    assert m["svdquant_errors_total{kind=queue_full}"] == full
    assert m["svdquant_batch_images_sum"] == ok
    assert m["svdquant_batch_images_count"] < ok  # compatible requests were micro-batched


# ------------------------------------------------------------------------------------------------ faults
class GatedEngine(Engine):
    """The real engine, but sampling waits for ``gate`` and a batch holding ``oom_seed`` (or any batch
    of more than one image while ``oom_batches``) runs out of memory, as a too-big batch on a GPU would."""

    def __init__(self, real: Engine):
        super().__init__(real.pipe, real.model_id, real.device, real.loras)
        self.gate, self.oom_seed, self.calls = threading.Event(), None, []

    def generate(self, settings, prompts, seeds):
        assert self.gate.wait(60)
        self.calls.append(list(seeds))
        if len(seeds) > 1 or self.oom_seed in seeds:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return super().generate(settings, prompts, seeds)


def wait_for(cond, what, limit=30):
    deadline = time.monotonic() + limit
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)

@contextlib.contextmanager
def cli_server(args, what, limit, **env):
    """``svdquant serve ARGS`` in a subprocess on a free 127.0.0.1 port, waited for until /health answers;
    yields (process, base URL) and kills the process if the test left it running. Its output goes to a file
    (``proc.log()`` reads it): an undrained pipe fills up (Ray's processes log every second) and blocks the
    server's writes, which once made Ray's shutdown abort."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **env}
    out = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen([sys.executable, "-m", "svdquant.cli", "serve", "--port", str(port), *args],
                            env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
    proc.log = lambda: (out.seek(0), out.read())[1]
    base = f"http://127.0.0.1:{port}"
    try:
        def up():
            assert proc.poll() is None, proc.log()
            with contextlib.suppress(httpx.TransportError):
                return httpx.get(f"{base}/health", timeout=2).status_code == 200
        wait_for(up, what, limit=limit)
        yield proc, base
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        out.close()


def test_disconnect_cancels_queued_work_and_oom_falls_back_one_by_one(engine):
    gated = GatedEngine(engine)
    with live(create_app(gated, max_queue=8, max_batch=4, batch_wait_ms=50)) as base, \
            concurrent.futures.ThreadPoolExecutor(4) as pool:
        first = pool.submit(post, base, prompt="cat", seed=1)               # holds the worker at the gate
        wait_for(lambda: metrics(base)["svdquant_in_flight"] == 1, "the first request in flight")
        # a client that gives up while queued: its job is dropped, never sampled
        with pytest.raises(httpx.ReadTimeout):
            post(base, prompt="dog", seed=2, timeout=0.5)
        wait_for(lambda: metrics(base)["svdquant_errors_total{kind=cancelled}"] == 1, "the cancellation")
        assert metrics(base)["svdquant_queue_depth"] == 0
        # three compatible requests batch together, the batch runs out of memory, each is retried alone;
        # the one that still does not fit gets 503 and the others their images
        gated.oom_seed = 666
        rest = []
        for i, seed in enumerate((3, 4, 666)):  # one at a time, so the batch's order is known
            rest.append(pool.submit(post, base, prompt="cat", seed=seed))
            wait_for(lambda: metrics(base)["svdquant_queue_depth"] == i + 1, f"{i + 1} queued requests")
        gated.gate.set()
        assert first.result(60).status_code == 200
        codes = [f.result(60).status_code for f in rest]
        assert codes == [200, 200, 503]
        assert gated.calls == [[1], [3, 4, 666], [3], [4], [666]]  # the cancelled seed 2 never ran
        m = metrics(base)
        assert m["svdquant_errors_total{kind=out_of_memory}"] == 1 and m["svdquant_images_total"] == 3
        assert httpx.get(f"{base}/health").json()["status"] == "ok"  # the server stays up
        assert post(base, prompt="cat", seed=9).status_code == 200


# ------------------------------------------------------------------------------------------------ CLI
@pytest.mark.parametrize("argv,words", [
    (["--port", "0"], "--port 0"),
    (["--max-queue", "0"], "--max-queue 0"),
    (["--max-batch", "65"], "--max-batch 65"),
    (["--batch-wait-ms", "-1"], "--batch-wait-ms -1"),
    (["/no/such/model"], "does not exist"),
    (["--lora", "/no/such.safetensors"], "no LoRA file"),
    (["--device", "cuda:7"], "--device cuda:7"),
    (["--replicas", "0"], "--replicas 0"),
    (["--api-key", "short"], "at least 8 characters"),
    (["--cors-origin", "https://app.example/path"], "--cors-origin https://app.example/path"),
    (["--allowed-host", "http://x"], "--allowed-host http://x"),
    (["--max-body-bytes", "10"], "--max-body-bytes 10"),
    (["--read-timeout", "0"], "--read-timeout 0"),
    (["--drain-timeout", "-1"], "--drain-timeout -1"),
    (["--max-connections", "0"], "--max-connections 0"),
])
def test_cli_serve_refuses_bad_options_before_loading(argv, words, capsys):
    assert cli.main(["serve", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("svdquant serve: error:") and words in err and err.count("\n") == 1


def test_cli_serve_refuses_a_recorded_base_outside_unless_allowed(tmp_path, capsys):
    """A checkpoint whose svdquant.json points its base outside its folder and here is refused before loading;
    --allow-base-outside lets it through to the next check (this base is no pipeline: another error)."""
    import json

    (tmp_path / "elsewhere").mkdir()
    ck = tmp_path / "downloads" / "ck"
    ck.mkdir(parents=True)
    (ck / "svdquant.json").write_text(json.dumps({
        "format": "svdquant", "format_version": 2, "model_class": "FluxTransformer2DModel", "model_config": {},
        "layers": {}, "base": "../../elsewhere", "base_is_local": True}))
    port = str(free_port())
    assert cli.main(["serve", str(ck), "--port", port]) == 2
    err = capsys.readouterr().err
    assert "outside" in err and "--allow-base-outside" in err and err.count("\n") == 1
    assert cli.main(["serve", str(ck), "--port", port, "--allow-base-outside"]) == 2
    assert "outside" not in capsys.readouterr().err


def test_cli_serve_warns_when_listening_beyond_this_machine_without_a_key():
    with cli_server(["--host", "0.0.0.0"], "svdquant serve to start", 120, SVDQUANT_API_KEY="") as (proc, base):
        r = httpx.get(f"{base}/health/ready", timeout=5)
        assert r.status_code == 200 and r.headers["x-request-id"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) in (0, -signal.SIGTERM)
        log = proc.log()
    assert "warning: listening on 0.0.0.0, beyond this machine, without an API key" in log, log
    assert '"GET /health/ready" 200' in log   # the access log


def test_cli_serve_replicas_without_ray_says_so(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed: importing it raises ImportError
    assert cli.main(["serve", "--replicas", "2", "--port", str(free_port())]) == 2
    err = capsys.readouterr().err
    assert "Ray Serve, which is not installed" in err and err.count("\n") == 1


def test_cli_serve_refuses_a_taken_port(capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        assert cli.main(["serve", "--port", str(s.getsockname()[1])]) == 2
    assert "cannot listen on 127.0.0.1" in capsys.readouterr().err


def test_cli_serve_drains_the_queue_on_sigterm():
    with cli_server(["--max-batch", "1"], "svdquant serve to start", 120) as (proc, base):
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            futs = [pool.submit(post, base, prompt="frog", seed=s, num_inference_steps=20) for s in range(3)]

            def all_accepted_some_queued():
                # SIGTERM only promises the requests the server has taken: wait until all three are (queued,
                # sampling or done) and one still waits, else a late one meets a closed port
                m = metrics(base)
                taken = m["svdquant_queue_depth"] + m["svdquant_in_flight"] + m["svdquant_images_total"]
                return taken >= 3 and m["svdquant_queue_depth"] >= 1

            wait_for(all_accepted_some_queued, "three accepted requests, one queued")
            proc.send_signal(signal.SIGTERM)
            codes = [f.result(90).status_code for f in futs]
        assert codes == [200, 200, 200]  # queued work finished before the process left
        # uvicorn re-raises the signal once its graceful shutdown is done, so the process ends "killed by
        # SIGTERM" (what a supervisor expects); any other status is a crash
        assert proc.wait(60) in (0, -signal.SIGTERM)
        log = proc.log()
        assert "serving tiny on http://127.0.0.1" in log and "Traceback" not in log, log


@pytest.mark.slow
def test_cli_serve_replicas_on_ray_serve():
    """Two CPU replicas behind Ray Serve's proxy answer like one server (~70 s: Ray and two model loads)."""
    pytest.importorskip("ray.serve", reason="ray[serve] is not installed (an optional, large dependency)")
    with cli_server(["--replicas", "2"], "the Ray Serve replicas", 180, RAY_USAGE_STATS_ENABLED="0") as (proc, base):
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            rs = list(pool.map(lambda s: post(base, prompt="deer", seed=s), range(6)))
        assert [r.status_code for r in rs] == [200] * 6
        assert rs[0].json()["data"][0]["seed"] == 0 and decode(rs[0].json()["data"][0]).size == (32, 32)
        again = post(base, prompt="deer", seed=0).json()["data"][0]   # whichever replica: same seed, same image
        # (the first may have run in a batch: batched matmuls can move a pixel by one level)
        a = np.asarray(decode(again).convert("RGB"), dtype=np.int16)
        b = np.asarray(decode(rs[0].json()["data"][0]).convert("RGB"), dtype=np.int16)
        assert np.abs(a - b).max() <= 1
        bad = post(base, prompt="a dragon")
        assert bad.status_code == 400 and "airplane" in bad.json()["error"]["message"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) == 0, proc.log()[-4000:]


# ------------------------------------------------------------------------------------------------ browser
@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"no {CHROMIUM}: install Debian's chromium (.ci/run does)")
def test_browser_generates_an_image(server, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        # --no-sandbox: CI runs as root, where chromium's sandbox refuses to start
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 900, "height": 640})
            page.goto(server + "/", timeout=30_000)
            page.wait_for_function("document.getElementById('size').value === '32x32'", timeout=30_000)
            assert page.locator("input[data-lora='style']").count() == 1  # one slider per loaded LoRA
            page.fill("#steps", "4")
            for i, prompt in enumerate(("cat", "ship", "horse")):
                page.fill("#prompt", prompt)
                page.fill("#seed", str(i))
                page.click("#generate")
                page.wait_for_function(f"document.querySelectorAll('img.result').length === {i + 1}", timeout=60_000)
            img = page.locator("img.result").first
            assert img.evaluate("im => im.complete && im.naturalWidth") == 32
            assert page.locator("#status").inner_text().startswith("done in")
            # README's picture is refreshed on request only, so a test run leaves the tree as it was
            shot = ROOT / "docs" / "serve.png" if os.environ.get("SVDQUANT_UPDATE_DOCS") else tmp_path / "serve.png"
            page.screenshot(path=str(shot))
            assert shot.stat().st_size > 1000
        finally:
            browser.close()
