"""q/k/v stacked into one quantized GEMM (svdquant/modules/fused.py, Int8Runner.stacked) against the layers run
apart, through LoRAs, moves and unfusing, on the tiny FLUX.

Two kinds of claim:

* bit for bit, on the CPU: there a fused layer runs its members in turn (``FusedSVDQLinear.forward`` without a
  stacked runner) and the GELU after the layer, so fused and unfused run the same torch ops on the same shapes;
* within the numerics' bound, on the INT8 runners (the GPU's path, kernels in the Triton interpreter): one GEMM of
  N = 128 against GEMMs of N = 48 / 32 / 48. The integer GEMM is exact, but the branch's fp32 down and up
  projections are wider when stacked (with a LoRA on a member, its down rows join the others'), and BLAS picks its
  summation order per shape, thread count and CPU, so the two differ by float rounding (``reassociation_bound``).
"""

from __future__ import annotations

import copy
import os

import tiny_models as tm  # first: sets HF_HUB_OFFLINE before diffusers is imported

import pytest
import torch

import svdquant
from svdquant import SVDQLinear, get_recipe
from svdquant._state import peek
from svdquant.modules import FusedSVDQLinear, fuse_projections, unfuse_projections
from svdquant.modules.fused import Projected
from svdquant.ops.branch import stacked_branch
from svdquant.ops.runners import Int8Runner, ReferenceRunner

# fp32's unit roundoff. Two orders of summing the same n fp32 products differ by at most 2·γ_n ≈ 2·n·u of the sum of
# the products' magnitudes (Higham, "Accuracy and Stability of Numerical Algorithms", §3.1); the float part of a
# quantized layer (the branch, the epilogue) is a part of its output, so relative to the output it is smaller still.
U32 = 2.0**-24


def reassociation_bound(n: int) -> float:
    """The relative difference two summation orders of length-``n`` fp32 dot products may make (worst case)."""
    return 2 * n * U32


def rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


interpreted = tm.interpreted


@pytest.fixture(scope="module")
def quantized_flux():
    return tm.quantized_flux(input_seed=7)


def test_fused_flux_equals_unfused_and_keeps_its_state_dict(quantized_flux):
    """Bit for bit on the CPU, where the fused layers run their members in turn (module doc)."""
    model, inputs = quantized_flux
    with torch.no_grad():
        before = model(**inputs)[0]
    keys = list(model.state_dict())
    n_attn = sum(1 for m in model.modules() if hasattr(m, "fused_projections"))
    assert fuse_projections(model) == n_attn > 0
    assert all(m.fused_projections for m in model.modules() if hasattr(m, "fused_projections"))
    assert isinstance(model.transformer_blocks[0].attn.to_added_qkv, FusedSVDQLinear)
    single = model.single_transformer_blocks[0]  # q/k/v and the MLP's up projection: one GEMM
    stacked = peek(single).stack
    assert stacked.members == (single.attn.to_q, single.attn.to_k, single.attn.to_v, single.proj_mlp)
    assert isinstance(single.attn.to_qkv, Projected) and isinstance(single.act_mlp, torch.nn.GELU)
    assert list(model.state_dict()) == keys  # checkpoints and LoRAs still address to_q / to_k / to_v
    with torch.no_grad():
        fused = model(**inputs)[0]
    assert torch.equal(fused, before)
    assert fuse_projections(model) == 0  # already fused
    assert unfuse_projections(model) == n_attn
    assert not hasattr(model.transformer_blocks[0].attn, "to_qkv")
    assert "forward" not in single.__dict__ and not hasattr(single.attn, "to_qkv") \
        and not single.attn.fused_projections
    with torch.no_grad():
        assert torch.equal(model(**inputs)[0], before)


def test_single_block_stacks_only_what_reads_one_input(quantized_flux):
    """single_mlp=False, or a proj_mlp smoothed apart from q/k/v (e.g. imported), leaves the MLP out: q/k/v alone."""
    import copy

    model, inputs = quantized_flux
    with torch.no_grad():
        before = model(**inputs)[0]
    for variant in ("flag", "lambda"):
        m = copy.deepcopy(model)
        if variant == "lambda":
            with torch.no_grad():
                m.single_transformer_blocks[0].proj_mlp.smooth_inv.mul_(1.5)
        assert fuse_projections(m, single_mlp=variant != "flag") == 2
        single = m.single_transformer_blocks[0]
        assert peek(single).stack is None and isinstance(single.attn.to_qkv, FusedSVDQLinear)
        assert len(single.attn.to_qkv.members) == 3
        if variant == "flag":
            with torch.no_grad():
                assert torch.equal(m(**inputs)[0], before)
    meta = copy.deepcopy(model).to("meta")  # built before its weights are loaded: λ cannot be compared, stacked
    assert fuse_projections(meta) == 2 and peek(meta.single_transformer_blocks[0]).stack is not None


def test_stacked_single_block_follows_loras(quantized_flux):
    """A LoRA on proj_mlp (a stacked member) and on to_q, added after fusing, changes the output as unfused (bit for
    bit: on the CPU the members run in turn, module doc)."""
    import copy

    model, inputs = quantized_flux
    ref, fused = copy.deepcopy(model), copy.deepcopy(model)
    fuse_projections(fused)
    for m in (ref, fused):
        blk = m.single_transformer_blocks[0]
        for lin in (blk.proj_mlp, blk.attn.to_q):
            lin.add_adapter("l", torch.randn(4, lin.in_features, generator=torch.Generator().manual_seed(1)) * 0.1,
                            torch.randn(lin.out_features, 4, generator=torch.Generator().manual_seed(2)) * 0.1, 0.8)
    with torch.no_grad():
        assert torch.equal(fused(**inputs)[0], ref(**inputs)[0])


@pytest.mark.parametrize("sd35", [False, True])
def test_fused_sd3_equals_unfused(sd35):
    """SD3's joint attention (and SD3.5's: q/k RMS norms, dual-attention blocks whose second attention has no
    text stream) through FusedJointAttnProcessor: bit for bit the unfused model, same state dict, and unfusing
    puts diffusers' processor back."""
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    from svdquant.modules.fused import FusedJointAttnProcessor

    extra = dict(qk_norm="rms_norm", dual_attention_layers=(0,)) if sd35 else {}
    model = tm.build_sd3(seed=0, **extra)
    svdquant.quantize(model, get_recipe("int4", iterations=1, eval_tokens=64),
                      svdquant.Calibration(inputs=[tm.sd3_inputs(model, seed=1)]), progress=False)
    inputs = tm.sd3_inputs(model, seed=7)
    with torch.no_grad():
        before = model(**inputs)[0]
    keys = list(model.state_dict())
    attns = [m for m in model.modules() if type(getattr(m, "processor", None)) is JointAttnProcessor2_0]
    assert len(attns) == 2 + sd35
    assert svdquant.fuse(model)["qkv"] == len(attns)
    assert all(isinstance(a.processor, FusedJointAttnProcessor) and isinstance(a.to_qkv, FusedSVDQLinear)
               for a in attns)
    assert isinstance(model.transformer_blocks[0].attn.to_added_qkv, FusedSVDQLinear)
    assert list(model.state_dict()) == keys
    with torch.no_grad():
        assert torch.equal(model(**inputs)[0], before)
    assert unfuse_projections(model) == len(attns)
    assert all(type(a.processor) is JointAttnProcessor2_0 and not hasattr(a, "to_qkv") for a in attns)
    with torch.no_grad():
        assert torch.equal(model(**inputs)[0], before)


def test_fusing_a_16bit_model_changes_nothing():
    model = tm.build_flux()
    assert fuse_projections(model) == 0
    assert svdquant.fuse(model, compiled_activations=True) == {"qkv": 0, "gelu": 0, "compiled_activations": 0, "modulations": 0, "norm_rope": 0}
    with pytest.raises(TypeError, match="pipeline or an nn.Module"):
        svdquant.fuse("flux")


def test_stacked_single_blocks_and_diffusers_hooks(quantized_flux):
    """First-Block Cache after fusing wraps the stacked forward (exact at threshold 0); unfusing then says to
    remove the hook first and changes nothing; a block hooked before fusing keeps its MLP apart."""
    import copy

    from diffusers.hooks import FirstBlockCacheConfig

    model, inputs = quantized_flux
    with torch.no_grad():
        before = model(**inputs)[0]
    m = copy.deepcopy(model)
    fuse_projections(m)
    m.enable_cache(FirstBlockCacheConfig(threshold=0.0))
    with torch.no_grad(), m.cache_context("fused"):
        assert torch.equal(m(**inputs)[0], before)
    with pytest.raises(RuntimeError, match="remove it before unfusing"):
        unfuse_projections(m)
    assert peek(m.single_transformer_blocks[0]).stack is not None  # untouched
    assert isinstance(m.transformer_blocks[0].attn.to_qkv, FusedSVDQLinear)
    m.disable_cache()
    assert unfuse_projections(m) == 2
    m.enable_cache(FirstBlockCacheConfig(threshold=0.0))
    assert fuse_projections(m) == 2
    single = m.single_transformer_blocks[0]
    assert peek(single).stack is None and len(single.attn.to_qkv.members) == 3
    with torch.no_grad(), m.cache_context("hooked first"):
        assert torch.equal(m(**inputs)[0], before)


def _single_block_call(model, inputs):
    """``model``'s first single block and the keyword arguments ``model(**inputs)`` calls it with."""
    block, call = model.single_transformer_blocks[0], {}
    hook = block.register_forward_pre_hook(lambda mod, args, kwargs: call.update(kwargs), with_kwargs=True)
    with torch.no_grad():
        model(**inputs)
    hook.remove()
    return block, call


@pytest.mark.parametrize("dtype, ahead", [(torch.float32, False), (torch.float16, False), (torch.float32, True)])
def test_compiled_single_block_normalizes_each_stream(quantized_flux, dtype, ahead):
    """Compiled, a stacked single block normalizes its text and image streams apart and adds each one's residual
    (two LayerNorms in the traced graph: no joint concatenation for inductor to write out), bit for bit what
    normalizing their concatenation gives, with the modulations computed ahead too (``ahead``); it normalizes the
    concatenation, as diffusers' forward does, with ``NORM_PER_STREAM`` off, with a hooked norm (a torch hook, which
    then runs, or an offload hook's mark; added before compiling, as dynamo skips hook guards), and eagerly (the
    same bytes there, in fewer launches)."""
    from svdquant.integrations.diffusers import compat

    model, inputs = quantized_flux
    m = copy.deepcopy(model).to(dtype)
    inputs = {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in inputs.items()}
    svdquant.fuse(m, gelu=False, modulations=True) if ahead else fuse_projections(m)
    block, call = _single_block_call(m, inputs)
    with torch.no_grad():
        eager = block(**call)
        graphs = []

        def backend(gm, example_inputs):  # runs the traced ops as they are
            graphs.append(gm)
            return gm.forward

        def layer_norms(compiled):
            out = compiled(**call)
            assert all(torch.equal(o, e) for o, e in zip(out, eager))
            return sum(getattr(n.target, "__name__", "") == "layer_norm" for n in graphs[-1].graph.nodes)

        torch._dynamo.reset()
        compiled = torch.compile(block, backend=backend, fullgraph=True)
        assert layer_norms(compiled) == 2
        compat.NORM_PER_STREAM = False
        try:
            assert layer_norms(compiled) == 1
        finally:
            compat.NORM_PER_STREAM = True
        norms = []
        block.norm.register_forward_hook(lambda mod, args, out: norms.append(mod))
        assert block(**call) is not None and norms == [block.norm]  # eagerly: diffusers' way
        torch._dynamo.reset()
        assert layer_norms(torch.compile(block, backend=backend, fullgraph=True)) == 1 and len(norms) > 1
        block.norm._forward_hooks.clear()
        block.norm._hf_hook = None  # as accelerate's offload hooks mark a module
        torch._dynamo.reset()
        assert layer_norms(torch.compile(block, backend=backend, fullgraph=True)) == 1


@interpreted
def test_compiled_single_block_writes_no_concatenation_of_its_streams(quantized_flux):
    """Under inductor (its CPU build, the quantized layers opaque ops as on a GPU), the fused single block's buffers
    as large as its joint activation: the stacked GEMM's normed input only; with ``NORM_PER_STREAM`` off (diffusers'
    concatenation, normalized) also the concatenation, kept as the residual. Compiled equals eager either way."""
    import re

    from torch._inductor.utils import run_and_get_code

    from svdquant.integrations.diffusers import compat

    model, inputs = quantized_flux
    m = copy.deepcopy(model)
    tm.on_int8_kernels(m)
    svdquant.fuse(m)
    block, call = _single_block_call(m, inputs)
    tokens = call["hidden_states"].shape[1] + call["encoder_hidden_states"].shape[1]
    joint = re.compile(rf"empty_strided_cpu\(\((1, )?{tokens}, {tm.HIDDEN}\)")
    found = {}
    for per_stream in (True, False):
        compat.NORM_PER_STREAM = per_stream
        try:
            torch._dynamo.reset()
            with torch.no_grad():
                eager = block(**call)
                out, codes = run_and_get_code(torch.compile(block, fullgraph=True), **call)
        finally:
            compat.NORM_PER_STREAM = True
        found[per_stream] = len(joint.findall("\n".join(codes)))
        assert all(float((o - e).norm() / e.norm()) < 1e-5 for o, e in zip(out, eager))
    assert found == {True: 1, False: 2}


@interpreted
@pytest.mark.parametrize("fusion", ["projections", "all"])
def test_stacked_single_block_on_the_int8_kernels(quantized_flux, fusion):
    """The INT8 runners (Triton interpreter) as on a GPU: the single block's q/k/v + proj_mlp stacked runner gives
    the unfused model's step within the numerics' bound, with LoRAs added before fusing (on proj_mlp, and on a
    double block's to_q: a stacked runner once took its members' branches as of their last call, without such a
    LoRA; leaving that LoRA out of the fused copy moves this output by 4.5e-3).

    Not bit for bit: the stacked GEMMs sum their fp32 branch in another order (module doc), a difference of
    ``reassociation_bound(64)`` = 7.6e-6 at most where it arises (measured ~1e-7). Downstream, it can move an INT8
    activation code of a later layer across its rounding boundary: one step of 1/127 of that token's absmax on one
    element, ~1.3e-5 of this output (measured by perturbing every quantized layer's output by 2e-7 relative: 23 of
    300 runs moved one code). The bound, 1e-4, covers both with a margin of 5 (several moved codes); it stays 45x
    below the missing LoRA's 4.5e-3.

    ``fusion="all"`` (:func:`svdquant.fuse`): the MLPs' GELUs move into their down projections' activation passes
    (fp32 here: Triton's tanh-GELU against torch's, ~1e-7 apart), and the single block's proj_out reads the
    attention output and the stack's MLP columns as two parts (no concatenation, no GELU pass): within the same
    bound."""
    import copy

    model, inputs = quantized_flux
    ref, fused = copy.deepcopy(model), copy.deepcopy(model)
    for m in (ref, fused):
        tm.on_int8_kernels(m)
        for lin in (m.single_transformer_blocks[0].proj_mlp, m.transformer_blocks[0].attn.to_q):
            lin.add_adapter("l", torch.randn(4, lin.in_features, generator=torch.Generator().manual_seed(1)) * 0.1,
                            torch.randn(lin.out_features, 4, generator=torch.Generator().manual_seed(2)) * 0.1, 0.8)
    single = fused.single_transformer_blocks[0]
    if fusion == "all":
        svdquant.fuse(fused)
    else:
        fuse_projections(fused)
    stacked = peek(single).stack
    assert stacked._runner is not None and stacked._runner.w.shape[0] == stacked.out_features
    parts = []
    if fusion == "all":
        qkv_width = stacked.out_features - single.proj_mlp.out_features
        assert not stacked._runner.gelu and isinstance(single.act_mlp, torch.nn.Identity)
        assert single.proj_out.input_gelu_from == qkv_width // 3 == single.proj_out._runner.input_gelu_from
        fc2 = fused.transformer_blocks[0].ff.net[2]
        assert fc2.input_gelu_from == 0 == fc2._runner.input_gelu_from
        assert not fused.transformer_blocks[0].ff.net[0].proj.output_gelu
        runner = single.proj_out._runner
        call = runner.call_concat
        runner.call_concat = lambda head, tail: parts.append((head.shape, tail.stride())) or call(head, tail)
    bound = 1e-4  # see the docstring
    with torch.no_grad():
        want, got = ref(**inputs)[0], fused(**inputs)[0]
    assert rel(got, want) < bound
    if fusion == "all":  # proj_out was handed the MLP's output where the stack wrote it (row stride: its width)
        tokens = got.shape[1] + inputs["encoder_hidden_states"].shape[1]
        assert parts == [((tokens, qkv_width // 3), (stacked.out_features, 1))], parts
    for m in (ref, fused):  # and one added after: the stacked runner restacks its branch
        k = m.single_transformer_blocks[0].attn.to_k
        k.add_adapter("k", torch.randn(4, k.in_features, generator=torch.Generator().manual_seed(3)) * 0.1,
                      torch.randn(k.out_features, 4, generator=torch.Generator().manual_seed(4)) * 0.1, 1.0)
    with torch.no_grad():
        want, got = ref(**inputs)[0], fused(**inputs)[0]
    assert rel(got, want) < bound


def test_fuse_moves_every_mlp_gelu_into_its_down_projection_and_back(quantized_flux):
    from diffusers.models.activations import GELU

    from svdquant.modules.fused import ProjectedGELU, fuse_gelu

    model, inputs = quantized_flux
    with torch.no_grad():
        before = model(**inputs)[0]
    keys = list(model.state_dict())
    # tiny FLUX: 1 double block (image + text MLPs) + 1 single block; 2 attentions. Every MLP's GELU moves into the
    # layer reading its output: fc2 from its first channel, the single block's proj_out after the attention's
    assert svdquant.fuse(model) == {"qkv": 2, "gelu": 3, "compiled_activations": 0, "modulations": 0, "norm_rope": 0}
    ff = model.transformer_blocks[0].ff
    assert isinstance(ff.net[0], ProjectedGELU) and ff.net[0].down is ff.net[2] and ff.net[2].input_gelu_from == 0
    assert not ff.net[0].proj.output_gelu
    single = model.single_transformer_blocks[0]
    attn_width = single.proj_out.in_features - single.proj_mlp.out_features
    assert isinstance(single.act_mlp, torch.nn.Identity) and single.proj_out.input_gelu_from == attn_width
    assert peek(single).stack is not None and not single.proj_mlp.output_gelu
    assert list(model.state_dict()) == keys
    with torch.no_grad():  # the CPU reference applies the GELU before the layer: the same ops, bit for bit
        assert torch.equal(model(**inputs)[0], before)
    assert svdquant.unfuse(model) == {"qkv": 2, "gelu": 3, "compiled_activations": 0, "modulations": 0, "norm_rope": 0}
    assert isinstance(ff.net[0], GELU) and ff.net[2].input_gelu_from is None and not ff.net[0].proj.output_gelu
    assert isinstance(single.act_mlp, torch.nn.GELU) and single.proj_out.input_gelu_from is None
    with torch.no_grad():
        assert torch.equal(model(**inputs)[0], before)
    # the other order: the GELUs first, then the stack (its members carry no GELU of their own)
    assert fuse_gelu(model) == 3 and fuse_projections(model) == 2 and peek(single).stack is not None
    with torch.no_grad():
        assert torch.equal(model(**inputs)[0], before)
    assert svdquant.unfuse(model) == {"qkv": 2, "gelu": 3, "compiled_activations": 0, "modulations": 0, "norm_rope": 0}
    # into="up": the up projections' epilogues; a stacked single block keeps its GELU (one GEMM, one member's GELU)
    assert fuse_projections(model) == 2 and fuse_gelu(model, into="up") == 2
    assert ff.net[0].proj.output_gelu and ff.net[2].input_gelu_from is None
    assert isinstance(single.act_mlp, torch.nn.GELU) and single.proj_out.input_gelu_from is None
    with torch.no_grad():
        assert torch.equal(model(**inputs)[0], before)
    assert svdquant.unfuse(model) == {"qkv": 2, "gelu": 2, "compiled_activations": 0, "modulations": 0, "norm_rope": 0}
    assert not ff.net[0].proj.output_gelu and isinstance(ff.net[0], GELU)
    # into="up" first: the unstacked single block's GELU goes into proj_mlp's epilogue, and it is not stacked
    # after (its members would run in turn: slower than the block as it is)
    assert fuse_gelu(model, into="up") == 3 and single.proj_mlp.output_gelu
    assert fuse_projections(model) == 2 and peek(single).stack is None
    with torch.no_grad():
        assert torch.equal(model(**inputs)[0], before)
    assert svdquant.unfuse(model) == {"qkv": 2, "gelu": 3, "compiled_activations": 0, "modulations": 0, "norm_rope": 0}
    with pytest.raises(ValueError, match="into='sideways': use one of"):
        fuse_gelu(model, into="sideways")


@interpreted
def test_an_input_gelu_in_the_activation_pass_matches_the_gelu_before_the_layer():
    """set_input_gelu on the INT8 runner against F.gelu before the reference layer, the input whole or in two parts:
    from channel 0 (an fc2: in the interpreted kernels, both activation passes), and from channels that are not a
    whole number of this layer's K blocks (64, 40 of 128: applied in torch ops first; the kernels' own start at a
    block boundary is tested in test_kernels.py). fp32: Triton's tanh-GELU and torch's agree to ~1e-7; a missing
    GELU moves the output by far more than the bound."""
    from svdquant import kernels
    from svdquant.ops.reference import gelu_columns

    (m,), x = _group(ns=(48,))
    ref = ReferenceRunner(m)
    m._runner = Int8Runner(m, kernels, tma=False, num_sms=0)
    plain = ref(x)
    for start in (0, 64, 40):
        m.set_input_gelu(start)
        want = ref(gelu_columns(x, None, start))
        assert rel(want, plain) > 0.01
        assert rel(m(x), want) < 1e-5, start
        assert rel(m(x[:, :64], tail=x[:, 64:]), want) < 1e-5, start
    m.set_input_gelu(None)
    assert rel(m(x), plain) < 1e-5
    with pytest.raises(ValueError, match=r"set_input_gelu\(128\): the first GELU channel must be in \[0, 128\)"):
        m.set_input_gelu(128)


def test_compiled_activations_mark_every_a8_layer_and_leave_eager_unchanged(quantized_flux):
    from svdquant.modules import SVDQLinear

    model, inputs = quantized_flux
    with torch.no_grad():
        before = model(**inputs)[0]
    a8 = [m for m in model.modules() if isinstance(m, SVDQLinear) and m.activations == "int8"]
    assert len(a8) == 17  # tiny FLUX: 12 in the double block, 5 in the single one (the adaLN layers are W4A16)
    got = svdquant.fuse(model, gelu=False, compiled_activations=True)
    assert got == {"qkv": 2, "gelu": 0, "compiled_activations": 17, "modulations": 0, "norm_rope": 0}
    # the single block's stacked runner (q/k/v + proj_mlp) follows a later switch too (members set it on theirs)
    assert all(m.compiled_activations for m in a8)
    assert svdquant.fuse(model, gelu=False, compiled_activations=True)["compiled_activations"] == 0  # already on
    with torch.no_grad():  # eager (here the CPU reference) is not touched
        assert torch.equal(model(**inputs)[0], before)
    assert svdquant.unfuse(model) == {"qkv": 2, "gelu": 0, "compiled_activations": 17, "modulations": 0, "norm_rope": 0}
    assert not any(m.compiled_activations for m in a8)


@interpreted
@pytest.mark.parametrize("mode", ["speed", "memory"])
def test_int8_runner_applies_the_gelu_in_its_epilogue(mode):
    """The INT8 GEMM's epilogue GELU (fp32, before the 16-bit rounding) against the reference + F.gelu."""
    from svdquant import kernels

    (m,), x = _group(ns=(48,))
    ref = torch.nn.functional.gelu(ReferenceRunner(m)(x), approximate="tanh")
    m.weight_mode = mode
    m._runner = Int8Runner(m, kernels, tma=False, num_sms=0)
    m.set_output_gelu(True)
    assert m._runner.gelu
    y = m(x)
    assert float((y - ref).norm() / ref.norm()) < 1e-5
    m.set_output_gelu(False)
    assert float((m(x) - ReferenceRunner(m)(x)).norm()) < 1e-3


@interpreted
@pytest.mark.parametrize("mode", ["speed", "memory"])
def test_a_model_on_the_int8_runners_deep_copies(mode):
    """copy.deepcopy of a layer whose runner holds the kernels module and the GEMM's read-only tile table (a GPU
    model after loading) gives a layer that runs on its own tensors, as fused layers do."""
    from svdquant import kernels

    layers, x = _group()
    for m in layers:
        m.weight_mode = mode
        m._runner = Int8Runner(m, kernels, tma=False, num_sms=0)
    want = torch.cat([m(x) for m in layers], -1)
    fused = FusedSVDQLinear(layers)
    copied = copy.deepcopy(torch.nn.ModuleList([fused, *layers]))
    assert copied[1]._runner.kernels is kernels and copied[1]._runner.config == layers[0]._runner.config
    if mode == "speed":
        assert copied[1]._runner.w.data_ptr() != layers[0]._runner.w.data_ptr()
    else:  # the copied stack reads the copied layers' own buffers
        codes, mults = copied[0]._runner.parts
        assert all(c is m._buffers["qweight"] and u is m._buffers["wmult"] for c, u, m in zip(codes, mults, copied[1:]))
    assert torch.equal(copied[0](x), fused(x)) and torch.equal(torch.cat([m(x) for m in copied[1:]], -1), want)


def test_fused_layer_refuses_layers_of_different_layouts():
    a = SVDQLinear(64, 32, True, rank=16)
    b = SVDQLinear(64, 32, True, rank=32)
    with pytest.raises(ValueError, match="share their input width and quantization layout"):
        FusedSVDQLinear([a, b])
    with pytest.raises(TypeError, match="two or more"):
        FusedSVDQLinear([a])


def test_stacked_branch_shares_one_down_and_makes_a_block_up_with_loras():
    g = torch.Generator().manual_seed(0)
    d = torch.randn(16, 8, generator=g)
    u1, u2 = torch.randn(4, 16, generator=g), torch.randn(6, 16, generator=g)
    down, up = stacked_branch([(d, u1), (d, u2)], [4, 6])
    assert down is d and torch.equal(up, torch.cat([u1, u2]))
    d2 = torch.randn(16, 8, generator=g)
    down, up = stacked_branch([(d, u1), (d2, u2), (None, None)], [4, 6, 3])
    assert down.shape == (32, 8) and up.shape == (13, 32)
    x = torch.randn(5, 8, generator=g)
    want = torch.cat([x @ d.T @ u1.T, x @ d2.T @ u2.T, torch.zeros(5, 3)], 1)
    assert torch.allclose(x @ down.T @ up.T, want, atol=1e-5)
    assert stacked_branch([(None, None)] * 2, [3, 3]) == (None, None)


def test_stacked_branch_keeps_the_groups_rows_once_with_each_members_loras_after_them():
    """q/k/v + MLP of a FLUX single block with a rank-8 LoRA on each: the group's 32 rows once, then each member's 8
    (its padding's zero rows dropped): rank 64, what the Hopper GEMM takes, not 4 · 64 = 256. Each member's rows
    of the product are its own branch's."""
    g = torch.Generator().manual_seed(1)
    base = torch.randn(32, 24, dtype=torch.float64, generator=g)
    members, ns = [], (5, 6, 7, 9)
    for n in ns:
        lora = torch.randn(8, 24, dtype=torch.float64, generator=g)
        down = torch.cat([base, lora, torch.zeros(24, 24, dtype=torch.float64)])  # padded_branch's 40 -> 64
        up = torch.cat([torch.randn(n, 40, dtype=torch.float64, generator=g), torch.zeros(n, 24, dtype=torch.float64)],
                       1)
        members.append((down, up))
    down, up = stacked_branch(members, list(ns))
    assert down.shape == (64, 24) and up.shape == (sum(ns), 64)
    x = torch.randn(3, 24, dtype=torch.float64, generator=g)
    want = torch.cat([x @ d.T @ u.T for d, u in members], 1)
    assert rel(x @ down.T @ up.T.double(), want) < 1e-6  # the up is held in fp32
    # a member without a branch: the others still share theirs, its rows of the product are zero
    down, up = stacked_branch(members[:2] + [(None, None)], [5, 6, 4])
    assert down.shape == (64, 24) and not up[11:].any()  # 32 shared + 2 x 8 -> 64
    want = torch.cat([x @ d.T @ u.T for d, u in members[:2]] + [torch.zeros(3, 4, dtype=torch.float64)], 1)
    assert rel(x @ down.T @ up.T.double(), want) < 1e-6
    # rows shared by only some members are not shared: those members' rows are their own
    other = (torch.cat([torch.randn(32, 24, dtype=torch.float64, generator=g), members[0][0][32:]]), members[0][1])
    down, up = stacked_branch([other] + members[1:], list(ns))
    assert down.shape[0] == 256  # no row shared by all four: 40 + 3 · 40 rows -> 256
    want = torch.cat([x @ d.T @ u.T for d, u in [other] + members[1:]], 1)
    assert rel(x @ down.T @ up.T.double(), want) < 1e-6


def _group(recipe="int4", k=128, ns=(48, 32, 48), seed=0):
    """Three layers quantized as one shared-input group (one λ, one branch), as q/k/v are."""
    g = torch.Generator().manual_seed(seed)
    lins = [torch.nn.Linear(k, n) for n in ns]
    with torch.no_grad():
        for lin in lins:
            lin.weight.copy_(torch.randn(lin.out_features, k, generator=g) / k**0.5)
    x = torch.randn(64, k, generator=g)
    x[:, :3] *= 20
    rc = get_recipe(recipe).replace(rank=16, iterations=1, eval_tokens=64)
    return SVDQLinear.from_linears(lins, x, rc), x


@interpreted
@pytest.mark.parametrize("recipe,mode", [("int4", "speed"), ("w4a4", "speed"), ("int4", "memory"),
                                         ("w4a4", "memory")])
def test_stacked_int8_runner_equals_the_layers_apart_through_the_kernels(recipe, mode):
    """One INT8 runner over the three layers' rows (N = 128) gives what they give apart (N = 48 / 32 / 48) within
    the numerics' bound: the integer GEMM is exact; the fp32 branch (K = 128) is summed in another order when
    stacked, ``reassociation_bound(128)`` = 1.5e-5 at most (measured 3.5e-8 without a LoRA, 1.5e-7 with one; a
    LoRA's effect, which the bound must catch, is ~0.1). Members run alone again afterwards on their own shapes:
    the same ops as before stacking (speed mode: their weights are views of the stacked one), so that is bit for
    bit. Memory mode holds no copy: the stack expands the layers' own 4-bit codes (their buffers) per call."""
    from svdquant import kernels

    layers, x = _group(recipe)
    packed = [m.packed_weight().clone() for m in layers]
    for m in layers:
        m.weight_mode = mode
        m._runner = Int8Runner(m, kernels, tma=False, num_sms=0)  # the GPU's runner, kernels interpreted
    apart = torch.cat([m(x) for m in layers], -1)
    fused = FusedSVDQLinear(layers)
    assert fused._runner is not None
    if mode == "speed":
        assert fused._runner.w.shape[0] == 128
        assert all(m._runner.w.data_ptr() == fused._runner.w[s:].data_ptr()  # views, not copies
                   for m, s in zip(layers, (0, 48, 80)))
    else:
        codes, mults = fused._runner.parts
        assert all(c is m._buffers["qweight"] and u is m._buffers["wmult"] for c, u, m in zip(codes, mults, layers))
        assert fused._runner.w is None and fused._runner.packed is None
    assert rel(fused(x), apart) < reassociation_bound(128)
    assert torch.equal(torch.cat([m(x) for m in layers], -1), apart)  # members still run alone
    # a LoRA on one member: its rows see it, the others do not (the shared rows once, then the LoRA's, block up)
    layers[1].add_adapter("l", torch.randn(8, 128) * 0.1, torch.randn(32, 8) * 0.1, 0.7)
    assert fused._runner.down.shape[0] == 32  # 16 shared + 8 -> 32 (each member's own copy: 16 + 24 + 16 -> 64)
    ref = torch.cat([ReferenceRunner(m)(x) for m in layers], -1)
    assert float((fused(x) - ref).norm() / ref.norm()) < 1e-6
    # state dicts still hold each member's own packed codes (speed mode: rebuilt from its view of the stacked weight)
    for m, want in zip(layers, packed):
        assert torch.equal(m.state_dict()["qweight"], want)


@interpreted
def test_a_memory_mode_stack_runs_its_members_in_turn_under_their_offload_hooks(monkeypatch):
    """A memory-mode stack expands its members' buffers; offload hooks on the members (here accelerate's
    ``cpu_offload(offload_buffers=True)``, which keeps them on ``meta`` between calls; diffusers' leaf-level group
    offloading alike) bring those in only when a member's own forward runs. So the stack runs its members in turn
    there: each member's GEMM, none over the stack's rows, and the stacked result within the branch's reassociation
    bound. Without hooks it runs the one GEMM."""
    from accelerate import cpu_offload

    from svdquant import kernels
    from svdquant.integrations.diffusers import compat
    from svdquant.modules import linear

    layers, x = _group()
    monkeypatch.setattr(linear.ops, "prepare", lambda m: Int8Runner(m, kernels, tma=False, num_sms=0))
    for m in layers:
        m.weight_mode = "memory"
        m.refresh()
    fused = FusedSVDQLinear(layers)
    widths = []
    gemm = kernels.int8_gemm
    monkeypatch.setattr(kernels, "int8_gemm", lambda a, a_s, w, *r, **kw: widths.append(w.shape[0]) or
                        gemm(a, a_s, w, *r, **kw))
    want = fused(x)
    assert fused._reads_members and widths == [128]
    cpu_offload(torch.nn.ModuleList(layers), execution_device="cpu", offload_buffers=True)
    assert all(compat.has_hooks(m) for m in layers) and all(m.qweight.is_meta for m in layers)
    widths.clear()
    assert rel(fused(x), want) < reassociation_bound(128)
    assert widths == [48, 32, 48]


@pytest.mark.parametrize("runner", ["dense", "int8"])
@pytest.mark.parametrize("gelu", ["output", "input"])
def test_a_stack_whose_member_has_its_own_gelu_runs_its_members_in_turn(runner, gelu):
    """One GEMM for a stack cannot apply one member's GELU (on its output, or on its input): set on a member, the
    stack runs its members in turn (each with its GELU), and stacks again once it is off."""
    from svdquant.ops.runners.cublas import DenseRunner

    if runner == "int8" and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1"):
        pytest.skip("the interpreter runs the kernels on CPU machines")
    from svdquant import kernels

    layers, x = _group()
    for m in layers:
        m.weight_mode = "speed"
        m._runner = DenseRunner(m) if runner == "dense" else Int8Runner(m, kernels, tma=False, num_sms=0)
    fused = FusedSVDQLinear(layers)
    assert fused._runner is not None
    plain = torch.cat([m(x) for m in layers], -1)
    if gelu == "output":
        layers[2].set_output_gelu(True)
    else:
        layers[2].set_input_gelu(64)
    assert fused._runner is None
    apart = torch.cat([m(x) for m in layers], -1)
    assert torch.equal(fused(x), apart) and rel(apart[:, 80:], plain[:, 80:]) > 0.01  # the GELU did apply
    layers[2].set_output_gelu(False)
    layers[2].set_input_gelu(None)
    assert fused._runner is not None and rel(fused(x), plain) < 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("mode", ["speed", "memory"])
def test_gpu_fused_qkv_at_flux_shape_equals_the_layers_apart(mode):
    """In either weight mode the stack adds no resident weight: speed mode's members view its INT8 rows, memory
    mode's stack expands the members' own 4-bit codes per call."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from kernel_speed import random_layer

    layers = [random_layer(3072, 3072, seed=i) for i in range(3)]
    with torch.no_grad():
        for m in layers[1:]:  # one shared-input group: one λ, one branch down projection
            m.smooth_inv.copy_(layers[0].smooth_inv)
            m.lora_down.copy_(layers[0].lora_down)
    for m in layers:
        m.weight_mode = mode
        m.refresh()
    x = torch.randn(4608, 3072, device="cuda", dtype=torch.bfloat16)
    apart = torch.cat([m(x) for m in layers], -1)
    allocated = torch.cuda.memory_allocated()
    fused = FusedSVDQLinear(layers)
    added = torch.cuda.memory_allocated() - allocated
    assert added < 4 * 2**20, added  # the members view the stacked weight (a copy would add 28 MB)
    assert fused._runner is not None and (fused._runner.parts is not None) == (mode == "memory")
    y = fused(x)
    assert float((y.float() - apart.float()).norm() / apart.float().norm()) < 1e-6
    layers[2].add_adapter("l", torch.randn(64, 3072, device="cuda", dtype=torch.bfloat16) * 0.01,
                          torch.randn(3072, 64, device="cuda", dtype=torch.bfloat16) * 0.01, 0.8)
    ref = torch.cat([ReferenceRunner(m)(x) for m in layers], -1)
    assert float((fused(x).float() - ref.float()).norm() / ref.float().norm()) < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("mode", ["speed", "memory"])
def test_gpu_gelu_epilogue_at_the_flux_mlp_shape(mode):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from kernel_speed import random_layer

    m = random_layer(3072, 12288, seed=3, mode=mode)
    x = torch.randn(4608, 3072, device="cuda", dtype=torch.bfloat16)
    want = torch.nn.functional.gelu(ReferenceRunner(m)(x).float(), approximate="tanh")
    m.set_output_gelu(True)
    m.refresh()  # a re-prepared runner keeps it
    y = m(x)
    assert float((y.float() - want).norm() / want.norm()) < 1e-2


def test_diffusers_unfuse_qkv_projections_leaves_a_stacked_single_block_working(quantized_flux):
    """transformer.unfuse_qkv_projections() (diffusers' API) after svdquant.fuse: the single block's to_qkv is
    not a projection; removing it broke the block's forward and then svdquant.unfuse (half-way)."""
    import copy

    model, inputs = quantized_flux
    with torch.no_grad():
        before = model(**inputs)[0]
    m = copy.deepcopy(model)
    svdquant.fuse(m)
    m.unfuse_qkv_projections()
    with torch.no_grad():
        assert torch.equal(m(**inputs)[0], before)
    svdquant.unfuse(m)
    single = m.single_transformer_blocks[0]
    assert "forward" not in single.__dict__ and single.proj_mlp.stacked_in is None
    with torch.no_grad():
        assert torch.equal(m(**inputs)[0], before)


@interpreted
def test_fuse_compiled_activations_reach_the_stacked_runners(quantized_flux):
    """On the INT8 runners: svdquant.fuse(compiled_activations=True) puts every A8 quantization in the graph,
    stacked runners included (no int8_linear left), and the compiled step equals eager."""
    import copy

    from svdquant import kernels

    model, inputs = quantized_flux
    m = copy.deepcopy(model)
    for lin in m.modules():
        if isinstance(lin, SVDQLinear) and lin.activations == "int8":
            lin._runner = Int8Runner(lin, kernels, tma=False, num_sms=0)
    svdquant.fuse(m, gelu=False, compiled_activations=True)
    assert peek(m.single_transformer_blocks[0]).stack._runner.act_in_graph
    torch._dynamo.reset()
    graph = "\n".join(str(g.graph) for g in torch._dynamo.explain(m)(**inputs).graphs)
    assert "svdquant.int8_gemm" in graph and "int8_linear" not in graph
    with torch.no_grad():
        eager = m(**inputs)[0]
        compiled = torch.compile(m, backend="aot_eager", fullgraph=True)(**inputs)[0]
    assert float((compiled - eager).norm() / eager.norm()) < 1e-6


@pytest.mark.parametrize("arch", ["flux2", "wan"])
def test_fused_flux2_and_wan_equal_unfused(arch):
    """FLUX.2's attentions (both streams) and Wan's self-attention read diffusers' ``to_qkv`` / ``to_added_qkv``
    once fused; Wan's cross-attention (which would read a ``to_kv``) and FLUX.2's single blocks (one linear
    already) stay as they are. Bit for bit on the CPU, same state dict, and unfusing restores the attentions."""
    build, make_inputs = tm.ARCHS[arch]
    model = build(seed=0)
    svdquant.quantize(model, get_recipe("int4", iterations=1, eval_tokens=64),
                      svdquant.Calibration(inputs=tm.calibration_inputs(arch, model, 1)), progress=False)
    inputs = make_inputs(model, seed=7)
    with torch.no_grad():
        before = model(**inputs)[0]
    keys = list(model.state_dict())
    if arch == "flux2":
        attns = [b.attn for b in model.transformer_blocks]
        untouched = [b.attn for b in model.single_transformer_blocks]
    else:
        attns = [b.attn1 for b in model.blocks]
        untouched = [b.attn2 for b in model.blocks]
    assert attns and untouched
    assert svdquant.fuse(model)["qkv"] == len(attns)
    assert all(a.fused_projections and isinstance(a.to_qkv, FusedSVDQLinear) for a in attns)
    if arch == "flux2":
        assert all(isinstance(a.to_added_qkv, FusedSVDQLinear) for a in attns)
    assert not any(a.fused_projections or hasattr(a, "to_qkv") for a in untouched if arch == "wan")
    assert list(model.state_dict()) == keys
    with torch.no_grad():
        assert torch.equal(model(**inputs)[0], before)
    assert unfuse_projections(model) == len(attns)
    assert not any(a.fused_projections or hasattr(a, "to_qkv") for a in attns)
    with torch.no_grad():
        assert torch.equal(model(**inputs)[0], before)


@pytest.mark.parametrize("arch, streams", [("qwenimage", 2), ("zimage", 1), ("pixart", 1), ("sana", 1), ("sdxl", 1)])
def test_fused_view_equals_unfused(arch, streams):
    """Attentions whose diffusers processor calls to_q, to_k, to_v one by one (Qwen-Image's two streams, Z-Image's,
    PixArt-Σ's and SANA's self-attention) run them as one stacked GEMM through a view of the attention: bit for bit
    the unfused model on the CPU, same state dict, cross-attentions untouched, diffusers' processors back after
    unfusing; the attention backend set on the model reaches diffusers' processor inside."""
    from svdquant.modules.fused_view import FusedViewProcessor

    build, make_inputs = tm.ALL_ARCHS[arch]
    model = build(seed=0)
    svdquant.quantize(model, get_recipe("int4", iterations=1, eval_tokens=64),
                      svdquant.Calibration(inputs=tm.calibration_inputs(arch, model, 1)), progress=False)
    inputs = make_inputs(model, seed=7)
    before = tm.forward(model, inputs)
    keys = list(model.state_dict())
    processors = {n: m.processor for n, m in model.named_modules() if hasattr(m, "processor")}
    names = [n for n, m in model.named_modules() if hasattr(m, "processor") and not getattr(m, "is_cross_attention", False)]
    attns = [model.get_submodule(n) for n in names]
    assert attns
    assert svdquant.fuse(model)["qkv"] == len(attns)
    for a in attns:
        assert isinstance(a.processor, FusedViewProcessor) and isinstance(a.to_qkv, FusedSVDQLinear)
        assert isinstance(getattr(a, "to_added_qkv", None), FusedSVDQLinear) == (streams == 2)
    for n, m in model.named_modules():  # cross-attentions keep diffusers' processor
        if hasattr(m, "processor") and m not in attns:
            assert m.processor is processors[n]
    assert list(model.state_dict()) == keys
    stacked_calls = []
    hooks = [a.to_qkv.register_forward_hook(lambda *_: stacked_calls.append(1)) for a in attns]
    assert torch.equal(tm.forward(model, inputs), before)
    assert len(stacked_calls) >= len(attns)  # the processors ran the stacked GEMM, not the members alone
    for h in hooks:
        h.remove()
    if hasattr(attns[0].processor, "_attention_backend"):  # diffusers' set_attention_backend writes it there
        model.set_attention_backend("native")
        assert all(a.processor.inner._attention_backend is not None for a in attns)
        model.reset_attention_backend()
    copied = copy.deepcopy(model)  # a fused model copies (the wrapper classes are made at run time)
    assert type(copied.get_submodule(names[0]).processor) is type(attns[0].processor)
    assert torch.equal(tm.forward(copied, inputs), before)
    assert unfuse_projections(model) == len(attns)
    assert {n: m.processor for n, m in model.named_modules() if hasattr(m, "processor")} == processors
    assert not any(hasattr(a, "to_qkv") for a in attns)
    assert torch.equal(tm.forward(model, inputs), before)


def test_fused_view_traces_in_one_graph():
    """The view and the wrapped processor must not break torch.compile's graph (CUDA graphs and the compiled blocks of
    svdquant.optimize need whole graphs): Qwen-Image's blocks, both streams fused, compile with fullgraph=True."""
    import torch._dynamo

    model = tm.build_qwenimage(seed=0)
    svdquant.quantize(model, get_recipe("int4", iterations=1, eval_tokens=64),
                      svdquant.Calibration(inputs=tm.calibration_inputs("qwenimage", model, 1)), progress=False)
    inputs = tm.qwenimage_inputs(model, seed=7)
    before = tm.forward(model, inputs)
    assert svdquant.fuse(model)["qkv"] == len(model.transformer_blocks)
    torch._dynamo.reset()
    for block in model.transformer_blocks:
        block.compile(fullgraph=True, backend="eager")  # a graph break raises here
    assert torch.equal(tm.forward(model, inputs), before)


@interpreted
def test_kernel_speeds_gemm_stage_is_the_layers_own_gemm():
    """benchmarks/kernel_speed.py times the GEMM stage through ``layer_gemm``: with the layer's own activation pass
    it gives the layer's output exactly (the same kernel and operands as the runner's call), and without the
    branch it differs by the branch."""
    import sys
    from pathlib import Path

    from svdquant import kernels

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from kernel_speed import layer_gemm

    (m,), x = _group(ns=(48,))
    run = Int8Runner(m, kernels, tma=False, num_sms=0)
    a, a_s, la = kernels.quantize_activations(x, run.sinv, run.down)
    y = run(x)
    assert torch.equal(layer_gemm(run, a, a_s, la, x.dtype), y)
    assert rel(layer_gemm(run, a, a_s, None, x.dtype), y) > 1e-3


@interpreted
def test_the_layer_choice_times_a_memory_mode_stack_under_its_own_key(monkeypatch):
    """svdquant.optimize's cost table (one file per machine, kept across versions) timed memory-mode stacks when
    they ran their members in turn: a stack that runs one GEMM gets a key of its own, so it is timed afresh."""
    from svdquant import kernels
    from svdquant.pipelines.layer_choice import _key

    layers, x = _group()
    for m in layers:
        m.weight_mode = "memory"
        m._runner = Int8Runner(m, kernels, tma=False, num_sms=0)
    fused = FusedSVDQLinear(layers)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "a GPU")
    assert _key(fused, 64, torch.float32).split("|")[6] == "memory+stacked"
    assert _key(layers[0], 64, torch.float32).split("|")[6] == "memory"
