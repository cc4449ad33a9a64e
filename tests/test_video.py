"""Video: a tiny Wan 2.1 text-to-video pipeline calibrated through diffusers' WanPipeline (two transformer calls a
step with guidance, frames as tokens), the per-layer token budget bounded however many tokens a call has, the
size multiple from the adapter, and Wan 2.2's two experts refused rather than half quantized."""

from __future__ import annotations

import tiny_models as tm  # first: sets HF_HUB_OFFLINE before diffusers is imported

import pytest
import torch

import svdquant
from svdquant import SVDQLinear
from svdquant.calibration import LinearInputRecorder, record_inputs
from svdquant.pipelines import check_size, size_multiple

RECIPE = svdquant.W4A4Config(iterations=1, eval_tokens=64)


def calib(**kw):
    return svdquant.Calibration(**{**dict(prompts=["a cat", "a dog on a hill"], steps=2, snapshots=4,
                                          pipeline_kwargs=dict(tm.WAN_KWARGS)), **kw})


def rel_err(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def test_wan_pipeline_calibrates_and_stays_close_to_16bit():
    pipe = tm.build_wan_pipeline()
    ref = tm.sample_video(pipe)
    report = svdquant.quantize(pipe, RECIPE, calib(), progress=False)
    assert report.snapshots == 4 and report.model == "WanTransformer3DModel"
    assert type(pipe.transformer.blocks[1].ffn.net[2]) is SVDQLinear
    assert pipe.transformer.blocks[0].attn2.to_k.activations is None  # text K/V: weight-only
    out = tm.sample_video(pipe)
    assert out.shape == ref.shape == (1, 16, 2, 8, 8)
    assert 0 < rel_err(out, ref) < 0.05, rel_err(out, ref)  # measured 0.011 on pipeline seed 0


@pytest.mark.parametrize("tokens, snapshots", [(8, 4), (6, 4), (64, 2)])
def test_token_budget_per_layer_holds_for_video(monkeypatch, tokens, snapshots):
    """A call holds 32 video tokens per layer here (~32k for a 480p 5 s clip): each drawn call adds at most
    ceil(tokens / snapshots) of them, and a layer is calibrated on at most ``tokens``."""
    kept, per_call = [], []
    orig_inputs = LinearInputRecorder.inputs

    def inputs(self, key):
        x, amax = orig_inputs(self, key)
        kept.append(x.shape[0])
        per_call.extend(t.shape[0] for t in self.samples[key])
        return x, amax

    monkeypatch.setattr(LinearInputRecorder, "inputs", inputs)
    pipe = tm.build_wan_pipeline()
    svdquant.quantize(pipe, RECIPE, calib(snapshots=snapshots, tokens_per_layer=tokens), progress=False)
    assert kept and max(kept) <= tokens
    assert max(per_call) <= -(-tokens // snapshots)
    # the budget is used, not undershot, by the video layers (cross-attention K/V read the 8 text tokens)
    assert max(kept) == min(tokens, 32 * snapshots)


def test_size_multiple_comes_from_the_adapter():
    wan, kontext, flux = tm.build_wan_pipeline(), tm.build_kontext_pipeline(), tm.build_flux_pipeline()
    # Wan: VAE 8 x patch (1, 2, 2); FLUX / Kontext: VAE (2 here: a 2-level tiny VAE) x 2x2 packing
    assert size_multiple(wan) == 16 and size_multiple(kontext) == size_multiple(flux) == 2 * flux.vae_scale_factor
    check_size(wan, 64, 48)
    with pytest.raises(ValueError, match="multiple of 16"):
        check_size(wan, 40, 64)
    with pytest.raises(ValueError, match="multiple of 16"):
        svdquant.quantize(wan, RECIPE, calib(pipeline_kwargs={**tm.WAN_KWARGS, "height": 40}), progress=False)


def test_two_experts_are_refused_before_any_work():
    pipe = tm.build_wan_pipeline(two_experts=True)
    called = []
    handles = [m.register_forward_pre_hook(lambda *a: called.append(1)) for m in (pipe.transformer, pipe.transformer_2)]
    with pytest.raises(ValueError, match="two experts .*transformer_2"):
        svdquant.quantize(pipe, RECIPE, calib(), progress=False)
    for h in handles:
        h.remove()
    assert not called
    for m in (pipe.transformer, pipe.transformer_2):
        assert not any(isinstance(x, SVDQLinear) for x in m.modules())


def test_each_expert_quantizes_as_a_bare_model_on_its_own_calls():
    """The way the refusal names: the low-noise expert calibrated on the calls the pipeline makes to it."""
    pipe = tm.build_wan_pipeline(two_experts=True)
    c = calib(steps=4)
    for expert in (pipe.transformer, pipe.transformer_2):
        inputs = record_inputs(pipe, expert, c, progress=False)
        assert inputs
        svdquant.quantize(expert, RECIPE, svdquant.Calibration(inputs=inputs), progress=False)
        assert type(expert.blocks[0].attn1.to_q) is SVDQLinear
    assert torch.isfinite(tm.sample_video(pipe, steps=4)).all()
