"""The Triton kernels against the torch reference.

On a CPU machine the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, set in
conftest.py) at small shapes; on a GPU the tests marked ``gpu`` run them compiled at FLUX
shapes. Every test draws fresh random inputs from a seed it prints on failure.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from svdquant import Int4Config, NVFP4Config, SVDQLinear  # noqa: E402
from svdquant.formats.nvfp4 import e2m1_table  # noqa: E402
from svdquant.ops import reference as R  # noqa: E402
from svdquant.ops import reference_linear  # noqa: E402

triton = pytest.importorskip("triton")
from svdquant.kernels import KernelWeights  # noqa: E402
from svdquant.kernels.gemm import fp4_gemm, w4a4_gemm  # noqa: E402
from svdquant.kernels.quantize import quantize_input  # noqa: E402

CUDA = torch.cuda.is_available()
cpu_only = pytest.mark.skipif(CUDA or os.environ.get("TRITON_INTERPRET") != "1",
                              reason="interpreter tests run on CPU machines")
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
SMALL = dict(BLOCK_N=32, BLOCK_M=32, GROUP_N=2, num_warps=4, num_stages=1)


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def layer(fmt, k, n, dtype, seed, post_gelu=False, rank=32):
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(k, n, dtype=dtype)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=g) / k**0.5)
    x = torch.randn(64, k, generator=g)
    x[:, :3] *= 20
    if post_gelu:
        x = torch.nn.functional.gelu(x)
    rc = (Int4Config if fmt == "int4" else NVFP4Config)(rank=rank, method="svdquant" if rank else "smooth",
                                                         iterations=1, eval_tokens=64)
    return SVDQLinear.from_linear(lin, x.to(dtype), rc, post_gelu=post_gelu)


def inputs(m, rows, seed, dtype):
    g = torch.Generator().manual_seed(seed + 1000)
    x = torch.randn(rows, m.in_features, generator=g) * 2
    x[:, :3] *= 20
    return x.to(dtype)


# ---------------------------------------------------------------------------- kernel 1, interpreter
@cpu_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("post_gelu", [False, True, 64])
def test_quantize_kernel_matches_reference_exactly(dtype, post_gelu):
    seed = 1
    m = layer("int4", 192, 48, dtype, seed, post_gelu=post_gelu)
    x = inputs(m, 37, seed, dtype)
    kw = KernelWeights(m)
    codes, scales_t, lora_act = quantize_input(x, m.smooth_inv, kw.lora_down, shift=m.act_shift,
                                               unsigned_from=m.act_unsigned_from, block_m=16)
    ref = R.quantize_input(x, m.smooth_inv, m.lora_down, "int4", 64, m.act_shift, None, m.act_unsigned_from)
    assert torch.equal(codes, ref.codes.to(torch.int8))
    assert torch.equal(scales_t.t(), ref.scales)
    lora_sum = lora_act
    assert lora_sum[:, : m.rank].sub(ref.lora_act).abs().max() <= 1e-5 * ref.lora_act.abs().max()
    assert torch.all(lora_sum[:, m.rank:] == 0)


@cpu_only
def test_quantize_kernel_nvfp4_values_are_exact():
    m = layer("nvfp4", 128, 32, torch.bfloat16, 2)
    x = inputs(m, 20, 2, torch.bfloat16)
    kw = KernelWeights(m)
    values, scales_t, _ = quantize_input(x, m.smooth_inv, kw.lora_down, fmt="nvfp4", group_size=16,
                                         input_scale=m.input_scale, block_m=16)
    ref = R.quantize_input(x, m.smooth_inv, m.lora_down, "nvfp4", 16, 0.0, m.input_scale)
    want = e2m1_table()[ref.codes.long()] * ref.scales.float().repeat_interleave(16, 1)
    assert torch.equal(values.float(), want)
    assert torch.equal(scales_t.t().float(), ref.scales.float())


# ---------------------------------------------------------------------------- kernel 2, interpreter
@cpu_only
@pytest.mark.parametrize("pipeline", [False, True])
@pytest.mark.parametrize("rank", [0, 32])
def test_int4_gemm_matches_reference(pipeline, rank):
    seed = 3
    m = layer("int4", 200, 72, torch.float32, seed, rank=rank)  # K=200 is padded to 256, N=72 is ragged
    x = inputs(m, 45, seed, torch.float32)
    kw = KernelWeights(m)
    codes, scales_t, lora_act = quantize_input(x, m.smooth_inv, kw.lora_down, block_m=16)
    y = w4a4_gemm(codes, scales_t, m.qweight, kw.wscales_t, lora_act, kw.lora_up, m.bias, torch.float32,
                  pipeline=pipeline, **SMALL)
    ref = reference_linear(x, m)
    assert y.shape == ref.shape
    assert rel(y, ref) < 1e-6  # fp32 out: only the order of fp32 additions differs


@cpu_only
@pytest.mark.parametrize("split", [1, 3])
def test_quantize_kernel_split_k_gives_same_result(split):
    m = layer("int4", 192, 32, torch.float32, 11)
    x = inputs(m, 24, 11, torch.float32)
    kw = KernelWeights(m)
    c1, s1, l1 = quantize_input(x, m.smooth_inv, kw.lora_down, block_m=16, split=1)
    c2, s2, l2 = quantize_input(x, m.smooth_inv, kw.lora_down, block_m=16, split=split)
    assert torch.equal(c1, c2) and torch.equal(s1, s2)
    assert torch.allclose(l1, l2, rtol=1e-5, atol=1e-5)


@cpu_only
@pytest.mark.parametrize("w_layout", [1, 2])
def test_int4_gemm_unpacked_layouts_match(w_layout):
    from svdquant.formats import unpack_4bit_halves

    m = layer("int4", 128, 48, torch.float32, 12)
    x = inputs(m, 30, 12, torch.float32)
    kw = KernelWeights(m)
    codes_dtype = torch.int8 if w_layout == 1 else torch.float8_e4m3fn
    codes, scales_t, lora_act = quantize_input(x, m.smooth_inv, kw.lora_down, block_m=16, codes_dtype=codes_dtype)
    wq = unpack_4bit_halves(m.qweight, 64, signed=True).to(codes_dtype)
    y = w4a4_gemm(codes, scales_t, wq, kw.wscales_t, lora_act, kw.lora_up, m.bias, torch.float32, w_layout=w_layout,
                  **SMALL)
    assert rel(y, reference_linear(x, m)) < 1e-6


@cpu_only
def test_int4_gemm_gelu_epilogue():
    m = layer("int4", 128, 40, torch.float32, 4)
    x = inputs(m, 33, 4, torch.float32)
    kw = KernelWeights(m)
    codes, scales_t, lora_act = quantize_input(x, m.smooth_inv, kw.lora_down, block_m=16)
    y = w4a4_gemm(codes, scales_t, m.qweight, kw.wscales_t, lora_act, kw.lora_up, m.bias, torch.float32, gelu=True,
                  **SMALL)
    ref = torch.nn.functional.gelu(reference_linear(x, m), approximate="tanh")
    assert rel(y, ref) < 1e-6


@cpu_only
def test_int4_gemm_no_rescale_ceiling_is_a_different_function():
    # the benchmark-only ceiling mode really skips the scales (so its timing means what it says)
    m = layer("int4", 128, 32, torch.float32, 5)
    x = inputs(m, 16, 5, torch.float32)
    kw = KernelWeights(m)
    codes, scales_t, _ = quantize_input(x, m.smooth_inv, None, block_m=16)
    y = w4a4_gemm(codes, scales_t, m.qweight, kw.wscales_t, None, None, None, torch.float32, no_rescale=True, **SMALL)
    from svdquant.formats import unpack_4bit_halves

    want = codes.float() @ unpack_4bit_halves(m.qweight, 64, signed=True).float().T
    assert torch.equal(y, want)


@cpu_only
def test_fp4_gemm_matches_reference():
    m = layer("nvfp4", 192, 40, torch.float32, 6)
    x = inputs(m, 21, 6, torch.float32)
    kw = KernelWeights(m)
    values, _, lora_act = quantize_input(x, m.smooth_inv, kw.lora_down, fmt="nvfp4", group_size=16,
                                         input_scale=m.input_scale, block_m=16)
    y = fp4_gemm(values, m.qweight, m.wscales, m.wtensor_scale, m.input_scale, lora_act, kw.lora_up, m.bias,
                 torch.float32, **SMALL)
    assert rel(y, reference_linear(x, m)) < 1e-6


@cpu_only
def test_bf16_output_within_rounding_of_reference():
    m = layer("int4", 128, 48, torch.bfloat16, 7)
    x = inputs(m, 40, 7, torch.bfloat16)
    kw = KernelWeights(m)
    codes, scales_t, lora_act = quantize_input(x, m.smooth_inv, kw.lora_down, block_m=16)
    y = w4a4_gemm(codes, scales_t, m.qweight, kw.wscales_t, lora_act, kw.lora_up, m.bias, torch.bfloat16, **SMALL)
    assert y.dtype == torch.bfloat16
    # the interpreter truncates to bf16 where the GPU rounds: at most 2^-7 relative per element
    assert rel(y, reference_linear(x, m)) < 8e-3


@cpu_only
def test_kernel_weights_pad_rank_to_power_of_two():
    m = layer("int4", 128, 32, torch.float32, 8, rank=24)
    kw = KernelWeights(m)
    assert kw.lora_down.shape == (32, 128) and kw.lora_up.shape == (32, 32)  # rank 24 -> 32
    assert torch.equal(kw.lora_down[:24], m.lora_down) and torch.all(kw.lora_down[24:] == 0)
    x = inputs(m, 20, 8, torch.float32)
    codes, scales_t, lora_act = quantize_input(x, m.smooth_inv, kw.lora_down, block_m=16)
    y = w4a4_gemm(codes, scales_t, m.qweight, kw.wscales_t, lora_act, kw.lora_up, m.bias, torch.float32, **SMALL)
    assert rel(y, reference_linear(x, m)) < 1e-6


# ---------------------------------------------------------------------------- GPU, FLUX shapes
FLUX_SHAPES = [(3072, 9216), (3072, 3072), (3072, 12288), (12288, 3072), (3072, 21504), (15360, 3072)]


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("k,n", FLUX_SHAPES)
@pytest.mark.parametrize("fmt", ["int4", "nvfp4"])
def test_gpu_kernels_match_reference_at_flux_shapes(k, n, fmt):
    from kernels import random_layer

    from svdquant.kernels import linear

    seed = int.from_bytes(os.urandom(2), "little")
    m = random_layer(k, n, fmt=fmt, seed=seed)
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(1000, k, generator=g) * 2).to("cuda", torch.bfloat16)
    y = linear(x, m)
    ref = reference_linear(x, m)
    assert torch.isfinite(y).all()
    # bf16 output rounding (2^-9) and the tf32 branch epilogue; measured ~2e-3
    assert rel(y, ref) < 1e-2, f"seed {seed}"


@gpu
@pytest.mark.gpu
def test_gpu_module_dispatch_uses_kernels_and_matches_reference():
    m = layer("int4", 256, 128, torch.bfloat16, 9).cuda()
    x = inputs(m, 300, 9, torch.bfloat16).cuda().reshape(3, 100, 256)
    y = m(x)
    os.environ["SVDQUANT_REFERENCE"] = "1"
    try:
        ref = m(x)
    finally:
        del os.environ["SVDQUANT_REFERENCE"]
    assert y.shape == (3, 100, 128)
    assert rel(y, ref) < 1e-2


@cpu_only
def test_kernels_run_loras_concatenated_onto_the_branch():
    m = layer("int4", 128, 48, torch.float32, 13)
    g = torch.Generator().manual_seed(13)
    m.add_adapter("a", torch.randn(8, 128, generator=g) * 0.1, torch.randn(48, 8, generator=g) * 0.1, 0.5)
    kw = KernelWeights(m)
    assert kw.lora_down.shape[0] == 64  # rank 32 + 8 = 40, padded to a power of two
    x = inputs(m, 20, 13, torch.float32)
    codes, scales_t, lora_act = quantize_input(x, m.smooth_inv, kw.lora_down, block_m=16)
    y = w4a4_gemm(codes, scales_t, m.qweight, kw.wscales_t, lora_act, kw.lora_up, m.bias, torch.float32, **SMALL)
    assert rel(y, reference_linear(x, m)) < 1e-6
    m.set_adapter_strength("a", 2.0)
    assert m.branch_version != kw.version  # the kernels' cached copy is rebuilt on the next call


@gpu
@pytest.mark.gpu
def test_gpu_lora_through_kernels():
    from kernels import random_layer

    from svdquant.kernels import linear

    m = random_layer(3072, 3072, seed=5)
    x = torch.randn(512, 3072, device="cuda", dtype=torch.bfloat16)
    m.add_adapter("l", torch.randn(64, 3072, device="cuda", dtype=torch.bfloat16) * 0.01,
                  torch.randn(3072, 64, device="cuda", dtype=torch.bfloat16) * 0.01, 0.8)
    assert rel(linear(x, m), reference_linear(x, m)) < 1e-2
