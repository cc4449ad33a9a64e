"""FLUX.1's q / k RMSNorm and RoPE in the stacked q/k/v GEMMs' epilogue (svdquant/modules/flux_qk.py,
``svdquant.fuse(qk_epilogue=True)``), on the tiny FLUX: against diffusers' own norm and rotation after the GEMM,
on the CPU reference (the stacked layer applies the torch reference after its members) and on the INT8 runners in
the Triton interpreter (the epilogue itself, as on a GPU); fuse / unfuse / copy (compiled as one graph:
tests/test_compile.py)."""

from __future__ import annotations

import copy
import os

import tiny_models as tm  # first: sets HF_HUB_OFFLINE before diffusers is imported

import pytest
import torch

import svdquant
from svdquant import get_recipe
from svdquant._state import peek
from svdquant.modules.flux_qk import QkEpilogueFluxAttnProcessor, single_block_spec

interpreted = pytest.mark.skipif(torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1",
                                 reason="the interpreter runs the kernels on CPU machines")


def rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def quantized_flux():
    torch.manual_seed(0)
    model = tm.build_flux()
    for n in (m for m in model.modules() if type(m).__name__ == "RMSNorm"):  # not the all-ones init: weights matter
        n.weight.data.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(5))
    svdquant.quantize(model, get_recipe("int4", iterations=1, eval_tokens=64),
                      svdquant.Calibration(inputs=tm.calibration_inputs("flux", model, 1)), progress=False)
    return model, tm.calibration_inputs("flux", model, 1, seed=7)[0]


def test_fuse_qk_swaps_the_processors_and_unfuse_restores_them(quantized_flux):
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    model, inputs = quantized_flux
    model = copy.deepcopy(model)
    with torch.no_grad():
        before = model(**inputs)[0]
    done = svdquant.fuse(model, qk_epilogue=True)
    assert done == {"qkv": 2, "gelu": 3, "compiled_activations": 0, "qk_epilogue": 2}
    attns = [model.transformer_blocks[0].attn, model.single_transformer_blocks[0].attn]
    assert all(isinstance(a.processor, QkEpilogueFluxAttnProcessor) for a in attns)
    assert peek(model.single_transformer_blocks[0]).qk is single_block_spec
    assert svdquant.fuse(model, qk_epilogue=True)["qk_epilogue"] == 0  # already done
    with torch.no_grad():
        fused = model(**inputs)[0]
    # one fp32 rounding fewer than diffusers' norm and rotation (fp32 here too): ~1e-7 apart
    assert rel(fused, before) < 1e-5
    assert svdquant.unfuse(model) == {"qkv": 2, "gelu": 3, "compiled_activations": 0, "qk_epilogue": 2}
    assert all(type(a.processor) is FluxAttnProcessor for a in attns)
    assert peek(model.single_transformer_blocks[0]).qk is None
    with torch.no_grad():
        assert torch.equal(model(**inputs)[0], before)


def test_unfusing_the_projections_alone_puts_diffusers_processors_back(quantized_flux):
    """svdquant.modules.fused.unfuse (the module-level undo, without svdquant.unfuse's unfuse_qk) after fuse_qk: the
    processors that read the stacks go with them."""
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    from svdquant.modules.fused import unfuse as unfuse_model

    model, inputs = quantized_flux
    model = copy.deepcopy(model)
    with torch.no_grad():
        before = model(**inputs)[0]
    svdquant.fuse(model, qk_epilogue=True)
    unfuse_model(model)
    attns = [model.transformer_blocks[0].attn, model.single_transformer_blocks[0].attn]
    assert all(type(a.processor) is FluxAttnProcessor and not a.fused_projections for a in attns)
    assert peek(model.single_transformer_blocks[0]).qk is None and peek(attns[0]).qk_processor is None
    with torch.no_grad():
        assert torch.equal(model(**inputs)[0], before)


def _batch_of_two(inputs: dict) -> dict:
    """The tiny FLUX's call for two images: the second its own noise and text (positions are per image)."""
    g = torch.Generator().manual_seed(11)
    two = {}
    for k, v in inputs.items():
        if k in ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "guidance") and \
                torch.is_tensor(v):
            other = v * 0.7 if v.ndim == 1 else torch.randn(v.shape, generator=g, dtype=v.dtype) * v.std() + v.mean()
            two[k] = torch.cat([v, other])  # (a timestep: another step's)
        else:
            two[k] = v
    return two


@pytest.mark.parametrize("batch", [1, 2])
def test_the_epilogue_does_what_diffusers_norm_and_rotation_do(quantized_flux, batch):
    """With the epilogue, within rounding of diffusers' norm and rotation (one image, or two: each row at its own
    image's positions); a norm's weight tripled moves both alike, so the q / k path really reads the norms."""
    model, inputs = quantized_flux
    inputs = inputs if batch == 1 else _batch_of_two(inputs)
    fused, plain = copy.deepcopy(model), copy.deepcopy(model)
    svdquant.fuse(fused, qk_epilogue=True)
    svdquant.fuse(plain)
    with torch.no_grad():
        want, got = plain(**inputs)[0], fused(**inputs)[0]
        assert got.shape[0] == batch
        assert rel(got, want) < 1e-5
        for m in (fused, plain):
            m.transformer_blocks[0].attn.norm_added_k.weight.mul_(3.0)
        moved_want, moved_got = plain(**inputs)[0], fused(**inputs)[0]
    assert rel(moved_want, want) > 1e-3 and rel(moved_got, moved_want) < 1e-5


def test_a_processor_set_afterwards_and_a_call_without_rotation_norm_q_and_k_once(quantized_flux):
    """A processor set after fuse_qk (diffusers' own again) makes the single block's stack leave q and k alone; a call
    without a rotary table goes to diffusers' processor (there is nothing to rotate); an attention backend set before
    fusing is kept, and one set since is handed back on unfusing."""
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    model, inputs = quantized_flux
    plain, fused = copy.deepcopy(model), copy.deepcopy(model)
    svdquant.fuse(plain)
    for a in (fused.transformer_blocks[0].attn, fused.single_transformer_blocks[0].attn):
        a.processor._attention_backend = "native"
    svdquant.fuse(fused, qk_epilogue=True)
    attn = fused.single_transformer_blocks[0].attn
    assert isinstance(attn.processor, QkEpilogueFluxAttnProcessor) and attn.processor._attention_backend == "native"
    with torch.no_grad():
        want = plain(**inputs)[0]
        g = torch.Generator().manual_seed(2)
        x, e = torch.randn(1, 5, 64, generator=g), torch.randn(1, 3, 64, generator=g)
        block = fused.transformer_blocks[0].attn
        no_rope = block.processor(block, x, e, None, None)
        assert all(torch.equal(a, b) for a, b in zip(no_rope, FluxAttnProcessor()(block, x, e, None, None)))
        attn.processor = FluxAttnProcessor()  # the user's processor: the stack must not norm q / k any more
        assert rel(fused(**inputs)[0], want) < 1e-5
    svdquant.unfuse(fused)
    assert fused.transformer_blocks[0].attn.processor._attention_backend == "native"


def test_a_copied_model_uses_its_own_norms(quantized_flux):
    model, inputs = quantized_flux
    fused = copy.deepcopy(model)
    svdquant.fuse(fused, qk_epilogue=True)
    twin = copy.deepcopy(fused)
    with torch.no_grad():
        twin.single_transformer_blocks[0].attn.norm_q.weight.mul_(2.0)
        a, b = fused(**inputs)[0], twin(**inputs)[0]
    plain = copy.deepcopy(model)
    svdquant.fuse(plain)
    with torch.no_grad():
        plain.single_transformer_blocks[0].attn.norm_q.weight.mul_(2.0)
        assert rel(b, plain(**inputs)[0]) < 1e-5 and rel(a, b) > 1e-4


@interpreted
@pytest.mark.parametrize("batch", [1, 2])
def test_the_epilogue_on_the_int8_kernels(quantized_flux, monkeypatch, batch):
    """The INT8 runners (Triton interpreter) as on a GPU: the stacked GEMMs normalize and rotate q / k in their
    epilogue (both streams of the double block, the single block's q/k/v + MLP stack), against the same runners
    with diffusers' norm and rotation after them. The bound is test_fused.py's for the INT8 path (1e-4: a later
    layer's activation code may move one step); the epilogue itself differs by fp32 rounding (it skips the output's
    rounding before the norm)."""
    from svdquant import kernels

    model, inputs = quantized_flux
    inputs = inputs if batch == 1 else _batch_of_two(inputs)
    ref, fused = tm.on_int8_kernels(copy.deepcopy(model)), tm.on_int8_kernels(copy.deepcopy(model))
    svdquant.fuse(ref)
    svdquant.fuse(fused, qk_epilogue=True)
    with torch.no_grad():
        want = ref(**inputs)[0]
        specs, gemm = [], kernels.int8_gemm
        monkeypatch.setattr(kernels, "int8_gemm",
                            lambda *a, qk_norm_rope=None, **k: specs.append(qk_norm_rope) or gemm(
                                *a, qk_norm_rope=qk_norm_rope, **k))
        got = fused(**inputs)[0]
    epilogues = [(s["qk_cols"], s["seq"], s["pos0"]) for s in specs if s is not None]
    n_txt, n_img = inputs["encoder_hidden_states"].shape[1], inputs["hidden_states"].shape[1]
    # the double block's image stream (after the text), its text stream, the single block's whole sequence
    assert epilogues == [(128, n_img, n_txt), (128, n_txt, 0), (128, n_txt + n_img, 0)], epilogues
    assert rel(got, want) < 1e-4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("stream", ["image", "text", "single"])
def test_gpu_epilogue_at_flux_shapes(stream):
    """FLUX.1-dev's stacked GEMMs at 1024² on the GPU's tile (Hopper: TMA, 256 columns): the epilogue against the
    plain GEMM followed by the reference, with diffusers' repeated rotary tables."""
    from svdquant import kernels as K
    from svdquant.ops import reference as R

    dev, g = "cuda", torch.Generator("cuda").manual_seed(0)
    n_txt, n_img = 512, 4096
    m, n, seq, pos0 = {"image": (n_img, 9216, n_img, n_txt), "text": (n_txt, 9216, n_txt, 0),
                       "single": (n_txt + n_img, 21504, n_txt + n_img, 0)}[stream]
    a = torch.randint(-127, 128, (m, 3072), device=dev, dtype=torch.int8, generator=g)
    w = torch.randint(-126, 127, (n, 3072), device=dev, dtype=torch.int8, generator=g)
    a_s = torch.rand(m, device=dev, generator=g) * 1e-2
    w_s = torch.rand(n, device=dev, generator=g) * 1e-3
    la = torch.randn(m, 32, device=dev, generator=g) * 0.01
    lu = (torch.randn(n, 32, device=dev, generator=g) * 0.01).to(torch.bfloat16)
    theta = torch.rand(n_txt + n_img, 64, device=dev, generator=g) * 6.28
    cos, sin = (t.repeat_interleave(2, -1)[:, ::2] for t in (theta.cos(), theta.sin()))
    qw, kw = ((torch.rand(128, device=dev, generator=g) + 0.5).to(torch.bfloat16) for _ in range(2))  # the norms
    tma = torch.cuda.get_device_capability() >= (9, 0)
    cfg = K.int8_tile_config(tma, torch.bfloat16)
    if not K.takes_qk_norm_rope(cfg, 6144, 128):
        pytest.skip("this GPU's tile does not hold whole heads of 128 (sm_80-89)")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    kw = dict(tma=tma, num_programs=sms if tma else None)
    plain = K.int8_gemm(a, a_s, w, w_s, la, lu, None, torch.bfloat16, **kw)
    spec = dict(q_weight=qw, k_weight=kw, cos=cos, sin=sin, qk_cols=6144, seq=seq, pos0=pos0, eps=1e-6)
    fused = K.int8_gemm(a, a_s, w, w_s, la, lu, None, torch.bfloat16, qk_norm_rope=spec, **kw)
    want = R.qk_norm_rope(plain.float(), qw, kw, cos, sin, 6144, seq, pos0)
    assert rel(fused.float(), want) < 1e-2  # bf16 output; the reference starts from the plain GEMM's bf16 rounding
    assert torch.equal(fused[:, 6144:], plain[:, 6144:])
