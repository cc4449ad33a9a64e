"""benchmarks/pipeline_memory.py --quick (and e2e.py, gptq_speed.py): the GPU measurement scripts run end to end on the CPU (tiny configs,
every model and variant), so it cannot rot between GPU runs (~10 s)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import tiny_models  # noqa: F401  (first: sets HF_HUB_OFFLINE before diffusers is imported)

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import pipeline_memory as pm  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("pm")
    returned = pm.main(["--quick", "--out", str(out)])
    return returned, json.loads((out / "pipeline_memory.json").read_text())


def test_every_model_and_variant_ran(results):
    returned, saved = results
    assert saved == json.loads(json.dumps(returned))  # the file holds what the run measured
    assert saved["device"] == "cpu (quick)" and saved["steps"] == 2
    for model in pm.MODELS:
        res = saved[model]
        for variant in pm.VARIANTS:
            r = res[variant]
            if model in ("sdxl", "sd3", "sana", "pixart", "zimage") and variant.endswith("fbc"):
                assert "no First-Block Cache" in r["skipped"]
                continue
            if model in pm.FBC_FAILS and variant.endswith("fbc"):  # diffusers' hook breaks on their blocks
                assert "First-Block Cache fails" in r["skipped"]
                continue
            assert r["finite"] and r["seconds_per_image"] > 0, (model, variant)
            assert r["peak_gb"] is None  # no GPU: no memory figures invented
            assert r["weight_mode"] == {"bf16": None, "int4": "speed", "int4+te4": "speed"}.get(variant, "memory")


def test_quantized_variants_are_smaller(results):
    _, saved = results
    for model in pm.MODELS:
        res = saved[model]
        den = "unet" if model == "sdxl" else "transformer"
        assert res["quantized_layers"] > 0
        if model != "sdxl":  # the tiny UNet's 32- and 64-wide layers are smaller than their rank-32 branches
            assert res["int4"]["weights_gb"][den] < res["bf16"]["weights_gb"][den]
        assert res["int4"]["weights_gb"]["text_encoder"] == res["bf16"]["weights_gb"]["text_encoder"]
        assert res["int4+te4"]["weights_gb"]["text_encoder"] < res["int4"]["weights_gb"]["text_encoder"]
        assert res["int4+te4+offload"]["weights_gb"] == res["int4+te4"]["weights_gb"]
        # the embedding the denoiser reads moved (SDXL's tokens come from the tiny CLIPs' embedding layer,
        # before their only block: unchanged there)
        errs = res["text_embedding_rel_error"]
        assert all(0 <= e < 0.5 for e in errs) and max(errs) > 0.01
        assert all(0.05 < e < 0.15 for e in res["text_encoder_weight_error_median"].values())


def test_first_block_cache_counts_the_calls(results):
    _, saved = results
    flux, qwen = saved["flux"]["int4+te4+offload+fbc"], saved["qwenimage"]["int4+te4+offload+fbc"]
    assert flux["denoiser_calls"] == 2 and qwen["denoiser_calls"] == 4  # Qwen-Image's true CFG: 2 per step
    assert 1 <= flux["calls_all_blocks_ran"] <= 2 and 1 <= qwen["calls_all_blocks_ran"] <= 4


def test_table_and_options():
    text = pm.table({"flux": {"bf16": {"peak_gb": 33.1, "resident_gb": 33.0, "seconds_per_image": 6.0,
                                       "weights_gb": {"transformer": 23.8}, "weight_mode": None, "finite": True},
                              "int4": {"skipped": "past --budget-s 1"}}})
    assert "| flux | bf16 | 33.10 | 33.00 | 6.0 | transformer 23.80 |  |" in text
    assert "| flux | int4 | | | | | past --budget-s 1 |" in text
    with pytest.raises(SystemExit):
        pm.main(["--quick", "--steps", "0"])


def test_sizes_of_the_real_configs_on_meta():
    """--sizes: the stored weights of the real FLUX.1-dev pipeline, computed on meta. The transformer's 4-bit
    size is the checkpoint the H200 run measured from a state dict (BENCHMARKS.md: 6.56 GB), its 16-bit size
    FLUX.1-dev's 23.80 GB; T5-XXL 9.52 GB in bf16."""
    res = pm.main(["--sizes", "--models", "flux"])["flux"]
    assert res["bf16"]["transformer"] == pytest.approx(23.803, abs=5e-4)
    assert res["bf16"]["text_encoder_2"] == pytest.approx(9.525, abs=5e-4)
    assert res["int4+te4"]["transformer"] == pytest.approx(6.565, abs=5e-4)
    assert res["int4+te4"]["text_encoder_2"] == pytest.approx(2.724, abs=5e-4)  # 3.5x smaller
    assert res["int4+te4"]["vae"] == res["bf16"]["vae"]


def test_e2e_quick_runs_and_writes_its_table(tmp_path):
    """benchmarks/e2e.py shares the builders: its CPU smoke run (one model, eager and ours, batch 1) must not rot."""
    import e2e

    res = e2e.main(["--quick", "--models", "flux", "--variants", "bf16", "int4", "--batch", "1", "--out",
                    str(tmp_path)])
    saved = json.loads((tmp_path / "e2e.json").read_text())
    assert saved["device"] == "cpu (quick)" and saved["size"] == 16 and "command" in saved
    assert json.dumps(res, sort_keys=True) == json.dumps(saved, sort_keys=True)
    assert "| flux | int4 | 1 |" in e2e.table(res)


def test_gptq_speed_quick():
    """benchmarks/gptq_speed.py --quick: the torch block loop and gptq() timed at small shapes on the CPU."""
    import gptq_speed

    rows = gptq_speed.main(["--quick"])
    assert len(rows) == 2 and all(r["gptq_s"] > 0 and "torch_loop_b128_s" in r for r in rows)


def test_video_quick_runs_every_variant_it_is_given(tmp_path):
    """benchmarks/video.py --quick (Wan on tiny configs): per-step times from two calls, the clip estimate, the decode,
    and on the CPU no memory figure; its arguments checked before any work."""
    import video

    res = video.main(["--quick", "--variants", "bf16", "int4", "int4-24gb", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "video.json").read_text())
    assert json.dumps(res, sort_keys=True) == json.dumps(saved, sort_keys=True)
    assert saved["quantized_layers"] > 0  # (tiny widths: the rank-32 branches outweigh the 4-bit savings)
    for variant in ("bf16", "int4", "int4-24gb"):
        r = saved[f"{variant} 480p"]
        assert r["finite"] and r["seconds_per_step"] == pytest.approx((r["call_b_s"] - r["call_a_s"]) / 2, abs=2e-3)
        assert r["clip_s_est"] > 0 and "peak_gb" not in r and "peak_steps_gb" not in r
    assert saved["bf16 480p"]["decode"]["frames"] == 5
    with pytest.raises(SystemExit):
        video.main(["--quick", "--frames", "80"])
    with pytest.raises(SystemExit):
        video.main(["--quick", "--steps-a", "3", "--steps-b", "3"])


def test_plot_e2e_draws_the_results_file_and_checks_it(tmp_path):
    """benchmarks/plot_e2e.py: the committed results draw (a PNG); speed-ups are bf16 / variant; a row without its
    bf16 figure or with an unknown variant is refused in one line."""
    import plot_e2e

    rows = json.loads((Path(plot_e2e.__file__).parent / "results" / "e2e-h200.json").read_text())["rows"]
    assert rows["FLUX.1-dev"]["int4"] == 3.33  # as BENCHMARKS.md and the README say
    out = plot_e2e.main(["--out", str(tmp_path / "e2e.png")])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_e2e.speedups({"m": {"bf16": 2.0, "int4": 1.0}}) == {"m": {"bf16": 1.0, "int4": 2.0}}
    for bad, message in (({"m": {"int4": 1.0}}, "no bf16 figure"), ({"m": {"bf16": 1.0, "nf4": 1.0}}, "unknown"),
                         ({"m": {"bf16": 1.0, "int4": 0}}, "positive numbers"), ({"m": [1.0]}, "must be"),
                         ({}, "must map model names"), ([1], "must map model names")):
        (tmp_path / "bad.json").write_text(json.dumps({"rows": bad}))
        with pytest.raises(SystemExit):
            plot_e2e.main(["--results", str(tmp_path / "bad.json"), "--out", str(tmp_path / "bad.png")])
        with pytest.raises(ValueError, match=message):
            plot_e2e.speedups(bad)
    assert not (tmp_path / "bad.png").exists()
