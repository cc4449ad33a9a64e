"""Model cards (issue 14, part 2): ``save_quantized(..., model_card=True)`` writes README.md with Hub front matter."""

from __future__ import annotations

import math
import statistics

import tiny_models as tm  # first: sets HF_HUB_OFFLINE before diffusers is imported

import pytest
import yaml

import svdquant
from svdquant.ops import gpu_support

RECIPE = svdquant.get_recipe("int4", iterations=1, eval_tokens=64)
_CACHE: dict = {}


@pytest.fixture(scope="module")
def quantized():
    if "m" not in _CACHE:
        model = tm.build_flux()
        report = svdquant.quantize(model, RECIPE, svdquant.Calibration(inputs=tm.calibration_inputs("flux", model, 1)),
                                   progress=False)
        _CACHE["m"] = (model, report)
    return _CACHE["m"]


def card(path):
    text = (path / "README.md").read_text()
    assert text.startswith("---\n")
    front, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(front), body


def test_hub_base_card(quantized, tmp_path):
    model, report = quantized
    path = svdquant.save_quantized(model, tmp_path / "ck", base="black-forest-labs/FLUX.1-dev", report=report,
                                   model_card=True)
    front, body = card(path)
    assert front["base_model"] == "black-forest-labs/FLUX.1-dev"
    assert front["base_model_relation"] == "quantized"
    assert front["library_name"] == "diffusers" and front["pipeline_tag"] == "text-to-image"
    assert "license" not in front  # offline: the base's license is unknown, and nothing is guessed
    assert "svdquant" in front["tags"] and "int4" in front["tags"]
    errs = [r.rel_error for r in report.rows]
    assert f"{statistics.median(errs):.4f}" in body and f"| layer groups quantized | {len(report.rows)} |" in body
    sqnr = statistics.median(-20 * math.log10(e) for e in errs)
    assert f"{sqnr:.1f} dB" in body
    assert "| ranks used | 0, 32 |" in body  # the W4A16 adaLN layers have no branch, the others rank 32
    assert "INT8 GEMM kernels on compute capability 8.0+" in body and "W4A16 kernel" in body
    assert "| weights | `int4m` |" in body


def test_license_from_a_local_base(quantized, tmp_path):
    model, report = quantized
    base = tmp_path / "base"
    base.mkdir()
    (base / "README.md").write_text("---\nlicense: apache-2.0\ntags:\n- x\n---\n# base\n")
    path = svdquant.save_quantized(model, tmp_path / "ck", base=str(base), report=report, model_card=True)
    front, _ = card(path)
    assert front["license"] == "apache-2.0"
    assert "base_model" not in front  # a local folder is no Hub id


def test_license_from_the_hub_cache(quantized, tmp_path, monkeypatch):
    import huggingface_hub

    readme = tmp_path / "cached-README.md"
    readme.write_text("---\nlicense: other\nlicense_name: flux-1-dev-non-commercial-license\n---\n")
    asked = []

    def fake_download(repo, filename, **kw):
        asked.append((repo, filename))
        return str(readme)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    model, report = quantized
    path = svdquant.save_quantized(model, tmp_path / "ck", base="black-forest-labs/FLUX.1-dev", report=report,
                                   model_card=True)
    assert asked == [("black-forest-labs/FLUX.1-dev", "README.md")]
    assert card(path)[0]["license"] == "other"


def test_no_card_unless_asked_and_no_report(quantized, tmp_path):
    model, _ = quantized
    assert not (svdquant.save_quantized(model, tmp_path / "a") / "README.md").exists()
    _, body = card(svdquant.save_quantized(model, tmp_path / "b", model_card=True))
    assert "No quantization report" in body and "an unrecorded base model" in body


def test_card_loads_with_the_checkpoint(quantized, tmp_path):
    """README.md next to the checkpoint does not disturb loading (nor overwrite, which needs svdquant.json)."""
    model, report = quantized
    path = svdquant.save_quantized(model, tmp_path / "ck", report=report, model_card=True)
    svdquant.load_quantized(path)
    svdquant.save_quantized(model, path, report=report, overwrite=True, model_card=True)
    assert (path / "README.md").exists()


@pytest.mark.parametrize("recipe, words", [("int4", "INT8 GEMM"), ("w8a8", "INT8 GEMM"), ("nvfp4", "8.9+"),
                                           ("fp8", "_scaled_mm"), ("w4a4-float", "paper's W4A4"),
                                           ("w4a16", "W4A16 kernel"), ("nf4", "torch reference")])
def test_gpu_support_follows_the_runner_table(recipe, words):
    r = svdquant.get_recipe(recipe)
    assert words in gpu_support(r.weights, r.activations)


@pytest.mark.parametrize("meta, tag", [
    (dict(model_class="FluxTransformer2DModel", base="black-forest-labs/FLUX.1-dev"), "text-to-image"),
    (dict(model_class="FluxTransformer2DModel", base="black-forest-labs/FLUX.1-Kontext-dev"), "image-to-image"),
    (dict(model_class="QwenImageTransformer2DModel", base="Qwen/Qwen-Image-Edit-2509"), "image-to-image"),
    (dict(model_class="WanTransformer3DModel", base="Wan-AI/Wan2.1-T2V-14B-Diffusers",
          model_config=dict(in_channels=16, image_dim=None)), "text-to-video"),
    (dict(model_class="WanTransformer3DModel", model_config=dict(in_channels=36, image_dim=1280)), "image-to-video"),
    (dict(model_class="WanTransformer3DModel", model_config=dict(in_channels=36)), "image-to-video"),  # Wan 2.2 I2V
    (dict(model_class="FluxTransformer2DModel", base="../credit/FLUX.1-dev", base_is_local=True), "text-to-image"),
    (dict(model_class="FluxTransformer2DModel", base="editors/FLUX.1-dev"), "text-to-image"),  # the owner's name
])
def test_pipeline_tag_follows_the_pipeline(meta, tag):
    from svdquant.checkpoint.card import pipeline_tag

    assert pipeline_tag(meta) == tag
