"""LoRAs on the tiny SD3 / PixArt-Σ / SANA / Qwen-Image / FLUX.2 / Z-Image / Wan transformers and the SDXL UNet
(tests/test_lora.py covers FLUX).

For each architecture a LoRA goes onto several quantized layers (attention q/k/v, an output
projection, an MLP layer; SD3 also a W4A16 adaLN linear, FLUX.2 and Z-Image an INT8 weight-only modulation,
Wan a W4A16 cross-attention key, SANA both GLUMBConv 1x1 convolutions, which the adapter turns into
``SVDQConv1x1``) and onto one layer left 16-bit.

What "correct" means here: the model with the LoRA loaded must match the same quantized model
with ``+ s·(x·Aᵀ)·Bᵀ`` (computed in float64) added to each target layer's output by a forward hook.

Bounds (fp32 models, recipe ``Int4Config(iterations=2, eval_tokens=64)``, LoRA rank 4, A and B
``randn · 0.1``; at strength 0.7 the LoRA moves max |output| by 1.8 % (SD3), 2.0 % (PixArt), 11 % (SANA)):

* per layer, on the inputs the layer sees: ``‖after − before − delta‖ / ‖delta‖ ≤ 1e-5``
  (fp32 rounding only: measured ≤ 4.2e-7);
* end to end: ``max |y − y_ref| ≤ 1e-4 · max |y_ref|`` (measured ≤ 2.2e-7), while the LoRA itself
  must move the output by more than ``5e-3 · max |y_ref|`` (so the bound tells "applied" from "not").

Unloading, strength 0, and kohya-vs-PEFT with alpha/rank = 0.5 (a power of two) are checked bit-exactly.
"""

from __future__ import annotations

import copy

import tiny_models as tm  # first: sets HF_HUB_OFFLINE before diffusers is imported

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

import svdquant
from svdquant import Calibration, Int4Config, LoRAError, SVDQConv1x1, SVDQLinear
from svdquant.modules.lora_linear import LoRALinear

RECIPE = Int4Config(iterations=2, eval_tokens=64)
ARCHS = ["sd3", "pixart", "sana", "qwenimage", "sdxl", "flux2", "zimage", "wan"]
RANK = 4
SEED = 7  # forward inputs used for every comparison (calibration uses seeds 100, 101)
LAYER_TOL = 1e-5  # per-layer relative error against the dense delta
E2E_TOL = 1e-4  # end-to-end max abs error, relative to max |output|
# The SDXL UNet runs up to ~20 W4A4 layers after a LoRA layer (transformers in down, mid and up blocks,
# each entered through a quantized proj_in): an fp32-rounding-level difference between the fused branch
# and the float64 hooked delta flips a few 4-bit activation roundings downstream (measured 4.2e-4 end
# to end, while every LoRA layer on its own still matches to LAYER_TOL). The LoRA moves the output
# by > 10x this bound, so it still tells "applied" from "not".
# Z-Image alike: its layers after the LoRA layer of block 0 run W4A4, and a strength of 0.7 measured 3.6e-4 end to
# end where -0.5, 1.5 and 2.0 measured ~3e-7 (a flipped rounding); its LoRA moves the output by ~0.1.
E2E_TOLS = {"sdxl": 2e-3, "zimage": 2e-3}
MIN_EFFECT = 5e-3  # the LoRA must move the output by at least this much (relative to max |output|)

b0 = "transformer_blocks.0."
# name -> expected type after quantization ("q": SVDQLinear W4A4, "w4a16": SVDQLinear weight-only,
# "conv": SVDQConv1x1, "16bit": nn.Linear kept 16-bit)
LAYERS = {
    "sd3": {
        b0 + "attn.to_q": "q", b0 + "attn.to_k": "q", b0 + "attn.to_v": "q",
        b0 + "attn.to_add_out": "q",  # output projection of the context stream
        b0 + "ff.net.2": "q",  # MLP down projection (post-GELU shifted activations)
        "transformer_blocks.1.norm1.linear": "w4a16",  # adaLN: weight-only, no low-rank branch of its own
        "context_embedder": "16bit",
    },
    "pixart": {
        b0 + "attn1.to_q": "q", b0 + "attn1.to_k": "q", b0 + "attn1.to_v": "q",
        b0 + "attn1.to_out.0": "q",
        b0 + "ff.net.0.proj": "q", b0 + "ff.net.2": "q",
        b0 + "attn2.to_v": "16bit",  # cross-attention k/v read the text tokens: kept 16-bit
    },
    "sana": {
        b0 + "attn1.to_q": "q", b0 + "attn1.to_k": "q", b0 + "attn1.to_v": "q",
        b0 + "attn2.to_out.0": "q",
        b0 + "ff.conv_inverted": "conv", b0 + "ff.conv_point": "conv",  # GLUMBConv 1x1s
        b0 + "attn2.to_k": "16bit",
    },
    "qwenimage": {
        b0 + "attn.to_q": "q", b0 + "attn.to_k": "q", b0 + "attn.to_v": "q",
        b0 + "attn.to_add_out": "q",  # output projection of the text stream
        b0 + "img_mlp.net.2": "q",  # image MLP down projection (post-GELU)
        "transformer_blocks.1.txt_mod.1": "w4a16",  # modulation: weight-only
        "txt_in": "16bit",
    },
    "flux2": {
        b0 + "attn.to_q": "q", b0 + "attn.to_k": "q", b0 + "attn.to_v": "q",
        b0 + "attn.to_add_out": "q",  # output projection of the text stream
        b0 + "ff.linear_out": "q",  # SwiGLU down projection
        "single_transformer_blocks.0.attn.to_qkv_mlp_proj": "q",  # q/k/v + MLP in one layer
        "double_stream_modulation_img.linear": "w4a16",  # the model's modulation: INT8 weight-only
        "x_embedder": "16bit",
    },
    "zimage": {
        "layers.0.attention.to_q": "q", "layers.0.attention.to_k": "q", "layers.0.attention.to_v": "q",
        "layers.0.attention.to_out.0": "q",
        "layers.0.feed_forward.w2": "q",  # SwiGLU down projection
        "layers.0.adaLN_modulation.0": "w4a16",  # INT8 weight-only
        "cap_embedder.1": "16bit",
    },
    "wan": {
        "blocks.0.attn1.to_q": "q", "blocks.0.attn1.to_k": "q", "blocks.0.attn1.to_v": "q",
        "blocks.0.attn1.to_out.0": "q",
        "blocks.0.ffn.net.2": "q",  # GELU MLP down projection
        "blocks.0.attn2.to_k": "w4a16",  # cross-attention K reads the text tokens: weight-only
        "proj_out": "16bit",
    },
    "sdxl": {  # nested names: the kohya form must resolve underscores back to them
        "mid_block.attentions.0.proj_in": "q",
        "mid_block.attentions.0.transformer_blocks.0.attn1.to_q": "q",
        "mid_block.attentions.0.transformer_blocks.0.attn1.to_k": "q",
        "mid_block.attentions.0.transformer_blocks.0.attn1.to_v": "q",
        "down_blocks.1.attentions.0.transformer_blocks.0.ff.net.2": "q",  # GEGLU output
        "up_blocks.0.attentions.1.proj_out": "q",
        "up_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": "16bit",  # reads the text embedding
    },
}
TYPES = {"q": SVDQLinear, "w4a16": SVDQLinear, "conv": SVDQConv1x1, "16bit": nn.Linear}


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


_CACHE: dict = {}


def quantized(arch: str) -> nn.Module:
    """The fp32 tiny model of ``arch``, quantized once per module (tests take deep copies)."""
    if arch not in _CACHE:
        build, _ = tm.ALL_ARCHS[arch]
        model = build(seed=0)
        svdquant.quantize(model, RECIPE, Calibration(inputs=tm.calibration_inputs(arch, model, 2)), progress=False)
        _CACHE[arch] = model
    return copy.deepcopy(_CACHE[arch])


# ------------------------------------------------------------------------------------------------ helpers
def run(arch: str, model: nn.Module, seed: int = SEED) -> torch.Tensor:
    return tm.forward(model, tm.ALL_ARCHS[arch][1](model, seed=seed))


def linear_of(model: nn.Module, name: str) -> nn.Module:
    """The linear that computes layer ``name`` (an SVDQConv1x1's inner SVDQLinear reads channels-last tokens)."""
    m = model.get_submodule(name)
    return m.linear if isinstance(m, SVDQConv1x1) else m


def shape_of(model: nn.Module, name: str) -> tuple[int, int]:
    lin = linear_of(model, name)
    return lin.out_features, lin.in_features


def make_ab(model, arch, seed=0, scale=0.1) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    ab = {}
    for name in LAYERS[arch]:
        n_out, k = shape_of(model, name)
        ab[name] = (torch.randn(RANK, k, generator=g) * scale, torch.randn(n_out, RANK, generator=g) * scale)
    return ab


def conv_shaped(arch, name, a, b):
    """PEFT / kohya store the LoRA of a 1x1 convolution as 1x1 convolutions: [r, K, 1, 1] and [N, r, 1, 1]."""
    if LAYERS[arch][name] == "conv":
        return a[:, :, None, None], b[:, :, None, None]
    return a, b


def save_peft(path, arch, ab, extra: dict | None = None):
    sd = {}
    for name, (a, b) in ab.items():
        a, b = conv_shaped(arch, name, a, b)
        sd[f"transformer.{name}.lora_A.weight"] = a.contiguous()
        sd[f"transformer.{name}.lora_B.weight"] = b.contiguous()
    sd.update(extra or {})
    save_file(sd, str(path))


def save_kohya(path, arch, ab, alpha: float, extra: dict | None = None):
    sd = {}
    for name, (a, b) in ab.items():
        a, b = conv_shaped(arch, name, a, b)
        key = "lora_unet_" + name.replace(".", "_")
        sd[f"{key}.lora_down.weight"] = a.contiguous()
        sd[f"{key}.lora_up.weight"] = b.contiguous()
        sd[f"{key}.alpha"] = torch.tensor(float(alpha))
    sd.update(extra or {})
    save_file(sd, str(path))


def dense_delta(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, s: float) -> torch.Tensor:
    return s * ((x.double() @ a.double().T) @ b.double().T)


def reference_output(arch, model, ab, strength, seed=SEED) -> torch.Tensor:
    """``model``'s output with ``+ s·(x·Aᵀ)·Bᵀ`` added to each LoRA layer's output by forward hooks."""
    hooks = [linear_of(model, n).register_forward_hook(
        lambda m, args, out, a=a, b=b: out + dense_delta(args[0], a, b, strength).to(out.dtype))
        for n, (a, b) in ab.items()]
    try:
        return run(arch, model, seed)
    finally:
        for h in hooks:
            h.remove()


def capture_inputs(arch, model, names, seed=SEED) -> dict[str, torch.Tensor]:
    """The input each named layer's linear sees in one forward."""
    seen = {}
    hooks = [linear_of(model, n).register_forward_pre_hook(
        lambda m, args, n=n: seen.__setitem__(n, args[0].detach().clone())) for n in names]
    try:
        run(arch, model, seed)
    finally:
        for h in hooks:
            h.remove()
    return seen


def layer_outputs(model, xs) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return {n: linear_of(model, n)(x).detach() for n, x in xs.items()}


def check_layers(model, xs, before, ab, strength):
    after = layer_outputs(model, xs)
    for n, (a, b) in ab.items():
        delta = dense_delta(xs[n], a, b, strength)
        err = float((after[n].double() - before[n].double() - delta).norm() / delta.norm())
        assert err <= LAYER_TOL, f"{n}: LoRA delta off by {err:.2e} (relative)"


def check_end_to_end(y, y_ref, y_base, arch=None):
    tol = E2E_TOLS.get(arch, E2E_TOL)
    scale = float(y_ref.abs().max())
    effect = float((y_ref - y_base).abs().max()) / scale
    assert effect > max(MIN_EFFECT, 10 * tol), f"the LoRA barely changes the output ({effect:.1e}): the test could not fail"
    err = float((y - y_ref).abs().max()) / scale
    assert err <= tol, f"output differs from quantized + dense LoRA delta by {err:.2e} (max abs, relative)"


def snapshot(model) -> tuple[dict, dict]:
    """(module name -> type, tensor name -> tensor clone) over parameters and buffers."""
    types = {n: type(m) for n, m in model.named_modules()}
    tensors = {k: v.detach().clone() for k, v in model.state_dict().items()}
    tensors.update({f"buffer:{k}": v.detach().clone() for k, v in model.named_buffers()})
    return types, tensors


def assert_same(snap_a, snap_b):
    (types_a, t_a), (types_b, t_b) = snap_a, snap_b
    assert types_a == types_b
    assert t_a.keys() == t_b.keys()
    for k in t_a:
        assert t_a[k].dtype == t_b[k].dtype and torch.equal(t_a[k], t_b[k]), k


def assert_no_adapters(model):
    assert svdquant.loaded_loras(model) == {}
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert all(not m.adapters for m in model.modules() if isinstance(m, SVDQLinear))


# ------------------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_model_layers_are_what_the_tests_assume(arch):
    # If the adapter changes which layers it quantizes, the tests below would silently test other things.
    model = quantized(arch)
    for name, kind in LAYERS[arch].items():
        m = model.get_submodule(name)
        assert type(m) is TYPES[kind], (name, type(m).__name__)
        if kind == "q":
            assert m.activations == RECIPE.activations and m.rank > 0, name
        if kind == "w4a16":
            assert m.activations is None and m.rank == 0, name
        if kind == "conv":
            assert type(m.linear) is SVDQLinear, name
        assert next(model.parameters()).dtype == torch.float32


@pytest.mark.parametrize("arch", ARCHS)
def test_peft_lora_is_quantized_output_plus_dense_delta(arch, tmp_path):
    model = quantized(arch)
    ab = make_ab(model, arch, seed=1)
    save_peft(tmp_path / "style.safetensors", arch, ab)
    y_base = run(arch, model)
    y_ref = reference_output(arch, model, ab, 0.7)
    xs = capture_inputs(arch, model, list(ab))
    before = layer_outputs(model, xs)

    assert svdquant.load_lora(model, tmp_path / "style.safetensors", strength=0.7) == "style"
    assert svdquant.loaded_loras(model) == {"style": 0.7}
    for name, kind in LAYERS[arch].items():  # quantized layers keep their type; the 16-bit one is wrapped
        m = model.get_submodule(name)
        assert type(m) is (LoRALinear if kind == "16bit" else TYPES[kind]), name
        assert "style" in linear_of(model, name).adapters, name
    check_layers(model, xs, before, ab, 0.7)
    check_end_to_end(run(arch, model), y_ref, y_base, arch)


@pytest.mark.parametrize("arch", ARCHS)
def test_strength_changes_follow_dense_delta_and_unload_is_exact(arch, tmp_path):
    model = quantized(arch)
    snap0 = snapshot(model)
    y_base = run(arch, model)
    ab = make_ab(model, arch, seed=2)
    save_peft(tmp_path / "a.safetensors", arch, ab)
    xs = capture_inputs(arch, model, list(ab))
    before = layer_outputs(model, xs)
    model_ref = quantized(arch)  # an untouched copy, hooked for the references

    svdquant.load_lora(model, tmp_path / "a.safetensors", name="a", strength=0.7)
    check_end_to_end(run(arch, model), reference_output(arch, model_ref, ab, 0.7), y_base, arch)
    for s in (-1.5, 2.0):
        svdquant.set_lora_strength(model, "a", s)
        assert svdquant.loaded_loras(model) == {"a": s}
        check_layers(model, xs, before, ab, s)
        check_end_to_end(run(arch, model), reference_output(arch, model_ref, ab, s), y_base, arch)
    svdquant.set_lora_strength(model, "a", 0.0)
    assert torch.equal(run(arch, model), y_base)  # strength 0: the adapter drops out of the branch exactly

    svdquant.set_lora_strength(model, "a", 1.3)
    assert not torch.equal(run(arch, model), y_base)
    svdquant.unload_lora(model, "a")
    assert torch.equal(run(arch, model), y_base)
    assert_same(snapshot(model), snap0)
    assert_no_adapters(model)
    for name, kind in LAYERS[arch].items():
        assert type(model.get_submodule(name)) is TYPES[kind], name
    # and it can be loaded again under the same name, with the same effect
    svdquant.load_lora(model, tmp_path / "a.safetensors", name="a", strength=2.0)
    check_layers(model, xs, before, ab, 2.0)


@pytest.mark.parametrize("arch", ARCHS)
def test_kohya_with_alpha_equals_equivalent_peft(arch, tmp_path):
    alpha = 2.0  # alpha / rank = 0.5: a power of two, so the scaling is exact wherever it is applied
    ab = make_ab(quantized(arch), arch, seed=3)
    save_kohya(tmp_path / "kohya.safetensors", arch, ab, alpha)
    save_peft(tmp_path / "peft.safetensors", arch, {n: (a, b * (alpha / RANK)) for n, (a, b) in ab.items()})
    save_peft(tmp_path / "unscaled.safetensors", arch, ab)

    outs = {}
    for stem in ("kohya", "peft", "unscaled"):
        model = quantized(arch)
        svdquant.load_lora(model, tmp_path / f"{stem}.safetensors", strength=0.8)
        assert svdquant.loaded_loras(model) == {stem: 0.8}
        for name in LAYERS[arch]:
            assert stem in linear_of(model, name).adapters, (stem, name)  # every kohya name was resolved
        outs[stem] = run(arch, model)
    assert torch.equal(outs["kohya"], outs["peft"])
    assert not torch.equal(outs["kohya"], outs["unscaled"])  # alpha was not ignored
    base = quantized(arch)
    check_end_to_end(outs["kohya"], reference_output(arch, base, ab, 0.8 * alpha / RANK), run(arch, base), arch)


@pytest.mark.parametrize("fmt", ["peft", "kohya"])
@pytest.mark.parametrize("arch", ARCHS)
def test_lora_for_a_missing_module_is_refused_and_nothing_is_applied(arch, fmt, tmp_path):
    model = quantized(arch)
    snap0 = snapshot(model)
    y0 = run(arch, model)
    ab = make_ab(model, arch, seed=4)
    g = torch.Generator().manual_seed(5)
    ghost = "transformer_blocks.9.attn.to_q"  # the tiny models have at most 2 blocks
    a, b = torch.randn(RANK, tm.HIDDEN, generator=g), torch.randn(tm.HIDDEN, RANK, generator=g)
    path = tmp_path / "other.safetensors"
    if fmt == "peft":
        save_peft(path, arch, ab, extra={f"transformer.{ghost}.lora_A.weight": a, f"transformer.{ghost}.lora_B.weight": b})
        shown = ghost
    else:
        key = "lora_unet_" + ghost.replace(".", "_")
        save_kohya(path, arch, ab, 4.0, extra={f"{key}.lora_down.weight": a, f"{key}.lora_up.weight": b,
                                               f"{key}.alpha": torch.tensor(4.0)})
        # the file's own key, also where diffusers has a converter for the model (Qwen-Image, FLUX.2, Z-Image, Wan):
        # a file in the model's names with one stray layer is not converted (the converters drop or fail on it)
        shown = ghost.replace(".", "_")
    with pytest.raises(LoRAError, match=r"match no layer.*" + shown) as e:
        svdquant.load_lora(model, path, name="other")
    for name in LAYERS[arch]:  # only the missing layer is reported, not the good ones
        assert f"'{name}'" not in str(e.value) and f"'{name.replace('.', '_')}'" not in str(e.value), name
    assert torch.equal(run(arch, model), y0)
    assert_same(snapshot(model), snap0)
    assert_no_adapters(model)
    # the same file without the stray layer loads fine (the refusal was about that layer only)
    save_peft(tmp_path / "ok.safetensors", arch, ab)
    svdquant.load_lora(model, tmp_path / "ok.safetensors", name="other")
    assert not torch.equal(run(arch, model), y0)


# Wan's original layer names (its repository's WanModel, and the LoRAs trained on it) against diffusers': a known
# answer per kind of layer (diffusers/loaders/lora_conversion_utils.py maps the same)
WAN_ORIGINAL = {"blocks.0.self_attn.q": "blocks.0.attn1.to_q", "blocks.0.cross_attn.o": "blocks.0.attn2.to_out.0",
                "blocks.1.ffn.2": "blocks.1.ffn.net.2"}


def test_wan_lora_in_its_original_names_equals_the_diffusers_names(tmp_path):
    """A Wan LoRA as the community ships it (``diffusion_model.blocks.N.self_attn.q.lora_down.weight`` with alpha)
    goes through diffusers' Wan converter: the same output as the file in diffusers' names with alpha folded in."""
    build, make_inputs = tm.ARCHS["wan"]
    model = build(seed=0)
    svdquant.quantize(model, RECIPE, Calibration(inputs=tm.calibration_inputs("wan", model, 2)), progress=False)
    g, alpha = torch.Generator().manual_seed(9), 2.0  # alpha / rank = 0.5: exact wherever it is applied
    original, peft, kohya = {}, {}, {}
    for orig, name in WAN_ORIGINAL.items():
        lin = model.get_submodule(name)
        assert isinstance(lin, SVDQLinear), name
        a = torch.randn(RANK, lin.in_features, generator=g) * 0.1
        b = torch.randn(lin.out_features, RANK, generator=g) * 0.1
        original.update({f"diffusion_model.{orig}.lora_down.weight": a, f"diffusion_model.{orig}.lora_up.weight": b,
                         f"diffusion_model.{orig}.alpha": torch.tensor(alpha)})
        peft.update({f"transformer.{name}.lora_A.weight": a, f"transformer.{name}.lora_B.weight": b * (alpha / RANK)})
        k = "lora_unet_" + name.replace(".", "_")  # kohya in diffusers' module names: no converter needed
        kohya.update({f"{k}.lora_down.weight": a, f"{k}.lora_up.weight": b, f"{k}.alpha": torch.tensor(alpha)})
    save_file(original, str(tmp_path / "wan.safetensors"))
    save_file(peft, str(tmp_path / "peft.safetensors"))
    save_file(kohya, str(tmp_path / "kohya.safetensors"))
    inputs = make_inputs(model, seed=SEED)
    base = tm.forward(model, inputs)
    outs = []
    for stem in ("wan", "peft", "kohya"):
        m = copy.deepcopy(model)
        svdquant.load_lora(m, tmp_path / f"{stem}.safetensors", strength=0.9)
        assert all(stem in m.get_submodule(name).adapters for name in WAN_ORIGINAL.values())
        outs.append(tm.forward(m, inputs))
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2]) and not torch.equal(outs[0], base)


def test_a_lora_diffusers_cannot_convert_is_refused_in_one_line(tmp_path):
    """A Wan file in none of the model's names goes to diffusers' Wan converter; when that fails (here an
    IndexError on a kohya key of another model's layout), the user gets one line naming the model and the cause,
    and the model is untouched."""
    model = quantized("wan")
    snap0 = snapshot(model)
    g = torch.Generator().manual_seed(6)
    key = "lora_unet_transformer_blocks_9_attn_to_q"
    save_file({f"{key}.lora_down.weight": torch.randn(RANK, tm.HIDDEN, generator=g),
               f"{key}.lora_up.weight": torch.randn(tm.HIDDEN, RANK, generator=g)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(LoRAError, match=r"^diffusers could not convert this WanTransformer3DModel LoRA \(\w+Error: "):
        svdquant.load_lora(model, tmp_path / "x.safetensors")
    assert_same(snapshot(model), snap0)
    assert_no_adapters(model)
