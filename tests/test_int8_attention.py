"""INT8 Q·Kᵀ attention (issue 23): the reference's known roundings, the Triton kernels against it (the interpreter
on the CPU, real shapes on a GPU), the op's errors, and the diffusers backend (``optimize(attention="int8")``)."""

from __future__ import annotations

import importlib
import math
import os

import pytest
import torch

from svdquant.ops.int8_attention import (BALANCE, LOG2E, int8_attention, int8_attention_reference, mean_query_scores,
                                         quantize_tokens, smoothing, unsupported)

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def bshd(seed, b, s, h, d, dtype=torch.float32, offset=0.0, device=DEV):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, s, h, d, generator=g) + offset).to(device=device, dtype=dtype)


def exact(q, k, v):
    q, k, v = (x.transpose(1, 2).float() for x in (q, k, v))
    return torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2)


def reference(q, k, v, scale=None):
    return int8_attention_reference(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale).transpose(1, 2)


def unsmoothed(q, k, v, centre_k: bool = True):
    """INT8 attention per token without the smoothing under test (Q as it is, K centred or not): what the
    smoothing is measured against."""
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    (qc, qs), (kc, ks) = quantize_tokens(qt), quantize_tokens(kt, kt.float().mean(dim=2) if centre_k else None)
    s = (qc.float() @ kc.float().mT) * qs[..., None] * ks[..., None, :] / math.sqrt(q.shape[-1])
    return (torch.softmax(s, dim=-1) @ vt.float()).transpose(1, 2)


# ------------------------------------------------------------------------------------------------- the reference
def test_quantize_tokens_known_answers():
    # one token of amax 127 (scale 1: ties to even), one of zeros, one of amax 254 (scale 2)
    x = torch.tensor([[127.0, -63.5, 0.5, 1.5], [0.0, 0.0, 0.0, 0.0], [254.0, 3.0, -1.0, 5.0]])[None, None]
    codes, scales = quantize_tokens(x)
    assert codes.dtype == torch.int8 and scales.dtype == torch.float32
    assert scales.flatten().tolist() == [1.0, 0.0, 2.0]
    assert codes[0, 0].tolist() == [[127, -64, 0, 2], [0, 0, 0, 0], [127, 2, 0, 2]]
    # the mean is subtracted first: a token equal to it quantizes to zeros
    mean = torch.tensor([[[254.0, 3.0, -1.0, 5.0]]])
    codes, scales = quantize_tokens(x, mean)
    assert codes[0, 0, 2].tolist() == [0, 0, 0, 0] and scales[0, 0, 2].item() == 0.0
    # then the channel factor: the first token's 127 halved, so 1.5 sets its scale (0.75 / 127 per code)
    codes, scales = quantize_tokens(x, None, torch.tensor([[[0.5, 1.0, 1.0, 1.0]]]))
    assert scales[0, 0, 0].item() == pytest.approx(63.5 / 127) and codes[0, 0, 0].tolist() == [127, -127, 1, 3]


def test_smoothing_known_answer():
    """Two tokens, two channels: the means, then a = (amax|Q - Q̄| / amax|K - K̄|) ** BALANCE per channel, 1 where a
    channel of either is constant; the mean query's score of each key."""
    q = torch.tensor([[4.0, 7.0], [-2.0, 7.0]])[None, :, None, :]  # [B, S, H, D]; Q's channel 2 constant
    k = torch.tensor([[3.0, 1.0], [1.0, 5.0]])[None, :, None, :]
    sm = smoothing(q, k, tokens_dim=1)
    assert sm.q_mean.shape == sm.q_factor.shape == (1, 1, 2)
    assert sm.q_mean.flatten().tolist() == [1.0, 7.0] and sm.k_mean.flatten().tolist() == [2.0, 3.0]
    assert sm.k_factor.flatten().tolist() == [pytest.approx(3.0 ** BALANCE), 1.0]  # amax |Q - Q̄| 3, |K - K̄| 1
    assert torch.equal(sm.q_factor, 1.0 / sm.k_factor)
    # Q̄·(K - K̄): key 1 (1, -2) -> 1 - 14 = -13, key 2 (-1, 2) -> 13
    assert mean_query_scores(k.transpose(1, 2), sm).flatten().tolist() == [-13.0, 13.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_centred_amax_from_max_and_min_is_exact(dtype):
    """The smoothing takes amax|x - mean| as max(max x - mean, mean - min x): the same bits as subtracting first."""
    from svdquant.ops.int8_attention import _mean_and_centred_amax

    x = (torch.randn(2, 300, 3, 64, generator=torch.Generator().manual_seed(5)) * 5 + 2).to(dtype)
    mean, amax = _mean_and_centred_amax(x, 1)
    assert torch.equal(amax, (x.float() - mean[:, None]).abs().amax(dim=1))


def test_centring_q_keeps_a_shared_query_offset_free():
    """A query offset common to all tokens (a bias in the Q projection) changes each key's score by Q̄·k_j, which
    the softmax does not ignore: centred Q rounds the same, and the mean query's scores come back exactly."""
    q, k, v = (bshd(i, 1, 90, 2, 64, device="cpu") for i in range(3))
    offset = 4.0 * torch.randn(1, 1, 2, 64, generator=torch.Generator().manual_seed(11))
    want = exact(q + offset, k, v)
    centred = rel(reference(q + offset, k, v), want)
    raw = rel(unsmoothed(q + offset, k, v), want)  # Q as it is: the offset sets each query's scale
    assert centred < 0.01 and raw > 2.5 * centred, (centred, raw)


def test_reference_is_close_to_exact_attention():
    q, k, v = (bshd(i, 2, 150, 3, 64, device="cpu") for i in range(3))
    err = rel(reference(q, k, v), exact(q, k, v))
    assert 0 < err < 0.02, err


def test_smoothing_makes_a_shared_key_offset_free():
    """An offset common to all keys (a bias in the K projection) moves every score of a query by one amount, which
    the softmax ignores; K minus its token mean quantizes (nearly) the same with or without it."""
    q, k, v = (bshd(i, 1, 90, 2, 64, device="cpu") for i in range(3))
    offset = 30.0 * torch.randn(1, 1, 2, 64, generator=torch.Generator().manual_seed(9))
    a, b = reference(q, k, v), reference(q, k + offset, v)
    assert rel(a, b) < 1e-3  # a few codes differ: k + offset - mean is not k to the last bit
    smoothed = rel(b, exact(q, k + offset, v))
    raw = rel(unsmoothed(q, k + offset, v, centre_k=False), exact(q, k + offset, v))  # the offset sets K's scales
    assert smoothed < 0.02 and raw > 5 * smoothed, (smoothed, raw)


def test_the_channel_balance_tames_outlier_channels():
    """A Q channel 20x the others (RoPE'd projections have such channels): unbalanced, it sets every query's scale
    and the other channels lose their bits; Q / a, K · a share the range, the scores unchanged."""
    q, k, v = (bshd(i, 1, 128, 2, 64, device="cpu") for i in range(3))
    q[..., 3] *= 20.0
    want = exact(q, k, v)
    balanced = rel(reference(q, k, v), want)
    unbalanced = rel(unsmoothed(q, k, v), want)
    assert balanced < 0.02 and unbalanced > 1.5 * balanced, (balanced, unbalanced)


def test_probabilities_round_to_v_dtype():
    q, k, v = (bshd(i, 1, 64, 1, 64, device="cpu") for i in range(3))
    fp32 = int8_attention_reference(*(x.transpose(1, 2) for x in (q, k, v)))
    bf16p = int8_attention_reference(*(x.transpose(1, 2) for x in (q, k, v)), p_dtype=torch.bfloat16)
    assert 0 < rel(bf16p, fp32) < 0.01


# ----------------------------------------------------------------------------------------------------- kernels
kernels = pytest.importorskip("svdquant.kernels") if CUDA or os.environ.get("TRITON_INTERPRET") == "1" else None
needs_kernels = pytest.mark.skipif(kernels is None, reason="needs a GPU or TRITON_INTERPRET=1")


def kernel_module():
    """svdquant.kernels.int8_attention itself (the package exports a function of that name)."""
    return importlib.import_module("svdquant.kernels.int8_attention")


@needs_kernels
@pytest.mark.parametrize("seed", [0, 1])
def test_quantize_kernel_equals_the_reference_exactly(seed):
    """Strided input (a slice of a fused q/k/v projection, as diffusers hands it), tokens no multiple of the block,
    K's mean subtracted."""
    qkv = bshd(seed, 2, 70, 3, 3 * 64, offset=0.7)
    k = qkv[..., 64:128]
    assert k.stride(-1) == 1 and not k.is_contiguous()
    sm = smoothing(qkv[..., :64], k, tokens_dim=1)
    codes, scales, dots = kernels.quantize_attention_tokens(k, sm.k_mean, sm.k_factor, dot=sm.q_mean)
    ref_codes, ref_scales = quantize_tokens(k.transpose(1, 2), sm.k_mean, sm.k_factor)
    assert torch.equal(codes, ref_codes) and torch.equal(scales, ref_scales)
    assert torch.allclose(dots, mean_query_scores(k.transpose(1, 2), sm), rtol=1e-5, atol=1e-5)
    codes, scales = kernels.quantize_attention_tokens(torch.zeros(1, 5, 1, 64, device=DEV))
    assert not codes.any() and not scales.any()


# (dtype, kernel vs reference bound): the interpreter truncates fp32 -> bf16 casts where a GPU rounds
BOUNDS = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}


@needs_kernels
@pytest.mark.parametrize("tma", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16] + ([] if CUDA else [torch.float32]))
@pytest.mark.parametrize("shape", [(1, 100, 77, 2, 64), (2, 130, 128, 3, 128), (1, 64, 200, 1, 128), (1, 50, 40, 2, 32)])
def test_attention_kernel_against_the_reference(dtype, shape, tma):
    """Pointer loads and TMA descriptors (V a strided slice of a fused q/k/v projection, as diffusers hands it)."""
    b, sq, sk, h, d = shape
    seed = sum(shape) + {torch.float16: 0, torch.bfloat16: 100, torch.float32: 200}[dtype] + tma
    q = bshd(seed, b, sq, h, d, dtype)
    kv = bshd(seed + 1, b, sk, h, 2 * d, dtype)
    k, v = kv[..., :d] + 0.5, kv[..., d:]
    if tma and CUDA and torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("TMA needs sm_90")
    assert kernel_module().tma_ready(v)  # the descriptors' path, where asked
    sm = smoothing(q, k, tokens_dim=1)
    out = kernels.int8_attention(q, k, v, LOG2E / math.sqrt(d), sm.k_mean, sm.q_factor, sm.k_factor, q_mean=sm.q_mean,
                                 tma=tma)
    assert out.shape == (b, sq, h, d) and out.dtype == dtype
    ref = reference(q, k, v)
    assert rel(out, ref) < BOUNDS[dtype], rel(out, ref)
    assert rel(out, exact(q, k, v)) < 0.03


@needs_kernels
def test_the_custom_op_and_its_fake_agree():
    q, k, v = (bshd(i, 1, 40, 2, 64, torch.float16) for i in range(3))
    torch.library.opcheck(torch.ops.svdquant.int8_attention.default, (q, k, v, *smoothing(q, k, 1), None, 0.2),
                          test_utils=("test_schema", "test_faketensor"))


@needs_kernels
@pytest.mark.parametrize("kind", ["bool", "additive", "batch-shared"])
def test_attention_kernel_with_a_padding_mask(kind):
    """One entry per key (Qwen-Image's and Z-Image's padding masks, [B, 1, 1, S_k]): the kernel against the reference
    and against SDPA with the same mask, a whole 64-key tile masked in the second batch element."""
    b, sq, sk, h, d = 2, 70, 150, 2, 64
    q, k, v = bshd(1, b, sq, h, d, torch.float16), bshd(2, b, sk, h, d, torch.float16), bshd(3, b, sk, h, d, torch.float16)
    keep = torch.ones(b, sk, dtype=torch.bool)
    keep[1, 40:] = False  # tiles 1 and 2 of the second element: nothing but padding
    mask = keep if kind != "additive" else torch.zeros(b, sk).masked_fill(~keep, -1e4)
    mask = mask[1:] if kind == "batch-shared" else mask  # the padded row, for both elements
    mask = mask[:, None, None, :].to(DEV)
    sm = smoothing(q, k, tokens_dim=1)
    from svdquant.ops.int8_attention import key_mask, mask_bias

    bias = mask_bias(key_mask(mask, b, sk), 1 / math.sqrt(d))
    out = kernels.int8_attention(q, k, v, LOG2E / math.sqrt(d), sm.k_mean, sm.q_factor, sm.k_factor, q_mean=sm.q_mean,
                                 mask_bias=bias)
    ref = int8_attention_reference(*(x.transpose(1, 2) for x in (q, k, v)), attn_mask=mask).transpose(1, 2)
    assert rel(out, ref) < BOUNDS[torch.float16], rel(out, ref)
    want = torch.nn.functional.scaled_dot_product_attention(*(x.transpose(1, 2).float() for x in (q, k, v)),
                                                            attn_mask=mask).transpose(1, 2)
    assert rel(out, want) < 0.03 and rel(out, exact(q, k, v)) > 0.05  # the mask mattered


# ---------------------------------------------------------------------------------------- the op and its errors
def test_the_op_takes_the_scale_and_diffusers_layout():
    """``scale`` reaches the scores (a sharper softmax than 1/sqrt(D)), and [B, S, H, D] comes back as it went in."""
    q, k, v = (bshd(i, 2, 33, 3, 128, device="cpu") for i in range(3))
    out = int8_attention(q, k, v, 0.3)
    assert out.shape == q.shape
    want = torch.nn.functional.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v)), scale=0.3)
    assert rel(out, want.transpose(1, 2)) < 0.03 and rel(out, exact(q, k, v)) > 0.3


@pytest.mark.parametrize("change, message", [
    (dict(attn_mask=torch.ones(1, 1, 10, 10, dtype=torch.bool)),
     "a mask of shape (1, 1, 10, 10) (it takes one entry per key: [B, S_k] or [B, 1, 1, S_k])"),
    (dict(attn_mask=torch.ones(3, 10, dtype=torch.bool)), "a mask of shape (3, 10)"),
    (dict(is_causal=True), "dropout, causal attention or grouped-query attention"),
    (dict(d=72), "head size 72 (it takes 32, 64 or 128, the same for q, k, v)"),
    (dict(k_tokens=7), "q, k, v of shapes (1, 10, 2, 64), (1, 7, 2, 64), (1, 10, 2, 64)"),
    (dict(bhs=True), "tensors of 3, 3, 3 dims"),
])
def test_what_the_op_cannot_take(change, message):
    d = change.pop("d", 64)
    q = torch.randn(1, 10, 2, d)
    k = torch.randn(1, change.pop("k_tokens", 10), 2, d)
    v = torch.randn(1, 10, 2, d)
    if change.pop("bhs", False):
        q, k, v = q[0], k[0], v[0]
    assert message in unsupported(q, k, v, **change)
    if not change:
        with pytest.raises(ValueError, match=r"^INT8 attention cannot take .*; use torch's scaled_dot_product_attention"):
            int8_attention(q, k, v)


# ----------------------------------------------------------------------------------------- the diffusers backend
def tiny_flux():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    m = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=64,
                               num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                               axes_dims_rope=[4, 28, 32])
    img_ids = torch.stack([torch.zeros(16), torch.arange(16) // 4, torch.arange(16) % 4], dim=1)
    inputs = dict(hidden_states=torch.randn(1, 16, 4), encoder_hidden_states=torch.randn(1, 8, 32),
                  pooled_projections=torch.randn(1, 32), timestep=torch.tensor([0.5]), img_ids=img_ids,
                  txt_ids=torch.zeros(8, 3))
    return m, inputs


def test_the_backend_runs_a_diffusers_model_and_leaves_others_alone(monkeypatch):
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    from svdquant.integrations.diffusers import attention as backend
    from svdquant.integrations.diffusers.compat import set_attention_backend_locally

    m, inputs = tiny_flux()
    with torch.no_grad():
        native = m(**inputs).sample
    active = _AttentionBackendRegistry._active_backend
    assert backend.register() == backend.register() == "svdquant_int8"
    calls = []
    real = backend.int8_attention_unchecked
    monkeypatch.setattr(backend, "int8_attention_unchecked", lambda *a: calls.append(a[0].shape) or real(*a))
    set_attention_backend_locally(m, "svdquant_int8")
    assert _AttentionBackendRegistry._active_backend == active  # other models keep the default
    with torch.no_grad():
        out = m(**inputs).sample
    assert calls == [(1, 24, 2, 64)] * 2  # the joint block and the single block, text + image tokens
    assert 0 < rel(out, native) < 0.01
    m.reset_attention_backend()
    with torch.no_grad():
        assert torch.equal(m(**inputs).sample, native)


def test_optimize_sets_int8_attention_only_where_the_kernel_runs():
    """``optimize(attention="int8")``'s attention step (on the CPU optimize stops before it: called directly): a
    16-bit model with head size 32 gets the backend and its captured graphs are retired; head size 48 or an fp32
    model is left as it was, the report says why."""
    from svdquant.modules import revision
    from svdquant.pipelines.optimize import Optimized, _set_attention

    m, _ = tiny_flux()
    report = Optimized(device="cpu")
    _set_attention(m, "int8", report)
    assert report.attention is None and "a torch.float32 model" in report.skipped["attention"]
    m = m.to(torch.bfloat16)
    before = revision()
    report = Optimized(device="cpu")
    _set_attention(m, "int8", report)
    assert report.attention == "svdquant_int8" and revision() > before
    assert {p._attention_backend.value for p in m.attn_processors.values()} == {"svdquant_int8"}
    from diffusers import FluxTransformer2DModel

    wide = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=0, attention_head_dim=48,
                                  num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                                  axes_dims_rope=[8, 20, 20]).to(torch.bfloat16)
    report = Optimized(device="cpu")
    _set_attention(wide, "int8", report)
    assert report.attention is None and "head size 48 (the kernel takes 32, 64, 128)" in report.skipped["attention"]


def test_the_backend_hands_what_it_cannot_take_to_sdpa():
    from svdquant.integrations.diffusers.attention import svdquant_int8_attention

    q, k, v = (bshd(i, 1, 12, 2, 64, device="cpu") for i in range(3))
    mask = torch.rand(1, 1, 12, 12, generator=torch.Generator().manual_seed(4)) > 0.3
    mask[..., 0] = True
    want = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask).transpose(1, 2)
    assert torch.allclose(svdquant_int8_attention(q, k, v, attn_mask=mask), want, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_gpu_kernel_at_the_flux_shape():
    """One FLUX.1 image's attention (4,608 tokens, 24 heads of 128) in bf16, against the reference and SDPA."""
    q, k, v = (bshd(i, 1, 4608, 24, 128, torch.bfloat16, offset=0.3 * (i == 1)) for i in range(3))
    out = int8_attention(q, k, v)
    assert rel(out, reference(q, k, v)) < 5e-3
    assert rel(out, exact(q, k, v)) < 0.02
    compiled = torch.compile(lambda a, b, c: int8_attention(a, b, c), fullgraph=True)
    assert rel(compiled(q, k, v), out) < 1e-3  # inductor sums K's mean in another order: a few codes may differ


@needs_kernels
def test_the_speed_benchmark_checks_before_it_times(tmp_path, capsys):
    """benchmarks/attention_speed.py --quick: every variant's output is compared with fp32 attention and the stages'
    with the reference, and the table is written (on the CPU through the interpreter: the times mean nothing); a
    --shapes that names no shape it would run is one line."""
    import importlib.util
    import json
    import pathlib

    path = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "attention_speed.py"
    spec = importlib.util.spec_from_file_location("attention_speed", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    res = bench.main(["--quick", "--out", str(tmp_path)])
    assert "error" not in res, res.get("error")
    ours = [r for r in res["rows"] if r["variant"].startswith("ours: INT8")]
    assert ours and all(0 < r["rel_err_vs_fp32"] < 0.03 for r in ours)
    stages = [r for r in res["rows"] if r["variant"] == "ours: stages"]
    assert stages and stages[0]["rel_err_vs_reference"] < 0.02
    assert json.loads((tmp_path / "attention.json").read_text())["rows"] == res["rows"]
    assert "ours, stages" in (tmp_path / "attention.md").read_text()
    with pytest.raises(SystemExit):
        bench.main(["--quick", "--shapes", "FLUX"])
    assert "error: --shapes 'FLUX' names none of ['tiny']" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_gpu_optimize_with_int8_attention():
    """``optimize(attention="int8")`` on the tiny quantized FLUX (head size 32): compiled and graph-captured with the
    op inside, close to the same model with SDPA."""
    first, second, sdpa = optimized_against_sdpa("int8", "svdquant_int8")
    assert torch.equal(first, second) and 0 < rel(first, sdpa) < 3e-2


def optimized_against_sdpa(attention: str, backend: str, model=None, inputs=None):
    """The tiny quantized FLUX on the GPU (or ``model`` / ``inputs`` there), optimized with SDPA and then with
    ``attention`` (checked to set ``backend``, compiled and graph-captured): its two outputs with it, and SDPA's."""
    import tiny_models as tm

    from svdquant.pipelines.optimize import deoptimize, optimize

    if model is None:
        model, inputs = tm.on_cuda(*tm.quantized_flux())
    optimize(model, attention=None, layers=False)
    with torch.no_grad():
        sdpa = model(**inputs)[0]
    deoptimize(model)
    report = optimize(model, attention=attention, layers=False)
    assert report.attention == backend and report.cuda_graphs
    with torch.no_grad():
        first, second = model(**inputs)[0], model(**inputs)[0]
    return first, second, sdpa


def test_importing_svdquant_makes_the_backend_a_diffusers_name():
    """``import svdquant`` registers the backend when diffusers loads its attention dispatcher (a fresh process:
    before or after diffusers), so diffusers' own ``set_attention_backend`` takes the name."""
    import subprocess
    import sys

    code = ("import {first}, {second}\n"
            "from diffusers.models.attention_dispatch import AttentionBackendName\n"
            "print(AttentionBackendName('svdquant_int8').value)\n")
    for first, second in (("svdquant", "diffusers"), ("diffusers.models.attention_dispatch", "svdquant")):
        out = subprocess.run([sys.executable, "-c", code.format(first=first, second=second)], capture_output=True,
                             text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert out.returncode == 0 and out.stdout.strip() == "svdquant_int8", out.stderr[-2000:]


# which tiny models' attention goes through diffusers' backends (the rest call PyTorch's SDPA from diffusers'
# legacy processors: set_attention_backend does not reach them, and optimize says so)
DISPATCHING = {"flux": 2, "flux2": 2, "wan": 4, "zimage": None, "qwenimage": 2}  # INT8 calls in one forward
LEGACY = ["sd3", "pixart", "sana", "sdxl"]


def _first(out):
    out = out[0]
    return out[0] if isinstance(out, (list, tuple)) else out


@pytest.mark.parametrize("arch", [*DISPATCHING, *LEGACY])
def test_the_backend_on_every_architecture(arch, monkeypatch):
    """Each tiny model (diffusers classes, real processors) with its attention on the backend: a forward close to
    SDPA's, and how many attention calls took INT8 (Qwen-Image's with its text padding mask; the tiny Z-Image's
    head size 96 goes to SDPA); the models whose processors do not dispatch through diffusers' backends are refused
    by optimize with the reason."""
    import tiny_models as tm

    from svdquant.integrations.diffusers import attention as backend
    from svdquant.integrations.diffusers.compat import set_attention_backend_locally
    from svdquant.pipelines.optimize import Optimized, _set_attention

    model = getattr(tm, f"build_{arch}")()
    inputs = getattr(tm, f"{arch}_inputs")(model)
    with torch.no_grad():
        native = _first(model(**inputs))
    if arch in LEGACY:
        report = Optimized(device="cpu")
        _set_attention(model.to(torch.bfloat16), "int8", report)
        assert report.attention is None and "legacy" in report.skipped["attention"], report.skipped
        return
    calls = []
    real = backend.int8_attention_unchecked
    monkeypatch.setattr(backend, "int8_attention_unchecked", lambda *a: calls.append(1) or real(*a))
    set_attention_backend_locally(model, backend.register())
    with torch.no_grad():
        out = _first(model(**inputs))
    assert torch.isfinite(out).all() and rel(out, native) < 0.02, rel(out, native)
    if DISPATCHING[arch] is not None:
        assert len(calls) == DISPATCHING[arch]
    assert (rel(out, native) > 0) == bool(calls)
