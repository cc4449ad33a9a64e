"""``svdquant.optimize`` (issue 22): fuse, attention backend, compiled blocks and CUDA graphs by default on CUDA.

On the CPU: the argument checks, the report, that nothing changes off CUDA, the graph cache's signatures and
output rebuilding, and what keeps a captured graph valid (a LoRA strength change rewrites the branch in place;
an added LoRA, a weight-mode change or fusing bumps the revision). On a GPU: the graphs themselves against eager."""

from __future__ import annotations

import copy

import tiny_models as tm  # first: sets HF_HUB_OFFLINE before diffusers is imported

import pytest
import torch

import svdquant
from svdquant.modules import SVDQLinear, revision
from svdquant.pipelines import graphs as G
from svdquant.pipelines.optimize import denoiser, optimize

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def quantized_flux():
    return tm.quantized_flux()


def test_optimize_does_nothing_off_cuda(quantized_flux):
    model = copy.deepcopy(quantized_flux[0])
    report = optimize(model)
    assert "not on a CUDA device" in report.skipped["all"] and "forward" not in model.__dict__
    assert not report.cuda_graphs and not report.compiled_blocks and not any(report.fused.values())
    assert "nothing to do" in str(report)


def test_optimize_fuses_flux_norm_rope_by_default(quantized_flux, monkeypatch):
    """Its fuse step gives every FLUX attention the q/k RMSNorm + RoPE op (a FLUX.1-dev step 2.4 ms faster on an
    H100, BENCHMARKS.md "Session 37"); fuse=False leaves diffusers' processors; unfuse gives them back. Past the CUDA
    check on the CPU, where the op is diffusers' math: the same output."""
    from svdquant.modules.norm_rope import NormRopeFluxAttnProcessor
    from svdquant.pipelines import optimize as O

    monkeypatch.setattr(O, "_device_of", lambda model: torch.device("cuda", 0))
    model, inputs = quantized_flux
    attentions = len(model.transformer_blocks) + len(model.single_transformer_blocks)
    off = dict(attention=None, compile=False, cuda_graphs=False, layers=False)
    plain = copy.deepcopy(model)
    assert not any(O.optimize(plain, fuse=False, **off).fused.values())
    assert not any(isinstance(m.processor, NormRopeFluxAttnProcessor) for m in plain.modules()
                   if hasattr(m, "processor"))
    model = copy.deepcopy(model)
    report = O.optimize(model, **off)
    assert report.fused["norm_rope"] == attentions and f"norm_rope {attentions}" in str(report)
    processors = [m.processor for m in model.modules() if hasattr(m, "processor")]
    assert sum(isinstance(p, NormRopeFluxAttnProcessor) for p in processors) == attentions
    with torch.no_grad():
        assert torch.equal(model(**inputs)[0], plain(**inputs)[0])
    assert svdquant.unfuse(model)["norm_rope"] == attentions


@pytest.mark.parametrize("kwargs, message", [
    (dict(fuse="yes"), "fuse='yes': use True or False"),
    (dict(compile=1), "compile=1: use True (each repeated block: the default), 'model' (the whole denoiser as one "
                      "graph: a faster step, a longer first call) or False"),
    (dict(compile="whole"), "compile='whole': use True (each repeated block"),
    (dict(attention="sage"), "attention='sage': use 'auto', None, 'int8', 'flash4' or one of"),
    (dict(max_graphs=0), "max_graphs=0: use a whole number >= 1"),
    (dict(max_graphs=True), "max_graphs=True: use a whole number >= 1"),
])
def test_optimize_argument_errors(quantized_flux, kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        optimize(quantized_flux[0], **kwargs)


def test_optimize_takes_pipelines_and_models_only():
    with pytest.raises(TypeError, match="takes a diffusers pipeline"):
        optimize("flux-int4")
    pipe = tm.build_flux_pipeline()
    assert denoiser(pipe) is pipe.transformer


def test_blocks_compile_with_coordinate_descent_tuning(quantized_flux, monkeypatch):
    """Every repeated block compiles with COMPILE_OPTIONS (2.6 ms of a FLUX.1-dev step on an H100, BENCHMARKS.md), and
    inductor takes them: a function compiled with them runs."""
    from svdquant.pipelines import compiling as O

    assert O.COMPILE_OPTIONS == {"coordinate_descent_tuning": True, "coordinate_descent_check_all_directions": True}
    assert torch.compile(lambda x: x * 2 + 1, options=O.COMPILE_OPTIONS)(torch.ones(3)).tolist() == [3.0] * 3
    seen = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: seen.append((type(self).__name__, kw)))
    model = copy.deepcopy(quantized_flux[0])
    assert O.compile_blocks(model) == len(seen) == len(model.transformer_blocks) + len(model.single_transformer_blocks)
    assert {name for name, _ in seen} == {"FluxTransformerBlock", "FluxSingleTransformerBlock"}
    assert all(kw == dict(dynamic=False, options=O.COMPILE_OPTIONS) for _, kw in seen)
    seen.clear()
    model = copy.deepcopy(quantized_flux[0])
    O.compile_blocks(model, options={})  # a benchmark's 16-bit baseline: inductor's defaults
    assert seen and all(kw == dict(dynamic=False, options={}) for _, kw in seen)


@pytest.fixture
def flux_step(monkeypatch):
    """benchmarks/flux_step.py as a module."""
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import flux_step

    return flux_step


@pytest.mark.parametrize("argv, message", [
    (["--inductor-options", "{x"], "--inductor-options: not JSON"),
    (["--inductor-options", "[1]"], "--inductor-options: a JSON object of inductor config names"),
    (["--inductor-options", '{"no_such_option": true}'], "a JSON object of inductor config names"),
    (["--inductor-options", "{}", "--inductor-defaults"], "and not with --inductor-defaults"),
])
def test_flux_steps_inductor_options_are_checked_first(argv, message, capsys, flux_step):
    """benchmarks/flux_step.py's A/B of our blocks' inductor options: a bad one is one line, before any model."""
    with pytest.raises(SystemExit) as e:
        flux_step.main(["--smoke", *argv])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_flux_steps_torchao_variants_need_torchao_first(monkeypatch, capsys, flux_step):
    """The fp8-torchao variants without torchao: one line before any model is built (not an ImportError after the
    variants before them ran)."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else real(name, *a))
    with pytest.raises(SystemExit) as e:
        flux_step.main(["--smoke", "--variants", "int4,fp8-torchao-compiled"])
    assert e.value.code == 2 and "the fp8-torchao variants need torchao: pip install torchao" in capsys.readouterr().err


@pytest.mark.parametrize("name, cls", [
    ("triton_red_fused_add_cat_int8_linear_mul_native_layer_norm_split_unsqueeze_view_1", "elementwise / rest"),
    ("triton_per_fused__to_copy_abs_amax_int8_gemm_mul_3", "elementwise / rest"),
    ("kernel_cutlass_kernel_svdquantkernelscutlass_gemmInt8GemmSm90_object_at_0x7f", "INT8 GEMM (CUTLASS)"),
    ("int8_gemm_kernel", "INT8 GEMM (Triton)"), ("activation_stats_kernel", "activation pass"),
    ("w4a16_gemv_kernel", "adaLN W4A16"), ("w4a16_sum_kernel", "adaLN W4A16"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x128x128_4x1x1", "attention"),
    ("nvjet_tst_128x256_64x4_2x1_v_bz_coopA_TNT", "other GEMM (cuBLAS)"),
])
def test_flux_steps_profile_classes(name, cls, flux_step):
    """Known answers: inductor's kernels count as elementwise even where their names carry one of our ops' (an
    int4-act run once put 16.9 ms of them in "INT8 GEMM (Triton)"), ours by their own names."""
    assert flux_step.kernel_class(name) == cls


def test_signature_and_rebuild():
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    with pytest.raises(G._Unsupported):  # a CPU tensor
        G.signature((torch.zeros(2),))
    with pytest.raises(G._Unsupported):
        G.signature({"x": object()})
    assert G.signature({"b": None, "a": (1, 2.5, "s")}) == G.signature({"a": (1, 2.5, "s"), "b": None})
    assert G.signature({"a": 1}) != G.signature({"a": 2})
    out = Transformer2DModelOutput(sample=torch.ones(2))
    t = G._tensors(out, [])
    assert len(t) == 1 and t[0] is out.sample
    rebuilt = G._rebuild(out, iter([torch.zeros(2)]))
    assert type(rebuilt) is Transformer2DModelOutput and torch.equal(rebuilt.sample, torch.zeros(2))
    args = ((torch.ones(1), [torch.ones(2), 3]), {"z": torch.ones(3), "a": {"k": torch.ones(4)}})
    flat = G._tensors(args, [])
    assert [x.numel() for x in flat] == [1, 2, 4, 3]  # dict keys sorted
    back = G._rebuild(args, iter([x * 2 for x in flat]))
    assert torch.equal(back[1]["a"]["k"], torch.full((4,), 2.0)) and back[0][1][1] == 3


def _add_lora(lin, name, rank=4, strength=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    lin.add_adapter(name, torch.randn(rank, lin.in_features, generator=g) * 0.1,
                    torch.randn(lin.out_features, rank, generator=g) * 0.1, strength)


def test_a_model_with_graphs_refuses_deepcopy_in_one_line(quantized_flux):
    """The graphs (and the hooks check, the layer choice) belong to the model they were made for: a deep copy would
    replay or prepare the original's. Refused, naming the fix; deoptimize gives a model that copies."""
    model = copy.deepcopy(quantized_flux[0])
    graphs = G.StepGraphs(model, model.forward)  # what optimize installs on CUDA (nothing here needs a GPU)
    model.__dict__["forward"] = graphs
    with pytest.raises(TypeError, match=r"copy it before optimize, or call svdquant.deoptimize\(model\) first"):
        copy.deepcopy(model)
    graphs.remove()
    assert "forward" not in model.__dict__ and isinstance(copy.deepcopy(model), type(model))


def test_lora_strength_is_rewritten_in_place_and_adding_one_bumps_the_revision(quantized_flux):
    model, inputs = copy.deepcopy(quantized_flux[0]), quantized_flux[1]
    lin = next(m for m in model.modules() if isinstance(m, SVDQLinear) and m.activations)
    _add_lora(lin, "a", strength=0.5)
    with torch.no_grad():
        model(**inputs)  # the runner takes the branch at its next call
    down, up, rev = lin._runner.down, lin._runner.up, revision()
    lin.set_adapter_strength("a", 1.5)
    with torch.no_grad():
        model(**inputs)
    assert lin._runner.down is down and lin._runner.up is up and revision() == rev  # graph-safe
    want = lin.branch()
    assert torch.equal(lin._runner.up, want[1]) and torch.equal(lin._runner.down, want[0])
    _add_lora(lin, "b", rank=8, seed=1)
    with torch.no_grad():
        model(**inputs)
    assert revision() > rev and lin._runner.down is not down  # new shapes: new tensors, graphs re-captured
    rev = revision()
    svdquant.set_weight_mode(model, "memory")
    assert revision() > rev


def test_the_layers_buffers_are_never_rewritten(quantized_flux):
    """Without LoRAs a runner holds the layer's own branch buffers: a change must replace, never write into them."""
    model = copy.deepcopy(quantized_flux[0])
    lin = next(m for m in model.modules() if isinstance(m, SVDQLinear) and m.activations)
    before = lin.lora_up.clone()
    from svdquant.ops.branch import assign_branch

    runner = lin._runner
    assert runner.up is lin.lora_up
    assert assign_branch(runner, lin.lora_down.clone(), lin.lora_up * 2, (lin.lora_down, lin.lora_up))
    assert torch.equal(lin.lora_up, before)


# ------------------------------------------------------------------------------------------------ GPU
def _cuda(model, inputs, dtype=torch.bfloat16):
    return tm.on_cuda(model, inputs, dtype)


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.gpu
@gpu
def test_gpu_optimized_step_equals_eager_and_keeps_its_graphs(quantized_flux):
    """Fused, compiled, graph-captured: the same step as eager (bf16 rounding and inductor's fusions apart); a
    strength change replays the same graph with the new branch; an added LoRA and a new shape capture again."""
    model, inputs = _cuda(*quantized_flux)
    with torch.no_grad():
        eager = model(**inputs)[0]
    report = optimize(model, attention=None, layers=False)  # every layer on the INT8 path (the choice: below)
    assert report.cuda_graphs and report.compiled_blocks == 2 and report.fused["qkv"] == 2
    graphs = model.__dict__["forward"]
    with torch.no_grad():
        first = model(**inputs)[0]
        second = model(**inputs)[0]
    assert graphs.captures == 1 and graphs.replays == 2
    assert _rel(first, eager) < 2e-2 and torch.equal(first, second)
    lin = model.transformer_blocks[0].ff.net[2]
    _add_lora(lin, "a", strength=0.5)
    with torch.no_grad():
        model(**inputs)
    captures = graphs.captures
    assert captures == 2  # the LoRA added new tensors
    lin.set_adapter_strength("a", 2.0)
    with torch.no_grad():
        graphed = model(**inputs)[0]
    assert graphs.captures == captures  # in place: the same graph
    svdquant.deoptimize(model)
    with torch.no_grad():
        plain = model(**inputs)[0]
    assert _rel(graphed, plain) < 2e-2
    optimize(model, attention=None, layers=False)
    graphs = model.__dict__["forward"]
    bigger = dict(tm.flux_inputs(quantized_flux[0], batch=2))
    _, bigger = _cuda(quantized_flux[0], bigger)
    with torch.no_grad():
        model(**inputs)
        model(**bigger)
        model(**inputs)
    assert graphs.captures == 2 and len(graphs.graphs) == 2


def test_dense_runner_is_the_layer_without_activation_rounding(quantized_flux):
    """compute="dense" (the layer choice's 16-bit GEMM): W = Q(R)·diag(λ⁻¹) + L2·L1, the post-GELU shift folded into
    the bias. On the CPU the layer keeps its runner (dense is a GPU choice); the dense weight is checked here by
    building the runner by hand against the layer with its activations unrounded."""
    from svdquant.ops.runners import DenseRunner

    model = quantized_flux[0]
    for lin in (model.transformer_blocks[0].attn.to_q, model.transformer_blocks[0].ff.net[2]):
        runner = DenseRunner(lin)
        x = torch.randn(7, lin.in_features)
        wf = svdquant.formats.get_format(lin.weights)
        r = wf.dequantize(wf.from_buffers(lin.weight_buffers(), lin.group_size, lin.in_features))[:, :lin.in_features]
        from svdquant.formats.int4 import shift_vector

        shift = shift_vector(lin.in_features, lin.act_shift, lin.act_unsigned_from)
        want = ((x + shift) * lin.smooth_inv) @ r.T + (x @ lin.lora_down.T) @ lin.lora_up.T + lin.bias
        torch.testing.assert_close(runner(x), want, rtol=1e-5, atol=1e-5)
        # and close to the quantized layer itself (which rounds its activations to INT8)
        y = lin(x)
        assert float((runner(x) - y).norm() / y.norm()) < 2e-2


def test_dense_runners_stack_into_one_gemm():
    from svdquant.modules import FusedSVDQLinear
    from svdquant.ops.runners import DenseRunner

    g = torch.Generator().manual_seed(0)
    lins = [torch.nn.Linear(64, n) for n in (16, 8, 16)]
    x = torch.randn(32, 64, generator=g)
    layers = SVDQLinear.from_linears(lins, x, svdquant.get_recipe("int4", rank=16, iterations=1))
    runners = [DenseRunner(m) for m in layers]
    apart = torch.cat([r(x) for r in runners], -1)
    stacked = DenseRunner.stacked(runners)
    # one GEMM of N = 40 against three: the same products, summed in the order the BLAS picks per shape
    assert float((stacked(x) - apart).norm() / apart.norm()) < 1e-6
    assert runners[1].weight.data_ptr() == stacked.weight[16:].data_ptr()  # views, not copies
    assert FusedSVDQLinear  # the fused module builds this stack when all its members are dense (GPU)


@pytest.mark.gpu
@gpu
def test_gpu_layer_choice_runs_what_measured_faster(quantized_flux):
    """At the first call each quantized shape is timed both ways; the step stays the step (the dense layers drop
    only their activation rounding) and a LoRA strength change reaches a dense layer in place."""
    model, inputs = _cuda(*quantized_flux)
    with torch.no_grad():
        eager = model(**inputs)[0]
    report = optimize(model, attention=None)
    with torch.no_grad():
        out = model(**inputs)[0]
    layers = report.layers
    assert layers is not None and layers["dense_layers"] + layers["quantized_layers"] == 17
    assert all(s["dense"] == (s["dense_ms"] < 0.95 * s["quantized_ms"]) for s in layers["shapes"])
    assert _rel(out, eager) < 2e-2
    dense = [m for m in model.modules() if isinstance(m, SVDQLinear) and m.compute == "dense"]
    if dense:
        graphs = model.__dict__["forward"]
        _add_lora(dense[0], "a", strength=0.5)
        with torch.no_grad():
            model(**inputs)
        captures = graphs.captures
        dense[0].set_adapter_strength("a", 1.5)
        with torch.no_grad():
            a = model(**inputs)[0]
        assert graphs.captures == captures
        svdquant.deoptimize(model)
        assert all(m.compute == "quantized" for m in dense)


def test_the_cost_table_is_kept_on_disk_and_shown_by_info(tmp_path, monkeypatch, capsys):
    """The layer choice's timings persist per machine (one table, GPU name in each key); `svdquant info` prints the
    decisions for the checkpoint's layer widths, and says when nothing was measured."""
    from svdquant.cli import main
    from svdquant.pipelines import layer_choice as lc

    monkeypatch.setenv("SVDQUANT_CACHE", str(tmp_path / "cache"))
    assert lc.cost_file() == tmp_path / "cache" / "layer_costs.json" and lc.load_costs() == {}
    model = tm.build_flux()
    svdquant.quantize(model, svdquant.get_recipe("int4", iterations=0, eval_tokens=32),
                      svdquant.Calibration(inputs=tm.calibration_inputs("flux", model, 1)), progress=False)
    svdquant.save_quantized(model, tmp_path / "ck", base="tiny")
    assert main(["info", str(tmp_path / "ck")]) == 0
    assert "nothing measured on this machine yet" in capsys.readouterr().out
    k = model.transformer_blocks[0].attn.to_q.in_features
    table = {lc.key("NVIDIA H200", 512, k, 96, "int4m", "int8", "speed", torch.bfloat16): [0.03, 0.01],
             lc.key("NVIDIA H200", 4096, k, 96, "int4m", "int8", "speed", torch.bfloat16): [0.10, 0.12],
             lc.key("NVIDIA H200", 4096, 99999, 96, "int4m", "int8", "speed", torch.bfloat16): [0.10, 0.01]}
    lc._save_costs(table)
    assert lc.load_costs() == table
    (tmp_path / "cache" / "layer_costs.json").with_name("junk").write_text("{")
    assert main(["info", str(tmp_path / "ck")]) == 0
    out = capsys.readouterr().out
    assert f"512 rows × {k} → 96 (speed, bfloat16): INT8 path 0.0300 ms, 16-bit 0.0100 ms → 16-bit" in out
    assert f"4096 rows × {k} → 96" in out and "→ INT8 path" in out and "99999" not in out
    (tmp_path / "cache" / "layer_costs.json").write_text("{not json")
    assert lc.load_costs() == {}  # only a cache: a damaged one is ignored


def test_serve_warms_up_only_what_compiles_lazily():
    """The server's default warm-up: nothing to do for a pipeline that does not compile lazily (the CPU, the tiny
    model): no sampling, 0 s, and /health says so; on CUDA it samples every batch size (GPU run, NOTES-GPU.md)."""
    from svdquant.serve.engine import load_engine

    engine = load_engine("tiny")
    lines = []
    assert engine.warmup(4, log=lambda *a, **k: lines.append(a)) == 0.0 and engine.warmup_seconds == 0.0
    assert lines == []
