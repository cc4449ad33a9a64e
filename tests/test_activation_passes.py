"""benchmarks/activation_passes.py: the FLUX step's activation passes timed one type at a time (GPU); here its CPU
smoke run, tiny shapes through Triton's interpreter: the step's pass count, and the block options it sweeps give
the shipped blocks' codes and scales."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

pytest.importorskip("triton")


@pytest.mark.skipif(torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1",
                    reason="the interpreter runs the kernels on CPU machines")
def test_the_smoke_run_covers_the_steps_passes_and_every_swept_block_agrees(tmp_path):
    import activation_passes as ap

    res = ap.main(["--smoke", "--out", str(tmp_path)])
    assert json.loads((tmp_path / "activation_passes.json").read_text())["passes"] == res["passes"]
    assert sum(r["count"] for r in res["passes"]) == 19 * 8 + 38 * 2  # 228 INT8 layers' passes a FLUX step
    for r in res["passes"]:
        assert r["two_reads_us"] > r["one_read_us"] > 0
        assert r["sweep"] and all(isinstance(t, float) for t in r["sweep"].values()), r["sweep"]
        assert r["chunks"] and all(isinstance(t, float) for t in r["chunks"].values()), r["chunks"]
        assert isinstance(r["uniform_us"], float) and isinstance(r["given_maxima_us"], float)
        assert r["given_sweep"] and all(isinstance(t, float) for t in r["given_sweep"].values()), r["given_sweep"]


def test_the_floor_counts_the_bytes_of_a_pass():
    """Known answer: M = 1,000 rows of K = 100 at 1 GB/s (1 byte per ns), 2 K splits."""
    import activation_passes as ap

    f = ap.floor_us(1000, 100, 1.0, 2)
    x, out, partials = 1000 * 100 * 2, 1000 * (100 + 4 + 64), 2 * 1000 * (8 + 128)
    assert f["one_read_us"] == pytest.approx((x + out) / 1e3)
    assert f["two_reads_us"] == pytest.approx((2 * x + 2 * partials + out) / 1e3)


def test_a_gpu_run_is_refused_without_one_in_a_line(capsys):
    import activation_passes as ap

    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    with pytest.raises(SystemExit):
        ap.main(["--out", "x"])
    assert "needs a CUDA GPU; --smoke runs the plumbing on the CPU" in capsys.readouterr().err
