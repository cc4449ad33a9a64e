"""``svdquant.optimize``'s two ways to compile (:mod:`svdquant.pipelines.compiling`), on the CPU: ``compile=`` checked;
the tiny quantized FLUX's whole forward as one inductor graph, equal to eager; hooks run it eagerly; each kind of
compile undoes the other, under a CUDA-graph cache too, and :func:`svdquant.deoptimize` undoes both."""

from __future__ import annotations

import copy

import tiny_models as tm  # first: sets HF_HUB_OFFLINE before diffusers is imported

import pytest
import torch
from torch._dynamo.utils import counters

from svdquant.pipelines import compiling as C
from svdquant.pipelines.graphs import StepGraphs
from svdquant.pipelines.optimize import Optimized, deoptimize


@pytest.fixture(scope="module")
def quantized_flux():
    return tm.quantized_flux()


@pytest.mark.parametrize("value, mode", [(True, "blocks"), ("blocks", "blocks"), ("model", "model"), (False, None)])
def test_compile_modes(value, mode):
    assert C.compile_mode(value) == mode


@pytest.mark.parametrize("value", [1, 0, None, "whole", "Model"])
def test_compile_mode_errors_name_the_choices(value):
    with pytest.raises(ValueError, match=rf"^compile={value!r}: use True \(each repeated block: the default\), 'model' "
                                         r"\(the whole denoiser as one graph: a faster step, a longer first call\) "
                                         "or False$"):
        C.compile_mode(value)


def test_the_whole_tiny_flux_compiles_to_one_graph_equal_to_eager(quantized_flux):
    """Inductor (its CPU backend here) takes the quantized model's whole forward without a graph break: the custom
    ops' fakes and the adapters' code all trace."""
    model, inputs = copy.deepcopy(quantized_flux[0]), quantized_flux[1]
    with torch.no_grad():
        eager = model(**inputs)[0]
    torch._dynamo.reset()
    counters.clear()
    C.compile_model(model)
    assert isinstance(model.__dict__["forward"], C.CompiledForward)
    with torch.no_grad():
        out = model(**inputs)[0]
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
    assert float((out - eager).norm() / eager.norm()) < 1e-4


def test_hooks_run_the_whole_forward_eagerly(quantized_flux):
    """A graph traced without a hook would ignore it (dynamo does not guard on module hooks): an offload or cache
    hook, even one added after compiling, sends the call to the eager forward."""
    model, inputs = copy.deepcopy(quantized_flux[0]), quantized_flux[1]
    C.compile_model(model)
    compiled = model.__dict__["forward"]
    calls = []
    compiled.compiled = lambda *a, **kw: calls.append("compiled")
    eager = compiled.eager
    compiled.eager = lambda *a, **kw: calls.append("eager") or eager(*a, **kw)
    with torch.no_grad():
        model(**inputs)
        model.single_transformer_blocks[0].__dict__["_hf_hook"] = object()  # what accelerate's offload sets
        model(**inputs)
    assert calls == ["compiled", "eager"]


def test_each_compile_undoes_the_other_and_deoptimize_both(quantized_flux, monkeypatch):
    seen = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: (seen.append(self),
                                                                          setattr(self, "_compiled_call_impl", kw)))
    model = copy.deepcopy(quantized_flux[0])
    blocks = C.repeated_blocks(model)
    assert C.compile_blocks(model) == len(blocks) == len(seen)
    C.compile_model(model)
    assert all(b._compiled_call_impl is None for b in blocks)
    assert isinstance(model.__dict__["forward"], C.CompiledForward)
    C.compile_model(model)  # again: the same compiled forward, not one compiled around the other
    assert not isinstance(model.__dict__["forward"].eager, C.CompiledForward)
    C.compile_blocks(model)
    assert "forward" not in model.__dict__ and all(b._compiled_call_impl is not None for b in blocks)
    graphs = StepGraphs(model, model.forward)  # what optimize puts on a CUDA model
    model.forward = graphs
    C.compile_model(model)
    assert model.__dict__["forward"] is graphs and isinstance(graphs.forward, C.CompiledForward)
    assert all(b._compiled_call_impl is None for b in blocks)
    deoptimize(model)
    assert "forward" not in model.__dict__ and not isinstance(graphs.forward, C.CompiledForward)


def test_a_wholly_compiled_model_refuses_deepcopy(quantized_flux):
    """Its compiled function belongs to its own forward: a copy holding it would run the original's weights."""
    model = copy.deepcopy(quantized_flux[0])
    C.compile_model(model)
    with pytest.raises(TypeError, match=r"^a model svdquant.optimize compiled as a whole \(compile='model'\) cannot "
                                        r"be deep-copied: copy it before optimize, or call svdquant.deoptimize"):
        copy.deepcopy(model)
    C.uncompile(model)
    copy.deepcopy(model)


def test_a_compile_change_drops_the_graphs_captured_before(quantized_flux, monkeypatch):
    """Graphs captured with one compile replay its kernels: switching (or undoing) it makes the next call capture
    again; compiling as it already is keeps them."""
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: setattr(self, "_compiled_call_impl", kw))
    model = copy.deepcopy(quantized_flux[0])
    graphs = StepGraphs(model, model.forward)
    model.forward = graphs
    for step in (C.compile_blocks, C.compile_model, C.uncompile):
        graphs.graphs["captured"] = None
        step(model)
        assert not graphs.graphs, step.__name__
    C.compile_model(model)
    graphs.graphs["captured"] = None
    C.compile_model(model)
    assert graphs.graphs


def test_an_instance_forward_set_before_comes_back(quantized_flux):
    """diffusers' hooks set the instance's ``forward``: undoing the whole compile gives that back, not the class's."""
    model = copy.deepcopy(quantized_flux[0])
    wrapper = model.forward
    model.forward = lambda *a, **kw: wrapper(*a, **kw)
    hook = model.__dict__["forward"]
    C.compile_model(model)
    C.uncompile(model)
    assert model.__dict__["forward"] is hook


def test_optimize_with_hooks_compiles_the_blocks_instead(quantized_flux, monkeypatch):
    """Hooks on the model at optimize (offloading, a cache) run its forward outside one graph: the report says so and
    the blocks are compiled."""
    from svdquant.pipelines import optimize as O

    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: setattr(self, "_compiled_call_impl", kw))
    monkeypatch.setattr(O, "_device_of", lambda model: torch.device("cuda", 0))  # past the CUDA check, on the CPU
    model = copy.deepcopy(quantized_flux[0])
    model.single_transformer_blocks[0].__dict__["_hf_hook"] = object()  # what accelerate's offload sets
    report = O.optimize(model, fuse=False, attention=None, cuda_graphs=False, layers=False, compile="model")
    assert report.skipped["compile"] == ("model: hooks on the model (offloading or a cache) run its forward outside "
                                         "one graph; its blocks compiled instead")
    assert not report.compiled_model and report.compiled_blocks == len(C.repeated_blocks(model))
    assert "forward" not in model.__dict__


def test_the_report_says_the_whole_forward_compiled():
    report = Optimized(device="cuda:0", compiled_model=True, cuda_graphs=True, max_graphs=4)
    assert "the whole forward compiled as one graph (at the first call of each shape); CUDA graphs" in str(report)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_optimize_compiles_the_whole_model_under_its_graphs(quantized_flux):
    """``optimize(compile="model")``: the whole forward compiled under the CUDA-graph cache, captured once and
    replayed, close to eager (bf16 rounding and inductor's fusions apart); deoptimize gives the eager forward back."""
    from svdquant.pipelines.optimize import optimize

    model, inputs = tm.on_cuda(*quantized_flux)
    with torch.no_grad():
        eager = model(**inputs)[0]
    report = optimize(model, attention=None, layers=False, compile="model")
    assert report.compiled_model and not report.compiled_blocks and report.cuda_graphs
    graphs = model.__dict__["forward"]
    assert isinstance(graphs, StepGraphs) and isinstance(graphs.forward, C.CompiledForward)
    with torch.no_grad():
        first, second = model(**inputs)[0], model(**inputs)[0]
    assert graphs.captures == 1 and graphs.replays == 2 and torch.equal(first, second)
    assert float((first.float() - eager.float()).norm() / eager.float().norm()) < 2e-2
    deoptimize(model)
    assert "forward" not in model.__dict__
