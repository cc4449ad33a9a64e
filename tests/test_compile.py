"""torch.compile captures a whole quantized step: the groundwork of the Hopper step issue (fused blocks,
custom ops). On the CPU every layer runs the torch reference; the test asserts dynamo sees one graph with no
break (the runners' forward does nothing dynamo cannot trace: no syncs, no environment reads, no state changes)
and that the compiled step computes what the eager one does."""

from __future__ import annotations

import tiny_models as tm  # first: sets HF_HUB_OFFLINE before diffusers is imported

import pytest
import torch

import svdquant


@pytest.fixture(scope="module")
def quantized_flux():
    torch.manual_seed(0)
    model = tm.build_flux()
    svdquant.quantize(model, svdquant.get_recipe("int4", iterations=1, eval_tokens=64),
                      svdquant.Calibration(inputs=tm.calibration_inputs("flux", model, 1)), progress=False)
    return model, tm.calibration_inputs("flux", model, 1)[0]


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
