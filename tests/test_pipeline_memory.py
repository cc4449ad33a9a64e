"""benchmarks/pipeline_memory.py --quick (and e2e.py, gptq_speed.py, video.py): the GPU measurement scripts run end to
end on the CPU (tiny configs, every model and variant), so they cannot rot between GPU runs."""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

import tiny_models  # noqa: F401  (first: sets HF_HUB_OFFLINE before diffusers is imported)

import pytest
import torch

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
    edit = saved["qwenimage-edit"]["int4+te4+offload+fbc"]
    assert flux["denoiser_calls"] == 2 and qwen["denoiser_calls"] == edit["denoiser_calls"] == 4  # true CFG: 2 a step
    assert 1 <= flux["calls_all_blocks_ran"] <= 2 and 1 <= qwen["calls_all_blocks_ran"] <= 4
    assert 1 <= edit["calls_all_blocks_ran"] <= 4
    # FluxKontextPipeline calls its transformer outside a cache context: skipped with the reason, not crashed
    assert "No cache context" in saved["kontext"]["int4+te4+offload+fbc"]["skipped"]


def test_edit_models_edit_their_picture(results):
    """FLUX.1 Kontext and Qwen-Image-Edit (--quick): every variant gives a picture of the asked size from the call's
    input picture, recorded by its size; the picture's latent tokens reach the transformer beside the ones being
    denoised, and Qwen-Image-Edit's text encoder reads the picture as image tokens."""
    _, saved = results
    for model, side in (("kontext", 16), ("qwenimage-edit", 64)):
        res = saved[model]
        assert res["call"]["image"] == "random RGB 16x16 (PIL)"
        assert res["call"]["height"] == res["call"]["width"] == side
        for variant in ("bf16", "int4", "int4+te4", "int4+te4+offload"):
            assert res[variant]["shape"] == [1, 3, side, side], (model, variant)

    seen = {}
    for model in ("kontext", "qwenimage-edit"):
        pipe, call = pm.build(model, True, "cpu")

        def record(module, args, kwargs, model=model):
            seen.setdefault(model, (kwargs["hidden_states"].shape, kwargs["encoder_hidden_states"].shape))

        pipe.transformer.register_forward_pre_hook(record, with_kwargs=True)
        pipe(**call, num_inference_steps=1)
    # Kontext: 16² out through the 2x tiny VAE, 2 x 2 packing: 16 tokens, and the 16² picture's 16 more
    assert seen["kontext"][0][1] == 16 + 16
    # Qwen-Image-Edit: 64² out through its 16x tiny VAE: 4 tokens; the picture encoded at 1024²: 1024 more;
    # the prompt's hidden states include the 16 image tokens of the picture shown at 16² (8 x 8 patches, 2 x 2 merged)
    assert seen["qwenimage-edit"][0][1] == 4 + 1024
    text = pipe.prompt_template_encode.format(call["prompt"])
    ids = pipe.processor(text=[text], images=call["image"], return_tensors="pt")["input_ids"][0]
    assert int((ids == pipe.processor.image_token_id).sum()) == 16
    assert seen["qwenimage-edit"][1][1] == len(ids) - pipe.prompt_template_encode_start_idx


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


def test_sizes_of_the_edit_pipelines_and_qwen_image_edits_processor():
    """--sizes: FLUX.1 Kontext [dev] is FLUX.1-dev's components, Qwen-Image-Edit Qwen-Image's (the vision tower was
    always part of Qwen2.5-VL-7B). The full Qwen-Image-Edit processor, built offline with Qwen2.5-VL's image
    settings, shows Qwen2.5-VL a 1024² picture as 1036² (74 x 74 patches of 14): 1369 image tokens, under the
    token id the full text encoder's config names."""
    res = pm.main(["--sizes", "--models", "flux", "kontext", "qwenimage", "qwenimage-edit"])
    assert res["kontext"] == res["flux"] and res["qwenimage-edit"] == res["qwenimage"]
    assert res["qwenimage-edit"]["bf16"]["transformer"] == pytest.approx(40.861, abs=5e-4)

    pipe, call = pm.build("qwenimage-edit", False, "meta")
    assert call["image"].size == (1024, 1024) and call["true_cfg_scale"] == 4.0
    processor = pipe.processor
    assert processor.image_processor.patch_size == 14 and processor.image_processor.merge_size == 2
    out = processor(text=["<|vision_start|><|image_pad|><|vision_end|>a fox"], images=call["image"],
                    return_tensors="pt")
    assert out["image_grid_thw"].tolist() == [[1, 74, 74]]
    assert int((out["input_ids"][0] == pipe.text_encoder.config.image_token_id).sum()) == 37 * 37
    kontext, kcall = pm.build("kontext", False, "meta")
    assert type(kontext).__name__ == "FluxKontextPipeline" and kcall["image"].size == (1024, 1024)


def test_e2e_quick_edits_a_picture(tmp_path):
    """benchmarks/e2e.py --models kontext qwenimage-edit --quick: a row per model and variant, the input picture
    in the recorded call, the output of the asked size."""
    import e2e

    res = e2e.main(["--quick", "--models", "kontext", "qwenimage-edit", "--variants", "bf16", "int4", "--batch", "1",
                    "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "e2e.json").read_text())
    assert json.dumps(res, sort_keys=True) == json.dumps(saved, sort_keys=True)
    table = e2e.table(res)
    for model, side in (("kontext", 16), ("qwenimage-edit", 64)):
        assert saved[model]["call"]["image"] == "random RGB 16x16 (PIL)"
        assert saved[model]["int4"]["quantized_layers"] > 0
        for variant in ("bf16", "int4"):
            r = saved[model][variant]["b1"]
            assert r["finite"] and r["shape"] == [1, 3, side, side], (model, variant)
            assert f"| {model} | {variant} | 1 |" in table


def test_flux2_dev_as_built_for_the_gpu_on_meta():
    """FLUX.2 [dev] (``flux2``) with the real configs, on meta: the transformer is Flux2Transformer2DModel's
    defaults (64.45 GB in BF16, 17.52 GB int4: BENCHMARKS.md's sizes), Mistral Small 3.1 24B 48.0 GB with its own
    lm_head; the pipeline stacks three of Mistral's 40 layers, 3 x 5120 = the transformer's joint_attention_dim."""
    import inspect

    from diffusers import Flux2Transformer2DModel

    defaults = {k: p.default for k, p in inspect.signature(Flux2Transformer2DModel.__init__).parameters.items()}
    assert {k: defaults[k] for k in pm.FLUX2_DEV} == pm.FLUX2_DEV
    res = pm.main(["--sizes", "--models", "flux2"])["flux2"]
    assert res["bf16"]["transformer"] == pytest.approx(64.447, abs=5e-4)
    assert res["int4+te4"]["transformer"] == pytest.approx(17.519, abs=5e-4)
    assert res["bf16"]["text_encoder"] == pytest.approx(48.023, abs=5e-4)
    pipe, call = pm.build("flux2", False, "meta")
    te, tr = pipe.text_encoder, pipe.transformer
    assert type(pipe).__name__ == "Flux2Pipeline" and type(te).__name__ == "Mistral3ForConditionalGeneration"
    assert te.lm_head.weight is not te.model.language_model.embed_tokens.weight
    text = te.config.text_config
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads,
            text.head_dim, text.intermediate_size, text.vocab_size) == (5120, 40, 32, 8, 128, 32768, 131072)
    layers = call["text_encoder_out_layers"]
    assert layers == (10, 20, 30) and max(layers) <= text.num_hidden_layers
    assert len(layers) * text.hidden_size == tr.config.joint_attention_dim == 15360
    assert tr.config.guidance_embeds and call["guidance_scale"] == 4.0 and call["max_sequence_length"] == 512


def test_e2e_refuses_its_arguments_before_any_work(monkeypatch, capsys):
    """e2e.py's refusals come before a pipeline is built: a GPU call must not run its int4 variant for minutes and
    then fail at torchao's import."""
    import importlib.util

    import e2e

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else real(name, *a))
    for argv, message in ((["--variants", "int4", "fp8-torchao"], "fp8-torchao needs torchao: pip install torchao"),
                          (["--variants", "fp8-torchao", "int4"], "fp8-torchao must come last"),
                          (["--batch", "0"], "must be at least 1")):
        with pytest.raises(SystemExit):
            e2e.main(["--quick", "--models", "flux", *argv])
        assert message in capsys.readouterr().err, argv


def test_e2e_quick_flux2_excludes_the_text_encoding(tmp_path):
    """e2e.py --models flux2 --quick: the prompt is encoded once before the variants (timed, recorded as excluded
    from s / image) and the text encoder dropped; every timed call of every variant reads the precomputed
    prompt_embeds (repeated per image at batch 2). From the embeddings the pipeline makes the picture it makes from
    the prompt, its transformer reading the same text tokens."""
    import e2e

    res = e2e.main(["--quick", "--models", "flux2", "--variants", "bf16", "int4", "--batch", "1", "2", "--out",
                    str(tmp_path)])
    saved = json.loads((tmp_path / "e2e.json").read_text())
    assert json.dumps(res, sort_keys=True) == json.dumps(saved, sort_keys=True)
    f2 = saved["flux2"]
    te = f2["text_encoding"]
    assert te["excluded_from_seconds_per_image"] is True and te["seconds"] > 0 and te["first_call_s"] > 0
    assert te["prompt_embeds_shape"] == [1, 256, 3 * 32] and te["text_encoder_weights_gb"] > 0
    assert te["peak_gb"] is None  # no GPU: no memory figures invented
    assert f2["call"]["prompt"] == "a red fox in the snow" and f2["call"]["prompt_embeds"].startswith("precomputed")
    assert f2["int4"]["quantized_layers"] > 0
    for variant in ("bf16", "int4"):
        assert "text_encoder" not in f2[variant]["weights_gb"], variant  # dropped before the first variant
        for b in (1, 2):
            r = f2[variant][f"b{b}"]
            assert r["finite"] and r["shape"] == [b, 3, 16, 16], (variant, b)
    assert "flux2: s / image excludes the text encoding" in e2e.table(res)

    pipe, call = pm.build("flux2", True, "cpu")
    gen = torch.Generator("cpu")
    from_prompt = pipe(**call, num_inference_steps=1, generator=gen.manual_seed(0)).images
    timed, facts = e2e.precompute_text(pipe, call, "cpu")
    assert pipe.text_encoder is None and "prompt" not in timed and facts["excluded_from_seconds_per_image"]
    seen = []
    pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["encoder_hidden_states"].shape), with_kwargs=True)
    from_embeds = pipe(**timed, num_inference_steps=1, generator=gen.manual_seed(0)).images
    assert torch.equal(from_prompt, from_embeds) and seen == [torch.Size([1, 256, 96])]


def test_e2e_quick_runs_and_writes_its_table(tmp_path):
    """benchmarks/e2e.py shares the builders: its CPU smoke run (one model, eager and ours, batch 1) must not rot."""
    import e2e

    res = e2e.main(["--quick", "--models", "flux", "--variants", "bf16", "int4", "int4-int8attn", "int4-no-normrope",
                    "--batch", "1", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "e2e.json").read_text())
    assert saved["device"] == "cpu (quick)" and saved["size"] == 16 and "command" in saved
    assert json.dumps(res, sort_keys=True) == json.dumps(saved, sort_keys=True)
    assert "| flux | int4 | 1 |" in e2e.table(res) and "| flux | int4-int8attn | 1 |" in e2e.table(res)
    # the second int4 variant reuses the quantized layers (quantized once)
    assert "quantized_layers" in res["flux"]["int4"] and "quantized_layers" not in res["flux"]["int4-int8attn"]
    assert res["flux"]["int4-no-normrope"]["b1"]["finite"]


def test_gptq_speed_quick():
    """benchmarks/gptq_speed.py --quick: the torch block loop and gptq() timed at small shapes on the CPU."""
    import gptq_speed

    rows = gptq_speed.main(["--quick"])
    assert len(rows) == 2 and all(r["gptq_s"] > 0 and "torch_loop_b128_s" in r for r in rows)


def test_video_quick_runs_every_variant_it_is_given(tmp_path):
    """benchmarks/video.py --quick (Wan on tiny configs): per-step times from two calls, the clip estimate, the decode,
    and on the CPU no memory figure; its arguments checked before any work."""
    import video

    res = video.main(["--quick", "--variants", "bf16", "int4", "int4-int8attn", "int4-24gb", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "video.json").read_text())
    assert json.dumps(res, sort_keys=True) == json.dumps(saved, sort_keys=True)
    assert saved["quantized_layers"] > 0  # (tiny widths: the rank-32 branches outweigh the 4-bit savings)
    for variant in ("bf16", "int4", "int4-int8attn", "int4-24gb"):
        r = saved[f"{variant} 480p"]
        difference = (r["call_b_s"] - r["call_a_s"]) / 2
        assert r["finite"]
        if "per_step_fallback" in r:  # a loaded CPU: the calls' difference at zero or below, so call b's median step
            assert r["seconds_per_step_difference"] == pytest.approx(difference, abs=2e-3)
            assert r["seconds_per_step_difference"] <= 0
            assert r["seconds_per_step"] == pytest.approx(statistics.median(r["step_s"]["call_b"][1:]), abs=1e-3)
        else:
            assert r["seconds_per_step"] == pytest.approx(difference, abs=2e-3)
        # (a tiny step takes milliseconds: the calls' difference, and the estimate rounded to 0.1 s, may be 0 or
        # below on a loaded machine; the figure is a benchmark's, not this test's)
        assert math.isfinite(r["clip_s_est"]) and "peak_gb" not in r and "peak_steps_gb" not in r
    assert saved["bf16 480p"]["decode"]["frames"] == 5
    with pytest.raises(SystemExit):
        video.main(["--quick", "--frames", "80"])
    with pytest.raises(SystemExit):
        video.main(["--quick", "--steps-a", "3", "--steps-b", "3"])
    with pytest.raises(SystemExit):
        video.main(["--quick", "--model", "t2v2"])
    assert saved["model"] == "t2v" and saved["clip_steps"] == 50 and saved["steps"] == [1, 3]
    assert saved["bf16 480p"]["latents_shape"] == [1, 16, 2, 8, 8] and "expert_steps" not in saved["bf16 480p"]


def test_video_quick_image_to_video(tmp_path):
    """video.py --model i2v --quick: Wan 2.1 I2V's pipeline (CLIP image encoder, 36 input channels) animates its
    picture; the image cross-attention's add_k / add_v projections are quantized too (4 more layers than T2V's 20)."""
    import video

    res = video.main(["--quick", "--model", "i2v", "--variants", "bf16", "int4", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "video-i2v.json").read_text())
    assert json.dumps(res, sort_keys=True) == json.dumps(saved, sort_keys=True)
    assert saved["model"] == "i2v" and "WanImageToVideoPipeline" in saved["pipeline"] and saved["clip_steps"] == 40
    assert "image_encoder" in saved["weights_gb_bf16"] and saved["quantized_layers"] == 24
    for variant in ("bf16", "int4"):
        r = saved[f"{variant} 480p"]
        assert r["finite"] and r["latents_shape"] == [1, 16, 2, 8, 8] and r["clip_s_est"] > 0, variant
    assert saved["bf16 480p"]["decode"]["frames"] == 5
    pipe = video.build(True, "cpu", "i2v")
    assert pipe.transformer.config.in_channels == 36 and pipe.transformer.blocks[0].attn2.add_k_proj is not None
    assert video.build(False, "meta", "i2v").transformer.config.image_dim == 1280  # the real config, on meta


def test_video_quick_wan22_two_experts(tmp_path):
    """video.py --model wan22 --quick: Wan 2.2 A14B's two experts, both quantized and both compiled; the timed calls
    run 1 + 1 and 2 + 1 [high-noise, low-noise] steps (flow shift 12, boundary 0.875), the first call all 3."""
    import video

    res = video.main(["--quick", "--model", "wan22", "--variants", "bf16", "bf16-compiled", "int4", "int4-24gb",
                      "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "video-wan22.json").read_text())
    assert json.dumps(res, sort_keys=True) == json.dumps(saved, sort_keys=True)
    assert saved["model"] == "wan22" and saved["boundary_ratio"] == 0.875 and saved["steps"] == [2, 3]
    assert saved["guidance"] == {"guidance_scale": 4.0, "guidance_scale_2": 3.0} and saved["clip_steps"] == 40
    assert saved["weights_gb_bf16"]["transformer_2"] == saved["weights_gb_bf16"]["transformer"]
    assert saved["quantized_layers_per_expert"] == [20, 20] and saved["quantized_layers"] == 40
    assert saved["compiled_blocks"] == [2, 2]
    for variant in ("bf16", "bf16-compiled", "int4", "int4-24gb"):
        r = saved[f"{variant} 480p"]
        assert r["finite"] and r["latents_shape"] == [1, 16, 2, 8, 8], variant
        assert r["first_call_steps"] == 3 and r["expert_steps"] == {"call_a": [1, 1], "call_b": [2, 1]}
        assert "clip_s_est" in r  # (tiny timings: their difference can round to 0 or below)
        assert [len(r["step_s"]["call_a"]), len(r["step_s"]["call_b"])] == [2, 3], variant
    # under offload each call moves both experts, by seconds more or less from call to call: per step is the one
    # steady step of call b (its second, on the high-noise expert like the first), not the calls' difference
    r = saved["int4-24gb 480p"]
    assert r["seconds_per_step"] == r["step_s"]["call_b"][1] and "no expert moved" in r["per_step_from"]
    assert r["seconds_per_step_difference"] == pytest.approx(r["call_b_s"] - r["call_a_s"], abs=2e-3)
    assert "per_step_from" not in saved["int4 480p"]
    assert "transformer_2:" in saved["optimize int4"]  # svdquant.optimize reports on both experts


def test_plot_e2e_draws_the_results_file_and_checks_it(tmp_path):
    """benchmarks/plot_e2e.py: the committed results draw (a PNG); speed-ups are bf16-compiled / variant; a row
    without its bf16-compiled figure or with an unknown variant is refused in one line."""
    import plot_e2e

    rows = json.loads((Path(plot_e2e.__file__).parent / "results" / "e2e-h200.json").read_text())["rows"]
    assert rows["FLUX.1-dev"]["int4"] == 3.33  # as BENCHMARKS.md and the README say
    out = plot_e2e.main(["--out", str(tmp_path / "e2e.png")])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_e2e.speedups({"m": {"bf16": 3.0, "bf16-compiled": 2.0, "int4": 1.0}}) == \
        {"m": {"bf16": 2 / 3, "bf16-compiled": 1.0, "int4": 2.0}}
    _refused(plot_e2e.main, plot_e2e.speedups, "rows", tmp_path,
             (({"m": {"bf16": 2.0, "int4": 1.0}}, "no bf16-compiled figure"),
              ({"m": {"bf16-compiled": 1.0, "nf4": 1.0}}, "unknown"),
              ({"m": {"bf16-compiled": 1.0, "int4": 0}}, "positive numbers"), ({"m": [1.0]}, "must be"),
              ({}, "must map model names"), ([1], "must map model names")))


def test_plot_step_draws_the_results_file_and_checks_it(tmp_path):
    """benchmarks/plot_step.py: the committed step figures draw (a PNG); a row without a positive step time, with a
    class flux_step.py does not report, or whose classes sum far from its timed step is refused in one line."""
    import plot_step

    rows = json.loads((Path(plot_step.__file__).parent / "results" / "flux-step-h100.json").read_text())["rows"]
    assert [r["ms"] for r in rows.values()] == [180.53, 96.52, 87.36]  # BENCHMARKS.md, "Session 41"
    ours = rows["svdquant int4, the default path"]["classes"]
    assert sum(ours.values()) == pytest.approx(86.45)
    out = plot_step.main(["--out", str(tmp_path / "step.png")])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    good = {"attention": 40.0, "INT8 GEMM (CUTLASS)": 55.0}
    assert plot_step.check({"a": {"ms": 100.0, "classes": good}, "b": {"ms": 1}})["a"]["classes"] == good
    _refused(plot_step.main, plot_step.check, "rows", tmp_path,
             (({"a": {"ms": 0}}, "positive step time"), ({"a": {}}, "positive step time"),
              ({"a": {"ms": 10.0, "classes": {"norms": 10.0}}}, "unknown classes"),
              ({"a": {"ms": 10.0, "classes": {"attention": -1.0}}}, "positive numbers"),
              ({"a": {"ms": 10.0, "classes": {"attention": 5.0}}}, "more than 10% off"),
              ({"a": {"ms": 10.0, "classes": [1.0]}}, "must map"), ({}, "must map labels"), ([1], "must map labels")))


def _refused(main, check, key: str, tmp_path, cases) -> None:
    """A picture's script refuses each ``(bad, message)`` of ``cases`` (``bad`` under ``key`` in its results file):
    its command line exits in one line before anything is drawn, and ``check`` raises ``message``."""
    for bad, message in cases:
        (tmp_path / "bad.json").write_text(json.dumps({key: bad}))
        with pytest.raises(SystemExit):
            main(["--results", str(tmp_path / "bad.json"), "--out", str(tmp_path / "bad.png")])
        with pytest.raises(ValueError, match=message):
            check(bad)
    assert not (tmp_path / "bad.png").exists()


def test_plot_quantize_draws_the_results_file_and_checks_it(tmp_path):
    """benchmarks/plot_quantize.py: the committed runs draw (a PNG); a run's wall time splits into the calibration,
    the groups, the waits and the rest, which add up to its total; a run missing a stage, with a negative one, or
    whose stages exceed its total is refused in one line, before anything is drawn."""
    import plot_quantize

    runs = json.loads((Path(plot_quantize.__file__).parent / "results" / "quantize-flux-h100.json").read_text())["runs"]
    assert [round(r["seconds_total"], 1) for r in runs.values()] == [65.0, 63.0, 57.6, 58.2, 69.2]  # BENCHMARKS.md
    out = plot_quantize.main(["--out", str(tmp_path / "q.png")])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    stages = {"calibration": 1.0, "calibration transfers": 0.5, "groups at once (wall)": 40.0,
              "waiting for replays": 7.0, "replays": 51.0}
    assert plot_quantize.segments({"r": {"seconds_total": 57.5, "stages": stages}}) == \
        {"r": {"calibration": 1.5, "groups": 40.0, "waiting": 7.0, "rest": 9.0, "replays": 51.0}}
    _refused(plot_quantize.main, plot_quantize.segments, "runs", tmp_path,
             (({"r": {"seconds_total": 57.5, "stages": {**stages, "replays": -1.0}}}, "stages >= 0"),
              ({"r": {"seconds_total": 57.5, "stages": {"calibration": 1.0}}}, "are missing"),
              ({"r": {"seconds_total": 40.0, "stages": stages}}, "more than its total"),
              ({"r": {"seconds_total": 0, "stages": stages}}, "the total > 0"),
              ({"r": [57.5]}, "needs seconds_total and stages"), ({}, "must map labels")))


def test_calibration_memory_quick(tmp_path):
    """benchmarks/calibration_memory.py --quick: a FLUX double and single block at tiny widths, one prompt and four,
    each in its own process, and the table it writes."""
    import calibration_memory

    res = calibration_memory.main(["--quick", "--out", str(tmp_path)])
    assert [(r["block"], r["batch"]) for r in res["rows"]] == [("double", 1), ("double", 4), ("single", 1),
                                                               ("single", 4)]
    assert all(r["transient_gb"] >= 0 for r in res["rows"])
    assert json.loads((tmp_path / "calibration_memory.json").read_text()) == res


def test_scoring_precision_quick(tmp_path):
    """benchmarks/scoring_precision.py --quick: the demo's table with the candidates' error products read from
    TF32-rounded operands, against fp32; the rounding itself has exact answers."""
    import scoring_precision as sp

    x = torch.tensor([1.0, 1.0 + 2**-11, 1.0 + 2**-10, 1.0 + 3 * 2**-11, 3.14159265, -2.0 - 2**-12])
    assert sp.tf32(x).tolist() == [1.0, 1.0, 1.0 + 2**-10, 1.0 + 2**-9, 3.140625, -2.0]  # ties to even
    rows = sp.main(["--quick", "--modes", "fp32", "tf32", "--out", str(tmp_path)])
    assert [(r["mode"], r["recipe"]) for r in rows] == [("fp32", "w8a8"), ("tf32", "w8a8")]
    assert all(r["psnr"] > 40 for r in rows)
    from svdquant.algorithm import layer
    assert layer._Problem.errors.__name__ == "errors" and layer._Problem.errors.__module__ == layer.__name__


@pytest.mark.parametrize("bench", ["flux_step", "pipeline_memory"])
def test_random_models_give_a_shared_branch_group_one_down_projection(bench):
    """Both benchmark builders' random layers are laid out as a quantized checkpoint's: the members of a
    shared-branch group (q/k/v, a FLUX single block's q/k/v + MLP) hold one down projection, so their stacked GEMM
    keeps a rank-32 branch (the Hopper GEMM's 128 × 256 tiles take ranks up to 64), not a block-diagonal one of rank 96
    or 128."""
    import flux_step

    from svdquant.models import get_adapter
    from svdquant.ops.branch import padded_branch, stacked_branch

    model = tiny_models.build_flux(dtype=torch.bfloat16)
    adapter = get_adapter(model)
    groups = [(block, adapter.groups(block)) for _, block in adapter.blocks(model)]  # of nn.Linears: asked first
    if bench == "flux_step":
        flux_step.random_quantized(model, device="cpu")
    else:
        pm.random_quantize(model, "speed")
    stacked = 0
    for block, block_groups in groups:
        for g in block_groups:
            members = [block.get_submodule(n) for n in g.names]
            if g.weight_only or not g.shared_branch or len(members) < 2:
                continue
            down, _ = stacked_branch([padded_branch(m) for m in members], [m.out_features for m in members])
            assert down.shape[0] == 32 and all(torch.equal(m.lora_down, members[0].lora_down) for m in members)
            stacked += 1
    assert stacked == 2 * len(model.transformer_blocks) + len(model.single_transformer_blocks)


def test_flux_steps_triton_switch_reaches_every_stack():
    """``flux_step.sm90_runners`` (the CUTLASS / Triton GEMM A/B) finds the runner of every stack ``svdquant.fuse``
    makes: the attentions' ``to_qkv`` / ``to_added_qkv`` (submodules) and a FLUX single block's q/k/v + MLP stack
    (held in the block's state, not a submodule; the A/B once missed it). On this CPU no runner asks for the Hopper
    GEMM, so each stack's is marked as if it did."""
    import types

    import flux_step

    from svdquant import fuse
    from svdquant._state import peek
    from svdquant.modules import FusedSVDQLinear

    model = tiny_models.build_flux(dtype=torch.bfloat16)
    flux_step.random_quantized(model, device="cpu")
    fuse(model)
    assert flux_step.sm90_runners(model) == []
    stacks = [m for m in model.modules() if isinstance(m, FusedSVDQLinear)]
    stacks += [peek(m).stack for m in model.modules() if peek(m).stack is not None]
    assert len(stacks) == 2 * len(model.transformer_blocks) + len(model.single_transformer_blocks)
    for s in stacks:
        s._runner = types.SimpleNamespace(sm90=True)
    assert sorted(map(id, flux_step.sm90_runners(model))) == sorted(id(s._runner) for s in stacks)
