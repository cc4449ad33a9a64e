"""The fast path of every model on a CUDA GPU: fused q/k/v (diffusers' fused projections for FLUX.2 and Wan, the
per-call view of ``svdquant/modules/fused_view.py`` for Qwen-Image, Z-Image, PixArt-Σ, SANA and SDXL) on the INT8
runners, compiled and graph-captured by ``svdquant.optimize``, against the same model run eagerly and unfused; one
Qwen-Image block at its real width; and both experts of a Wan 2.2 pipeline optimized.

On the CPU these paths are tested bit for bit (tests/test_fused.py, tests/test_experts.py); on the GPU the stacked
GEMM, bf16 and inductor's fusions change the rounding, so the claims are bounds.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import tiny_models as tm  # first: sets HF_HUB_OFFLINE before diffusers is imported

import pytest
import torch

import svdquant
from svdquant import get_recipe
from svdquant.modules import FusedSVDQLinear

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def _to(value, dtype=torch.bfloat16, key: str = ""):
    """Forward kwargs on the GPU, floats in ``dtype`` (position ids stay as they are), through the lists (Z-Image's
    images) and dicts (SDXL's added_cond_kwargs) they hold."""
    if torch.is_tensor(value):
        return value.to("cuda", dtype) if value.is_floating_point() and not key.endswith("_ids") else value.to("cuda")
    if isinstance(value, dict):
        return {k: _to(v, dtype, k) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to(v, dtype, key) for v in value)
    return value


@pytest.mark.parametrize("arch", ["qwenimage", "zimage", "pixart", "sana", "sdxl", "flux2", "wan"])
def test_gpu_optimize_fuses_compiles_and_graphs_every_model(arch):
    build, make_inputs = tm.ALL_ARCHS[arch]
    model = build(seed=0)
    svdquant.quantize(model, get_recipe("int4", iterations=1, eval_tokens=64),
                      svdquant.Calibration(inputs=tm.calibration_inputs(arch, model, 1)), progress=False)
    model = model.to("cuda", torch.bfloat16)
    inputs = _to(make_inputs(model, seed=7))
    if arch == "qwenimage":  # as QwenImagePipeline passes it for unpadded prompts (a padded mask: the test below)
        inputs["encoder_hidden_states_mask"] = None
    eager = tm.forward(model, inputs)
    report = svdquant.optimize(model, attention=None, layers=False)  # every layer on the INT8 path
    assert report.fused.get("qkv", 0) > 0, report
    assert report.compiled_blocks > 0 and report.cuda_graphs, report
    assert any(isinstance(m, FusedSVDQLinear) for m in model.modules())
    first = tm.forward(model, inputs)
    second = tm.forward(model, inputs)
    graphs = model.__dict__["forward"]
    assert graphs.captures == 1 and graphs.replays == 2
    assert torch.equal(first, second)
    assert _rel(first, eager) < 2e-2, _rel(first, eager)
    svdquant.deoptimize(model)  # graphs and compilation go; the fusion stays (svdquant.unfuse undoes it)
    assert _rel(tm.forward(model, inputs), eager) < 2e-2
    svdquant.unfuse(model)
    assert torch.equal(tm.forward(model, inputs), eager)  # the members run alone again: the eager model's ops


def test_gpu_a_call_that_cannot_be_captured_runs_as_it_is():
    """Qwen-Image's transformer given a padded text mask (prompts of different lengths in one batch) copies a host
    scalar to the GPU, which a CUDA graph cannot hold: that call runs compiled but without a graph, once warned,
    and calls without the mask still replay a graph."""
    model = tm.build_qwenimage(seed=0)
    svdquant.quantize(model, get_recipe("int4", iterations=1, eval_tokens=64),
                      svdquant.Calibration(inputs=tm.calibration_inputs("qwenimage", model, 1)), progress=False)
    model = model.to("cuda", torch.bfloat16)
    padded = _to(tm.qwenimage_inputs(model, seed=7, batch=2))
    padded["encoder_hidden_states_mask"][1, -2:] = 0
    plain = dict(padded, encoder_hidden_states_mask=None)
    want_padded, want_plain = tm.forward(model, padded), tm.forward(model, plain)
    svdquant.optimize(model, attention=None, layers=False)
    with pytest.warns(UserWarning, match="cannot be captured in a CUDA graph"):
        got = tm.forward(model, padded)
    graphs = model.__dict__["forward"]
    assert len(graphs.uncapturable) == 1 and not graphs.graphs
    assert _rel(got, want_padded) < 2e-2
    assert _rel(tm.forward(model, padded), want_padded) < 2e-2  # not tried again
    assert _rel(tm.forward(model, plain), want_plain) < 2e-2 and _rel(tm.forward(model, plain), want_plain) < 2e-2
    assert graphs.captures == 1 and graphs.replays == 2 and len(graphs.graphs) == 1


def test_gpu_fused_view_at_the_qwenimage_width():
    """One Qwen-Image block at the real width (24 heads × 128, both streams' q/k/v stacked into GEMMs of N = 9216)
    with random valid int4 layers: fused through the view, eager and compiled, against the layers apart."""
    from diffusers import QwenImageTransformer2DModel

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from pipeline_memory import random_quantize

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = QwenImageTransformer2DModel(num_layers=1).to(torch.bfloat16).eval()
    assert random_quantize(model, "speed") > 0
    g = torch.Generator(device="cuda").manual_seed(1)
    img, txt = 1024, 128
    inputs = dict(hidden_states=torch.randn(1, img, 64, device="cuda", generator=g).bfloat16(),
                  encoder_hidden_states=torch.randn(1, txt, 3584, device="cuda", generator=g).bfloat16(),
                  encoder_hidden_states_mask=torch.ones(1, txt, device="cuda", dtype=torch.long),
                  timestep=torch.full((1,), 0.5, device="cuda", dtype=torch.bfloat16),
                  img_shapes=[[(1, 32, 32)]], return_dict=False)
    apart = tm.forward(model, inputs)
    assert torch.isfinite(apart).all()
    assert svdquant.fuse(model)["qkv"] == 1
    fused = tm.forward(model, inputs)
    assert _rel(fused, apart) < 1e-2, _rel(fused, apart)
    compiled = copy.deepcopy(model)
    for block in compiled.transformer_blocks:
        block.compile(fullgraph=True)
    assert _rel(tm.forward(compiled, inputs), apart) < 2e-2


def test_gpu_two_expert_pipeline_optimizes_both():
    """Wan 2.2's layout: both experts fused, compiled and graph-captured, each called in its own steps; the video
    latents stay those of the eager pipeline."""
    pipe = tm.build_wan_pipeline(two_experts=True)
    svdquant.quantize(pipe, get_recipe("int4", iterations=1, eval_tokens=64),
                      svdquant.Calibration(prompts=["a cat", "a dog on a hill"], steps=2, snapshots=4,
                                           pipeline_kwargs=dict(tm.WAN_KWARGS)), progress=False)
    pipe.to("cuda", torch.bfloat16)
    gen = dict(prompt="a cat", num_inference_steps=4, output_type="latent", **tm.WAN_KWARGS)
    with torch.no_grad():
        eager = pipe(generator=torch.Generator("cuda").manual_seed(0), **gen).frames
    report = svdquant.optimize(pipe, attention=None, layers=False)
    assert report.cuda_graphs and list(report.experts) == ["transformer_2"]
    assert report.experts["transformer_2"].cuda_graphs
    with torch.no_grad():
        out = pipe(generator=torch.Generator("cuda").manual_seed(0), **gen).frames
    for name in ("transformer", "transformer_2"):
        assert getattr(pipe, name).__dict__["forward"].captures >= 1, name  # each expert ran its own graph
    assert _rel(out, eager) < 5e-2, _rel(out, eager)


def test_gpu_load_pipeline_offloaded(tmp_path):
    """load_pipeline(..., offload=True) on a GPU: every model in CPU memory between its runs, the quantized layers
    4-bit resident, optimized (compiled) without graphs; the video latents those of the plain load."""
    base = tmp_path / "base"
    tm.build_wan_pipeline().save_pretrained(base)
    pipe = tm.build_wan_pipeline()
    svdquant.quantize(pipe, get_recipe("int4", iterations=1, eval_tokens=64),
                      svdquant.Calibration(prompts=["a cat"], steps=2, snapshots=2,
                                           pipeline_kwargs=dict(tm.WAN_KWARGS)), progress=False)
    ck = svdquant.save_quantized(pipe, tmp_path / "ck", base=str(base))
    plain = svdquant.load_pipeline(None, ck, device="cuda", torch_dtype=torch.bfloat16)
    want = tm.sample_video(plain)
    del plain
    pipe = svdquant.load_pipeline(None, ck, device="cuda", torch_dtype=torch.bfloat16, offload=True)
    assert {m.weight_mode for m in pipe.transformer.modules() if isinstance(m, svdquant.SVDQLinear)} == {"memory"}
    assert next(pipe.transformer.parameters()).device.type == "cpu"  # between calls
    got = tm.sample_video(pipe)
    assert next(pipe.text_encoder.parameters()).device.type == "cpu"
    assert _rel(got, want) < 5e-2, _rel(got, want)
