"""Nunchaku's Qwen-Image (and Qwen-Image-Edit: the same transformer) single-file INT4 checkpoints imported
(svdquant/convert/nunchaku/; issue 26).

A tiny Qwen-Image, 128 wide (Nunchaku's INT4 layers are multiples of 128), quantized by us with ``w4a4-float`` in
bf16, then written here as ``NunchakuQwenImageTransformer2DModel`` holds it, from the facts of the public nunchaku
repository (``nunchaku/models/transformers/transformer_qwenimage.py``, ``models/linear.py``,
``models/attention.py``, ``models/utils.py``), not from svdquant's writer:

* diffusers' names, except q/k/v stacked along N into ``attn.to_qkv`` and ``attn.add_qkv_proj``;
* each W4A4 layer as ``SVDQW4A4Linear``: ``qweight``, ``wscales``, ``bias``, ``smooth_factor`` (λ: the kernel
  divides by it), ``smooth_factor_orig`` (unused), ``proj_down``, ``proj_up``, in the kernel's layouts;
* ``img_mod.1`` / ``txt_mod.1`` as ``AWQW4A16Linear`` (unsigned codes, ``w = code · scale + zero``), output rows
  interleaved six to a channel (the block reads ``view(B, -1, 6)``) and 1 added to the bias of the two scale
  chunks (the block runs with ``scale_shift=0``);
* metadata ``config`` (the diffusers config) and ``quantization_config`` (INT4, group 64, the rank).

Two things the file stores in 16 bits are fp32 or ``b`` (not ``1 + b``) in our model, so the source model is first
made representable (λ a bf16 number, scale biases on a grid where ``1 + b`` is exact); then the import must give
back every tensor bit for bit and the same outputs, and ``to_nunchaku`` must write the same tensors.
"""

from __future__ import annotations

import json

import tiny_models as tm  # first: sets HF_HUB_OFFLINE before diffusers is imported

import pytest
import torch
from safetensors.torch import load_file, save_file

import svdquant
from svdquant.checkpoint import CheckpointError, quantized_layers
from svdquant.convert import from_nunchaku, to_nunchaku
from svdquant.convert.nunchaku.packing import pack_awq, pack_lanes, pack_lowrank, pack_qweight
from svdquant.formats import unpack_4bit_halves
from svdquant.modules import SVDQLinear
from test_cli_inputs import rejected, run

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py

D = 128
QKV = {"attn.to_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
       "attn.add_qkv_proj": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}
ONE = ("attn.to_out.0", "attn.to_add_out", "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj",
       "txt_mlp.net.2")
MOD = ("img_mod.1", "txt_mod.1")
SCALE_CHUNKS = (1, 4)  # shift, scale, gate of the attention, then of the MLP: QwenImageTransformerBlock._modulate


def representable(model) -> None:
    """Round what the file stores in 16 bits onto values it holds exactly: λ = 1 / smooth_inv to bf16, and the
    modulation scale chunks' biases to multiples of 2⁻⁷ in (−0.5, 0.5), where 1 + b is a bf16 number."""
    with torch.no_grad():
        for m in model.modules():
            if not isinstance(m, SVDQLinear):
                continue
            if m.activations is not None:
                lam = (1 / m.smooth_inv.double()).to(torch.bfloat16)
                m.smooth_inv.copy_(1.0 / lam.float())
            else:
                b = m.bias.float().reshape(6, -1)
                for c in SCALE_CHUNKS:
                    b[c] = (b[c] * 128).round().clamp(-63, 63) / 128
                m.bias.copy_(b.reshape(-1).to(m.bias.dtype))
            m.refresh()


def codes(m: SVDQLinear) -> torch.Tensor:
    return unpack_4bit_halves(m.qweight, 64, signed=True)


def w4a4_tensors(mods: list[SVDQLinear]) -> dict[str, torch.Tensor]:
    """SVDQW4A4Linear's tensors for our layers stacked along N (they share λ and the down projection)."""
    lam = (1 / mods[0].smooth_inv.double()).to(torch.bfloat16)
    return {"qweight": pack_qweight(torch.cat([codes(m) for m in mods])),
            "wscales": pack_lanes(torch.cat([m.wscales for m in mods])),
            "bias": pack_lanes(torch.cat([m.bias for m in mods])),
            "smooth_factor": pack_lanes(lam), "smooth_factor_orig": pack_lanes(lam),
            "proj_down": pack_lowrank(mods[0].lora_down, down=True),
            "proj_up": pack_lowrank(torch.cat([m.lora_up for m in mods]), down=False)}


def interleaved(t: torch.Tensor) -> torch.Tensor:
    """diffusers' row c·D + d -> Nunchaku's row d·6 + c (what view(B, D, 6) reads as chunk c of channel d)."""
    return t.reshape(6, t.shape[0] // 6, *t.shape[1:]).transpose(0, 1).reshape(t.shape)


def awq_tensors(m: SVDQLinear) -> dict[str, torch.Tensor]:
    """AWQW4A16Linear's tensors for our symmetric weight-only layer: code + 8 with the zero at -8 · scale."""
    bias = m.bias.float().reshape(6, -1).clone()
    for c in SCALE_CHUNKS:
        bias[c] += 1
    return {"qweight": pack_awq(interleaved((codes(m).to(torch.int16) + 8).to(torch.uint8))),
            "wscales": interleaved(m.wscales).t().contiguous(),
            "wzeros": interleaved((-8 * m.wscales.float()).to(torch.bfloat16)).t().contiguous(),
            "bias": interleaved(bias.reshape(-1).to(torch.bfloat16))}


def diffusers_config() -> dict:
    """The tiny model's diffusers config, as config.json holds it (a 16-bit model's, nothing of ours in it)."""
    return {k: v for k, v in tm.build_qwenimage(num_attention_heads=4).config.items() if not k.startswith("_")}


def nunchaku_file(model, path, metadata: dict | None = None) -> tuple[dict, dict]:
    t = {}
    for name, v in model.state_dict().items():
        if not name.startswith("transformer_blocks."):
            t[name] = v
    for i, block in enumerate(model.transformer_blocks):
        pre = f"transformer_blocks.{i}"
        for theirs, ours in [*QKV.items(), *((n, (n,)) for n in ONE)]:
            mods = [block.get_submodule(o) for o in ours]
            t.update({f"{pre}.{theirs}.{k}": v for k, v in w4a4_tensors(mods).items()})
        for name in MOD:
            t.update({f"{pre}.{name}.{k}": v for k, v in awq_tensors(block.get_submodule(name)).items()})
        for norm in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
            t[f"{pre}.attn.{norm}.weight"] = block.attn.get_submodule(norm).weight
    t = {k: v.detach().contiguous() for k, v in t.items()}
    config = {"_class_name": "QwenImageTransformer2DModel", **diffusers_config()}
    qc = {"method": "svdquant", "weight": {"dtype": "int4", "scale_dtype": None, "group_size": 64},
          "activation": {"dtype": "int4", "scale_dtype": None, "group_size": 64}, "rank": 32}
    md = {"config": json.dumps(config), "quantization_config": json.dumps(qc),
          "model_class": "NunchakuQwenImageTransformer2DModel"} if metadata is None else metadata
    save_file(t, str(path), metadata=md)
    return t, md


@pytest.fixture(scope="module")
def source():
    model = tm.build_qwenimage(dtype=torch.bfloat16, num_attention_heads=4)
    svdquant.quantize(model, svdquant.get_recipe("w4a4-float", iterations=1, eval_tokens=64),
                      svdquant.Calibration(inputs=tm.calibration_inputs("qwenimage", model, 1)), progress=False)
    representable(model)
    return model


@pytest.fixture(scope="module")
def written(source, tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen-nunchaku") / "svdq-int4_r32-qwen-image.safetensors"
    tensors, md = nunchaku_file(source, path)
    return path, tensors, md


def test_import_gives_back_every_tensor_and_output(source, written):
    path, _, _ = written
    model = svdquant.load_quantized(path)
    assert type(model).__name__ == "QwenImageTransformer2DModel"
    a, b = source.state_dict(), model.state_dict()
    assert set(a) == set(b)
    assert [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])] == []
    assert quantized_layers(model) == quantized_layers(source)
    blk = model.transformer_blocks[0]
    assert (blk.attn.to_v.rank, blk.img_mlp.net[2].act_shift, blk.img_mod[1].activations) == (32, 0.171875, None)
    for seed in (3, 4):
        x = tm.qwenimage_inputs(model, seed=seed)
        assert torch.equal(tm.forward(model, x), tm.forward(source, x))


def test_read_metadata_and_the_file_without_class_names(source, written, tmp_path):
    path, _, _ = written
    meta = svdquant.read_metadata(path)
    assert meta["source"] == "nunchaku" and meta["model_class"] == "QwenImageTransformer2DModel"
    assert meta["layers"]["transformer_blocks.1.attn.add_k_proj"]["rank"] == 32 and meta["recipe"]["rank"] == 32
    assert meta["layers"]["transformer_blocks.0.txt_mlp.net.2"]["act_shift"] == 0.171875
    # Nunchaku's loaders read neither model_class nor the config's _class_name: without both, the tensors decide
    bare = tmp_path / "bare.safetensors"
    nunchaku_file(source, bare, {"config": json.dumps(diffusers_config()),
                                 "quantization_config": json.dumps({"rank": 32})})
    assert torch.equal(tm.forward(from_nunchaku(bare), tm.qwenimage_inputs(source)),
                       tm.forward(source, tm.qwenimage_inputs(source)))


def test_to_nunchaku_writes_the_same_tensors(source, written, tmp_path):
    path, tensors, _ = written
    out = to_nunchaku(source, tmp_path / "ours.safetensors")
    ours = load_file(str(out))
    assert set(ours) == set(tensors)
    assert [k for k in tensors if ours[k].dtype != tensors[k].dtype or not torch.equal(ours[k], tensors[k])] == []
    model = from_nunchaku(out)
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in model.state_dict().items())


def test_the_convert_and_info_commands_take_it(source, written, tmp_path):
    path, _, _ = written
    rc, text, err = run(["info", path])
    assert rc == 0 and "QwenImageTransformer2DModel" in text and "Nunchaku single-file INT4" in text, err
    rc, text, err = run(["convert", "nunchaku", path, "-o", tmp_path / "ck"])
    assert rc == 0 and err == "", err
    x = tm.qwenimage_inputs(source, seed=5)
    assert torch.equal(tm.forward(svdquant.load_quantized(tmp_path / "ck"), x), tm.forward(source, x))
    rc, text, err = run(["convert", tmp_path / "ck", "--to", "nunchaku", "-o", tmp_path / "back.safetensors"])
    assert rc == 0 and load_file(str(tmp_path / "back.safetensors")).keys() == load_file(str(path)).keys(), err
    (tmp_path / "fp4").mkdir()
    bad = _edit(written, tmp_path / "fp4", metadata={"quantization_config": NVFP4})
    rejected(["convert", "nunchaku", bad, "-o", tmp_path / "fp4" / "out"], "not NVFP4 ones", folder=tmp_path / "fp4")


def test_a_qwen_model_without_a_branch_is_not_exported(tmp_path):
    model = tm.build_qwenimage(dtype=torch.bfloat16, num_attention_heads=4)
    svdquant.quantize(model, svdquant.get_recipe("w4a4-float-naive"),
                      svdquant.Calibration(inputs=tm.calibration_inputs("qwenimage", model, 1)), progress=False)
    with pytest.raises(CheckpointError, match=r"rank 0; Nunchaku's branch rank is a multiple of 16, not 0.*--rank 32"):
        to_nunchaku(model, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


def _edit(written, tmp_path, tensors=None, metadata=None):
    path, t, md = written
    t = dict(t)
    tensors and tensors(t)
    f = tmp_path / "case.safetensors"
    save_file(t, str(f), metadata=dict(md, **(metadata or {})))
    return f


def _drop(name):
    return lambda t: t.pop(name)


def _transpose(name):
    return lambda t: t.__setitem__(name, t[name].t().contiguous())


def _add(name):
    return lambda t: t.__setitem__(name, torch.zeros(4))


def _flux_names(t):  # the C++ engine's tensor names, which NunchakuQwenImageTransformer2DModel does not load
    for k in [k for k in t if ".to_qkv." in k]:
        new = k.replace("smooth_factor", "smooth").replace("proj_down", "lora_down").replace("proj_up", "lora_up")
        t[new] = t.pop(k)


NVFP4 = json.dumps({"weight": {"dtype": "fp4_e2m1_all", "group_size": 16}, "rank": 32})
HOSTILE = {
    "missing": (dict(tensors=_drop("transformer_blocks.1.attn.to_qkv.qweight")),
                "lacks the tensor 'transformer_blocks.1.attn.to_qkv.qweight'; the checkpoint is incomplete"),
    "missing-branch": (dict(tensors=_drop("transformer_blocks.0.img_mlp.net.2.proj_down")),
                       "lacks the tensor 'transformer_blocks.0.img_mlp.net.2.proj_down'"),
    "missing-kept": (dict(tensors=_drop("transformer_blocks.0.attn.norm_added_k.weight")),
                     "lacks the tensor 'transformer_blocks.0.attn.norm_added_k.weight'"),
    "wrong-shape": (dict(tensors=_transpose("transformer_blocks.0.img_mod.1.wscales")),
                    "tensor 'transformer_blocks.0.img_mod.1.wscales' is [768, 2] BF16, a layer of this model needs "
                    "[2, 768] BF16"),
    "engine-names": (dict(tensors=_flux_names), "lacks the tensor 'transformer_blocks.0.attn.to_qkv.proj_down'"),
    "extra": (dict(tensors=_add("transformer_blocks.0.attn.to_qkv.wtscale")),
              "holds 1 tensors a Qwen-Image model does not use"),
    "unknown-class": (dict(metadata={"model_class": "NunchakuSanaTransformer2DModel"}),
                      "is a NunchakuSanaTransformer2DModel checkpoint; svdquant imports Nunchaku's FLUX "
                      "(NunchakuFluxTransformer2dModel) and Qwen-Image (NunchakuQwenImageTransformer2DModel) "
                      "checkpoints only"),
    "classes-disagree": (dict(metadata={"model_class": "NunchakuFluxTransformer2dModel"}),
                         "its metadata names a NunchakuFluxTransformer2dModel but its config a "
                         "QwenImageTransformer2DModel; the file is corrupt"),
    "nvfp4": (dict(metadata={"quantization_config": NVFP4}),
              "holds fp4_e2m1_all weights (group 16); svdquant imports Nunchaku's INT4 checkpoints (group 64) only"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_files_fail_in_one_line(written, tmp_path, case):
    kw, needle = HOSTILE[case]
    f = _edit(written, tmp_path, **kw)
    for load in (svdquant.load_quantized, svdquant.read_metadata):
        with pytest.raises(CheckpointError) as e:
            load(f)
        msg = str(e.value)
        assert needle in msg and "\n" not in msg, msg
