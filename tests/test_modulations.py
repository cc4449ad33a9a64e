"""FLUX.1's adaLN modulations computed ahead in one stacked weight-only GEMV (svdquant/modules/modulations.py),
against the norms running their own linears, on the tiny FLUX.

On the CPU the stack runs its members in turn (bit for bit the unfused model). The GPU's path, the W4A16 runners
stacked into one launch, runs here with the kernels in Triton's interpreter: each modulation row is the same dot
product of the same input in one launch or in many, so the model's output is the same bit for bit there too.
"""

from __future__ import annotations

import copy

import tiny_models as tm  # first: sets HF_HUB_OFFLINE before diffusers is imported

import pytest
import torch

import svdquant
from svdquant._state import peek
from svdquant.modules.modulations import fuse_modulations, unfuse_modulations

interpreted = tm.interpreted


@pytest.fixture(scope="module")
def quantized_flux():
    return tm.quantized_flux(input_seed=7)


def _adaln(model):
    return [n.linear for b in model.transformer_blocks for n in (b.norm1, b.norm1_context)] + \
        [b.norm.linear for b in model.single_transformer_blocks]


def _norms(model):
    return [n for b in model.transformer_blocks for n in (b.norm1, b.norm1_context)] + \
        [b.norm for b in model.single_transformer_blocks] + [model.norm_out]


def test_modulations_ahead_equal_the_norms_own_and_undo(quantized_flux):
    """Bit for bit on the CPU, the state dict unchanged; unfuse puts the norms' classes and the embedding back."""
    model, inputs = copy.deepcopy(quantized_flux[0]), quantized_flux[1]
    before = tm.forward(model, inputs)
    keys = list(model.state_dict())
    n, base = len(_adaln(model)), [type(norm) for norm in _norms(model)]
    assert svdquant.fuse(model, modulations=True)["modulations"] == n == 3  # 1 double block (2), 1 single (1)
    classes = [type(norm) for norm in _norms(model)]
    assert all(c.__name__.endswith("Ahead") and c.__bases__[0] is b for c, b in zip(classes, base))
    assert len(model.time_text_embed._forward_hooks) == 1
    assert list(model.state_dict()) == keys
    assert torch.equal(tm.forward(model, inputs), before)
    assert fuse_modulations(model) == n  # already: nothing more
    batch = tm.flux_inputs(model, seed=3, batch=2)
    after = tm.forward(model, batch)
    assert svdquant.unfuse(model)["modulations"] == n
    assert [type(norm) for norm in _norms(model)] == base
    assert not any(hasattr(norm, a) for norm in _norms(model) for a in ("svdq_row", "svdq_region", "svdq_width"))
    assert not model.time_text_embed._forward_hooks and peek(model).modulations is None
    assert torch.equal(tm.forward(model, inputs), before) and torch.equal(tm.forward(model, batch), after)
    assert unfuse_modulations(model) == 0


def test_modulations_stay_where_they_cannot_go_ahead(quantized_flux):
    """Not FLUX.1, a LoRA'd or 16-bit adaLN linear, offload hooks: nothing changes (0)."""
    from accelerate import cpu_offload

    model = copy.deepcopy(quantized_flux[0])
    sd3 = tm.build_sd3()
    assert fuse_modulations(sd3) == 0 and fuse_modulations(tm.build_flux()) == 0  # SD3; FLUX.1 unquantized
    lora = copy.deepcopy(model)
    lin = lora.transformer_blocks[0].norm1.linear
    lin.add_adapter("x", torch.randn(4, lin.in_features), torch.randn(lin.out_features, 4), 1.0)
    assert fuse_modulations(lora) == 0 and not lora.time_text_embed._forward_hooks
    cpu_offload(model.transformer_blocks[0], execution_device="cpu")
    assert fuse_modulations(model) == 0 and peek(model).modulations is None


def _w4a16_on_cpu(monkeypatch, model):
    """The weight-only layers on the GPU's W4A16 runner, its kernels in the interpreter; each launch's rows counted."""
    from svdquant import SVDQLinear, kernels
    from svdquant.modules import linear
    from svdquant.ops.runners import W4A16Runner

    prepare = linear.ops.prepare
    monkeypatch.setattr(linear.ops, "prepare",
                        lambda m: W4A16Runner(m, kernels) if m.activations is None else prepare(m))
    rows = []
    launch = kernels.w4a16_linear
    monkeypatch.setattr(kernels, "w4a16_linear", lambda x, p, *a, **kw: rows.append(p.shape[0]) or
                        launch(x, p, *a, **kw))
    for m in model.modules():
        if isinstance(m, SVDQLinear) and m.activations is None:
            m.refresh()
    return rows


@interpreted
def test_one_launch_for_every_modulation_on_the_w4a16_runners(monkeypatch, quantized_flux):
    """The stacked W4A16 runner: one launch over every adaLN row instead of one per linear, the same output; the
    members' codes are rows of the stack's (their own dropped, the state dict giving them back), and unfusing
    gives each its own again."""
    model, inputs = copy.deepcopy(quantized_flux[0]), quantized_flux[1]
    rows = _w4a16_on_cpu(monkeypatch, model)
    members = _adaln(model)
    codes = [m.qweight.clone() for m in members]
    before = tm.forward(model, inputs)
    assert rows == [m.out_features for m in members]
    assert fuse_modulations(model) == 3
    stack = peek(model).modulations[0]
    assert stack._runner is not None and all(m._buffers["qweight"] is None for m in members)
    rows.clear()
    assert torch.equal(tm.forward(model, inputs), before)
    assert rows == [sum(m.out_features for m in members)]
    sd = model.state_dict()
    for name, m, c in zip(("transformer_blocks.0.norm1.linear", "transformer_blocks.0.norm1_context.linear",
                           "single_transformer_blocks.0.norm.linear"), members, codes):
        assert torch.equal(sd[name + ".qweight"], c)
        assert sd[name + ".qweight"].untyped_storage().data_ptr() != stack._runner.qweight.untyped_storage().data_ptr()
    assert unfuse_modulations(model) == 3
    assert all(torch.equal(m.qweight, c) for m, c in zip(members, codes))
    rows.clear()
    assert torch.equal(tm.forward(model, inputs), before) and rows == [m.out_features for m in members]


@interpreted
def test_a_lora_on_a_stacked_modulation_runs_the_members_in_turn(monkeypatch, quantized_flux):
    """A LoRA added to one adaLN linear after the fusion: a W4A16 stack cannot take branches, so its members run in
    turn (the LoRA'd one with its branch): the output of the unfused model with the same LoRA."""
    model, inputs = copy.deepcopy(quantized_flux[0]), quantized_flux[1]
    rows = _w4a16_on_cpu(monkeypatch, model)
    twin = copy.deepcopy(model)
    fuse_modulations(model)
    for m in (model, twin):
        lin = m.single_transformer_blocks[0].norm.linear
        g = torch.Generator().manual_seed(1)
        lin.add_adapter("x", torch.randn(4, lin.in_features, generator=g), torch.randn(lin.out_features, 4,
                                                                                      generator=g), 0.5)
    rows.clear()
    got = tm.forward(model, inputs)
    assert peek(model).modulations[0]._runner is None and len(rows) == 3
    assert torch.equal(got, tm.forward(twin, inputs))
    for m in (model, twin):
        m.single_transformer_blocks[0].norm.linear.remove_adapter("x")
    rows.clear()
    got = tm.forward(model, inputs)  # the LoRA gone: one launch again
    assert peek(model).modulations[0]._runner is not None and len(rows) == 1
    assert torch.equal(got, tm.forward(twin, inputs))


def test_a_fused_model_copies_and_its_copy_unfuses(quantized_flux):
    """The norms' swapped classes and index buffers travel with ``copy.deepcopy``; the copy unfuses on its own."""
    model, inputs = copy.deepcopy(quantized_flux[0]), quantized_flux[1]
    before = tm.forward(model, inputs)
    fuse_modulations(model)
    twin = copy.deepcopy(model)
    assert torch.equal(tm.forward(twin, inputs), before)
    assert unfuse_modulations(twin) == 3 and type(twin.single_transformer_blocks[0].norm).__name__ == \
        "AdaLayerNormZeroSingle"
    assert torch.equal(tm.forward(twin, inputs), before) and peek(model).modulations is not None


def test_a_regional_compile_traces_each_block_class_once():
    """``compile_repeated_blocks`` compiles a block class's forward once for all its blocks (FLUX.1-dev: 19 and 38);
    a forward or a slice bound per norm would be guarded per block and compile again, past dynamo's limit."""
    torch.manual_seed(0)
    model = tm.build_flux(num_layers=2, num_single_layers=3)
    svdquant.quantize(model, svdquant.get_recipe("int4", iterations=1, eval_tokens=64),
                      svdquant.Calibration(inputs=tm.calibration_inputs("flux", model, 1)), progress=False)
    inputs = tm.calibration_inputs("flux", model, 1, seed=5)[0]
    before = tm.forward(model, inputs)
    assert svdquant.fuse(model, modulations=True)["modulations"] == 7
    torch._dynamo.reset()
    model.compile_repeated_blocks(fullgraph=True, backend="eager")
    # two compiles per block class at most: diffusers' first single block reads a differently strided input (one
    # recompile with or without the modulations ahead); a third, per-norm one, fails the call under fullgraph
    with torch._dynamo.config.patch(recompile_limit=2):
        assert torch.equal(tm.forward(model, inputs), before)
    torch._dynamo.reset()


def test_unfusing_refuses_a_norm_whose_forward_a_hook_replaced(quantized_flux):
    model = copy.deepcopy(quantized_flux[0])
    fuse_modulations(model)
    norm = model.single_transformer_blocks[0].norm
    ours = norm.forward
    norm.forward = lambda *a, **kw: ours(*a, **kw)  # what a cache or offload hook added after fusing does
    with pytest.raises(RuntimeError, match="remove it before unfusing"):
        unfuse_modulations(model)
    assert peek(model).modulations is not None  # nothing undone
    del norm.forward  # the hook removed: the class's forward again
    assert unfuse_modulations(model) == 3


def test_a_stack_past_the_kernels_offsets_stays_apart():
    """The W4A16 kernel's byte offsets are 32-bit: layers whose codes add up to 2**31 bytes do not stack."""
    from svdquant import kernels
    from svdquant.ops.runners import W4A16Runner

    r = object.__new__(W4A16Runner)
    r.kernels, r.down, r.group, r.k, r.wzeros, r.bias = kernels, None, 64, 4096, None, None
    r.wscales = torch.empty(1 << 19, 64, dtype=torch.bfloat16, device="meta")
    r.qweight = torch.empty(1 << 19, 2048, dtype=torch.uint8, device="meta")  # 2**30 bytes each
    with pytest.raises(ValueError, match="2\\*\\*31 bytes"):
        W4A16Runner.stack([r, copy.copy(r)], [1 << 19, 1 << 19])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_modulations_ahead_at_flux_width():
    """FLUX.1-dev's widths (3,072 channels: 18,432 and 9,216 modulation rows), random 4-bit layers on the GPU's
    W4A16 runners: one launch for every modulation gives the model's output bit for bit at batch 1 and 2; at batch 17
    the stack (~92 K rows here, more than it dequantizes whole) runs 16 tokens a launch where its members each
    dequantize for cuBLAS: the same within bf16 rounding."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import flux_step
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = FluxTransformer2DModel(num_layers=2, num_single_layers=2, **flux_step.FLUX_DEV).to(torch.bfloat16)
    flux_step.random_quantized(model, device="cuda")
    for batch in (1, 2, 17):
        inputs = {k: v.cuda() if torch.is_tensor(v) else v for k, v in tm.flux_inputs(model, batch=batch).items()}
        inputs["guidance"] = torch.full((batch,), 3.5, device="cuda", dtype=torch.bfloat16)
        before = tm.forward(model, inputs)
        assert fuse_modulations(model) == 6
        assert peek(model).modulations[0]._runner is not None
        got = tm.forward(model, inputs)
        assert torch.equal(got, before) if batch < 17 else float((got - before).float().norm() /
                                                                   before.float().norm()) < 1e-2, batch
        assert unfuse_modulations(model) == 6
