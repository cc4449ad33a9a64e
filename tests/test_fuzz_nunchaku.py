"""Fuzzing the Nunchaku importer with hostile files (issue 14, parts 3 and 4).

The approach of test_fuzz_checkpoint.py, on one Nunchaku file per model: a 128-wide tiny FLUX quantized with
``w4a4-float``, exported, then rewritten in the form deepcompressor publishes (two branches for the single
block's proj_out, AWQ zeros that are not -8 · scale), so every import path is reached; and a 128-wide tiny
Qwen-Image the same way (its modulation layers with such zeros: Qwen-Image's names and strict tensor set). Hypothesis rewrites it
(truncations, flipped bytes, headers that lie about dtype, shape or offsets, missing / extra / resized /
retyped tensors, metadata that lies, NaN / Inf / zero values) and imports it with ``from_nunchaku``: every
case must end in a model, a ``CheckpointError`` or (NaN / Inf in a kept 16-bit tensor) a
``NonFiniteWarning``; any other exception fails. ``svdquant convert nunchaku`` on damaged files must exit 2
with one line and leave no output folder.

derandomize=True; 40 cases per test by default (~500 in all, both models, ~40 s on one core);
SVDQUANT_FUZZ_EXAMPLES=N runs N per test.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import tiny_models as tm  # first: sets HF_HUB_OFFLINE before diffusers is imported

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from safetensors_fuzz import flip_bytes, fuzz_settings, parse, resized, retyped, serialize, with_header

import svdquant
from svdquant.checkpoint import CheckpointError, NonFiniteWarning
from svdquant.convert import from_nunchaku, to_nunchaku
from svdquant.convert.nunchaku.packing import pack_awq, pack_lowrank, unpack_awq, unpack_lowrank
from test_cli_inputs import run

FUZZ = fuzz_settings(40, deadline=20000)  # one example took 6.3 s on a loaded 2-core machine (CI's size)
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


AWQ_LAYERS = {"flux": ("transformer_blocks.0.norm1.linear", "single_transformer_blocks.0.norm.linear"),
              "qwenimage": ("transformer_blocks.0.img_mod.1", "transformer_blocks.1.txt_mod.1")}


class Original:
    """The Nunchaku file's bytes, its parsed header and metadata, and where each case is written."""

    def __init__(self, root: Path, arch: str):
        self.arch = arch
        model = tm.ARCHS[arch][0](dtype=torch.bfloat16, num_attention_heads=4)
        svdquant.quantize(model, svdquant.get_recipe("w4a4-float", iterations=1, eval_tokens=64),
                          svdquant.Calibration(inputs=tm.calibration_inputs(arch, model, 1)), progress=False)
        plain = to_nunchaku(model, root / "plain.safetensors")
        with safe_open(str(plain), "pt") as f:
            metadata = f.metadata()
        t = load_file(str(plain))
        if arch == "flux":
            b = "single_transformer_blocks.0.mlp_fc2"
            up = unpack_lowrank(t[f"{b}.lora_up"], False).float() * 2
            t[f"{b}.lora_up"] = pack_lowrank(up.to(torch.bfloat16), False)
        for norm in AWQ_LAYERS[arch]:
            codes = unpack_awq(t[f"{norm}.qweight"])
            t[f"{norm}.qweight"] = pack_awq((codes.to(torch.int16) - 1).clamp(0, 15).to(torch.uint8))
            t[f"{norm}.wzeros"] = (-7 * t[f"{norm}.wscales"].float()).to(torch.bfloat16)
        self.path = root / "published.safetensors"
        save_file(t, str(self.path), metadata=metadata)
        self.bytes = self.path.read_bytes()
        self.header, self.metadata, self.entries = parse(self.bytes)
        self.names = sorted(self.entries)
        blocks = ("transformer_blocks.", "single_transformer_blocks.")
        self.kept = {k for k in self.names if not k.startswith(blocks) or ".norm_" in k}
        self.quantized = set(self.names) - self.kept
        self.case = root / "case.safetensors"
        self.out = root / "out"


@pytest.fixture(scope="module", params=["flux", "qwenimage"])
def orig(tmp_path_factory, request):
    return Original(tmp_path_factory.mktemp("fuzz-nunchaku"), request.param)


def load(orig: Original, raw: bytes | None = None):
    """Import the case: ``("ok", model)``, ``("error", CheckpointError)`` or ``("warned", model)``; anything else
    raises, which fails the test."""
    orig.case.write_bytes(orig.bytes if raw is None else raw)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            model = from_nunchaku(orig.case)
        except CheckpointError as e:
            return "error", e
    if any(issubclass(w.category, NonFiniteWarning) for w in caught):
        return "warned", model
    return "ok", model


def rewrite(orig: Original, entries: dict | None = None, metadata: dict | None = None) -> bytes:
    return serialize(dict(sorted((entries or orig.entries).items())), orig.metadata if metadata is None else metadata)


def test_the_original_imports(orig):
    assert load(orig)[0] == "ok"
    assert load(orig, rewrite(orig))[0] == "ok"  # the serializer itself is faithful
    model = load(orig)[1]
    assert all(model.get_submodule(name).weights == "int4z" for name in AWQ_LAYERS[orig.arch])
    if orig.arch == "flux":
        assert model.single_transformer_blocks[0].proj_out.rank == 64


@FUZZ
@given(data=st.data())
def test_truncated(orig, data):
    n = data.draw(st.integers(0, len(orig.bytes) - 1))
    assert load(orig, orig.bytes[:n])[0] == "error"


@FUZZ
@given(data=st.data())
def test_flipped_bytes(orig, data):
    load(orig, flip_bytes(orig.bytes, data))


@FUZZ
@given(data=st.data())
def test_header_lies(orig, data):
    """One tensor's dtype, shape or offsets replaced; the data unchanged."""
    name = data.draw(st.sampled_from(orig.names))
    field = data.draw(st.sampled_from(["dtype", "shape", "data_offsets", "not-a-dict"]))
    header = json.loads(json.dumps(orig.header))
    junk = st.one_of(st.none(), st.booleans(), st.text(max_size=5), st.integers(-2**70, 2**70),
                     st.lists(st.integers(-2**70, 2**70), max_size=9))
    if field == "dtype":
        new = data.draw(st.one_of(st.sampled_from(["F32", "F16", "BF16", "U8", "I8", "I32", "I64", "F8_E4M3", "X"]),
                                  junk))
        header[name]["dtype"] = new
    elif field == "shape":
        header[name]["shape"] = data.draw(st.one_of(st.lists(st.integers(0, 700), max_size=4), junk))
    elif field == "data_offsets":
        header[name]["data_offsets"] = data.draw(st.one_of(st.lists(st.integers(-1, len(orig.bytes)), min_size=2,
                                                                    max_size=2), junk))
    else:
        header[name] = data.draw(junk)
    same_width_float = (field == "dtype" and name in orig.kept and header[name]["dtype"] in ("F16", "BF16")
                        and orig.header[name]["dtype"] in ("F16", "BF16"))  # kept: either 16-bit float is fine
    changed = header != orig.header and not same_width_float
    result = load(orig, with_header(orig.bytes, {**header, "__metadata__": orig.metadata}))
    assert result[0] == "error" or not changed


@FUZZ
@given(data=st.data())
def test_missing_extra_resized_and_retyped_tensors(orig, data):
    entries = dict(orig.entries)
    name = data.draw(st.sampled_from(orig.names))
    kind = data.draw(st.sampled_from(["missing", "extra", "resized", "retyped"]))
    if kind == "missing":
        if name.endswith(".smooth_orig"):
            return  # optional in FLUX files: Nunchaku's kernels never read it (Qwen-Image's loader needs it)
        del entries[name]
    elif kind == "extra":
        extra = data.draw(st.one_of(st.sampled_from([n + "x" for n in orig.names] + [
            "transformer_blocks.0.qkv_proj.wtscale", "transformer_blocks.0.qkv_proj.wcscales",
            "transformer_blocks.0.attn.to_qkv.wtscale", "transformer_blocks.0.attn.to_qkv.wcscales",
            "transformer_blocks.1.qkv_proj.qweight", "transformer_blocks.0.norm1.linear.lora_down"]),
            st.text(min_size=1, max_size=8)))
        if extra in entries:
            return
        entries[extra] = ("F32", [2], bytes(8))
    elif kind == "resized":
        new = data.draw(st.lists(st.integers(0, 800), min_size=0, max_size=3))
        if new == entries[name][1]:
            return
        entries[name] = resized(entries[name], new)
    else:
        new = data.draw(st.sampled_from(["F32", "F16", "BF16", "U8", "I8", "I32", "F8_E4M3"]))
        if new == entries[name][0] or (name in orig.kept and new in ("F32", "F16", "BF16")):
            return  # a kept tensor may be stored in any float dtype: not damage
        entries[name] = retyped(entries[name], new)
    assert load(orig, rewrite(orig, entries))[0] == "error"


@FUZZ
@given(data=st.data())
def test_metadata_lies(orig, data):
    """The config, quantization_config or model_class replaced, cut or filled with absurd values."""
    md = dict(orig.metadata)
    kind = data.draw(st.sampled_from(["config-value", "config-value", "config-text", "quantization", "class",
                                      "drop", "svdquant"]))
    if kind == "config-value":
        cfg = json.loads(md["config"])
        key = data.draw(st.sampled_from(sorted(cfg)))
        cfg[key] = data.draw(st.one_of(
            st.none(), st.booleans(), st.integers(-5, 300), st.sampled_from([2**24 + 1, 10**9, 2**63, 10**400]),
            st.floats(allow_nan=True), st.text(max_size=6), st.sampled_from(["SD3Transformer2DModel", "ModelMixin"]),
            st.lists(st.integers(0, 10**6), max_size=3), st.just([0] * 5000)))
        md["config"] = json.dumps(cfg)
    elif kind == "config-text":
        text = md["config"]
        md["config"] = text[:data.draw(st.integers(0, len(text) - 1))] + data.draw(st.text(max_size=3))
    elif kind == "quantization":
        md["quantization_config"] = data.draw(st.one_of(st.text(max_size=8), st.sampled_from([
            json.dumps({"weight": {"dtype": "fp4_e2m1_all", "group_size": 16}}), json.dumps({"weight": {"dtype": "int4",
            "group_size": 128}}), "[]", "null"])))
    elif kind == "class":
        md["model_class"] = data.draw(st.one_of(st.text(max_size=8), st.sampled_from(
            ["NunchakuQwenImageTransformer2DModel", "NunchakuSanaTransformer2DModel", "FluxTransformer2DModel"])))
    elif kind == "drop":
        del md[data.draw(st.sampled_from(sorted(md)))]
    else:
        md["svdquant"] = "{}"
    result = load(orig, rewrite(orig, metadata=md))
    if kind in ("class", "svdquant") or (kind == "drop" and "config" not in md):
        assert result[0] == "error" or md.get("model_class") == orig.metadata["model_class"]


@FUZZ
@given(data=st.data())
def test_values(orig, data):
    """NaN / Inf (or a zero smoothing factor) written into a 16-bit tensor: a CheckpointError in a quantized
    layer, a NonFiniteWarning in a kept one; any integer code is a valid 4-bit code, so a changed code loads."""
    name = data.draw(st.sampled_from(orig.names))
    dtype, shape, raw = orig.entries[name]
    if not raw:
        return
    raw = bytearray(raw)
    if dtype in ("I8", "I32"):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
        assert load(orig, rewrite(orig, {**orig.entries, name: (dtype, shape, bytes(raw))}))[0] == "ok"
        return
    t = torch.frombuffer(raw, dtype=getattr(torch, {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}[dtype]))
    t = t.clone()
    zero_smooth = name.endswith((".smooth", ".smooth_factor"))
    value = data.draw(st.sampled_from([float("nan"), float("inf"), float("-inf")] + ([0.0] if zero_smooth else [])))
    t[data.draw(st.integers(0, t.numel() - 1))] = value
    result = load(orig, rewrite(orig, {**orig.entries, name: (dtype, shape, t.view(torch.uint8).numpy().tobytes())}))
    assert result[0] == ("warned" if name in orig.kept else "error"), (name, value, result)


@fuzz_settings(40, divide=4, at_least=5, deadline=20000)
@given(data=st.data())
def test_convert_command_leaves_nothing_on_damage(orig, data):
    """``svdquant convert nunchaku`` on a truncated or flipped file: exit 2, one line, no output folder (or a
    checkpoint that loads, when the damage was harmless)."""
    raw = bytearray(orig.bytes)
    if data.draw(st.booleans()):
        raw = raw[:data.draw(st.integers(0, len(raw) - 1))]
    else:
        n = int.from_bytes(raw[:8], "little")
        raw[data.draw(st.integers(0, 8 + n - 1))] ^= data.draw(st.integers(1, 255))
    orig.case.write_bytes(bytes(raw))
    import shutil

    shutil.rmtree(orig.out, ignore_errors=True)
    rc, _, err = run(["convert", "nunchaku", orig.case, "-o", orig.out])
    if rc == 0:
        svdquant.load_quantized(orig.out)
    else:
        assert rc == 2 and len(err.strip().splitlines()) == 1 and err.startswith("svdquant convert: error: ")
        assert "Traceback" not in err and not orig.out.exists()
        assert not any(p.name.startswith(".out") for p in orig.out.parent.iterdir())  # no temporary folder left
