"""``benchmarks/serve.py``, the GPU serving benchmark, kept from rotting on the CPU: its ``--quick`` run end to
end, its one-line refusals, and its FLUX.1-dev-size pipeline built at two blocks and served once."""

from __future__ import annotations

import concurrent.futures
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import tiny_models  # noqa: F401 - first: sets HF_HUB_OFFLINE before diffusers is imported

pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "serve.py"


def bench():
    spec = importlib.util.spec_from_file_location("serve_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_run_writes_every_figure(tmp_path):
    # a subprocess, as it is run: its clients live in a spawned process that must import the script itself
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(tmp_path / "out")], env=env,
                         capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stdout + run.stderr
    out = json.loads((tmp_path / "out" / "serve.json").read_text())
    assert out["device"] == "cpu" and list(out["models"]) == ["tiny"] and out["wall_s"] > 0
    rows = out["results"]
    assert [(r["model"], r["size"], r["steps"], r["max_batch"]) for r in rows] == [
        ("tiny", "32x32", 1, 1), ("tiny", "32x32", 1, 4)]
    for r in rows:
        assert r["clients"] == 4 and r["requests"] == r["ok"] == r["images"] == 8, r
        assert r["http_429"] == r["failed"] == 0 and r["status"] == {"200": 8}
        assert r["images_per_s"] > 0 and r["wall_s"] > 0 and r["pipeline_s_per_image"] > 0
        lat = r["latency_s"]
        assert 0 < lat["p50"] <= lat["p95"] <= lat["max"]
        assert sum(int(n) * c for n, c in r["batches"].items()) == r["images"]
        assert max(int(n) for n in r["batches"]) <= r["max_batch"]
        m = r["metrics"]  # the server's own count agrees with the clients' and the engine's
        assert m["images_total"] == m["batch_images"] == m["latency_count"] == r["images"]
        assert m["batches"] == sum(r["batches"].values()) and m["queue_depth_max"] <= r["max_queue"]
        assert not any(m["errors"].values())
        assert r["first_image"] == [32, 32, "JPEG"]
    assert rows[0]["batches"] == {"1": 8}
    assert rows[1]["mean_batch"] > 1  # four clients at once: the micro-batched server did batch
    table = (tmp_path / "out" / "serve.md").read_text()
    assert table.startswith("| model | size | steps | max batch | images/s |") and table.strip() in run.stdout
    assert table.count("\n| tiny | 32x32 |") == 2


@pytest.mark.parametrize("argv,words", [
    (["--sizes", "500"], "--sizes 500"),
    (["--max-batch", "1"], "--max-batch 1"),
    (["--clients", "0"], "--clients 0"),
    (["--blocks", "0", "0"], "--blocks 0 0"),
    (["--blocks", "20", "1"], "--blocks DOUBLE 20"),
    (["--steps", "101"], "--steps 101"),
    (["--device", "cpu", "--models", "flux-dev"], "--blocks 1 1"),
    (["--device", "tpu"], "--device"),
])
def test_bad_options_get_one_line_before_any_work(argv, words, capsys):
    with pytest.raises(SystemExit) as e:
        bench().parse_args(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("benchmarks/serve.py: error: ") and words in err, err


def test_out_must_be_a_folder(tmp_path, capsys):
    (tmp_path / "f").write_text("")
    with pytest.raises(SystemExit):
        bench().parse_args(["--quick", "--out", str(tmp_path / "f")])
    assert "is a file" in capsys.readouterr().err


def test_a_missing_server_package_is_named(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "fastapi", None)  # as if not installed: importing it raises ImportError
    with pytest.raises(SystemExit):
        bench().parse_args(["--quick"])
    assert "needs the fastapi package" in capsys.readouterr().err


@pytest.mark.slow
def test_flux_dev_size_pipeline_builds_and_serves_on_the_cpu(one_torch_thread):
    """The FLUX-size path at 2 of its 57 blocks (~20 s): FLUX.1-dev's widths everywhere, the quantized layers
    random on the CPU (the torch reference runs them), one request through a live server."""
    from svdquant import SVDQLinear
    from svdquant.serve import Engine

    b = bench()
    pipe, info = b.flux_dev_pipeline((1, 1), "cpu")
    cfg = pipe.transformer.config
    assert (cfg.num_layers, cfg.num_single_layers, cfg.num_attention_heads, cfg.attention_head_dim,
            cfg.joint_attention_dim, cfg.pooled_projection_dim, cfg.guidance_embeds) == (1, 1, 24, 128, 4096, 768, True)
    quantized = [m for m in pipe.transformer.modules() if isinstance(m, SVDQLinear)]
    assert info["quantized_layers"] == len(quantized) > 0
    assert all(m.qweight is None or m.qweight.device.type == "cpu" for m in quantized)
    assert tuple(pipe.vae.config.block_out_channels) == (128, 256, 512, 512) and pipe.vae.config.latent_channels == 16
    assert pipe.text_encoder_2.config.d_model == 4096 and pipe.text_encoder.config.hidden_size == 768
    engine = b.recording(Engine(pipe, b.FLUX_MODEL_ID, "cpu"))
    assert engine.default_size == (1024, 1024) and engine.multiple == 16
    with concurrent.futures.ThreadPoolExecutor(1) as clients:
        r = b.measure(engine, clients, model="flux-dev", size=(64, 48), steps=1, max_batch=2, batch_wait_ms=0,
                      clients=1, requests=1, max_queue=1, output_format="jpeg", seed=0)
    assert r["ok"] == r["images"] == 1 and r["batches"] == {"1": 1} and r["first_image"] == [64, 48, "JPEG"]
