"""q/k RMSNorm + rotary embedding as one op where diffusers' rotary embedding is a complex product (Qwen-Image's
double-stream attention, Z-Image's single-stream one; ``svdquant.fuse(model, norm_rope=True)``): the reference with
diffusers' ``RMSNorm`` rounding (``round_norm``) is Qwen-Image's math to the bit; the Triton kernel's ``ROUND_NORM``
and per-batch tables against it in the interpreter; the processors on the tiny models, alone and inside a stacked
q/k/v's view (exact on the CPU), what they hand back to diffusers, and that ``optimize``'s fusions take them."""

from __future__ import annotations

import copy
import itertools
import os

import tiny_models as tm  # first: sets HF_HUB_OFFLINE before diffusers is imported

import pytest
import torch
from diffusers.models.normalization import RMSNorm
from diffusers.models.transformers.transformer_qwenimage import (QwenDoubleStreamAttnProcessor2_0,
                                                                 apply_rotary_emb_qwen)

import svdquant
from svdquant.ops import norm_rope as N
from test_norm_rope import truncated_reference

interpreter = pytest.mark.skipif(torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1",
                                 reason="interpreter tests run on CPU machines")


def case(seed, b, s, s2, h, d, dtype):
    """A strided q slice of a stacked q/k/v output, a text stream, two norm weights, Qwen-Image-like complex tables
    (image, text) and the op's cos / sin ``[S2 + S, D]`` made from them."""
    g = torch.Generator().manual_seed(seed)
    full = torch.randn(b, s, 3 * h * d, generator=g).mul(3).to(dtype)
    x2 = None if s2 is None else torch.randn(b, s2, h * d, generator=g).to(dtype)
    w, w2 = (torch.randn(d, generator=g).to(dtype) for _ in range(2))
    angles = torch.randn(s + (s2 or 0), d // 2, generator=g) * 10
    freqs = torch.polar(torch.ones_like(angles), angles)
    image, text = freqs[s2 or 0:], freqs[:s2 or 0]
    cos, sin = freqs.real.repeat_interleave(2, 1).contiguous(), freqs.imag.repeat_interleave(2, 1).contiguous()
    return full[..., h * d:2 * h * d], w, cos, sin, x2, w2 if s2 else None, (image, text)


def qwen_way(x, w, freqs, eps, h, x2, w2):
    """diffusers' Qwen-Image processor's steps: its RMSNorm per head, the complex product per stream, text first."""
    d = x.shape[-1] // h

    def norm_rope(t, weight, f):
        norm = RMSNorm(d, eps=eps).to(device=t.device, dtype=t.dtype)
        norm.weight.data.copy_(weight)
        return apply_rotary_emb_qwen(norm(t.unflatten(-1, (h, d))), f, use_real=False)

    y = norm_rope(x, w, freqs[0])
    return y if x2 is None else torch.cat([norm_rope(x2, w2, freqs[1]), y], dim=1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("s2", [None, 5])
def test_the_rounded_norm_reference_is_qwen_images_math_to_the_bit(dtype, s2):
    x, w, cos, sin, x2, w2, freqs = case(0, 2, 11, s2, 3, 32, dtype)
    ref = N.norm_rope_reference(x, w, cos, sin, 1e-6, 3, x2, w2, round_norm=True)
    assert torch.equal(ref, qwen_way(x, w, freqs, 1e-6, 3, x2, w2))
    if dtype != torch.float32:  # torch.nn.RMSNorm's one rounding is not diffusers' two: the flag matters
        assert not torch.equal(ref, N.norm_rope_reference(x, w, cos, sin, 1e-6, 3, x2, w2))


@interpreter
@pytest.mark.parametrize("s2", [None, 5])
def test_the_kernels_rounded_norm_against_the_reference_in_the_interpreter(s2):
    """ROUND_NORM: fp16 the reference's bits, bf16 the reference's with the interpreter's rounding toward zero;
    partners split from registers or loaded again, a launch for a query and a key or one each."""
    from svdquant.kernels.norm_rope import norm_rope_into

    def emulated(x, w, cos, sin, eps, h, x2, w2):
        return N.norm_rope_reference(x, w, cos, sin, eps, h, x2, w2, round_norm=True)

    def truncated(x, w, cos, sin, eps, h, x2, w2):  # the interpreter's bf16 rounding toward zero
        return truncated_reference(x, w, cos, sin, eps, h, x2, w2, round_norm=True)

    for (dtype, reference), split in itertools.product(
            ((torch.float16, emulated), (torch.bfloat16, truncated)), (True, False)):
        x, w, cos, sin, x2, w2, _ = case(1 + (s2 or 0), 2, 13, s2, 3, 32, dtype)
        ref = reference(x, w, cos, sin, 1e-6, 3, x2, w2)
        out, out_k = torch.empty_like(ref), torch.empty_like(ref)
        if x2 is not None:
            norm_rope_into(out, x2, w2, cos, sin, 1e-6, 0, block_t=8, split=split, round_norm=True)
        norm_rope_into(out, x, w, cos, sin, 1e-6, s2 or 0, block_t=8, split=split, round_norm=True,
                       pair=(out_k, x, w))
        assert torch.equal(out, ref), (dtype, split)
        assert torch.equal(out_k[:, s2 or 0:], ref[:, s2 or 0:]), (dtype, split)


def _processors(model):
    return [m.processor for m in model.modules() if hasattr(m, "processor")]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_processor_is_diffusers_qwen_image_attention_to_the_bit(dtype, monkeypatch):
    """On the tiny Qwen-Image (text mask given, as the pipeline gives it): every block's attention fused, diffusers'
    processor never called, the transformer's output the same bits; unfusing gives diffusers' processors back."""
    from svdquant.modules.norm_rope import NormRopeQwenAttnProcessor, fuse_norm_rope, unfuse_norm_rope

    model = tm.build_qwenimage(0, dtype)
    inputs = tm.qwenimage_inputs(model, seed=3)
    before = tm.forward(model, inputs)
    originals = _processors(model)
    assert fuse_norm_rope(model, ("flux",)) == 0
    assert fuse_norm_rope(model) == len(model.transformer_blocks) == len(originals)
    assert all(isinstance(p, NormRopeQwenAttnProcessor) for p in _processors(model))
    monkeypatch.setattr(QwenDoubleStreamAttnProcessor2_0, "__call__", lambda *a, **k: pytest.fail("diffusers' ran"))
    assert torch.equal(tm.forward(model, inputs), before)
    monkeypatch.undo()
    assert unfuse_norm_rope(model) == len(originals)
    assert _processors(model) == originals


def test_calls_the_processor_does_not_take_run_diffusers_processor():
    """An external mask, no rotary tables, tables that are not complex, norm weights of another dtype than the
    input: diffusers' processor runs, its result bit for bit (or its error: it refuses the mask, and a query in
    fp32 beside a bf16 key)."""
    from svdquant.modules.norm_rope import fuse_norm_rope

    model = tm.build_qwenimage(0, torch.bfloat16)
    attn = model.transformer_blocks[0].attn
    original = attn.processor
    fuse_norm_rope(model)
    g = torch.Generator().manual_seed(0)
    img, txt = (torch.randn(1, n, 64, generator=g).bfloat16() for n in (16, 6))
    tables = tuple(torch.polar(torch.ones(n, 16), torch.randn(n, 16, generator=g)) for n in (16, 6))
    calls = []
    attn.processor.original = lambda *a: calls.append(1) or original(*a)
    with pytest.raises(ValueError, match="does not accept an external attention_mask"):
        attn.processor(attn, img, txt, attention_mask=torch.ones(1, 1, 1, 22, dtype=torch.bool),
                       image_rotary_emb=tables)
    for rotary in (None, tuple(t.real for t in tables)):
        got = attn.processor(attn, img, txt, image_rotary_emb=rotary)
        assert all(torch.equal(a, b) for a, b in zip(got, original(attn, img, txt, None, None, rotary)))
    attn.norm_q.weight.data = attn.norm_q.weight.data.float()  # diffusers' then computes q in fp32, and refuses it
    with pytest.raises(RuntimeError, match="same dtype"):
        attn.processor(attn, img, txt, image_rotary_emb=tables)
    assert len(calls) == 4


def test_fuse_puts_it_inside_the_stacked_qkv_view_as_optimize_does():
    """svdquant.fuse(norm_rope=True) on a quantized tiny Qwen-Image: the processor inside each attention's view of
    its stacked q/k/v (the stacked GEMM runs), the output bit for bit the unfused model's, one graph per block under
    torch.compile; unfuse gives diffusers' processors back. svdquant.optimize's fusions (norm_rope.OPTIMIZED) take
    Qwen-Image's attentions too."""
    from svdquant.modules.fused_view import FusedViewProcessor
    from svdquant.modules.fusions import fuse_model
    from svdquant.modules.norm_rope import OPTIMIZED, NormRopeQwenAttnProcessor

    model = tm.build_qwenimage(seed=0)
    svdquant.quantize(model, svdquant.Int4Config(iterations=1, eval_tokens=64),
                      svdquant.Calibration(inputs=tm.calibration_inputs("qwenimage", model, 1)), progress=False)
    inputs = tm.qwenimage_inputs(model, seed=7)
    before = tm.forward(model, inputs)
    originals = _processors(model)
    assert fuse_model(model, norm_rope=("flux", "zimage"))["norm_rope"] == 0
    assert fuse_model(model, norm_rope=OPTIMIZED)["norm_rope"] == len(model.transformer_blocks)
    svdquant.unfuse(model)
    fused = svdquant.fuse(model, norm_rope=True)
    assert fused["qkv"] == fused["norm_rope"] == len(model.transformer_blocks)
    attns = [b.attn for b in model.transformer_blocks]
    assert all(isinstance(a.processor, FusedViewProcessor) and
               isinstance(a.processor.__dict__["inner"], NormRopeQwenAttnProcessor) for a in attns)
    stacked = []
    hooks = [a.to_qkv.register_forward_hook(lambda *_: stacked.append(1)) for a in attns]
    assert torch.equal(tm.forward(model, inputs), before)
    assert len(stacked) == len(attns)
    for h in hooks:
        h.remove()
    copied = copy.deepcopy(model)  # a fused model copies (the view's classes are made at run time)
    torch._dynamo.reset()
    for block in copied.transformer_blocks:
        block.compile(fullgraph=True, backend="aot_eager")  # a graph break raises here; the op's fake runs
    assert torch.equal(tm.forward(copied, inputs), before)
    assert svdquant.unfuse(model)["norm_rope"] == len(attns)
    assert _processors(model) == originals
    assert torch.equal(tm.forward(model, inputs), before)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_kernel_at_the_qwen_image_shape():
    """A Qwen-Image 1024² image's q and k (4,096 image tokens after 256 text tokens, 24 heads of 128, slices of a
    stacked q/k/v output) with diffusers' RMSNorm rounding, against Qwen-Image's own math on the GPU: at most one
    bf16 step apart in a few values (sums in another order); compiled and in a CUDA graph the same bits."""
    x, w, cos, sin, x2, w2, freqs = case(3, 1, 4096, 256, 24, 128, torch.bfloat16)
    x, w, cos, sin, x2, w2 = (t.cuda() for t in (x, w, cos, sin, x2, w2))
    freqs = tuple(f.cuda() for f in freqs)
    ref = qwen_way(x, w, freqs, 1e-6, 24, x2, w2)
    q, k = N.norm_rope_qk(x, x, w, w, cos, sin, 1e-6, 24, x2, x2, w2, w2, heads_first=True, round_norm=True)
    assert torch.equal(q, k)
    err = (q.float() - ref.float()).abs()
    assert float((err > 0).float().mean()) < 1e-3 and float(err.max()) <= 2 ** -7 * float(ref.float().abs().max())
    compiled = torch.compile(lambda *a: N.norm_rope(*a, heads_first=True, round_norm=True), fullgraph=True)
    assert torch.equal(compiled(x, w, cos, sin, 1e-6, 24, x2, w2), q)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = N.norm_rope(x, w, cos, sin, 1e-6, 24, x2, w2, round_norm=True)
    graph.replay()
    assert torch.equal(captured, q)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_processor_in_a_compiled_qwen_image_block():
    """One Qwen-Image block at the real width (24 heads × 128), bf16: the processor compiled with inductor (the
    tables' real parts made in one graph with the op) against diffusers' processor eager."""
    from diffusers import QwenImageTransformer2DModel

    from svdquant.modules.norm_rope import fuse_norm_rope

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = QwenImageTransformer2DModel(num_layers=1).to(torch.bfloat16).eval()
    g = torch.Generator(device="cuda").manual_seed(1)
    inputs = dict(hidden_states=torch.randn(1, 1024, 64, device="cuda", generator=g).bfloat16(),
                  encoder_hidden_states=torch.randn(1, 128, 3584, device="cuda", generator=g).bfloat16(),
                  encoder_hidden_states_mask=None, timestep=torch.full((1,), 0.5, device="cuda").bfloat16(),
                  img_shapes=[[(1, 32, 32)]], return_dict=False)
    want = tm.forward(model, inputs)
    assert fuse_norm_rope(model) == 1
    model.transformer_blocks[0].compile(fullgraph=True)
    got = tm.forward(model, inputs)
    assert float((got.float() - want.float()).norm() / want.float().norm()) < 2e-2


@interpreter
def test_the_benchmark_quick_times_qwen_images_case(tmp_path):
    """benchmarks/norm_rope_speed.py --quick: Qwen-Image's case beside FLUX's, diffusers' math and the qk op (its CPU
    path: the reference) giving the same bits, on q's and k's bytes; nothing timed records autograd (a pipeline's
    call does not: a result requiring grad warns when the error is read from it)."""
    import json
    import sys
    import warnings
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import norm_rope_speed

    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*requires_grad=True.*")
        norm_rope_speed.main(["--quick", "--out", str(tmp_path)])
    case = json.loads((tmp_path / "norm_rope_speed.json").read_text())["cases"]["qwenimage"]
    assert set(case["variants"]) == {"diffusers Qwen-Image eager, q and k",
                                     "svdquant qk op, diffusers' RMSNorm rounding"}
    assert all(r["ms"] > 0 and r["max_abs_err"] == 0 for r in case["variants"].values())
    assert case["bytes"] == 2 * 2 * (16 + 8) * 2 * 32 * 2  # q and k: read and written, bf16


def test_the_e2e_variant_empties_the_switch_for_its_call_only(monkeypatch):
    """benchmarks/e2e.py's int4-no-normrope: svdquant.optimize called with norm_rope.OPTIMIZED empty, put back after
    (also when optimize raises); the other variants see the default, which is every architecture."""
    import sys
    from pathlib import Path

    from svdquant.modules import norm_rope

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import e2e

    seen = []
    monkeypatch.setattr(svdquant, "optimize", lambda pipe, **kw: seen.append((norm_rope.OPTIMIZED, kw)) or "report")
    assert e2e.optimize_as("pipe", "int4-no-normrope") == "report"
    e2e.optimize_as("pipe", "int4-int8attn")
    everything = ("flux", "qwenimage", "zimage")
    assert seen == [((), {}), (everything, {"attention": "int8"})]
    assert norm_rope.OPTIMIZED == everything
    monkeypatch.setattr(svdquant, "optimize", lambda pipe, **kw: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        e2e.optimize_as("pipe", "int4-no-normrope")
    assert norm_rope.OPTIMIZED == everything


def zimage(dtype=torch.bfloat16):
    """The tiny Z-Image with 64-wide heads (the op takes powers of two; the tiny config's are 96 wide)."""
    return tm.build_zimage(0, dtype, dim=128, axes_dims=[16, 24, 24])


@interpreter
def test_the_kernel_reads_a_table_per_batch_entry_in_the_interpreter():
    """Tables [B, S, D] (Z-Image's): each batch entry rotated by its own, the reference's bits (fp16)."""
    from svdquant.kernels.norm_rope import norm_rope_into

    x, w, _, _, _, _, _ = case(5, 2, 13, None, 3, 32, torch.float16)
    g = torch.Generator().manual_seed(9)
    freqs = torch.polar(torch.ones(2, 13, 16), torch.randn(2, 13, 16, generator=g) * 10)
    cos, sin = N.complex_tables(freqs)
    assert cos.shape == (2, 13, 32) and N.unsupported(x, w, cos, sin, 3) is None
    ref = N.norm_rope_reference(x, w, cos, sin, 1e-5, 3, round_norm=True)
    assert not torch.equal(ref[0], N.norm_rope_reference(x, w, cos[1], sin[1], 1e-5, 3, round_norm=True)[0])
    out = torch.empty_like(ref)
    norm_rope_into(out, x, w, cos, sin, 1e-5, 0, block_t=8, round_norm=True)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_zimage_processor_is_diffusers_zimage_attention_to_the_bit(dtype, monkeypatch):
    """The tiny Z-Image (its refiners' attentions and the main layers'): every attention fused, diffusers' processor
    never called, the same bits; a call without complex tables runs diffusers' processor; unfusing gives diffusers'
    processors back."""
    from diffusers.models.transformers.transformer_z_image import ZSingleStreamAttnProcessor

    from svdquant.modules.norm_rope import NormRopeZImageAttnProcessor, fuse_norm_rope, unfuse_norm_rope

    model = zimage(dtype)
    inputs = tm.zimage_inputs(model, seed=3)
    before = tm.forward(model, inputs)
    originals = _processors(model)
    assert fuse_norm_rope(model, ("qwenimage",)) == 0
    assert fuse_norm_rope(model) == len(originals) == 3
    assert all(isinstance(p, NormRopeZImageAttnProcessor) for p in _processors(model))
    with monkeypatch.context() as m:
        m.setattr(ZSingleStreamAttnProcessor, "__call__", lambda *a, **k: pytest.fail("diffusers' ran"))
        assert torch.equal(tm.forward(model, inputs), before)
    attn = next(m for m in model.modules() if hasattr(m, "processor"))
    x = torch.randn(1, 8, 128).to(dtype)
    assert torch.equal(attn.processor(attn, x, freqs_cis=None), originals[0](attn, x, freqs_cis=None))
    assert unfuse_norm_rope(model) == len(originals)
    assert _processors(model) == originals


def test_the_zimage_processor_inside_the_stacked_qkv_view():
    """svdquant.optimize's fusions (norm_rope.OPTIMIZED) on a quantized tiny Z-Image: the op inside each attention's
    view of its stacked q/k/v, the same bits as the unfused model; svdquant.unfuse gives diffusers' processors back."""
    from svdquant.modules.fused_view import FusedViewProcessor
    from svdquant.modules.fusions import fuse_model
    from svdquant.modules.norm_rope import OPTIMIZED, NormRopeZImageAttnProcessor

    model = zimage(torch.float32)
    svdquant.quantize(model, svdquant.Int4Config(iterations=1, eval_tokens=64),
                      svdquant.Calibration(inputs=tm.calibration_inputs("zimage", model, 1)), progress=False)
    inputs = tm.zimage_inputs(model, seed=7)
    before = tm.forward(model, inputs)
    originals = _processors(model)
    fused = fuse_model(model, norm_rope=OPTIMIZED)
    assert fused["qkv"] == fused["norm_rope"] == 3
    assert all(isinstance(p, FusedViewProcessor) and isinstance(p.__dict__["inner"], NormRopeZImageAttnProcessor)
               for p in _processors(model))
    assert torch.equal(tm.forward(model, inputs), before)
    assert svdquant.unfuse(model)["norm_rope"] == 3 and _processors(model) == originals


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_tables_per_batch_entry_at_the_zimage_shape():
    """Z-Image's q and k at its width (30 heads of 128, 4,096 tokens, two batch entries with their own complex
    tables) against the reference on the GPU: at most one bf16 step apart in a few values."""
    x, w, _, _, _, _, _ = case(4, 2, 4096, None, 30, 128, torch.bfloat16)
    g = torch.Generator().manual_seed(2)
    freqs = torch.polar(torch.ones(2, 4096, 64), torch.randn(2, 4096, 64, generator=g) * 10).cuda()
    x, w = x.cuda(), w.cuda()
    cos, sin = N.complex_tables(freqs)
    ref = N.norm_rope_reference(x, w, cos, sin, 1e-5, 30, round_norm=True)
    q, k = N.norm_rope_qk(x, x, w, w, cos, sin, 1e-5, 30, heads_first=True, round_norm=True)
    err = (q.float() - ref.float()).abs()
    assert torch.equal(q, k)
    assert float((err > 0).float().mean()) < 1e-3 and float(err.max()) <= 2 ** -7 * float(ref.float().abs().max())
