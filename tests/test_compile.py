"""torch.compile captures a whole quantized step: the groundwork of the Hopper step issue (fused blocks,
custom ops). On the CPU every layer runs the torch reference; the test asserts dynamo sees one graph with no
break (the runners' forward does nothing dynamo cannot trace: no syncs, no environment reads, no state changes)
and that the compiled step computes what the eager one does (bit for bit where the compiled graph calls the
custom op, whose implementation is the eager path's function: the same ops on the same shapes)."""

from __future__ import annotations

import tiny_models as tm  # first: sets HF_HUB_OFFLINE before diffusers is imported

import pytest
import torch

import svdquant


@pytest.fixture(scope="module")
def quantized_flux():
    return tm.quantized_flux()


def test_a_quantized_flux_step_is_one_graph(quantized_flux):
    model, inputs = quantized_flux
    torch._dynamo.reset()
    exp = torch._dynamo.explain(model)(**inputs)
    assert exp.graph_break_count == 0, [str(r.reason) for r in exp.break_reasons]
    assert exp.graph_count == 1


def test_compiled_step_equals_eager(quantized_flux):
    model, inputs = quantized_flux
    torch._dynamo.reset()
    with torch.no_grad():
        eager = model(**inputs)[0]
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)(**inputs)[0]
    assert torch.allclose(compiled, eager, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("modulations", [False, True])
def test_a_fused_flux_step_is_one_graph(quantized_flux, modulations):
    """svdquant.fuse's structures (stacked q/k/v, the single block's q/k/v + MLP through its own forward, the GELU
    moved into fc1 and into the single block's stack, its proj_out reading two parts; the adaLN modulations
    computed ahead through the embedding's forward hook and the norms' forwards) trace whole too."""
    import copy

    model, inputs = quantized_flux
    model = copy.deepcopy(model)
    assert svdquant.fuse(model, modulations=modulations) == {"qkv": 2, "gelu": 3, "compiled_activations": 0,
                                                            "modulations": 3 if modulations else 0, "norm_rope": 0}
    torch._dynamo.reset()
    exp = torch._dynamo.explain(model)(**inputs)
    assert exp.graph_break_count == 0, [str(r.reason) for r in exp.break_reasons]
    with torch.no_grad():
        eager = model(**inputs)[0]
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)(**inputs)[0]
    assert torch.allclose(compiled, eager, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ the kernels as custom ops (interpreter)
# On a GPU the runners call torch.ops.svdquant.* under torch.compile. Here the same ops run the Triton
# kernels in the interpreter on CPU tensors, small shapes: opcheck tests the schema and that the fake
# implementation agrees with the real one; the compiled runner must equal the eager runner and the reference.
triton_interpreted = pytest.mark.skipif(torch.cuda.is_available() or __import__("os").environ.get(
    "TRITON_INTERPRET") != "1", reason="the interpreter runs the kernels on CPU machines")


def _layer(recipe, k=128, n=48, post_gelu=False, seed=3):
    import test_kernels as tk

    return tk.layer(recipe, k, n, torch.float32, seed, post_gelu=post_gelu)


@triton_interpreted
@pytest.mark.parametrize("recipe,mode", [("int4", "speed"), ("w4a4", "memory")])
def test_int8_runner_compiles_to_the_custom_op_and_matches_eager(recipe, mode):
    from svdquant import kernels
    from svdquant.ops.runners import Int8Runner, ReferenceRunner

    m = _layer(recipe, post_gelu=64 if recipe == "w4a4" else False)
    m.add_adapter("l", torch.randn(8, 128) * 0.1, torch.randn(48, 8) * 0.1, 0.7)
    m.weight_mode = mode
    runner = Int8Runner(m, kernels, tma=False, num_sms=0)
    assert (runner.w is None) == (mode == "memory")
    x = torch.randn(33, 128) * 2
    eager = runner(x)
    torch._dynamo.reset()
    exp = torch._dynamo.explain(runner)(x)
    assert exp.graph_break_count == 0 and exp.graph_count == 1
    assert "svdquant.int8_linear" in str(exp.graphs[0].graph)
    compiled = torch.compile(runner, backend="aot_eager", fullgraph=True)(x)
    assert torch.equal(compiled, eager)
    ref = ReferenceRunner(m)(x)
    assert float((eager - ref).norm() / ref.norm()) < 1e-6


@triton_interpreted
def test_a_memory_mode_stack_compiles_to_one_expand_and_one_linear_and_matches_eager():
    """q/k/v stacked in memory mode: the graph expands the layers' codes into one operand (``expand_rows``, its
    rows exactly each layer's own expansion) and runs one ``int8_linear``, as eager does."""
    from svdquant import kernels
    from svdquant.modules import FusedSVDQLinear
    from svdquant.ops.runners import Int8Runner

    layers = [_layer("int4", n=n, seed=3) for n in (48, 32)]
    with torch.no_grad():  # one shared-input group: one λ, one down projection
        layers[1].smooth_inv.copy_(layers[0].smooth_inv)
        layers[1].lora_down.copy_(layers[0].lora_down)
    for m in layers:
        m.weight_mode = "memory"
        m._runner = Int8Runner(m, kernels, tma=False, num_sms=0)
    runner = FusedSVDQLinear(layers)._runner
    assert runner is not None and runner.parts is not None
    w = torch.ops.svdquant.expand_rows(*runner.parts, 64)
    assert torch.equal(w, torch.cat([kernels.expand_int4m(m.packed_weight(), m.wmult) for m in layers]))
    x = torch.randn(33, 128) * 2
    eager = runner(x)
    torch._dynamo.reset()
    graph = str(torch._dynamo.explain(runner)(x).graphs[0].graph)
    assert graph.count("svdquant.expand_rows") == 1 and graph.count("svdquant.int8_linear") == 1
    assert torch.equal(torch.compile(runner, backend="aot_eager", fullgraph=True)(x), eager)
    apart = torch.cat([m(x) for m in layers], -1)
    assert float((eager - apart).norm() / apart.norm()) < 1e-5  # the fp32 branch summed in another order
    fused = layers[0].stacked_in  # the module, with its check for offload hooks on the members: still one graph
    explained = torch._dynamo.explain(fused)(x)
    assert explained.graph_break_count == 0 and "svdquant.expand_rows" in str(explained.graphs[0].graph)


@triton_interpreted
def test_inductor_hands_an_input_part_to_the_op_where_it_lies():
    """A layer fed ``(head, tail=y[:, 64:])`` under inductor: the op receives the slice of the producer's output
    as a view (``reinterpret_tensor`` of that buffer, its row stride 192), and no buffer as wide as the layer's
    input (the concatenation) is made; compiled equals eager."""
    import re

    from torch._inductor.utils import run_and_get_code

    from svdquant import kernels
    from svdquant.ops.runners import Int8Runner

    producer, consumer = _layer("int4", k=128, n=192), _layer("int4", k=192, n=48, seed=4)
    for m in (producer, consumer):
        m._runner = Int8Runner(m, kernels, tma=False, num_sms=0)

    def step(x, h):
        return consumer(h * 2, tail=producer(x)[:, 64:])

    x, h = torch.randn(33, 128), torch.randn(33, 64)
    eager = step(x, h)
    torch._dynamo.reset()
    out, (code,) = run_and_get_code(torch.compile(step, fullgraph=True), x, h)
    calls = [line for line in code.splitlines() if "svdquant.int8_linear.default(" in line]
    assert len(calls) == 2 and re.search(r"reinterpret_tensor\(buf\d+, \(33, 128\), \(192, 1\), 64\)", calls[1])
    assert "(33, 192), (192, 1)" not in "".join(l for l in code.splitlines() if "empty_strided" in l)
    assert float((out - eager).norm() / eager.norm()) < 1e-6


@triton_interpreted
@pytest.mark.parametrize("k", [128, 96])  # 96: padded to the 64-group as the kernel pads
def test_int8_activations_in_torch_ops_equal_the_kernel(k):
    """The A8 pass that inductor fuses into the producer gives the activation kernel's codes and scales bit for bit."""
    from svdquant import kernels
    from svdquant.ops.reference import int8_activations

    g = torch.Generator().manual_seed(k)
    x = torch.randn(37, k, generator=g) * 3
    x[5] = 0  # an all-zero token: scale 0, codes 0
    sinv = torch.rand(k, generator=g) + 0.5
    down = torch.randn(32, k, generator=g) * 0.1
    kp = k + (-k) % 64
    v, s, la = int8_activations(x, sinv, down, kp)
    kv, ks, kla = kernels.quantize_activations(x, sinv, down)
    assert v.shape == (37, kp) and v.dtype == torch.int8
    assert torch.equal(v, kv) and torch.equal(s, ks)
    assert float(s[5]) == 0 and not v[5].any()
    assert torch.allclose(la, kla, rtol=1e-5, atol=1e-5)


@triton_interpreted
@pytest.mark.parametrize("mode", ["speed", "memory"])
def test_compiled_activations_run_the_gemm_op_and_match_eager(mode):
    """set_compiled_activations: under compile the graph holds the torch-op quantization and the GEMM op (no
    int8_linear), eager is untouched, and both compute the same layer."""
    from svdquant import kernels
    from svdquant.ops.runners import Int8Runner, ReferenceRunner

    m = _layer("int4")
    m.weight_mode = mode
    m.set_compiled_activations(True)
    runner = Int8Runner(m, kernels, tma=False, num_sms=0)
    assert runner.act_in_graph
    x = torch.randn(33, 128) * 2
    eager = runner(x)
    torch._dynamo.reset()
    exp = torch._dynamo.explain(runner)(x)
    assert exp.graph_break_count == 0 and exp.graph_count == 1
    graph = str(exp.graphs[0].graph)
    assert "svdquant.int8_gemm" in graph and "int8_linear" not in graph
    compiled = torch.compile(runner, backend="aot_eager", fullgraph=True)(x)
    assert float((compiled - eager).norm() / eager.norm()) < 1e-6
    ref = ReferenceRunner(m)(x)
    assert float((compiled - ref).norm() / ref.norm()) < 1e-6
    m.set_compiled_activations(False)  # what a runner built before the switch follows: its own flag
    assert Int8Runner(m, kernels, tma=False, num_sms=0).act_in_graph is False


@triton_interpreted
def test_compiled_activations_take_an_input_in_two_parts_with_its_gelu():
    """The compiled-activations path (the GELU and the concatenation in torch ops for inductor) with an input GELU
    from channel 64 and the input as two parts: compiled equals eager (the kernels) and the reference layer."""
    from svdquant import kernels
    from svdquant.ops.reference import gelu_columns
    from svdquant.ops.runners import Int8Runner, ReferenceRunner

    m = _layer("int4")
    m.set_compiled_activations(True)
    m.set_input_gelu(64)
    runner = Int8Runner(m, kernels, tma=False, num_sms=0)
    x = torch.randn(33, 128) * 2
    eager = runner.call_concat(x[:, :64], x[:, 64:])
    torch._dynamo.reset()
    compiled = torch.compile(runner.call_concat, backend="aot_eager", fullgraph=True)(x[:, :64], x[:, 64:])
    ref = ReferenceRunner(m)(gelu_columns(x, None, 64))
    assert float((compiled - eager).norm() / eager.norm()) < 1e-5
    assert float((compiled - ref).norm() / ref.norm()) < 1e-5
    assert float((ReferenceRunner(m)(x) - ref).norm() / ref.norm()) > 0.01  # the GELU did apply


@triton_interpreted
def test_compiled_activations_leave_a4_layers_to_the_kernel():
    from svdquant import kernels
    from svdquant.ops.runners import Int8Runner

    m = _layer("w4a4")
    m.set_compiled_activations(True)
    runner = Int8Runner(m, kernels, tma=False, num_sms=0)
    torch._dynamo.reset()
    exp = torch._dynamo.explain(runner)(torch.randn(9, 128))
    assert "svdquant.int8_linear" in str(exp.graphs[0].graph)


@triton_interpreted
def test_custom_ops_pass_opcheck():
    from svdquant.ops.branch import padded_branch

    m = _layer("int4")
    down, up = padded_branch(m)
    x = torch.randn(20, 128)
    w = m.packed_weight()
    torch.library.opcheck(torch.ops.svdquant.int8_linear.default,
                          (x, m.smooth_inv, down, up, m.bias, w, m.wmult, m.wscales.float(), False, 64, 0.0, 128,
                           False, 0, True))  # with the epilogue GELU
    torch.library.opcheck(torch.ops.svdquant.int8_linear.default,  # the input in two parts, the MLP's GELU in it
                          (x[:, :64], m.smooth_inv, down, up, m.bias, w, m.wmult, m.wscales.float(), False, 64, 0.0,
                           128, False, 0, False, x[:, 64:], 64))
    from svdquant.ops.reference import int8_activations

    a, a_s, la = int8_activations(x, m.smooth_inv, down, 128)
    torch.library.opcheck(torch.ops.svdquant.int8_gemm.default,
                          (a, a_s, la, up, m.bias, w, m.wmult, m.wscales.float(), 64, False, 0, False, torch.float32))
    f = _layer("w4a4-float", post_gelu=64)
    fdown, fup = padded_branch(f)
    torch.library.opcheck(torch.ops.svdquant.float_scales_linear.default,
                          (x, f.smooth_inv, fdown, fup, f.bias, f.qweight, f.wscales.t().contiguous(), None, None,
                           False, 64, f.act_shift, f.act_unsigned_from))
    other = _layer("int4", n=16, seed=4)
    torch.library.opcheck(torch.ops.svdquant.expand_rows.default,  # a memory-mode stack's INT8 operand
                          ([w, other.packed_weight()], [m.wmult, other.wmult], 64))
    wo = _layer("w4a16")
    torch.library.opcheck(torch.ops.svdquant.w4a16_linear.default, (x[:4], wo.qweight, wo.wscales, wo.bias, None, 64))
    torch.library.opcheck(torch.ops.svdquant.dequantize_int4.default,
                          (wo.qweight, wo.wscales, None, 128, torch.float32, 64))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("compiled_activations", [False, True])
def test_gpu_compiled_and_graph_captured_step_equals_eager(quantized_flux, compiled_activations):
    """The real kernels: torch.compile (inductor, fullgraph) and one CUDA graph over the whole step; with
    compiled_activations, inductor's own A8 quantization fused into the LayerNorm/modulation and GELU kernels
    (then the GELUs stay a pass of their own, which inductor fuses the quantization into)."""
    import copy

    model = copy.deepcopy(quantized_flux[0]).cuda()
    inputs = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in quantized_flux[1].items()}
    got = svdquant.fuse(model, gelu=not compiled_activations, compiled_activations=compiled_activations)
    # tiny FLUX: 1 double + 1 single block; 17 INT8-activation layers
    assert got == {"qkv": 2, "gelu": 0 if compiled_activations else 3,
                   "compiled_activations": 17 if compiled_activations else 0, "modulations": 0, "norm_rope": 0}
    torch._dynamo.reset()
    with torch.no_grad():
        eager = model(**inputs)[0]
        compiled = torch.compile(model, fullgraph=True)
        out = compiled(**inputs)[0]
        assert float((out - eager).norm() / eager.norm()) < 1e-4
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            compiled(**inputs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = compiled(**inputs)[0]
        graph.replay()
        torch.cuda.synchronize()
    assert float((captured - eager).norm() / eager.norm()) < 1e-4
