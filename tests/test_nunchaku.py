"""Nunchaku checkpoints in and out (svdquant/convert/nunchaku/, two_level.py; issue 14, part 3).

A tiny FLUX, 128 wide (Nunchaku's INT4 layers are multiples of 128 on both sides), quantized by us with
``w4a4-float`` in bf16 and written as a Nunchaku file: the layout of every tensor, the import, the two
things the format rounds on the way out (16-bit smoothing, the ``+ 1`` folded into the scale biases) and
that nothing else changes; then the fixed point (import -> export -> import is bit-identical; outputs of the
same layers on the same tensors, so compared bit for bit), a file in the
form deepcompressor publishes (two branches for proj_out, AWQ zeros that are not -8 · scale), direct
loading, the two-level conversion and every ``svdquant convert`` error.
"""

from __future__ import annotations

import json
from pathlib import Path

import tiny_models as tm  # first: sets HF_HUB_OFFLINE before diffusers is imported

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import svdquant
from svdquant._state import peek, state
from svdquant.checkpoint import CheckpointError
from svdquant.convert import from_nunchaku, to_nunchaku, to_two_level
from svdquant.convert.nunchaku import nunchaku_tensors
from svdquant.convert.nunchaku.packing import (interleave_rows, pack_awq, pack_lanes, pack_lowrank, unpack_awq,
                                               unpack_lanes, unpack_lowrank, unpack_qweight)
from svdquant.formats import unpack_4bit_halves
from svdquant.modules import SVDQLinear
from test_cli_inputs import files, rejected, run

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py

WIDE = dict(num_attention_heads=4)   # 4 heads x 32 = 128
D, M = 128, 512                      # width, MLP width
RECIPE = svdquant.get_recipe("w4a4-float", iterations=1, eval_tokens=64)
SHIFT = 0.171875


def build(dtype=torch.bfloat16, recipe=RECIPE):
    model = tm.build_flux(dtype=dtype, **WIDE)
    svdquant.quantize(model, recipe, svdquant.Calibration(inputs=tm.calibration_inputs("flux", model, 1)),
                      progress=False)
    return model


def out(model, seed=7):
    return tm.forward(model, tm.flux_inputs(model, seed=seed))


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("nunchaku")


@pytest.fixture(scope="module")
def ours(root):
    model = build()
    svdquant.save_quantized(model, root / "ours")
    to_nunchaku(model, root / "ours.safetensors")
    return model


@pytest.fixture(scope="module")
def file(root, ours):
    return root / "ours.safetensors"


@pytest.fixture(scope="module")
def imported(file):
    return from_nunchaku(file)


def read(path):
    with safe_open(str(path), "pt") as f:
        return load_file(str(path)), f.metadata()


# ------------------------------------------------------------------------------------------------ the file
DOUBLE_W4A4 = ["qkv_proj", "qkv_proj_context", "out_proj", "out_proj_context", "mlp_fc1", "mlp_fc2",
               "mlp_context_fc1", "mlp_context_fc2"]


def test_the_file_holds_nunchakus_names_dtypes_and_metadata(file):
    t, md = read(file)
    w4a4 = {f"transformer_blocks.0.{n}" for n in DOUBLE_W4A4} | {
        f"single_transformer_blocks.0.{n}" for n in ("qkv_proj", "mlp_fc1", "out_proj", "mlp_fc2")}
    awq = {"transformer_blocks.0.norm1.linear", "transformer_blocks.0.norm1_context.linear",
           "single_transformer_blocks.0.norm.linear"}
    expected = {f"{lay}.{k}" for lay in w4a4 for k in ("qweight", "wscales", "bias", "smooth", "smooth_orig",
                                                       "lora_down", "lora_up")}
    expected |= {f"{lay}.{k}" for lay in awq for k in ("qweight", "wscales", "wzeros", "bias")}
    expected |= {f"transformer_blocks.0.{n}.weight" for n in ("norm_q", "norm_k", "norm_added_q", "norm_added_k")}
    expected |= {f"single_transformer_blocks.0.{n}.weight" for n in ("norm_q", "norm_k")}
    blocks = {k for k in t if k.startswith(("transformer_blocks.", "single_transformer_blocks."))}
    assert blocks == expected
    assert "x_embedder.weight" in t and "proj_out.weight" in t and "norm_out.linear.weight" in t
    qkv = "transformer_blocks.0.qkv_proj"
    assert t[f"{qkv}.qweight"].dtype == torch.int8 and t[f"{qkv}.qweight"].shape == (3 * D, D // 2)
    assert t[f"{qkv}.wscales"].shape == (D // 64, 3 * D) and t[f"{qkv}.lora_down"].shape == (D, 32)
    assert t[f"{qkv}.lora_up"].shape == (3 * D, 32) and t[f"{qkv}.wscales"].dtype == torch.bfloat16
    norm = "transformer_blocks.0.norm1.linear"
    assert t[f"{norm}.qweight"].dtype == torch.int32 and t[f"{norm}.qweight"].shape == (6 * D // 4, D // 2)
    assert t[f"{norm}.wscales"].shape == t[f"{norm}.wzeros"].shape == (D // 64, 6 * D)
    assert t["single_transformer_blocks.0.out_proj.qweight"].shape == (D, D // 2)
    assert t["single_transformer_blocks.0.mlp_fc2.qweight"].shape == (D, M // 2)
    assert md["model_class"] == "NunchakuFluxTransformer2dModel"
    qc = json.loads(md["quantization_config"])
    assert qc["rank"] == 32 and qc["weight"] == {"dtype": "int4", "scale_dtype": None, "group_size": 64}
    cfg = json.loads(md["config"])
    assert cfg["_class_name"] == "FluxTransformer2DModel" and cfg["num_attention_heads"] == 4


def test_w4a4_tensors_are_ours_repacked(file, ours):
    t, _ = read(file)
    blk = ours.transformer_blocks[0]
    q, k, v = blk.attn.to_q, blk.attn.to_k, blk.attn.to_v
    pre = "transformer_blocks.0.qkv_proj"
    codes = torch.cat([unpack_4bit_halves(m.qweight, 64, signed=True) for m in (q, k, v)])
    assert torch.equal(unpack_qweight(t[f"{pre}.qweight"]), codes)
    assert torch.equal(unpack_lanes(t[f"{pre}.wscales"]), torch.cat([q.wscales, k.wscales, v.wscales]))
    assert torch.equal(unpack_lanes(t[f"{pre}.bias"]), torch.cat([q.bias, k.bias, v.bias]))
    assert torch.equal(unpack_lowrank(t[f"{pre}.lora_down"], down=True), q.lora_down)  # shared
    assert torch.equal(unpack_lowrank(t[f"{pre}.lora_up"], down=False), torch.cat([q.lora_up, k.lora_up, v.lora_up]))
    # Nunchaku divides by smooth: λ = 1 / smooth_inv, in bf16
    assert torch.equal(unpack_lanes(t[f"{pre}.smooth"]), (1 / q.smooth_inv.double()).to(torch.bfloat16))
    assert torch.equal(t[f"{pre}.smooth_orig"], t[f"{pre}.smooth"])


def test_single_block_proj_out_is_split_along_k(file, ours):
    t, _ = read(file)
    po = ours.single_transformer_blocks[0].proj_out
    assert po.in_features == D + M and po.act_unsigned_from == D and po.act_shift == SHIFT
    a, b = "single_transformer_blocks.0.out_proj", "single_transformer_blocks.0.mlp_fc2"
    codes = unpack_4bit_halves(po.qweight, 64, signed=True)
    assert torch.equal(unpack_qweight(t[f"{a}.qweight"]), codes[:, :D])
    assert torch.equal(unpack_qweight(t[f"{b}.qweight"]), codes[:, D:])
    assert torch.equal(unpack_lanes(t[f"{a}.wscales"]), po.wscales[:, : D // 64])
    assert torch.equal(unpack_lowrank(t[f"{a}.lora_down"], True), po.lora_down[:, :D])
    assert torch.equal(unpack_lowrank(t[f"{b}.lora_down"], True), po.lora_down[:, D:])
    assert torch.equal(t[f"{a}.lora_up"], t[f"{b}.lora_up"])            # one branch: the same up for both parts
    assert torch.equal(unpack_lanes(t[f"{a}.bias"]), po.bias) and not bool(t[f"{b}.bias"].any())


def test_adaln_layers_are_awq_with_interleaved_rows_and_the_scale_one_folded(file, ours):
    t, _ = read(file)
    lin = ours.transformer_blocks[0].norm1.linear
    assert (lin.weights, lin.activations, lin.rank) == ("int4", None, 0)
    pre = "transformer_blocks.0.norm1.linear"
    codes = unpack_4bit_halves(lin.qweight, 64, signed=True).to(torch.int16) + 8  # symmetric: code + 8 ...
    assert torch.equal(unpack_awq(t[f"{pre}.qweight"]), interleave_rows(codes.to(torch.uint8), 6))
    assert torch.equal(t[f"{pre}.wscales"], interleave_rows(lin.wscales, 6).t())
    assert torch.equal(t[f"{pre}.wzeros"], -8 * t[f"{pre}.wscales"])  # ... and the zero at -8 · scale
    delta = torch.zeros(6, D)
    delta[1] = delta[4] = 1                                      # scale_msa, scale_mlp
    want = (lin.bias.float() + delta.reshape(-1)).to(torch.bfloat16)
    assert torch.equal(t[f"{pre}.bias"], interleave_rows(want, 6))
    single = t["single_transformer_blocks.0.norm.linear.bias"]
    b = ours.single_transformer_blocks[0].norm.linear.bias.float()
    b[D:2 * D] += 1                                               # three chunks: only scale_msa
    assert torch.equal(single, interleave_rows(b.to(torch.bfloat16), 3))


# ------------------------------------------------------------------------------------------------ import
def nunchaku_rounded(ours_sd: dict, name: str, value: torch.Tensor) -> torch.Tensor:
    """What one of our tensors comes back as after a trip through the file (module doc: the two roundings)."""
    if name.endswith(".smooth_inv"):
        return 1.0 / (1.0 / value.double()).to(torch.bfloat16).float()
    if name.endswith((".norm1.linear.bias", ".norm1_context.linear.bias", ".norm.linear.bias")):
        chunks = 3 if name.startswith("single") else 6
        b = value.float().reshape(chunks, -1).clone()
        for c in {1, chunks - 2}:
            b[c] = (b[c] + 1).to(torch.bfloat16).float() - 1
        return b.reshape(-1).to(value.dtype)
    return value


def test_first_trip_changes_only_what_the_format_rounds(ours, imported):
    a, b = ours.state_dict(), imported.state_dict()
    assert set(a) == set(b)
    changed = [k for k in a if not torch.equal(a[k], b[k])]
    for k in a:
        assert b[k].dtype == a[k].dtype and torch.equal(b[k], nunchaku_rounded(a, k, a[k])), k
    assert changed and all(k.endswith((".smooth_inv", "norm1.linear.bias", "norm1_context.linear.bias",
                                       "norm.linear.bias")) for k in changed)
    y0, y1 = out(ours).float(), out(imported).float()
    rel = float((y1 - y0).norm() / y0.norm())
    assert 0 < rel < 0.02   # measured 0.6 %: bf16 rounding of λ and of 1 + scale bias


def test_imported_layers(imported):
    blk = imported.transformer_blocks[0]
    for name in ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "ff.net.0.proj"):
        m = blk.get_submodule(name)
        assert isinstance(m, SVDQLinear) and (m.weights, m.activations, m.rank, m.act_shift) == ("int4", "int4", 32, 0)
    assert blk.ff.net[2].act_shift == SHIFT and blk.ff.net[2].act_unsigned_from == 0
    assert torch.equal(blk.attn.to_q.lora_down, blk.attn.to_v.lora_down)
    po = imported.single_transformer_blocks[0].proj_out
    assert (po.rank, po.act_unsigned_from, po.act_shift) == (32, D, SHIFT)  # equal ups: one branch
    assert blk.norm1.linear.weights == "int4" and peek(imported).recipe["name"] == "w4a4-float"


def test_import_export_import_is_a_fixed_point(imported, root, file):
    again = root / "again.safetensors"
    to_nunchaku(imported, again)
    a, ma = read(file)
    b, mb = read(again)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a) and ma == mb
    twice = from_nunchaku(again)
    sa, sb = imported.state_dict(), twice.state_dict()
    assert set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert torch.equal(out(imported), out(twice))
    # the files too, byte for byte (safetensors' own writer orders the metadata differently on every run, and an
    # imported model lists its config in another order)
    assert again.read_bytes() == file.read_bytes()
    third = root / "third.safetensors"
    to_nunchaku(twice, third)
    assert third.read_bytes() == file.read_bytes()


def test_no_local_path_in_what_is_written(root, tmp_path):
    """A model loaded from a folder carries that folder in its config (_name_or_path: a user's absolute path);
    neither an svdquant checkpoint nor a Nunchaku file may hold it (both get published)."""
    model = build()
    local = tmp_path / "home" / "ann" / "FLUX.1-dev" / "transformer"
    model.register_to_config(_name_or_path=str(local))  # what from_pretrained(folder) records
    to_nunchaku(model, tmp_path / "x.safetensors")
    svdquant.save_quantized(model, tmp_path / "ck")
    for f in (tmp_path / "x.safetensors", tmp_path / "ck" / "svdquant.json", *(tmp_path / "ck").glob("*.safetensors")):
        assert b"/home/ann" not in f.read_bytes(), f
    assert "_name_or_path" not in json.loads(read(tmp_path / "x.safetensors")[1]["config"])
    assert svdquant.load_quantized(tmp_path / "ck") is not None


# stored 1 + b values of an adaLN bias, as bf16 bit patterns written by hand (not by our packer): inside [0.5, 2], where
# the bias b = stored − 1 is a bf16 number, and outside, where it needs more bits (0.30078125, −1.0078125, 3.0,
# −123.5, 0.00994873046875, 65280.0, 1.0, 0.50390625, 2.0078125, −0.5)
HAND_BIAS_BITS = (0x3E9A, 0xBF81, 0x4040, 0xC2F7, 0x3C23, 0x477F, 0x3F80, 0x3F01, 0x4000 | 0x01, 0xBF00)


def _splice(path: Path, name: str, raw: bytes) -> None:
    """Overwrite tensor ``name``'s bytes in the safetensors file at ``path`` in place (same length)."""
    data = bytearray(path.read_bytes())
    n = int.from_bytes(data[:8], "little")
    begin, stop = json.loads(data[8:8 + n])[name]["data_offsets"]
    assert stop - begin == len(raw)
    data[8 + n + begin:8 + n + stop] = raw
    path.write_bytes(bytes(data))


def _tensor_bytes(path: Path, name: str) -> bytes:
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    begin, stop = json.loads(data[8:8 + n])[name]["data_offsets"]
    return data[8 + n + begin:8 + n + stop]


def test_adaln_scale_biases_outside_half_to_two_come_back_bit_exact(file, tmp_path):
    """Nunchaku stores 1 + b for the scale chunks; where that lies outside [0.5, 2], b itself needs more than 16
    bits: the import keeps such a layer's bias in fp32 (before: a bf16 copy, and the export differed in 38–85
    values per tensor of a published file). Export gives back the hand-written bytes, also through a checkpoint."""
    import struct

    name = "transformer_blocks.0.norm1.linear.bias"
    n = 6 * D
    hand = struct.pack(f"<{n}H", *(HAND_BIAS_BITS[i % len(HAND_BIAS_BITS)] for i in range(n)))
    f = tmp_path / "hand.safetensors"
    f.write_bytes(file.read_bytes())
    _splice(f, name, hand)
    model = from_nunchaku(f)
    lin = model.transformer_blocks[0].norm1.linear
    assert lin.bias.dtype == torch.float32 and lin.config()["bias_dtype"] == "float32"
    assert model.transformer_blocks[0].norm1_context.linear.bias.dtype == torch.bfloat16  # only where needed
    to_nunchaku(model, tmp_path / "back.safetensors")
    assert _tensor_bytes(tmp_path / "back.safetensors", name) == hand
    ck = svdquant.save_quantized(model, tmp_path / "ck")
    assert svdquant.read_metadata(ck)["format_version"] == 4   # older svdquant refuses it ("upgrade")
    to_nunchaku(svdquant.load_quantized(ck), tmp_path / "again.safetensors")
    assert _tensor_bytes(tmp_path / "again.safetensors", name) == hand
    # the fp32 bias computes what the 16-bit one did to within its rounding
    x = torch.randn(4, D, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    ref = torch.nn.functional.linear(x.float(), lin.dequantized_weight(), lin.bias.float())
    assert float((lin(x).float() - ref).abs().max() / ref.abs().max()) < 2 ** -6


def test_load_quantized_read_metadata_and_info_take_a_nunchaku_file(file, imported):
    model = svdquant.load_quantized(file)
    assert torch.equal(out(model), out(imported))
    meta = svdquant.read_metadata(file)
    assert meta["source"] == "nunchaku" and meta["model_class"] == "FluxTransformer2DModel"
    assert meta["layers"]["transformer_blocks.0.attn.to_k"]["rank"] == 32 and meta["base"] is None
    assert meta["layers"]["single_transformer_blocks.0.proj_out"]["act_unsigned_from"] == D
    rc, text, _ = run(["info", file])
    assert rc == 0 and "Nunchaku single-file INT4" in text and "17 × Wint4Aint4 rank 32" in text
    with pytest.raises(CheckpointError, match="does not record its base pipeline; pass base="):
        svdquant.load_pipeline(None, file)


# ------------------------------------------------------------------------------------------------ published form
@pytest.fixture(scope="module")
def published(root, file):
    """The file rewritten in the form deepcompressor publishes: the single block's out_proj and mlp_fc2 with
    branches of their own (mlp_fc2's up doubled) and biases of their own, and AWQ zeros at -7 · scale (in
    bf16: not exact), the codes shifted by one, so every weight keeps its value up to that rounding."""
    t, md = read(file)
    a, b = "single_transformer_blocks.0.out_proj", "single_transformer_blocks.0.mlp_fc2"
    up = unpack_lowrank(t[f"{b}.lora_up"], False)
    t[f"{b}.lora_up"] = pack_lowrank((up.float() * 2).to(torch.bfloat16), False)
    t[f"{b}.bias"] = pack_lanes(torch.linspace(-1, 1, D).to(torch.bfloat16))
    for norm in ("transformer_blocks.0.norm1.linear", "single_transformer_blocks.0.norm.linear"):
        codes = unpack_awq(t[f"{norm}.qweight"])
        t[f"{norm}.qweight"] = pack_awq((codes.to(torch.int16) - 1).clamp(0, 15).to(torch.uint8))
        t[f"{norm}.wzeros"] = (-7 * t[f"{norm}.wscales"].float()).to(torch.bfloat16)
    path = root / "published.safetensors"
    save_file(t, str(path), metadata=md)
    return path, t


def test_published_form_imports_two_branches_and_zero_points(published):
    path, t = published
    model = from_nunchaku(path)
    po = model.single_transformer_blocks[0].proj_out
    assert po.rank == 64
    a, b = "single_transformer_blocks.0.out_proj", "single_transformer_blocks.0.mlp_fc2"
    da, db = unpack_lowrank(t[f"{a}.lora_down"], True), unpack_lowrank(t[f"{b}.lora_down"], True)
    assert torch.equal(po.lora_down[:32, :D], da) and torch.equal(po.lora_down[32:, D:], db)
    assert not bool(po.lora_down[:32, D:].any()) and not bool(po.lora_down[32:, :D].any())
    assert torch.equal(po.lora_up, torch.cat([unpack_lowrank(t[f"{a}.lora_up"], False),
                                              unpack_lowrank(t[f"{b}.lora_up"], False)], 1))
    bias = (unpack_lanes(t[f"{a}.bias"]).float() + unpack_lanes(t[f"{b}.bias"]).float()).to(torch.bfloat16)
    assert torch.equal(po.bias, bias)
    # the layer computes what the two Nunchaku layers sum to (same activation codes: the parts end on a group)
    x = torch.randn(16, D + M, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    x[:, D:] = torch.nn.functional.gelu(x[:, D:].float(), approximate="tanh").to(torch.bfloat16)
    parts = []
    for name, cols, unsigned in ((a, slice(0, D), False), (b, slice(D, D + M), True)):
        part = SVDQLinear(cols.stop - cols.start, D, weights="int4", activations="int4", rank=32,
                          act_shift=SHIFT if unsigned else 0.0, dtype=torch.bfloat16)
        with torch.no_grad():  # the parts end on a group boundary: bytes and scales split there too
            part.qweight.copy_(po.qweight[:, cols.start // 2:cols.stop // 2])
            part.wscales.copy_(po.wscales[:, cols.start // 64:cols.stop // 64])
            part.smooth_inv.copy_(po.smooth_inv[cols])
            part.lora_down.copy_(unpack_lowrank(t[f"{name}.lora_down"], True))
            part.lora_up.copy_(unpack_lowrank(t[f"{name}.lora_up"], False))
            part.bias.copy_(unpack_lanes(t[f"{name}.bias"]))
        part.refresh()
        parts.append(part(x[:, cols]).double())
    want, got = parts[0] + parts[1], po(x).double()
    assert float((got - want).norm() / want.norm()) < 1e-2  # bf16 outputs, summed in another order
    # AWQ: zeros that are not -8 · scale keep the zero-point format, values code · scale + zero
    lin = model.transformer_blocks[0].norm1.linear
    assert lin.weights == "int4z" and lin.wzeros.shape == (6 * D, D // 64)
    pre = "transformer_blocks.0.norm1.linear"
    from svdquant.convert.nunchaku.packing import deinterleave_rows
    codes = deinterleave_rows(unpack_awq(t[f"{pre}.qweight"]), 6).float()
    s = deinterleave_rows(t[f"{pre}.wscales"].t(), 6).float().repeat_interleave(64, 1)
    z = deinterleave_rows(t[f"{pre}.wzeros"].t(), 6).float().repeat_interleave(64, 1)
    assert torch.equal(lin.dequantized_weight(), codes * s + z)


def test_published_form_exports_back_to_the_same_file(published, root):
    path, t = published
    back = root / "published-back.safetensors"
    to_nunchaku(from_nunchaku(path), back)
    b, _ = read(back)
    assert set(b) == set(t)
    assert [k for k in t if not torch.equal(b[k], t[k])] == ["single_transformer_blocks.0.mlp_fc2.bias",
                                                             "single_transformer_blocks.0.out_proj.bias"]
    # one layer holds one bias: the sum goes to out_proj (what the two Nunchaku layers add up to)
    a, m = "single_transformer_blocks.0.out_proj.bias", "single_transformer_blocks.0.mlp_fc2.bias"
    assert torch.equal(b[a], (t[a].float() + t[m].float()).to(torch.bfloat16)) and not bool(b[m].any())


# ------------------------------------------------------------------------------------------------ two-level
def test_two_level_conversion(file, root):
    model = from_nunchaku(file)
    y_float = out(model).float()
    report = to_two_level(model)
    assert len(report.errors) == 17  # every W4A4 layer: 12 in the double block, 5 in the single one
    layers = [m for m in model.modules() if isinstance(m, SVDQLinear)]
    assert sum((m.weights, m.activations) == ("int4m", "int4m") for m in layers) == 17
    assert sum(m.activations is None for m in layers) == 3          # the adaLN layers stay W4A16
    assert model.single_transformer_blocks[0].proj_out.act_unsigned_from == D
    for a, b in report.errors.values():
        assert 0 < a < 0.2 and 0 < b < 0.2 and b < 1.5 * a
    assert report.median(1) < 1.1 * report.median(0)
    text = str(report)
    assert text.startswith("two-level scales: 17 W4A4 layers converted") and "16-bit activations" in text
    rel = float((out(model).float() - y_float).norm() / y_float.norm())
    assert rel < 0.05
    assert peek(model).recipe["name"] == "w4a4"
    svdquant.save_quantized(model, root / "two-level")
    assert torch.equal(out(svdquant.load_quantized(root / "two-level")), out(model))


def test_two_level_recompensates_the_shift_for_the_new_codes(imported):
    """b' = b − shift · Σ_k Q(R)_nk / λ_k: with the new codes the layers' 16-bit-activation references differ
    by exactly the weight change applied to the unshifted input."""
    from svdquant.convert.two_level import _convert, _reference

    old = imported.transformer_blocks[0].ff.net[2]
    new = _convert(old)
    x = torch.nn.functional.gelu(torch.randn(8, M, generator=torch.Generator().manual_seed(1)), approximate="tanh")
    x = x.to(torch.bfloat16)
    dw = new.dequantized_weight(torch.float64) - old.dequantized_weight(torch.float64)
    want = (x.double() * old.smooth_inv.double()) @ dw.T
    got = _reference(new, x) - _reference(old, x)
    bias_ulp = old.bias.double().abs().max() * 2 ** -8
    assert float((got - want).abs().max()) <= float(bias_ulp)
    assert not torch.equal(new.bias, old.bias)


def test_two_level_api_checks():
    with pytest.raises(TypeError, match="to_two_level takes the quantized model"):
        to_two_level("flux.safetensors")
    assert str(to_two_level(torch.nn.Linear(2, 2))) == "two-level scales: no float-scale W4A4 layer to convert"


# ------------------------------------------------------------------------------------------------ export refusals
def test_two_level_and_fp32_models_are_refused(root):
    model = build(recipe=svdquant.get_recipe("int4-naive"))
    with pytest.raises(CheckpointError, match="Wint4mAint8.*re-quantize with --recipe w4a4-float"):
        nunchaku_tensors(model)
    model = build(dtype=torch.float32, recipe=svdquant.get_recipe("w4a4-float-naive"))
    with pytest.raises(CheckpointError, match="float32; Nunchaku runs bf16 or fp16"):
        nunchaku_tensors(model)
    assert not (root / "x.safetensors").exists()


def test_every_obstacle_is_named_at_once(root, tmp_path):
    """An fp32 two-level checkpoint: both obstacles in one message, with the one re-quantization that removes
    both (it said --dtype bf16 first, and --recipe w4a4-float only after that 134 s re-quantization)."""
    model = build(dtype=torch.float32, recipe=svdquant.get_recipe("int4-naive"))
    with pytest.raises(CheckpointError) as e:
        nunchaku_tensors(model)
    msg = str(e.value)
    assert "for 2 reasons: (1)" in msg and "float32; Nunchaku runs bf16 or fp16" in msg and "Wint4mAint8" in msg, msg
    assert msg.endswith("Fix them all at once: re-quantize once with --dtype bf16 --recipe w4a4-float"), msg
    assert "(16 more like it)" in msg and "\n" not in msg  # the first layer named, the others counted
    svdquant.save_quantized(model, root / "fp32-int4")
    line = rejected(["convert", root / "fp32-int4", "--to", "nunchaku", "-o", tmp_path / "x.safetensors"],
                    "--dtype bf16 --recipe w4a4-float", folder=tmp_path)
    assert "for 2 reasons" in line


def test_qkv_that_do_not_share_their_branch_are_refused(ours):
    model = from_nunchaku_copy(ours)
    with torch.no_grad():
        model.transformer_blocks[0].attn.to_k.lora_down.mul_(2)
    with pytest.raises(CheckpointError, match="do not share their low-rank down projection"):
        nunchaku_tensors(model)


def from_nunchaku_copy(model):
    import copy

    return copy.deepcopy(model)


def test_sizes_nunchaku_cannot_take_are_refused():
    model = build(recipe=svdquant.get_recipe("w4a4-float-naive"))  # rank 0 is fine ...
    nunchaku_tensors(model)
    narrow = tm.build_flux(dtype=torch.bfloat16)                  # ... 64 wide is not
    svdquant.quantize(narrow, svdquant.get_recipe("w4a4-float-naive"),
                      svdquant.Calibration(inputs=tm.calibration_inputs("flux", narrow, 1)), progress=False)
    with pytest.raises(CheckpointError, match="multiples of 128"):
        nunchaku_tensors(narrow)


def test_to_nunchaku_output_checks(root, ours):
    with pytest.raises(CheckpointError, match="ending in .safetensors"):
        to_nunchaku(ours, root / "flux.bin")
    with pytest.raises(CheckpointError, match="already exists; choose another name or pass overwrite=True"):
        to_nunchaku(ours, root / "ours.safetensors")
    with pytest.raises(CheckpointError, match="is a folder"):
        (root / "dir.safetensors").mkdir()
        to_nunchaku(ours, root / "dir.safetensors", overwrite=True)


def test_a_failed_export_leaves_no_file(root, ours, monkeypatch):
    import svdquant.convert.nunchaku.writer as nk

    def boom(tensors, path, metadata):
        Path(path).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(nk, "_save_safetensors", boom)
    before = files(root)
    with pytest.raises(OSError, match="disk full"):
        nk.to_nunchaku(ours, root / "ours.safetensors", overwrite=True)
    assert files(root) == before


# ------------------------------------------------------------------------------------------------ the command
def test_convert_import_and_export_commands(root, file, ours):
    rc, text, err = run(["convert", "nunchaku", file, "-o", root / "cli-import"])
    assert rc == 0 and err == "" and "no base pipeline recorded: pass --base" in text
    model = svdquant.load_quantized(root / "cli-import")
    assert torch.equal(out(model), out(from_nunchaku(file)))
    rc, text, err = run(["convert", root / "cli-import", "--to", "nunchaku", "-o", root / "cli.safetensors"])
    assert rc == 0 and text.strip() == f"wrote {root / 'cli.safetensors'}"
    a, b = read(file)[0], read(root / "cli.safetensors")[0]
    assert all(torch.equal(a[k], b[k]) for k in a)
    rc, text, err = run(["convert", "nunchaku", file, "-o", root / "cli-2l", "--two-level"])
    assert rc == 0 and text.startswith("two-level scales: 17 W4A4 layers converted")
    assert svdquant.read_metadata(root / "cli-2l")["recipe"]["name"] == "w4a4"


CONVERT_BAD = {
    "no-form": (["convert", "a", "b", "-o", "out"], ["give 'nunchaku FILE.safetensors -o DIR'"]),
    "one-arg": (["convert", "nunchaku", "-o", "out"], ["give 'nunchaku FILE.safetensors"]),
    "other-source": (["convert", "onnx", "f.safetensors", "-o", "out"], ["convert onnx f.safetensors:"]),
    "missing-file": (["convert", "nunchaku", "nope.safetensors", "-o", "out"], ["no file at nope.safetensors"]),
    "to-other": (["convert", "ck", "--to", "onnx", "-o", "x.safetensors"], ["--to onnx", "writes 'nunchaku'"]),
    "to-two-sources": (["convert", "ck", "ck", "--to", "nunchaku", "-o", "x.safetensors"], ["--to nunchaku:"]),
    "to-two-level": (["convert", "ck", "--to", "nunchaku", "-o", "x.safetensors", "--two-level"],
                     ["--two-level applies to imports"]),
    "to-base": (["convert", "ck", "--to", "nunchaku", "-o", "x.safetensors", "--base", "b"],
                ["--base applies to imports"]),
    "to-not-a-checkpoint": (["convert", "nowhere", "--to", "nunchaku", "-o", "x.safetensors"],
                            ["no svdquant checkpoint at nowhere"]),
}


@pytest.mark.parametrize("case", list(CONVERT_BAD))
def test_convert_rejects(tmp_path, monkeypatch, case):
    monkeypatch.chdir(tmp_path)
    argv, needles = CONVERT_BAD[case]
    rejected(argv, *needles, folder=tmp_path)


def test_convert_import_rejects_files_and_outputs(root, file, tmp_path):
    (tmp_path / "folder.safetensors").mkdir()
    rejected(["convert", "nunchaku", tmp_path / "folder.safetensors", "-o", tmp_path / "o"], "is not a file",
             folder=tmp_path)
    rejected(["convert", "nunchaku", root / "ours" / "transformer.safetensors", "-o", tmp_path / "o"],
             "is an svdquant checkpoint already", folder=tmp_path)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    rejected(["convert", "nunchaku", tmp_path / "junk.safetensors", "-o", tmp_path / "o"], "truncated or corrupt",
             folder=tmp_path)
    (tmp_path / "exists").mkdir()
    rejected(["convert", "nunchaku", file, "-o", tmp_path / "exists"], "already exists", "--overwrite",
             folder=tmp_path)
    (tmp_path / "other" / "a.txt").parent.mkdir()
    (tmp_path / "other" / "a.txt").write_text("x")
    rejected(["convert", "nunchaku", file, "-o", tmp_path / "other", "--overwrite"], "folder of other files",
             folder=tmp_path)
    (tmp_path / "afile").write_text("x")
    rejected(["convert", "nunchaku", file, "-o", tmp_path / "afile" / "ck"], "is a file", folder=tmp_path)
    rejected(["convert", "nunchaku", file, "-o", tmp_path / "o", "--base", "./no-such-pipeline"],
             "--base ./no-such-pipeline does not exist", folder=tmp_path)


def test_convert_export_rejects(root, tmp_path):
    two = root / "ours-int4"
    if not two.exists():
        svdquant.save_quantized(build(recipe=svdquant.get_recipe("int4-naive")), two)
    rejected(["convert", two, "--to", "nunchaku", "-o", tmp_path / "x.safetensors"],
             "Wint4mAint8", "re-quantize with --recipe w4a4-float", folder=tmp_path)
    rejected(["convert", root / "ours", "--to", "nunchaku", "-o", tmp_path / "x.bin"], "ending in .safetensors",
             folder=tmp_path)
    (tmp_path / "x.safetensors").write_bytes(b"keep")
    rejected(["convert", root / "ours", "--to", "nunchaku", "-o", tmp_path / "x.safetensors"], "already exists",
             "--overwrite", folder=tmp_path)
    (tmp_path / "d.safetensors").mkdir()
    rejected(["convert", root / "ours", "--to", "nunchaku", "-o", tmp_path / "d.safetensors", "--overwrite"],
             "is a folder", folder=tmp_path)


def test_convert_export_data_check_after_loading_leaves_no_file(root, ours, tmp_path):
    """q/k/v that do not share their smoothing can only be seen in the tensors: refused after loading, one
    line, nothing written."""
    model = from_nunchaku_copy(ours)
    with torch.no_grad():
        model.transformer_blocks[0].attn.to_v.smooth_inv.mul_(2)
    # edited by hand: not what svdquant's quantizer writes, so its bounds (a shared branch in balance) do not apply
    state(model).source = "hand-edited"
    svdquant.save_quantized(model, tmp_path / "ck")
    rejected(["convert", tmp_path / "ck", "--to", "nunchaku", "-o", tmp_path / "x.safetensors"],
             "do not share their smoothing", folder=tmp_path)


# ------------------------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_imported_model_runs_the_kernels(file, published):
    """On CUDA an imported model runs the float-scale W4A4 kernels and the zero-point W4A16 kernel (the published
    form's int4z adaLN layers); converted to two-level scales, the INT8 GEMM path. Against the CPU reference."""
    from svdquant.ops import runners as R

    def runners(model):
        return {type(m._runner).__name__ for m in model.modules() if isinstance(m, SVDQLinear)}

    def on(x, device):
        return {k: v.to(device) if torch.is_tensor(v) else v for k, v in x.items()}

    x = tm.flux_inputs(from_nunchaku(file), seed=7)
    for path in (file, published[0]):
        cpu, gpu = from_nunchaku(path), from_nunchaku(path, device="cuda")
        assert runners(gpu) == {R.FloatScalesRunner.__name__, R.W4A16Runner.__name__}
        want = tm.forward(cpu, x).float()
        assert float((tm.forward(gpu, on(x, "cuda")).float().cpu() - want).norm() / want.norm()) < 2e-2
        to_two_level(cpu)
        to_two_level(gpu)
        assert runners(gpu) == {R.Int8Runner.__name__, R.W4A16Runner.__name__}
        want = tm.forward(cpu, x).float()
        assert float((tm.forward(gpu, on(x, "cuda")).float().cpu() - want).norm() / want.norm()) < 2e-2
