"""The Hopper INT8 GEMM in the CuTe DSL (svdquant/kernels/cutlass_gemm.py, cutlass_launch.py).

On the CPU: every epilogue variant the engine launches compiles for sm_90a (symbolic M, N, K, no GPU), into int8
wgmmas without spills, and the register → coordinate mappings its epilogue relies on hold for every consumer
thread. On an H100 / H200: against the torch reference at FLUX.1's shapes and at shapes that end inside a tile,
and through a quantized layer, eager, compiled and in a CUDA graph."""

from __future__ import annotations

import importlib.util
import os
import re
import sys
from pathlib import Path

import pytest
import torch

if importlib.util.find_spec("cutlass") is None:
    pytest.skip("nvidia-cutlass-dsl is not installed", allow_module_level=True)
if not torch.cuda.is_available():  # read when the DSL is imported: without a GPU it would target sm_100a
    os.environ.setdefault("CUTE_DSL_ARCH", "sm_90a")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

# the DSL's notices about its own helpers (the tile scheduler moves to its examples after 4.8; pyproject pins <4.9)
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

VARIANTS = [  # (out, rank, bias, gelu): what the engine launches
    ("bf16", 32, "bf16", False),  # FLUX.1's q/k/v, out projections
    ("bf16", 32, "bf16", True),  # an MLP's up projection with its GELU (svdquant.fuse(gelu=False), other models)
    ("fp16", 32, "fp16", True),  # fp16 models (their branch's up projection copied to bf16 by the runner)
    ("bf16", 0, None, False),  # no branch, no bias
    ("bf16", 64, None, False),  # a branch widened by a LoRA (rank 32 + 32, copied to bf16 by the runner)
    ("bf16", 16, "bf16", False),  # a rank-16 branch
    # a stacked group whose members carry LoRAs (32 shared + 4 x 16, padded): 128 x 128 tiles (cutlass_launch.plan);
    # the engine takes it since this test passed on an H200 (NOTES-GPU.md, session 23)
    ("bf16", 128, "bf16", False),
]


@pytest.fixture(scope="module")
def dsl():
    import cutlass_int8_gemm as bench

    return bench.load_dsl(compile_only=True), bench


def _fake_compile(dsl, capfd, out, rank, bias, gelu, tile=(128, 256), raster_m=True, swizzle=1):
    (cutlass, cute, kern), bench = dsl
    gemm = kern.Int8GemmSm90(tile, (1, 1), out, rank, bias=bias, gelu=gelu, raster_m=raster_m, swizzle=swizzle)
    capfd.readouterr()
    compiled = bench.compile_fake(cutlass, cute, gemm, bench.SM90_SMS)
    return compiled.__ptx__ or "", bench.ptxas_facts(capfd.readouterr().err)  # ptxas's report


@pytest.mark.parametrize("out,rank,bias,gelu", VARIANTS)
def test_every_epilogue_variant_compiles_for_sm90_into_int8_wgmma_without_spills(dsl, capfd, out, rank, bias,
                                                                                 gelu):
    from svdquant.kernels.cutlass_launch import plan

    tile, raster_m, swizzle = plan(4096, 3072, 3072, 132, rank)
    ptx, facts = _fake_compile(dsl, capfd, out, rank, bias, gelu, tile, raster_m, swizzle)
    assert f"wgmma.mma_async.sync.aligned.m64n{tile[1]}k32.satfinite.s32.s8.s8" in ptx
    assert ("f32.bf16.bf16" in ptx) == bool(rank)  # the branch's own wgmma, only with a branch
    assert facts["spill_bytes"] == 0, facts
    assert ("tanh" in ptx) == gelu
    # the bias is read as a 16-bit vector only where there is one
    assert bool(re.search(r"ld\.global[\w.]*\.b16|ld\.global[\w.]*\.u16", ptx)) == bool(bias)


@pytest.mark.parametrize("tile,raster_m,swizzle", [((128, 128), True, 1), ((128, 256), False, 1), ((128, 256), True, 4)])
@pytest.mark.parametrize("out,rank,bias,gelu", VARIANTS[:2])
def test_every_plan_the_launcher_picks_compiles(dsl, capfd, out, rank, bias, gelu, tile, raster_m, swizzle):
    ptx, facts = _fake_compile(dsl, capfd, out, rank, bias, gelu, tile, raster_m, swizzle)
    assert f"wgmma.mma_async.sync.aligned.m64n{tile[1]}k32.satfinite.s32.s8.s8" in ptx
    assert facts["spill_bytes"] == 0, facts


@pytest.mark.skipif(importlib.util.find_spec("tvm_ffi") is None, reason="apache-tvm-ffi is not installed")
def test_the_tvm_ffi_entry_takes_torch_tensors_and_checks_them(dsl):
    (cutlass, cute, kern), bench = dsl
    gemm = kern.Int8GemmSm90((128, 256), (1, 1), "bf16", 32, bias="bf16")
    fn = bench.compile_fake(cutlass, cute, gemm, bench.SM90_SMS, tvm_ffi=True)
    i8, bf = torch.int8, torch.bfloat16
    args = [torch.zeros(256, 128, dtype=i8), torch.zeros(256, 128, dtype=i8), torch.ones(256), torch.ones(256),
            torch.zeros(256, 256, dtype=bf), torch.zeros(256, 32, dtype=bf), torch.zeros(256, 32, dtype=bf),
            torch.zeros(256, dtype=bf)]
    with pytest.raises(ValueError, match="expected device_type=cuda"):  # torch tensors go in; CPU ones are refused
        fn(*args)
    with pytest.raises(TypeError, match="argument #0"):  # so is anything not a tensor where one is expected
        fn(None, *args[1:])


@pytest.mark.parametrize("bn", [256, 128])
def test_the_epilogue_mappings_hold_for_every_consumer_thread(dsl, bn):
    (cutlass, cute, kern), bench = dsl
    assert bench.epilogue_mapping_check(cutlass, cute, kern, 128, bn, "bf16") == []


def test_the_kernel_refuses_what_it_cannot_compute(dsl):
    (_, _, kern), _ = dsl
    with pytest.raises(ValueError, match="a 16-bit one with a branch"):
        kern.Int8GemmSm90(out="int32", rank=32)
    with pytest.raises(ValueError, match="rank 40"):
        kern.Int8GemmSm90(rank=40)
    with pytest.raises(ValueError, match="rank 144"):
        kern.Int8GemmSm90(rank=144)
    with pytest.raises(ValueError, match="bias 'fp32'"):
        kern.Int8GemmSm90(bias="fp32")
    assert kern.Int8GemmSm90().problem_error(4080, 3072, 3072) is None  # partial tiles: TMA clips them
    assert "multiple of 16" in kern.Int8GemmSm90().problem_error(4096, 3072, 3000)
    # a swizzled walk rounds its groups up: the epilogue of a tile past the end would read scales out of bounds
    assert kern.Int8GemmSm90(swizzle=4).problem_error(4096, 3072, 3072) is None  # 12 N tiles: 3 groups
    assert "N=2560 is not a whole number of groups" in kern.Int8GemmSm90(swizzle=4).problem_error(4096, 2560, 3072)
    assert "M=4608" in kern.Int8GemmSm90(swizzle=8, raster_m=False).problem_error(4608, 3072, 3072)  # 36 M tiles
    # so does a cluster's CTA past the end (the probe's 2 x 1 clusters at an odd number of M tiles)
    assert "not a whole number of clusters" in kern.Int8GemmSm90(cluster_mn=(2, 1)).problem_error(4480, 3072, 3072)


def test_the_ab_switch_turns_the_kernel_off(monkeypatch):
    from svdquant.kernels import cutlass_launch as cl

    monkeypatch.setattr(cl, "_STATE", {})
    assert cl.available()  # the DSL imports here (the module is skipped where it does not)
    monkeypatch.setattr(cl, "ENABLED", False)  # quality.py --gemm triton: the runners then take Triton's GEMM
    assert not cl.available()


def test_the_launch_plan():
    from svdquant.kernels.cutlass_launch import plan

    big, small = (128, 256), (128, 128)
    # FLUX.1 at 1024², batch 1: A (4,096 x 3,072 int8, 12.6 MB) stays in L2, so the walk goes down M
    assert plan(4096, 9216, 3072, 132) == (big, True, 1)
    # the text stream's 512 tokens: 48 tiles of 128 x 256 for 132 SMs, 96 of 128 x 128
    assert plan(512, 3072, 3072, 132) == (small, True, 1)
    assert plan(512, 21504, 3072, 132) == (big, True, 1)  # 336 tiles: 3 waves either way, the big tile's rate wins
    # batch 4: A (16,384 x 3,072, 50 MB) does not fit L2 but W (9.4 MB) does: along N, W stays
    assert plan(16384, 3072, 3072, 132) == (big, False, 1)
    # neither fits: down M in groups of 4 N tiles, A swept once per group instead of once per N tile
    assert plan(16384, 12288, 3072, 132) == (big, True, 4)
    assert plan(16384, 12800, 3072, 132) == (big, True, 1)  # 50 N tiles: no whole groups of 4
    # a rank-128 branch's operands leave 128 x 256 tiles 2 pipeline stages; 128 x 128 keeps 4
    assert plan(4096, 9216, 3072, 132, 128) == (small, True, 1)


def test_the_last_rows_take_a_second_launch_where_the_last_wave_would_idle():
    from svdquant.kernels.cutlass_launch import SPLIT_LAUNCH_K, SPLIT_MIN_GAIN, launches, plan

    big, small = (128, 256), (128, 128)
    # FLUX's single-block proj_out: 432 big tiles, 3.27 waves on 132 SMs; 33 M tiles fill 3 waves, the last 3 run
    # as 72 small tiles in one wave
    assert launches(4608, 3072, 15360, 132, 32) == ((4224, big, True, 4), (384, small, True, 1))
    assert launches(4608, 3072, 3072, 132, 32) == ((4224, big, True, 1), (384, small, True, 1))
    assert launches(4608, 3072, 3072, 132, 32, split=False) == ((4608, *plan(4608, 3072, 3072, 132, 32)),)
    # a partial last tile goes with the tail: 4,600 rows are 36 M tiles too
    assert launches(4600, 3072, 12288, 132) == ((4224, big, True, 4), (376, small, True, 1))
    # a gain under SPLIT_MIN_GAIN is not taken: 4,608 × 12,288 would save a fifth of a wave of 13 (1.5 %), as
    # would batch 4's 18,432 rows at N = 3,072 (2.6 %: 0.36 of 14 waves)
    assert SPLIT_LAUNCH_K / 3072 < 1 - 0.5 / 0.85 and 0.2 / 13 < SPLIT_MIN_GAIN < 0.05
    assert len(launches(4608, 12288, 3072, 132)) == 1 and len(launches(18432, 3072, 15360, 132)) == 1
    # the second launch's start outweighs the gain at a short K
    assert len(launches(4608, 3072, 512, 132)) == 1
    # nearly whole last waves, and products of one wave or less, stay one launch
    assert launches(4096, 3072, 3072, 132) == ((4096, *plan(4096, 3072, 3072, 132)),)  # 384 tiles, 2.91 waves
    assert len(launches(512, 3072, 3072, 132)) == 1 and len(launches(4096, 21504, 3072, 132)) == 1
    assert len(launches(4608, 3072, 3072, 132, 128)) == 1  # a rank-128 branch runs small tiles throughout
    for m, n, k in [(4608, 3072, 3072), (18432, 9216, 3072), (4600, 12288, 3072), (77, 1000, 1152)]:
        parts = launches(m, n, k, 132)
        assert sum(rows for rows, *_ in parts) == m and all(rows % 128 == 0 for rows, *_ in parts[:-1])


def test_what_the_launcher_takes():
    from svdquant.kernels import cutlass_launch as cl

    up = torch.zeros(3072, 32, dtype=torch.bfloat16)
    b = torch.zeros(3072, dtype=torch.bfloat16)
    assert cl.takes(torch.bfloat16, up, b, 4096, 3072, 3072) and cl.takes(torch.float16, None, None, 512, 3072, 3072)
    assert not cl.takes(torch.float32, up, b, 4096, 3072, 3072)  # fp32 outputs: the Triton kernel
    assert not cl.takes(torch.bfloat16, up, b.float(), 4096, 3072, 3072)
    assert not cl.takes(torch.bfloat16, up.float(), b, 4096, 3072, 3072)  # an fp32 branch (stacked LoRAs)
    assert cl.takes(torch.bfloat16, torch.zeros(3072, 128, dtype=torch.bfloat16), b, 4096, 3072, 3072)
    assert not cl.takes(torch.bfloat16, torch.zeros(3072, 256, dtype=torch.bfloat16), b, 4096, 3072, 3072)
    assert not cl.takes(torch.bfloat16, torch.zeros(3072, 48, dtype=torch.bfloat16), b, 4096, 3072, 3072)
    assert cl.takes(torch.bfloat16, up[:3000], b[:3000], 4080, 3000, 3072)  # partial M and N tiles
    assert not cl.takes(torch.bfloat16, up, b, 4096, 3072, 3008)  # a partial k-tile
    assert not cl.takes(torch.bfloat16, up[:3004], b[:3004], 4096, 3004, 3072)  # Y's rows not 16-byte aligned
    assert cl.pad_to(torch.ones(300), 256).tolist() == [1.0] * 300 + [0.0] * 212
    t = torch.ones(512)
    assert cl.pad_to(t, 256) is t


@pytest.mark.skipif(torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1",
                    reason="the Triton interpreter runs the activation kernel on CPU machines")
@pytest.mark.parametrize("dtype,rank,mode,taken", [
    (torch.bfloat16, 32, "speed", True), (torch.bfloat16, 32, "memory", True), (torch.bfloat16, 32, "in-graph", True),
    (torch.bfloat16, 32, "lora", True), (torch.float16, 32, "speed", True), (torch.float32, 32, "speed", False),
    (torch.bfloat16, 128, "speed", True)])
def test_a_layer_routes_to_the_sm90_gemm_where_it_applies(monkeypatch, dtype, rank, mode, taken):
    """The dispatch alone (the kernel itself runs only on an H100 / H200, tested there): an Int8Runner built for
    sm_90 hands the GEMM to ``int8_gemm_sm90`` for bf16 layers of a branch it takes, with the activation pass's
    ``X·L1ᵀ`` written in bf16, and to the Triton kernel otherwise; the step equals the Triton path's within the
    bf16 rounding of the branch. Memory mode (4-bit codes expanded per call), activations quantized in the compiled
    graph, and an fp32 LoRA branch (the runner keeps a bf16 copy of its up projection) take it too. Here
    ``int8_gemm_sm90`` is swapped for its semantics in torch, recording calls, and the activation pass is watched
    for the dtype it writes ``X·L1ᵀ`` in."""
    import test_kernels as tk

    from svdquant import kernels
    from svdquant.ops.runners import Int8Runner

    calls, written = [], []

    def sm90_semantics(a, a_s, w, w_s, la, lu, bias, out_dtype, gelu=False):
        calls.append((la.dtype, lu.dtype))
        assert w_s.shape[0] % 256 == 0 and (bias is None or bias.shape[0] % 256 == 0)  # padded once, at load
        w_s, bias = w_s[:w.shape[0]], None if bias is None else bias[:w.shape[0]]
        return _reference(a, a_s, w, w_s, la, lu, bias, gelu, out_dtype)

    quantize = kernels.quantize_activations

    def watched(*args, **kw):
        out = quantize(*args, **kw)
        written.append(out[2].dtype)
        return out

    monkeypatch.setattr(kernels, "int8_gemm_sm90", sm90_semantics)
    monkeypatch.setattr(kernels, "quantize_activations", watched)
    m = tk.layer("int4", 256, 192, dtype, 3, rank=rank)  # a branch of rank 128 fits
    assert m.branch()[0].shape[0] == rank
    if mode == "memory":
        m.weight_mode = "memory"
    if mode == "lora":  # an adapter's fp32 up projection widens the branch to 32 + 16, padded to 64
        m.add_adapter("l", torch.randn(16, 256) * 0.1, torch.randn(192, 16) * 0.1, 0.7)
        assert m.branch()[1].dtype == torch.float32
    x = tk.inputs(256, 33, 3, dtype)
    hopper = Int8Runner(m, kernels, tma=False, num_sms=0, sm90=True)
    if mode == "in-graph":  # the compiled graph quantizes (torch ops) and calls the GEMM op alone
        hopper.act_in_graph = True
        torch._dynamo.reset()
        got = torch.compile(hopper, backend="aot_eager", fullgraph=True)(x)
    else:
        got = hopper(x)
    assert calls == ([(torch.bfloat16, torch.bfloat16)] if taken else [])
    assert written == ([] if mode == "in-graph" else [torch.bfloat16 if taken else torch.float32])
    want = Int8Runner(m, kernels, tma=False, num_sms=0)(x)
    err = float((got.float() - want.float()).norm() / want.float().norm())
    assert err < (1e-2 if taken else 1e-6), err


# ---------------------------------------------------------------- on an H100 / H200


def _hopper():
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


gpu = pytest.mark.skipif(not _hopper(), reason="needs an H100 / H200 (sm_90)")


def _reference(a, a_s, w, w_s, la, lu, bias, gelu, out_dtype):
    y = (a.float() @ w.float().T) * a_s[:, None] * w_s[None, :]
    if la is not None:
        y = y + la.float() @ lu.float().T
    if bias is not None:
        y = y + bias.float()
    if gelu:
        y = torch.nn.functional.gelu(y, approximate="tanh")
    return y.to(out_dtype)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("m,k,n", [  # every plan: 128 x 256 / x 128, down M / along N, groups of 4 (cutlass_launch.plan)
    (4096, 3072, 9216), (4608, 15360, 3072), (512, 3072, 12288), (256, 1152, 1280), (16384, 3072, 3072),
    (4080, 3072, 3072), (77, 1152, 1000)])  # the last two: partial tiles
@pytest.mark.parametrize("out,rank,bias,gelu", VARIANTS)
def test_gpu_matches_the_reference(m, k, n, out, rank, bias, gelu):
    from svdquant.kernels.cutlass_launch import int8_gemm_sm90

    args = problem(m, k, n, rank, bias, seed=m * 7 + n)
    y = int8_gemm_sm90(*args, DTYPES[out], gelu=gelu)
    ref = _reference(*args, gelu, DTYPES[out])
    err = (y.float() - ref.float()).abs().max() / ref.float().abs().max()
    assert torch.isfinite(y).all() and err < 1e-2, float(err)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("m,k,n", [(4608, 3072, 3072), (4608, 15360, 3072), (4600, 12288, 3072)])
@pytest.mark.parametrize("out,rank,bias,gelu", VARIANTS[:4])
def test_gpu_two_launches_match_the_reference_and_one_launch(monkeypatch, m, k, n, out, rank, bias, gelu):
    """The last rows' second launch (cutlass_launch.launches; the last shape's last tile partial): row slices of
    A, the scales, the branch's activations and Y, each launch writing its own rows."""
    from svdquant.kernels import cutlass_launch as cl

    assert len(cl.launches(m, n, k, torch.cuda.get_device_properties(0).multi_processor_count, rank)) == 2
    args = problem(m, k, n, rank, bias, seed=m * 5 + n)
    monkeypatch.setattr(cl, "SPLIT_TAIL", True)
    two = cl.int8_gemm_sm90(*args, DTYPES[out], gelu=gelu)
    monkeypatch.setattr(cl, "SPLIT_TAIL", False)
    one = cl.int8_gemm_sm90(*args, DTYPES[out], gelu=gelu)
    ref = _reference(*args, gelu, DTYPES[out])
    err = (two.float() - ref.float()).abs().max() / ref.float().abs().max()
    assert torch.isfinite(two).all() and err < 1e-2, float(err)
    # the int32 products are exact and the epilogue's arithmetic per element is the tile's either way
    assert float((two.float() - one.float()).abs().max() / ref.float().abs().max()) < 1e-3


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def problem(m, k, n, rank, bias, seed):
    """Random int8 operands, fp32 scales, a bf16 branch of ``rank`` over ~5 % of the main term and a ``bias``
    (dtype name or None) on the GPU: ``(a, a_scale, w, w_scale, lora_act, lora_up, bias)``."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    a = torch.randint(-127, 128, (m, k), device="cuda", dtype=torch.int8, generator=g)
    w = torch.randint(-126, 127, (n, k), device="cuda", dtype=torch.int8, generator=g)
    a_s = torch.rand(m, device="cuda", generator=g) * 1e-2 + 1e-3
    w_s = torch.rand(n, device="cuda", generator=g) * 1e-3 + 1e-4
    la = torch.randn(m, rank, device="cuda", generator=g).bfloat16() if rank else None
    lu = (torch.randn(n, rank, device="cuda", generator=g) * 0.05).bfloat16() if rank else None
    b = torch.randn(n, device="cuda", generator=g).to(DTYPES[bias]) if bias else None
    return a, a_s, w, w_s, la, lu, b


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("launch", ["views", "tvm-ffi"])
@pytest.mark.parametrize("post_gelu", [False, True])
def test_gpu_a_layer_on_the_sm90_gemm_eager_compiled_and_captured(monkeypatch, post_gelu, launch):
    """A bf16 int4 layer of whole tiles on the CUTLASS GEMM (its compiled variant appears) equals the Triton
    GEMM's output within bf16's rounding of the branch, eager, under torch.compile and in a CUDA graph (whose
    capture runs on a side stream: the launch must follow torch's current stream), launched through DLPack views
    and through apache-tvm-ffi."""
    import test_kernels as tk

    from svdquant import kernels
    from svdquant.kernels import cutlass_launch
    from svdquant.ops.runners import Int8Runner

    if launch == "tvm-ffi" and importlib.util.find_spec("tvm_ffi") is None:
        pytest.skip("apache-tvm-ffi is not installed")
    monkeypatch.setattr(cutlass_launch, "TVM_FFI", launch == "tvm-ffi")
    monkeypatch.setattr(cutlass_launch, "_STATE", {})  # compiled afresh for this launch

    m = tk.layer("int4", 1024, 512, torch.bfloat16, 3).cuda()
    m.output_gelu = post_gelu
    x = tk.inputs(1024, 256, 3, torch.bfloat16).cuda()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    hopper = Int8Runner(m, kernels, tma=True, num_sms=sms, sm90=True)
    plain = Int8Runner(m, kernels, tma=True, num_sms=sms)
    launched = []

    def counted(*args, **kw):
        y = cutlass_launch.int8_gemm_sm90(*args, **kw)
        launched.append(y is not None)
        return y

    monkeypatch.setattr(kernels, "int8_gemm_sm90", counted)
    with torch.no_grad():
        eager = hopper(x).float()
        assert launched == [True]
        assert cutlass_launch._STATE["ffi"] == (launch == "tvm-ffi")  # the launch asked for is the one that ran
        want = plain(x).float()
        assert launched == [True]
        assert float((eager - want).norm() / want.norm()) < 1e-2
        torch._dynamo.reset()
        compiled = torch.compile(hopper, fullgraph=True)
        assert float((compiled(x).float() - eager).norm() / eager.norm()) < 1e-3
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            compiled(x)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = compiled(x)
        assert launched == [True] * len(launched) and len(launched) >= 4  # compiled, warm-up, capture: the kernel
        x.mul_(0.5)  # new inputs in place: the replay must compute them, not repeat the capture's output
        graph.replay()
        torch.cuda.synchronize()
        again = hopper(x).float()
    assert float((captured.float() - again).norm() / again.norm()) < 1e-3
