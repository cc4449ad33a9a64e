"""Every pipeline of the newer models end to end on tiny random-weight components (tests/tiny_pipelines.py):
calibrated through the real diffusers pipeline (input images for the edit and image-to-video ones), every linear
the adapter lists quantized, saved, loaded into a freshly built pipeline bit for bit, and generating."""

from __future__ import annotations

import tiny_models as tm  # first: sets HF_HUB_OFFLINE before diffusers is imported
import tiny_pipelines as tp

import pytest
import torch

import svdquant
from svdquant import SVDQLinear
from svdquant.calibration import LinearInputRecorder, record_inputs
from svdquant.models import get_adapter

RECIPE = svdquant.get_recipe("int4", iterations=1, eval_tokens=64)
IMAGES = [tm.input_image(0), tm.input_image(1)]

# The transformer's relative error against 16 bits on the held-out calls: twice what was measured (0.0011, 0.0007,
# 0.035, 0.0010, 0.0011, 0.012). Without the low-rank branch (lora_up zeroed) it measured 6-45x these, without
# the smoothing (smooth_inv set to 1) 1.6-23x, over the bound everywhere but Z-Image's smoothing.
MAX_ERROR = {"flux2": 0.0025, "flux2-klein": 0.0015, "zimage": 0.07, "qwenimage-edit": 0.0025,
             "qwenimage-edit-plus": 0.0025, "wan-i2v": 0.025}


def calib(kwargs: dict, needs_image: bool, prompts=("a cat", "a dog on a hill"), **kw) -> svdquant.Calibration:
    return svdquant.Calibration(prompts=list(prompts), steps=2, pipeline_kwargs=dict(kwargs),
                                images=IMAGES if needs_image else None, **kw)


def generate(pipe, kwargs: dict, needs_image: bool) -> torch.Tensor:
    """One fixed-noise 2-step call: images as ``[B, 3, H, W]``, a video's frames as ``[B, F, 3, H, W]``."""
    extra = dict(image=tm.input_image(2)) if needs_image else {}
    with torch.no_grad():
        out = pipe(prompt="a red cube", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                   output_type="pt", **extra, **kwargs)
    return out.frames if hasattr(out, "frames") else out.images


def expected_shape(kwargs: dict) -> tuple[int, ...]:
    hw = (3, kwargs["height"], kwargs["width"])
    return (1, kwargs["num_frames"], *hw) if "num_frames" in kwargs else (1, *hw)


def adapter_linears(model) -> list[str]:
    adapter = get_adapter(model)
    names = [f"{b}.{n}" for b, block in adapter.blocks(model) for g in adapter.groups(block) for n in g.names]
    assert names
    return names


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def needs_ftfy():
    # diffusers 0.42's WanImageToVideoPipeline cleans every prompt with ftfy.fix_text, unguarded (WanPipeline checks
    # is_ftfy_available first): without ftfy any call fails with NameError
    pytest.importorskip("ftfy", reason="WanImageToVideoPipeline needs ftfy (pip install ftfy, or '.[dev]')")


@pytest.mark.parametrize("name", list(tp.PIPELINES))
def test_pipeline_quantizes_saves_reloads_bit_exact_and_generates(name, tmp_path, one_torch_thread):
    build, kwargs, needs_image = tp.PIPELINES[name]
    if name == "wan-i2v":
        needs_ftfy()
    pipe = build()
    # the transformer's inputs on held-out calls through the pipeline, and its 16-bit outputs on them
    held_out = record_inputs(pipe, pipe.transformer, calib(kwargs, needs_image, prompts=["a red cube"],
                                                            snapshots=2), progress=False)
    assert len(held_out) == 2
    ref = [tm.forward(pipe.transformer, kw) for kw in held_out]
    names = adapter_linears(pipe.transformer)  # read on the 16-bit model: groups list nn.Linear members

    report = svdquant.quantize(pipe, RECIPE, calib(kwargs, needs_image, snapshots=4), progress=False)
    assert report.snapshots == 4
    assert all(type(pipe.transformer.get_submodule(n)) is SVDQLinear for n in names)
    out = [tm.forward(pipe.transformer, kw) for kw in held_out]
    errs = [rel_err(o, r) for o, r in zip(out, ref)]
    assert all(0 < e < MAX_ERROR[name] for e in errs), errs

    path = svdquant.save_quantized(pipe.transformer, tmp_path / name, report=report)
    fresh = build()
    fresh.register_modules(transformer=svdquant.load_quantized(path))
    assert all(type(fresh.transformer.get_submodule(n)) is SVDQLinear for n in names)
    for kw, o in zip(held_out, out):
        assert torch.equal(tm.forward(fresh.transformer, kw), o)
    images = generate(fresh, kwargs, needs_image)
    assert images.shape == expected_shape(kwargs) and torch.isfinite(images).all()
    assert torch.equal(images, generate(pipe, kwargs, needs_image))


def test_a_call_in_which_a_layer_reads_no_tokens_adds_nothing():
    """Found on Wan image-to-video: a layer of an empty stream (an empty slice of the context) reads ``[B, 0, K]``;
    such a call is skipped, and a layer that read no token in any call is named, not an IndexError in a hook."""
    lin = torch.nn.Linear(8, 4)
    rec = LinearInputRecorder({"lin": lin}, n_snapshots=2, tokens_per_layer=16, seed=0)
    x = torch.randn(1, 3, 8)
    with torch.no_grad():
        lin(torch.randn(1, 0, 8))
        lin(x)
    tokens, amax = rec.inputs("lin")
    assert tokens.shape == (3, 8) and torch.equal(amax, x[0].abs().amax(0))
    rec.close()
    rec = LinearInputRecorder({"lin": lin}, n_snapshots=2, tokens_per_layer=16, seed=0)
    with torch.no_grad():
        lin(torch.randn(2, 0, 8))
    with pytest.raises(RuntimeError, match="never reached lin: the layer did not run, or read no tokens"):
        rec.inputs("lin")
    rec.close()


def test_wan_i2v_with_another_text_length_is_refused_before_any_work(one_torch_thread):
    """Wan's cross-attention takes the context's first ``length - 512`` tokens as the image's: with 8 text tokens
    the image projections would read none (diffusers then ignores the picture without a word)."""
    build, kwargs, _ = tp.PIPELINES["wan-i2v"]
    pipe = build()
    calls = []
    pipe.transformer.register_forward_pre_hook(lambda *a: calls.append(1))
    with pytest.raises(ValueError, match=r"^WanImageToVideoPipeline with image tokens needs max_sequence_length=512 "
                                         r".* got 8: leave max_sequence_length out of pipeline_kwargs$"):
        svdquant.quantize(pipe, RECIPE, calib({**kwargs, "max_sequence_length": 8}, True, snapshots=4),
                          progress=False)
    assert not calls


def test_wan_i2v_without_ftfy_is_refused_before_any_work(monkeypatch):
    """diffusers' WanImageToVideoPipeline runs ftfy on every prompt without checking it is installed; the check
    names the package before calibration runs anything."""
    import sys

    build, kwargs, _ = tp.PIPELINES["wan-i2v"]
    pipe = build()
    calls = []
    pipe.transformer.register_forward_pre_hook(lambda *a: calls.append(1))
    monkeypatch.setitem(sys.modules, "ftfy", None)  # what an import sees when the package is not installed
    with pytest.raises(ValueError, match=r"^WanImageToVideoPipeline runs every prompt through the ftfy package, "
                                         r"which is not installed: pip install ftfy$"):
        svdquant.quantize(pipe, RECIPE, calib(kwargs, True), progress=False)
    assert not calls


# The image's relative change with 4-bit text encoders and the int4 transformer against the 16-bit pipeline, from the
# same noise: twice what was measured (2.0e-4, 3.8e-4, 0.016, 3.8e-3, 7.2e-4)
TE_MAX_CHANGE = {"flux2": 5e-4, "flux2-klein": 1e-3, "zimage": 0.035, "wan-i2v": 8e-3, "qwenimage-edit": 1.5e-3}
# what the encoders' W4A16 rule quantizes and keeps (every block-stack linear; lm_head, vision towers, projectors kept)
TE_LAYERS = {"flux2": ("Mistral3ForConditionalGeneration", 14), "flux2-klein": ("Qwen3ForCausalLM", 14),
             "zimage": ("Qwen3Model", 14), "wan-i2v": ("UMT5EncoderModel", 7),
             "qwenimage-edit": ("Qwen2_5_VLForConditionalGeneration", 7)}


@pytest.mark.parametrize("name", list(TE_MAX_CHANGE))
def test_pipeline_with_4bit_text_encoders_saves_and_reloads_them_bit_exact(name, tmp_path, one_torch_thread):
    """``quantize(pipe, ..., text_encoders=True)`` on the newer pipelines' encoders (FLUX.2 [dev]'s Mistral 3, Z-Image
    and Klein's Qwen3, Wan's UMT5, Qwen-Image-Edit's Qwen2.5-VL): their block linears W4A16, one checkpoint with the
    transformer, and a fresh pipeline given the loaded encoders generates the same images bit for bit."""
    build, kwargs, needs_image = tp.PIPELINES[name]
    if name == "wan-i2v":
        needs_ftfy()
    pipe = build()
    ref = generate(pipe, kwargs, needs_image)
    report = svdquant.quantize(pipe, RECIPE, calib(kwargs, needs_image, snapshots=2), progress=False,
                               text_encoders=True)
    enc = report.text_encoders["text_encoder"]
    assert (enc["class"], enc["layers"]) == TE_LAYERS[name]
    images = generate(pipe, kwargs, needs_image)
    assert 0 < rel_err(images, ref) < TE_MAX_CHANGE[name]
    path = svdquant.save_quantized(pipe, tmp_path / name)
    loaded = svdquant.load_text_encoders(path)
    assert loaded.keys() == {"text_encoder"}
    want = pipe.text_encoder.state_dict()
    got = loaded["text_encoder"].state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    fresh = build()
    fresh.register_modules(transformer=svdquant.load_quantized(path), **loaded)
    assert torch.equal(generate(fresh, kwargs, needs_image), images)
