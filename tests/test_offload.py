"""Offloading and caching on quantized pipelines (issue 15, part 3), on the CPU.

The tiny diffusers FluxPipeline with an int4 transformer and 4-bit text encoders, loaded from one
checkpoint per test (hooks change the pipeline), against the same pipeline without hooks, bit for bit (exact,
not within a bound: hooks move tensors and skip nothing at threshold 0, so the same ops run on the same shapes):

* ``enable_model_cpu_offload`` (accelerate's ``CpuOffload``: each model ``.to()`` its device on entry):
  diffusers refuses it without an accelerator, so it runs here with ``device="cpu"``: the hooks fire,
  the moves are no-ops;
* group offloading (``enable_group_offload``), block and leaf level, in memory and through disk
  files: the disk path really writes every packed buffer out and reads it back;
* accelerate's ``cpu_offload`` with ``offload_buffers=True`` on the transformer: every quantized
  layer's buffers go to ``meta`` after its forward and come back before the next;
* LoRA strengths (on quantized and 16-bit layers) through each, and strength changes while hooked;
* First-Block Cache (``enable_cache`` / ``apply_first_block_cache``).

What needs a GPU is untestable here (a real second device): ``.to("cuda")`` re-preparing the kernels'
runner, memory actually freed. The two fixes it needed (a layer whose tensors are moved without
``.to()``) are tested with ``meta`` standing in for the other device. ``enable_sequential_cpu_offload``
fails on the CPU for the 16-bit tiny pipeline too (accelerate 1.15: a tied T5 embedding comes back as a
plain tensor), so it is not tested here.
"""

from __future__ import annotations

import tiny_models as tm  # first: sets HF_HUB_OFFLINE before diffusers is imported

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

import svdquant
from svdquant import SVDQLinear
from svdquant.modules.lora_linear import LoRALinear

PROMPTS = ["a cat", "two ships at sea"]
STEPS = 3
D = tm.HIDDEN
# a quantized group member, a quantized single-block layer and a layer that stays 16-bit
LORA_LAYERS = {"transformer_blocks.0.attn.to_q": (D, D), "single_transformer_blocks.0.proj_out": (D, 5 * D),
               "proj_out": (tm.FLUX_CONFIG["out_channels"], D)}
CPU = torch.device("cpu")
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """(checkpoint of the int4 pipeline with 4-bit text encoders, a LoRA file)."""
    root = tmp_path_factory.mktemp("offload")
    base = tm.save_flux_pipeline(root / "base")
    pipe = tm.build_flux_pipeline(0)
    calib = svdquant.Calibration(prompts=PROMPTS, steps=2, snapshots=2, pipeline_kwargs=tm.PIPE_KWARGS)
    svdquant.quantize(pipe, svdquant.Int4Config(iterations=3, eval_tokens=128), calib, text_encoders=True,
                      progress=False)
    ck = svdquant.save_quantized(pipe, root / "ck", base=str(base))
    g = torch.Generator().manual_seed(0)
    lora = {}
    for name, (n_out, k) in LORA_LAYERS.items():
        lora[f"transformer.{name}.lora_A.weight"] = torch.randn(4, k, generator=g) * 0.3
        lora[f"transformer.{name}.lora_B.weight"] = torch.randn(n_out, 4, generator=g) * 0.3
    save_file(lora, str(root / "style.safetensors"))
    return ck, root / "style.safetensors"


def load(made, lora: float | None = None):
    pipe = svdquant.load_pipeline(None, made[0])
    pipe.set_progress_bar_config(disable=True)
    if lora is not None:
        svdquant.load_lora(pipe, made[1], name="style", strength=lora)
    return pipe


def images(pipe):
    return tm.sample(pipe, PROMPTS, steps=STEPS)


@pytest.fixture(scope="module")
def reference(made):
    """Images without hooks: plain, LoRA at 0.7, LoRA at 0.3."""
    plain = images(load(made))
    pipe = load(made, lora=0.7)
    at07 = images(pipe)
    svdquant.set_lora_strength(pipe, "style", 0.3)
    return {None: plain, 0.7: at07, 0.3: images(pipe)}


def check(pipe, reference, lora):
    """Twice (the hooks move everything out after a call and back in for the next), then a strength change."""
    assert torch.equal(images(pipe), reference[lora])
    assert torch.equal(images(pipe), reference[lora])
    if lora is not None:
        svdquant.set_lora_strength(pipe, "style", 0.3)
        assert svdquant.loaded_loras(pipe) == {"style": 0.3}
        assert torch.equal(images(pipe), reference[0.3])


def test_the_loras_change_the_images(reference):
    assert not torch.equal(reference[None], reference[0.7]) and not torch.equal(reference[0.7], reference[0.3])


# ------------------------------------------------------------------------------------------------ model offload
@pytest.mark.skipif(torch.cuda.is_available(), reason="what diffusers does without an accelerator")
def test_model_cpu_offload_needs_an_accelerator(made):
    with pytest.raises(RuntimeError, match="requires accelerator"):
        load(made).enable_model_cpu_offload()


@pytest.mark.parametrize("lora", [None, 0.7])
def test_model_cpu_offload(made, reference, lora):
    pipe = load(made, lora)
    pipe.enable_model_cpu_offload(device="cpu")
    assert len(pipe._all_hooks) == 4  # text_encoder -> text_encoder_2 -> transformer -> vae
    check(pipe, reference, lora)


def test_load_pipeline_offload_is_model_offload_in_memory_mode(made, reference, monkeypatch):
    """load_pipeline(..., offload=True): the pipeline stays in CPU memory behind diffusers' model-offload hooks, the
    quantized layers 4-bit resident (memory mode unless a mode is given), images as without hooks. load_pipeline
    refuses device='cpu' with offload (pointless for users) and 'cuda' without a GPU, while diffusers' offload runs
    to the CPU on a CPU machine: the device check is stepped around and the hooks offload to the CPU here."""
    from svdquant.pipelines import load as load_module

    with pytest.raises(ValueError, match="offload=True keeps the models in CPU memory .* leave offload out"):
        svdquant.load_pipeline(None, made[0], device="cpu", offload=True)
    with pytest.raises(ValueError, match="offload='yes': use True or False"):
        svdquant.load_pipeline(None, made[0], offload="yes")
    from svdquant.pipelines.load import offloaded

    monkeypatch.setattr(load_module._checks, "device", lambda name, d: d)  # "cuda" passes without a GPU
    monkeypatch.setattr(load_module, "offloaded", lambda pipe, device, **kw: offloaded(pipe, "cpu", **kw))
    pipe = svdquant.load_pipeline(None, made[0], device="cuda", offload=True)  # loads into CPU memory
    pipe.set_progress_bar_config(disable=True)
    layers = [m for m in pipe.transformer.modules() if isinstance(m, SVDQLinear)]
    assert layers and {m.weight_mode for m in layers} == {"memory"}
    assert len(pipe._all_hooks) == 4
    check(pipe, reference, None)
    pipe = svdquant.load_pipeline(None, made[0], device="cuda", offload=True, weight_mode="speed")
    assert {m.weight_mode for m in pipe.transformer.modules() if isinstance(m, SVDQLinear)} == {"speed"}


# ------------------------------------------------------------------------------------------------ group offload
GROUPS = {
    "block": dict(offload_type="block_level", num_blocks_per_group=1),
    "leaf": dict(offload_type="leaf_level"),
    "block-disk": dict(offload_type="block_level", num_blocks_per_group=1, disk=True),
}


@pytest.mark.parametrize("lora", [None, 0.7])
@pytest.mark.parametrize("kind", list(GROUPS))
def test_group_offloading(made, reference, tmp_path, kind, lora):
    kw = dict(GROUPS[kind])
    if kw.pop("disk", False):
        kw["offload_to_disk_path"] = str(tmp_path / "groups")
    pipe = load(made, lora)
    layer = pipe.transformer.transformer_blocks[0].attn.to_k
    packed = layer.qweight.clone()
    pipe.enable_group_offload(onload_device=CPU, offload_device=CPU, **kw)
    check(pipe, reference, lora)
    if "offload_to_disk_path" in kw:
        # the packed codes went out to the group files and came back from them
        stored = [t for f in (tmp_path / "groups").glob("*.safetensors") for t in load_file(str(f)).values()]
        assert any(t.dtype == torch.uint8 and t.shape == packed.shape and torch.equal(t, packed) for t in stored)


def test_leaf_level_groups_each_quantized_layer(made):
    """Leaf-level offloading hooks only nn.Linear / Conv / Embedding; a quantized layer's buffers become a group
    of their own, hooked on the layer (diffusers gathers tensors with no hooked parent by closest module)."""
    from diffusers.hooks import HookRegistry

    pipe = load(made)
    pipe.transformer.enable_group_offload(onload_device=CPU, offload_device=CPU, offload_type="leaf_level")
    for name, m in pipe.transformer.named_modules():
        if isinstance(m, SVDQLinear):
            hook = HookRegistry.check_if_exists_or_initialize(m).get_hook("group_offloading")
            assert hook is not None, name
            assert {id(b) for b in hook.group.buffers} == {id(b) for b in m.buffers()}, name


# ------------------------------------------------------------------------------------------------ accelerate
def test_accelerate_offloads_quantized_buffers_to_meta(made, reference):
    """``cpu_offload(offload_buffers=True)``: each layer's tensors on meta between calls, restored from the
    offloaded copy (new tensor objects) before its forward."""
    from accelerate import cpu_offload

    pipe = load(made)
    cpu_offload(pipe.transformer, execution_device=CPU, offload_buffers=True)
    check(pipe, reference, None)
    layer = pipe.transformer.single_transformer_blocks[0].proj_out
    assert {b.device.type for b in layer.buffers()} == {"meta"}


# ------------------------------------------------------------------------------------------------ the two fixes
def _layer():
    torch.manual_seed(0)
    lin = nn.Linear(128, 64)
    x = torch.randn(32, 128)
    return SVDQLinear.from_linear(lin, x, svdquant.Int4Config(iterations=2, eval_tokens=32)), torch.randn(5, 128)


def test_layer_runs_the_tensors_it_holds_after_they_move_without_to():
    """Group offloading assigns each buffer's ``.data`` and accelerate replaces buffers, neither through
    ``.to()``: the layer must prepare again (on a GPU the runner otherwise keeps the torch reference chosen on
    the CPU, or CPU LoRA branches next to GPU weights). ``meta`` stands in for the other device;
    ``torch.utils.swap_tensors`` moves a tensor to another device keeping its identity, as ``.data =`` does."""
    layer, x = _layer()
    want = layer(x)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    empty = SVDQLinear.from_config(layer.config(), device="meta")
    with pytest.raises(RuntimeError, match="meta device"):
        empty(x)
    for name, b in empty.named_buffers():
        torch.utils.swap_tensors(b, state[name].clone())  # same objects, now on the CPU
    assert torch.equal(empty(x), want)
    # buffers replaced by other tensors on the same device (accelerate's hooks): the new ones run
    other, _ = _layer()
    other.wscales.mul_(2)
    for name in state:
        empty._buffers[name] = other._buffers[name]
    assert torch.equal(empty(x), other(x)) and not torch.equal(empty(x), want)


def test_lora_change_while_offloaded_is_built_when_the_layer_runs():
    """A strength set while an offload hook holds the tensors elsewhere (on disk the buffers are empty
    placeholders) must not build the branch from them: it is built at the next call."""
    layer, x = _layer()
    g = torch.Generator().manual_seed(1)
    layer.add_adapter("a", torch.randn(4, 128, generator=g) * 0.1, torch.randn(64, 4, generator=g) * 0.1, 0.5)
    layer.set_adapter_strength("a", 0.8)
    want = layer(x)
    saved = {name: b.clone() for name, b in layer.named_buffers()}
    for b in layer.buffers():
        b.data = torch.full_like(b, float("nan")) if b.is_floating_point() else torch.zeros_like(b)  # offloaded
    layer.set_adapter_strength("a", 0.3)
    layer.set_adapter_strength("a", 0.8)
    for name, b in layer.named_buffers():
        b.data = saved[name]  # onloaded
    assert torch.equal(layer(x), want)


def test_lora_on_a_16bit_layer_follows_its_weight():
    """LoRAs on kept layers are plain tensors beside the weight; a weight moved by ``.data`` (or ``.to()``) takes
    them along at the next call. Here the weight goes to meta, and so do the adapters."""
    torch.manual_seed(0)
    lin = LoRALinear(nn.Linear(8, 4))
    lin.add_adapter("a", torch.randn(2, 8), torch.randn(4, 2), 0.5)
    x = torch.randn(3, 8)
    want = lin.base(x) + 0.5 * (x @ lin.adapters["a"][0].T) @ lin.adapters["a"][1].T
    assert torch.allclose(lin(x), want, atol=1e-6)
    for p in lin.base.parameters():
        torch.utils.swap_tensors(p, nn.Parameter(p.detach().to("meta")))
    out = lin(x.to("meta"))
    assert out.device.type == "meta" and lin.adapters["a"][0].device.type == "meta"


# ------------------------------------------------------------------------------------------------ caching
def _count_runs(block) -> list[int]:
    """How often ``block`` computes: FBC skips a block by not calling its forward; its layers then do not run."""
    calls = [0]
    block.proj_out.register_forward_pre_hook(lambda m, a: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_first_block_cache_threshold_zero_is_exact(made, reference):
    from diffusers.hooks import FirstBlockCacheConfig

    pipe = load(made)
    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.0))  # a difference is never below 0
    calls = _count_runs(pipe.transformer.single_transformer_blocks[-1])
    assert torch.equal(images(pipe), reference[None])
    assert calls[0] == STEPS


def test_first_block_cache_skips_blocks_on_quantized_models(made, reference):
    """A threshold no step reaches: after the first step the remaining blocks are skipped and their cached
    residual reused, as on the 16-bit model."""
    from diffusers.hooks import FirstBlockCacheConfig

    runs = {}
    for name, pipe in (("4-bit", load(made)), ("16-bit", tm.build_flux_pipeline(0))):
        pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=1e9))
        calls = _count_runs(pipe.transformer.single_transformer_blocks[-1])
        runs[name] = (images(pipe), calls[0])
    out, calls = runs["4-bit"]
    assert calls == 1 == runs["16-bit"][1]  # once per call: the first step only
    assert torch.isfinite(out).all() and not torch.equal(out, reference[None])


def test_first_block_cache_with_group_offloading_and_lora(made, reference, tmp_path):
    from diffusers.hooks import FirstBlockCacheConfig

    pipe = load(made, lora=0.7)
    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.0))
    pipe.enable_group_offload(onload_device=CPU, offload_device=CPU, offload_type="block_level",
                              num_blocks_per_group=1, offload_to_disk_path=str(tmp_path / "g"))
    check(pipe, reference, 0.7)


def test_apply_first_block_cache_after_quantize():
    """quantize() runs the pipeline to calibrate; diffusers caches its hook registries on that call, and a
    First-Block Cache added afterwards with apply_first_block_cache found no context. Calibration clears it.
    (A pipeline call of your own before apply_first_block_cache still hits this diffusers 0.42 cache:
    use ``pipe.transformer.enable_cache(config)``, which clears it.)"""
    from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache

    calib = svdquant.Calibration(prompts=PROMPTS[:1], steps=1, snapshots=1, pipeline_kwargs=tm.PIPE_KWARGS)
    pipes = [tm.build_flux_pipeline(0) for _ in range(2)]
    for pipe in pipes:
        svdquant.quantize(pipe, svdquant.Int4Config(iterations=1, eval_tokens=64), calib, progress=False)
    apply_first_block_cache(pipes[0].transformer, FirstBlockCacheConfig(threshold=0.0))
    assert torch.equal(images(pipes[0]), images(pipes[1]))
