"""transformers-native loading of quantized text encoders: quant_method "svdquant" in their config.json.

The tiny FluxPipeline (tests/tiny_models.py: a 1-layer CLIP and a 1-layer T5) has its text encoders quantized
(W4A16) and is saved with ``pipe.save_pretrained``; ``FluxPipeline.from_pretrained`` and the encoders' own
``from_pretrained`` rebuild their quantized layers as SVDQLinear on the meta device and fill them from the file:
the same tensors bit for bit, the same embeddings. Before, the folder came back as 16-bit encoders whose quantized
linears were initialized at random, with only transformers' load report (UNEXPECTED / MISSING keys) to say so.
A damaged folder fails in one line naming the file and the layer; an unquantized pipeline saves as before.
"""

from __future__ import annotations

import json
import shutil

import tiny_models as tm  # first: sets HF_HUB_OFFLINE before diffusers is imported

import pytest
import torch
from safetensors.torch import load_file, save_file

import svdquant
from svdquant import CheckpointError, SVDQLinear
from svdquant.checkpoint import quantized_layers
from svdquant.integrations.transformers import attach, compat
from svdquant.integrations.transformers.quantizer import SVDQuantHfQuantizer, SVDQuantTextConfig

PROMPTS = ["a cat", "a red fox in the snow"]
ENCODERS = {"text_encoder": "CLIPTextModel", "text_encoder_2": "T5EncoderModel"}
T5_Q = "encoder.block.0.layer.0.SelfAttention.q"
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


def encoder_class(name):
    import transformers

    return getattr(transformers, ENCODERS[name])


def embeds(pipe):
    """(T5 token embeddings, CLIP pooled vector): what the FLUX transformer reads from the encoders."""
    with torch.no_grad():
        return pipe.encode_prompt(PROMPTS, prompt_2=None, max_sequence_length=tm.PIPE_KWARGS["max_sequence_length"])[:2]


def run(pipe, name, te):
    tok = pipe.tokenizer if name == "text_encoder" else pipe.tokenizer_2
    ids = tok(PROMPTS, padding="max_length", max_length=8, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        out = te(ids)
    return out[1] if name == "text_encoder" else out[0]  # CLIP's pooled vector, T5's token embeddings


def all_tensors(model):
    t = dict(model.state_dict())
    t.update({k: v for k, v in model.named_buffers() if k not in t})
    return t


def assert_same_encoder(a, b):
    assert {n for n, m in a.named_modules() if isinstance(m, SVDQLinear)} == {
        n for n, m in b.named_modules() if isinstance(m, SVDQLinear)}
    ta, tb = all_tensors(a), all_tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), k


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(the pipeline with its text encoders quantized, the folder ``pipe.save_pretrained`` wrote)."""
    pipe = tm.build_flux_pipeline(0)
    svdquant.quantize_text_encoders(pipe, progress=False)
    folder = tmp_path_factory.mktemp("te") / "pipe"
    pipe.save_pretrained(folder)
    return pipe, folder


def damaged_copy(saved, tmp_path):
    shutil.copytree(saved[1] / "text_encoder_2", tmp_path / "t5")
    return tmp_path / "t5", tmp_path / "t5" / "model.safetensors"


# ------------------------------------------------------------------------------------------------ the round trip
def test_pipeline_from_pretrained_brings_the_quantized_encoders_back(saved):
    from diffusers import FluxPipeline

    pipe, folder = saved
    loaded = FluxPipeline.from_pretrained(folder)
    for name in ENCODERS:
        te = getattr(loaded, name)
        assert isinstance(te.hf_quantizer, SVDQuantHfQuantizer) and quantized_layers(te)
        assert_same_encoder(getattr(pipe, name), te)
    assert isinstance(loaded.text_encoder_2.get_submodule(T5_Q), SVDQLinear)
    for a, b in zip(embeds(pipe), embeds(loaded)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", list(ENCODERS))
def test_encoder_from_pretrained_is_bit_exact(saved, name):
    pipe, folder = saved
    te = encoder_class(name).from_pretrained(folder / name)
    assert_same_encoder(getattr(pipe, name), te)
    assert torch.equal(run(pipe, name, getattr(pipe, name)), run(pipe, name, te))
    # transformers hands over views into the mapped file at any offset; unaligned operands can make CPU GEMMs round
    # differently from the model that was saved, so the loader copies those (quantizer._align)
    assert all(t.data_ptr() % 64 == 0 for t in all_tensors(te).values())


@pytest.mark.parametrize("name", list(ENCODERS))
def test_config_json_carries_the_quantization_config(saved, name):
    pipe, folder = saved
    cfg = json.loads((folder / name / "config.json").read_text())["quantization_config"]
    te = getattr(pipe, name)
    assert cfg["quant_method"] == "svdquant" and cfg["recipe"]["name"] == "w4a16"
    assert cfg["layers"] == quantized_layers(te) and len(cfg["layers"]) == 6
    loaded = encoder_class(name).from_pretrained(folder / name)
    assert isinstance(loaded.config.quantization_config, SVDQuantTextConfig)
    assert loaded.config.quantization_config.layers == cfg["layers"]


def test_no_16bit_weight_is_made_for_quantized_layers(saved, monkeypatch):
    _, folder = saved
    inits = tm.watch_loading(monkeypatch)
    built = tm.watch_quantized_builds(monkeypatch)
    te = encoder_class("text_encoder_2").from_pretrained(folder / "text_encoder_2")
    assert set(inits) <= {"meta"} and len(built) == 6 and set(built) == {"meta"}
    for n, m in te.named_modules():
        if isinstance(m, SVDQLinear):  # only T5's wo shows an empty weight (its dtype: models/text_encoders.py)
            assert not any(True for _ in m.parameters()) and ("weight" not in vars(m) or m.weight.numel() == 0), n
    assert not any(t.is_meta for t in all_tensors(te).values())


def test_save_pretrained_again_writes_the_same_tensors(saved, tmp_path):
    _, folder = saved
    te = encoder_class("text_encoder_2").from_pretrained(folder / "text_encoder_2")
    te.save_pretrained(tmp_path / "again")
    first = load_file(str(folder / "text_encoder_2" / "model.safetensors"))
    second = load_file(str(tmp_path / "again" / "model.safetensors"))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    again = encoder_class("text_encoder_2").from_pretrained(tmp_path / "again")
    assert_same_encoder(te, again)


def test_fp16_load_keeps_the_stored_scales(tmp_path):
    """transformers loads a T5 in fp16 with ``wo`` upcast to fp32 (``_keep_in_fp32_modules``); a quantized wo
    stored in fp16 comes back in fp16, bit for bit, and runs as the encoder that was saved."""
    import transformers

    assert "wo" in transformers.T5EncoderModel._keep_in_fp32_modules  # what the test is about
    pipe = tm.build_flux_pipeline(0)
    pipe.text_encoder_2.to(torch.float16)  # wo too (nn.Module.to): its scales are stored in fp16
    svdquant.quantize_text_encoders(pipe, progress=False)
    wo = "encoder.block.0.layer.1.DenseReluDense.wo"
    assert pipe.text_encoder_2.get_submodule(wo).wscales.dtype == torch.float16
    pipe.text_encoder_2.save_pretrained(tmp_path / "t5")
    te = transformers.T5EncoderModel.from_pretrained(tmp_path / "t5", dtype=torch.float16)
    assert_same_encoder(pipe.text_encoder_2, te)
    assert torch.equal(run(pipe, "text_encoder_2", pipe.text_encoder_2), run(pipe, "text_encoder_2", te))


def test_quantize_with_text_encoders_saves_the_whole_pipeline(tmp_path):
    """``quantize(pipe, ..., text_encoders=True)``: transformer and encoders both come back from the one folder
    and draw the same image."""
    from diffusers import FluxPipeline

    pipe = tm.build_flux_pipeline(0)
    calib = svdquant.Calibration(prompts=PROMPTS, steps=1, snapshots=2, pipeline_kwargs=tm.PIPE_KWARGS)
    svdquant.quantize(pipe, svdquant.get_recipe("int4", iterations=1, eval_tokens=64), calib, text_encoders=True,
                      progress=False)
    pipe.save_pretrained(tmp_path / "pipe")
    loaded = FluxPipeline.from_pretrained(tmp_path / "pipe")
    assert all(quantized_layers(getattr(loaded, n)) for n in ("transformer", *ENCODERS))
    assert torch.equal(tm.sample(pipe, steps=1), tm.sample(loaded, steps=1))


def test_svdquant_checkpoints_keep_the_quantizer_out_of_model_config(saved, tmp_path):
    """save_quantized stores the encoder's own config; the quantization_config is save_pretrained's record."""
    pipe = tm.build_flux_pipeline(0)
    calib = svdquant.Calibration(inputs=tm.calibration_inputs("flux", pipe.transformer, 1))
    svdquant.quantize(pipe.transformer, svdquant.get_recipe("int4", iterations=1, eval_tokens=64), calib,
                      progress=False)
    svdquant.quantize_text_encoders(pipe, progress=False)
    assert "quantization_config" in pipe.text_encoder_2.config.to_dict()
    path = svdquant.save_quantized(pipe, tmp_path / "ck")
    for entry in svdquant.read_metadata(path)["text_encoders"].values():
        assert "quantization_config" not in entry["model_config"]
    encoders = svdquant.load_text_encoders(path)
    assert_same_encoder(pipe.text_encoder_2, encoders["text_encoder_2"])
    # and what svdquant loaded saves the transformers way too (no random weights when read back)
    encoders["text_encoder_2"].save_pretrained(tmp_path / "t5")
    assert_same_encoder(pipe.text_encoder_2, encoder_class("text_encoder_2").from_pretrained(tmp_path / "t5"))


def test_an_unquantized_pipeline_saves_and_loads_as_before(tmp_path):
    from diffusers import FluxPipeline

    pipe = tm.build_flux_pipeline(0)
    pipe.save_pretrained(tmp_path / "pipe")
    for name in ENCODERS:
        assert "quantization_config" not in json.loads((tmp_path / "pipe" / name / "config.json").read_text())
        assert getattr(getattr(pipe, name), "hf_quantizer", None) is None
    loaded = FluxPipeline.from_pretrained(tmp_path / "pipe")
    for name in ENCODERS:
        te = getattr(loaded, name)
        assert getattr(te, "hf_quantizer", None) is None and not quantized_layers(te)
        a, b = getattr(pipe, name).state_dict(), te.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for a, b in zip(embeds(pipe), embeds(loaded)):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------ damaged folders
def one_line(e) -> str:
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


def test_a_truncated_file_fails_in_one_line(saved, tmp_path):
    folder, file = damaged_copy(saved, tmp_path)
    data = file.read_bytes()
    file.write_bytes(data[:-100])
    with pytest.raises(CheckpointError) as e:
        encoder_class("text_encoder_2").from_pretrained(folder)
    msg = one_line(e)
    assert str(file) in msg and "truncated" in msg


@pytest.mark.parametrize("damage", ["missing", "shape", "dtype"])
def test_a_mismatched_quantized_tensor_fails_in_one_line_naming_the_layer(saved, tmp_path, damage):
    folder, file = damaged_copy(saved, tmp_path)
    tensors = load_file(str(file))
    key = f"{T5_Q}.wscales"
    if damage == "missing":
        del tensors[key]
    elif damage == "shape":
        tensors[key] = tensors[key][:-1].clone()
    else:
        tensors[key] = tensors[key].to(torch.float16)
    save_file(tensors, str(file), metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as e:
        encoder_class("text_encoder_2").from_pretrained(folder)
    msg = one_line(e)
    assert key in msg and f"quantized layer {T5_Q!r}" in msg and str(folder) in msg


def test_values_svdquant_never_writes_are_refused_after_loading(saved, tmp_path):
    folder, file = damaged_copy(saved, tmp_path)
    tensors = load_file(str(file))
    tensors[f"{T5_Q}.wscales"][0, 0] = float("nan")
    save_file(tensors, str(file), metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as e:
        encoder_class("text_encoder_2").from_pretrained(folder)
    msg = one_line(e)
    assert f"{T5_Q}.wscales" in msg and "NaN" in msg and str(folder) in msg


def test_a_damaged_quantization_config_fails_in_one_line_that_names_the_fix(saved, tmp_path):
    folder, _ = damaged_copy(saved, tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"]["layers"][T5_Q]["in_features"] = 7
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as e:
        encoder_class("text_encoder_2").from_pretrained(folder)
    msg = one_line(e)
    assert T5_Q in msg and "config.json is damaged" in msg and "pipe.save_pretrained(folder)" in msg


def test_attach_refuses_what_it_cannot_save():
    pipe = tm.build_flux_pipeline(0)
    with pytest.raises(CheckpointError, match="no quantized layers"):
        attach(pipe.text_encoder_2)
    with pytest.raises(TypeError, match="not a transformers model"):
        attach(pipe.transformer)


# ------------------------------------------------------------------------------------------------ versions, registry
def test_an_unsupported_transformers_is_refused_in_one_line(saved, tmp_path, monkeypatch):
    """Below TRANSFORMERS_SUPPORTED the backend refuses to read, load and save, with the fix, rather than write a
    folder that transformers could not load back or load one at random."""
    pipe, folder = saved
    monkeypatch.setattr(compat, "installed_version", lambda: "4.45.2")
    with pytest.raises(compat.TransformersVersionError) as e:
        encoder_class("text_encoder_2").from_pretrained(folder / "text_encoder_2")
    msg = one_line(e)
    assert "4.45.2" in msg and "transformers>=5.0" in msg and "svdquant.save_quantized" in msg
    with pytest.raises(compat.TransformersVersionError) as e:
        pipe.text_encoder_2.save_pretrained(tmp_path / "t5")
    assert "save_pretrained" in one_line(e)


def test_the_version_check_warns_once_outside_the_tested_range():
    compat.require(version="5.25.0")  # silent: the tested range
    with pytest.warns(compat.TransformersVersionWarning, match="5.3.0"):
        compat.require(version="5.3.0")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compat.require(version="5.3.0")  # once per process
        compat.require()  # the installed one is in the tested range (pyproject.toml)


def test_registration_through_transformers_public_functions_and_without_them(monkeypatch):
    from transformers.quantizers import auto

    assert auto.AUTO_QUANTIZER_MAPPING["svdquant"] is SVDQuantHfQuantizer
    assert auto.AUTO_QUANTIZATION_CONFIG_MAPPING["svdquant"] is SVDQuantTextConfig
    compat.add_quantizer("svdquant", SVDQuantHfQuantizer, SVDQuantTextConfig)  # idempotent
    # a transformers before register_quantizer (< 4.49) has only the mappings: the entries go there
    monkeypatch.delattr(auto, "register_quantizer")
    monkeypatch.delattr(auto, "register_quantization_config")
    monkeypatch.delitem(auto.AUTO_QUANTIZER_MAPPING, "svdquant")
    monkeypatch.delitem(auto.AUTO_QUANTIZATION_CONFIG_MAPPING, "svdquant")
    compat.add_quantizer("svdquant", SVDQuantHfQuantizer, SVDQuantTextConfig)
    assert auto.AUTO_QUANTIZER_MAPPING["svdquant"] is SVDQuantHfQuantizer
    monkeypatch.setitem(auto.AUTO_QUANTIZER_MAPPING, "svdquant", auto.AUTO_QUANTIZER_MAPPING["gptq"])
    with pytest.raises(ValueError, match="already has a quantization method 'svdquant'"):
        compat.add_quantizer("svdquant", SVDQuantHfQuantizer, SVDQuantTextConfig)


def test_import_svdquant_leaves_transformers_unloaded_and_from_pretrained_works(saved):
    """Registration waits for transformers to load its quantizers (any transformers model class does), so
    ``import svdquant`` stays fast and ``<Model>.from_pretrained`` still finds the backend."""
    _, folder = saved
    code = (
        "import sys, svdquant\n"
        "assert 'transformers' not in sys.modules, 'import svdquant imported transformers'\n"
        "from transformers import T5EncoderModel\n"
        f"m = T5EncoderModel.from_pretrained({str(folder / 'text_encoder_2')!r})\n"
        "print(type(m.hf_quantizer).__name__, sum(type(x).__name__ == 'SVDQLinear' for x in m.modules()))\n"
    )
    name, n = tm.run_fresh_python(code).split()
    assert name == "SVDQuantHfQuantizer" and int(n) == 6
