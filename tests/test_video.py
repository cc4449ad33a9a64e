"""Video: a tiny Wan 2.1 text-to-video pipeline calibrated through diffusers' WanPipeline (two transformer calls a
step with guidance, frames as tokens), the per-layer token budget bounded however many tokens a call has, the
size multiple from the adapter, and Wan 2.2's two experts both quantized, each on its own calls (their checkpoint
and the errors around them: test_experts.py)."""

from __future__ import annotations

import tiny_models as tm  # first: sets HF_HUB_OFFLINE before diffusers is imported

import pytest
import torch

import svdquant
from svdquant import SVDQLinear
from svdquant.calibration import LinearInputRecorder, capture, record_inputs
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


def test_two_experts_are_both_quantized_each_on_its_own_calls(monkeypatch):
    """quantize(pipe) on Wan 2.2's layout quantizes transformer and transformer_2, each calibrated on the calls the
    pipeline makes to it (timesteps on its side of the boundary), the low-noise one while the high-noise one is
    still 16-bit (so its calls follow the 16-bit trajectory)."""
    pipe = tm.build_wan_pipeline(two_experts=True)
    ref = tm.sample_video(pipe)
    experts = {"transformer": pipe.transformer, "transformer_2": pipe.transformer_2}
    drawn = []
    selector_pre = capture.CallSelector._pre

    def pre(self, module, args, kwargs):  # the calls each calibration draws, by expert
        selector_pre(self, module, args, kwargs)
        if self.active:
            name = next(n for n, m in experts.items() if m is module)
            sixteen_bit = not any(isinstance(x, SVDQLinear) for x in pipe.transformer.modules())
            drawn.append((name, float(kwargs["timestep"][0]), sixteen_bit))

    monkeypatch.setattr(capture.CallSelector, "_pre", pre)
    report = svdquant.quantize(pipe, RECIPE, calib(), progress=False)
    boundary = pipe.config.boundary_ratio * pipe.scheduler.config.num_train_timesteps
    high = [t for n, t, _ in drawn if n == "transformer"]
    low = [(t, sixteen) for n, t, sixteen in drawn if n == "transformer_2"]
    # 2 prompts x the expert's 1 step each: the step's first (conditional) call, not its unconditional one too
    assert len(high) == len(low) == 2 and report.snapshots == 4
    assert all(t >= boundary for t in high) and all(t < boundary and sixteen for t, sixteen in low)
    for m in experts.values():
        assert type(m.blocks[0].attn1.to_q) is SVDQLinear and type(m.blocks[1].ffn.net[2]) is SVDQLinear
    names = [r.names[0] for r in report.rows]
    assert len(names) == 28 and sum(n.startswith("transformer_2.blocks.") for n in names) == 14
    assert "blocks.0.attn1.to_q" in names and "transformer_2.blocks.0.attn1.to_q" in names
    assert {n for n, _ in report.skipped} >= {"proj_out", "transformer_2.proj_out"}
    out = tm.sample_video(pipe)
    assert torch.isfinite(out).all() and 0 < rel_err(out, ref) < 0.05, rel_err(out, ref)


def test_each_expert_quantizes_as_a_bare_model_on_its_own_calls():
    """The manual way, still open: each expert as a bare model, calibrated on the calls the pipeline makes to it."""
    pipe = tm.build_wan_pipeline(two_experts=True)
    c = calib(steps=4)
    for expert in (pipe.transformer, pipe.transformer_2):
        inputs = record_inputs(pipe, expert, c, progress=False)
        assert inputs
        svdquant.quantize(expert, RECIPE, svdquant.Calibration(inputs=inputs), progress=False)
        assert type(expert.blocks[0].attn1.to_q) is SVDQLinear
    assert torch.isfinite(tm.sample_video(pipe, steps=4)).all()


def test_draws_cover_every_step_when_guidance_runs_two_calls_per_step():
    """Wan runs classifier-free guidance as two transformer calls per step: drawing calls would cover only the first
    half of the steps (the noisiest). Steps are drawn: with every step drawn, every step's timestep is recorded,
    once, from its first (conditional) call, and the pipeline call ends there at the last step (its unconditional
    call would record nothing)."""
    pipe = tm.build_wan_pipeline()
    assert tm.WAN_KWARGS["guidance_scale"] > 1  # two calls per step
    calls, texts = [], []

    def seen(m, a, kw):
        calls.append(float(kw["timestep"][0]))
        texts.append(kw["encoder_hidden_states"].clone())

    pipe.transformer.register_forward_pre_hook(seen, with_kwargs=True)
    inputs = record_inputs(pipe, pipe.transformer, calib(prompts=["a cat"], steps=4, snapshots=4), progress=False)
    assert len(calls) == 7 and calls[0:6:2] == calls[1:6:2] and len(set(calls)) == 4  # two calls per step
    assert [float(x["timestep"][0]) for x in inputs] == calls[0::2]
    # each the step's first call: the prompt's embedding, not the negative prompt's of the second
    assert not torch.equal(texts[0], texts[1])
    assert all(torch.equal(x["encoder_hidden_states"], texts[2 * i]) for i, x in enumerate(inputs))
    # a draw of 2 of the 4 steps: two different steps, not the two calls of one
    two = record_inputs(pipe, pipe.transformer, calib(prompts=["a cat"], steps=4, snapshots=2), progress=False)
    assert len({float(x["timestep"][0]) for x in two}) == 2


def test_the_high_noise_expert_calibrates_without_running_the_low_noise_steps():
    """Calibrating ``transformer`` of a two-expert pipeline stops each prompt where the low-noise expert would take
    over: its steps would record nothing (on Wan 2.2 A14B, 14B-parameter calls for nothing)."""
    pipe = tm.build_wan_pipeline(two_experts=True)
    low_calls = []
    pipe.transformer_2.register_forward_hook(lambda *a: low_calls.append(1))  # calls that ran to the end
    inputs = record_inputs(pipe, pipe.transformer, calib(prompts=["a cat"], steps=4, snapshots=8), progress=False)
    assert inputs and not low_calls
    # and the low-noise expert's own calibration still runs the high-noise steps it follows
    high_calls = []
    pipe.transformer.register_forward_hook(lambda *a: high_calls.append(1))
    assert record_inputs(pipe, pipe.transformer_2, calib(prompts=["a cat"], steps=4, snapshots=8), progress=False)
    assert high_calls
