"""Batched calibration calls: prompts drawn at the same steps go through the pipeline together
(``Calibration(batch_size=)``; by default 4 on a GPU), recording exactly the drawn (prompt, step) pairs with each
prompt's own noise, and running no denoising step a prompt alone would not run."""

from __future__ import annotations

import re

import tiny_models as tm  # first: sets HF_HUB_OFFLINE before diffusers is imported
import tiny_pipelines as tp

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import svdquant
from svdquant.calibration import Calibration, draw_plan, record_inputs
from svdquant.calibration.draw import calibration_batches, prompt_call
from svdquant.calibration.config import GPU_BATCH
from svdquant.pipelines import TinyFluxPipeline


def test_prompts_drawn_at_the_same_steps_share_a_call():
    plan = {0: {1}, 1: {1}, 2: {0, 2}, 3: {1}, 4: {2, 0}, 5: {3}, 6: {1}}
    assert calibration_batches(plan, 2) == [([0, 1], {1}), ([2, 4], {0, 2}), ([3, 6], {1}), ([5], {3})]
    assert calibration_batches(plan, 3) == [([0, 1, 3], {1}), ([2, 4], {0, 2}), ([5], {3}), ([6], {1})]
    assert calibration_batches(plan, 1) == [([p], plan[p]) for p in sorted(plan)]


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 40), st.integers(1, 10), st.integers(1, 200), st.integers(0, 5), st.integers(1, 9))
def test_batches_record_every_drawn_pair_once_and_run_no_extra_step(prompts, steps, snapshots, seed, size):
    plan = draw_plan(prompts, steps, snapshots, seed)
    calls = calibration_batches(plan, size)
    pairs = [(p, s) for rows, drawn in calls for p in rows for s in drawn]
    assert sorted(pairs) == sorted((p, s) for p, drawn in plan.items() for s in drawn)
    assert all(1 <= len(rows) <= size and all(plan[p] == drawn for p in rows) for rows, drawn in calls)
    # each prompt still stops at its own last drawn step: the prompt-steps run are those of one prompt at a time
    assert sum(len(rows) * (max(drawn) + 1) for rows, drawn in calls) == sum(max(d) + 1 for d in plan.values())
    assert len(calls) <= len(plan)


def test_the_default_draw_streams_the_model_half_as_often_in_batches_of_four():
    """128 snapshots of 128 prompts x 8 steps (the large-model default): 412 model calls one prompt at a time,
    216 in batches of four (each streams the weights once, under a memory cap). Each call's last drawn forward ends
    at the first block (tests/test_calibration_last_forward.py), so 329 and 177 of them run whole."""
    plan = draw_plan(128, 8, 128, seed=0)
    single, batched = calibration_batches(plan, 1), calibration_batches(plan, GPU_BATCH)
    assert sum(max(d) + 1 for _, d in single) == 412 and sum(max(d) for _, d in single) == 329
    assert sum(max(d) + 1 for _, d in batched) == 216 and sum(max(d) for _, d in batched) == 177


def test_batch_size_defaults_to_four_only_where_the_model_streams_to_a_gpu():
    """Streaming (each call moves the blocks): up to four; a resident model, videos, edits, pipelines that pad a
    batch's prompts to the longest, and calls given per-prompt arguments: one."""
    flux, wan, kontext = tm.build_flux_pipeline(), tm.build_wan_pipeline(), tm.build_kontext_pipeline()
    zimage = tp.build_zimage_pipeline()
    c = Calibration()
    assert c.batch_for(flux, streaming=True) == GPU_BATCH == 4 and c.batch_for(flux, streaming=False) == 1
    assert c.batch_for(wan, True) == c.batch_for(kontext, True) == c.batch_for(zimage, True) == 1
    assert c.batch_for("QwenImagePipeline", True) == 1
    assert Calibration(images=[tm.input_image(0)]).batch_for(kontext, True) == 1
    for kw in ({"latents": torch.zeros(1)}, {"prompt_embeds": torch.zeros(1)}, {"num_images_per_prompt": 2},
               {"ip_adapter_image": "x.png"}):
        assert Calibration(pipeline_kwargs=kw).batch_for(flux, True) == 1, kw
    assert Calibration(pipeline_kwargs={"num_images_per_prompt": 1, "height": 16}).batch_for(flux, True) == 4
    assert Calibration(batch_size=3).batch_for(flux, False) == 3 and Calibration(batch_size=2).batch_for(wan, True) == 2


@pytest.mark.parametrize("kw, message", [
    (dict(batch_size=0), "batch_size=0: must be between 1 and 64"),
    (dict(batch_size=2.0), "batch_size=2.0: must be a whole number"),
    (dict(batch_size=2, images=["x.png"]), "batch_size=2 with input images: an edit calibration runs one prompt"),
    (dict(batch_size=2, pipeline_kwargs={"latents": 0, "num_images_per_prompt": 2}),
     "batch_size=2 with pipeline_kwargs ['latents', 'num_images_per_prompt'], which describe one prompt's call; "
     "leave batch_size unset or 1"),
    (dict(batch_size=4, inputs=[{"x": 0}]), "batch_size=4 with inputs=: those are the model's calls as given"),
])
def test_bad_batch_sizes_are_refused_when_the_calibration_is_made(kw, message, monkeypatch):
    monkeypatch.setattr("svdquant.calibration.config.check_images", lambda images: images)
    with pytest.raises(ValueError, match=re.escape(message)):
        Calibration(**kw)


def test_a_batched_call_gives_each_prompt_its_own_noise_and_repeats_a_negative_prompt():
    prompts = ["a", "b", "c", "d"]
    one = prompt_call(prompts, [2], 10, {"negative_prompt": "blurry", "height": 16})
    assert one["prompt"] == "c" and one["negative_prompt"] == "blurry" and one["height"] == 16
    assert torch.equal(torch.randn(3, generator=one["generator"]), torch.randn(3, generator=torch.Generator().manual_seed(12)))
    two = prompt_call(prompts, [1, 3], 10, {"negative_prompt": "blurry", "negative_prompt_2": ["x", "y"],
                                                 "height": 16})
    assert two["prompt"] == ["b", "d"] and two["negative_prompt"] == ["blurry", "blurry"]
    assert two["negative_prompt_2"] == ["x", "y"] and two["height"] == 16
    three = prompt_call(prompts, [0, 1, 2], 0, {"prompt_2": "t5 text", "negative_prompt": ["blurry"]})
    assert three["prompt_2"] == ["t5 text"] * 3 and three["negative_prompt"] == ["blurry"] * 3
    seeds = [torch.randn(3, generator=g) for g in two["generator"]]
    assert all(torch.equal(s, torch.randn(3, generator=torch.Generator().manual_seed(10 + i)))
               for s, i in zip(seeds, [1, 3]))


def test_the_tiny_pipeline_takes_one_generator_per_image():
    pipe = TinyFluxPipeline.default()
    gens = lambda: [torch.Generator().manual_seed(s) for s in (3, 4)]  # noqa: E731
    both = pipe.noise(2, gens())
    assert torch.equal(both[1:], pipe.noise(1, torch.Generator().manual_seed(4)))
    with pytest.raises(ValueError, match="2 generators for 3 images: pass one generator, or one per image"):
        pipe.noise(3, gens())


def _row(entry: dict, rows: int, j: int, like: dict) -> dict:
    """Prompt ``j`` of a call recorded for ``rows`` prompts, shaped as ``like`` (the same call for one prompt):
    a tensor with ``rows`` times ``like``'s leading size is sliced, as a pipeline stacks a guided batch (the
    conditional rows of every prompt, then the unconditional ones: ``n`` blocks of ``rows``); one the batch shares
    (positions) is whole."""
    out = {}
    for k, v in entry.items():
        ref = like[k]
        if torch.is_tensor(v) and v.shape != ref.shape:
            n = ref.shape[0]
            assert v.shape[0] == rows * n, (k, v.shape, ref.shape)
            v = v.reshape(n, rows, *v.shape[1:])[:, j]
        out[k] = v
    return out


PIPELINES = {
    "flux": (tm.build_flux_pipeline, tm.PIPE_KWARGS),
    "flux2": (tp.build_flux2_pipeline, tp.FLUX2_KWARGS),
    "flux2-klein": (tp.build_flux2_klein_pipeline, tp.FLUX2_KWARGS),
    "tiny": (TinyFluxPipeline.default, {}),
}


@pytest.mark.parametrize("name", list(PIPELINES))
def test_batched_calls_record_the_same_snapshots_in_fewer_model_calls(name, one_torch_thread):
    build, kwargs = PIPELINES[name]
    pipe = build()
    prompts = None if name == "tiny" else ["a cat", "a dog on a hill", "a red cube", "two birds", "a boat", "rain"]
    calls = []
    pipe.transformer.register_forward_pre_hook(lambda *a: calls.append(1))

    def record(size):
        calls.clear()
        c = Calibration(prompts=prompts, num_prompts=6, steps=3, snapshots=9, seed=2, batch_size=size,
                        pipeline_kwargs=dict(kwargs))
        return record_inputs(pipe, pipe.transformer, c, progress=False), len(calls)

    (single, n_single), (batched, n_batched) = record(1), record(3)
    plan = draw_plan(6, 3, 9, seed=2)  # prompts 0, 1 and 3 share their drawn steps
    order = [(p, s) for p in sorted(plan) for s in sorted(plan[p])]
    assert len(single) == len(order) == 9 and n_batched < n_single
    k = 0
    for rows, drawn in calibration_batches(plan, 3):
        for s in sorted(drawn):
            for j, p in enumerate(rows):
                like = single[order.index((p, s))]
                got = _row(batched[k], len(rows), j, like)
                assert got.keys() == like.keys()
                for key, v in got.items():
                    if torch.is_tensor(v):
                        torch.testing.assert_close(v, like[key], rtol=1e-4, atol=1e-5, msg=f"{name} {key}")
            k += 1
    assert k == len(batched)


def test_quantize_through_batched_calls_counts_prompt_step_pairs(one_torch_thread):
    pipe = tm.build_flux_pipeline()
    ref = tm.sample(pipe)
    rows = []
    hook = pipe.transformer.register_forward_pre_hook(lambda m, a, kw: rows.append(kw["hidden_states"].shape[0]),
                                                      with_kwargs=True)
    c = Calibration(prompts=["a cat", "a dog on a hill", "a red cube", "two birds"], steps=2, snapshots=8,
                    batch_size=4, pipeline_kwargs=dict(tm.PIPE_KWARGS))
    report = svdquant.quantize(pipe, svdquant.get_recipe("int4", iterations=1, eval_tokens=64), c, progress=False)
    hook.remove()
    assert report.snapshots == 8 and rows == [4, 4]  # every prompt drawn at both steps: one call of four
    out = tm.sample(pipe)
    assert torch.isfinite(out).all() and 0 < (out - ref).norm() / ref.norm() < 0.05


# The other architectures, as benchmarks/pipeline_memory.py builds them on tiny configs: their denoiser's latent
# input per prompt, batched against one prompt a call (the text inputs may differ in padding: Qwen-Image pads a
# batch's prompts to the longest, with a mask, so only the latents and timesteps are compared, and a latent that
# matches at every drawn step says the masked text changed nothing).
OTHER_MODELS = {"sdxl": "sample", "qwenimage": "hidden_states", "sd3": "hidden_states", "sana": "hidden_states",
                "pixart": "hidden_states"}


@pytest.mark.parametrize("name", list(OTHER_MODELS))
def test_batched_calls_on_the_other_architectures(name, one_torch_thread):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import pipeline_memory as pm

    pipe, kw = pm.build(name, quick=True, device="cpu", dtype=torch.float32)
    model = getattr(pipe, "transformer", None) or pipe.unet
    call = {k: v for k, v in kw.items() if k not in ("prompt", "num_inference_steps", "generator", "output_type")}
    prompts = ["a cat", "a dog on a hill", "a red cube", "two birds", "a boat", "rain"]

    def record(size):
        c = Calibration(prompts=prompts, steps=3, snapshots=9, seed=2, batch_size=size, pipeline_kwargs=call)
        return record_inputs(pipe, model, c, progress=False)

    single, batched = record(1), record(3)
    plan = draw_plan(6, 3, 9, seed=2)
    order = [(p, s) for p in sorted(plan) for s in sorted(plan[p])]
    key = OTHER_MODELS[name]
    k = 0
    for rows, drawn in calibration_batches(plan, 3):
        for s in sorted(drawn):
            for j, p in enumerate(rows):
                like = single[order.index((p, s))]
                got = _row({key: batched[k][key]}, len(rows), j, {key: like[key]})
                # (the tiny random denoisers drive latents to a few hundred: the bound is relative to their size)
                torch.testing.assert_close(got[key], like[key], rtol=1e-4, atol=1e-5 * float(like[key].abs().max()))
            k += 1
    assert k == len(batched) < len(single)


def test_a_calibration_streamed_to_a_gpu_batches_its_calls(one_torch_thread):
    """run_calibration(streaming=True), as quantize(pipe, device="cuda") with the pipeline in CPU memory runs it: the
    default batch (here on the CPU, where only the batch size depends on it); without streaming, one a call."""
    from svdquant.calibration import run_calibration

    pipe = tm.build_flux_pipeline()
    prompts = ["a cat", "a dog on a hill", "a red cube", "two birds", "a boat"]
    for streaming, want in ((True, [4, 4, 1, 1]), (False, [1] * 10)):
        rows = []
        hook = pipe.transformer.register_forward_pre_hook(
            lambda m, a, kw: rows.append(kw["hidden_states"].shape[0]), with_kwargs=True)
        c = Calibration(prompts=prompts, steps=2, snapshots=10, pipeline_kwargs=dict(tm.PIPE_KWARGS))
        n = run_calibration(pipe, pipe.transformer, c, lambda selector: (lambda: None), progress=False,
                            streaming=streaming)
        hook.remove()
        assert n == 10 and rows == want, (streaming, rows)
