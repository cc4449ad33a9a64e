"""diffusers-native loading (issue 14, part 1): quant_method "svdquant" in config.json.

A tiny FLUX / SD3 is quantized and saved with ``svdquant.save_quantized``; ``load_quantized`` + ``attach`` +
``save_pretrained`` writes the diffusers layout; ``<Model>.from_pretrained`` (and a pipeline's) loads it
with SVDQLinears built on the meta device, bit-exact against ``svdquant.load_quantized`` (the same layers and
tensors: the same ops on the same shapes); saving that again writes the same tensors.
"""

from __future__ import annotations

import json

import tiny_models as tm  # first: sets HF_HUB_OFFLINE before diffusers is imported

import pytest
import torch
from safetensors.torch import load_file

import svdquant
from svdquant import CheckpointError, SVDQLinear
from svdquant.integrations.diffusers import attach, compat
from svdquant.integrations.diffusers.quantizer import SVDQuantConfig, SVDQuantQuantizer

RECIPE = svdquant.get_recipe("int4", iterations=1, eval_tokens=64)
CLASSES = {"flux": "FluxTransformer2DModel", "sd3": "SD3Transformer2DModel", "flux2": "Flux2Transformer2DModel",
           "zimage": "ZImageTransformer2DModel", "wan": "WanTransformer3DModel"}
_CACHE: dict = {}
_QUANTIZED: dict = {}  # arch -> the model svdquant.quantize made (what made() saved)


def model_class(arch):
    import diffusers

    return getattr(diffusers, CLASSES[arch])


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """``made(arch)`` -> (svdquant checkpoint folder, diffusers folder with a ``transformer`` subfolder)."""
    root = tmp_path_factory.mktemp("dq")

    def get(arch):
        if arch not in _CACHE:
            build, _ = tm.ALL_ARCHS[arch]
            model = build()
            svdquant.quantize(model, RECIPE, svdquant.Calibration(inputs=tm.calibration_inputs(arch, model, 1)),
                              progress=False)
            ours = svdquant.save_quantized(model, root / f"{arch}-svdq")
            _QUANTIZED[arch] = model
            attach(svdquant.load_quantized(ours)).save_pretrained(root / f"{arch}-diffusers" / "transformer")
            _CACHE[arch] = (ours, root / f"{arch}-diffusers")
        return _CACHE[arch]

    return get


def all_tensors(model):
    t = dict(model.state_dict())
    t.update({k: v for k, v in model.named_buffers() if k not in t})
    return t


def assert_same_model(a, b):
    ta, tb = all_tensors(a), all_tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), k


@pytest.mark.parametrize("arch", list(CLASSES))
def test_from_pretrained_is_bit_exact(made, arch):
    ours, folder = made(arch)
    ref = svdquant.load_quantized(ours)
    loaded = model_class(arch).from_pretrained(folder, subfolder="transformer")
    assert isinstance(loaded.hf_quantizer, SVDQuantQuantizer)
    assert sum(isinstance(m, SVDQLinear) for m in loaded.modules()) == sum(
        isinstance(m, SVDQLinear) for m in ref.modules()) > 0
    assert_same_model(ref, loaded)
    kwargs = tm.ALL_ARCHS[arch][1](ref, seed=7)
    assert torch.equal(tm.forward(ref, kwargs), tm.forward(loaded, kwargs))


@pytest.mark.parametrize("arch", list(CLASSES))
def test_save_pretrained_round_trip(made, arch, tmp_path):
    ours, folder = made(arch)
    loaded = model_class(arch).from_pretrained(folder, subfolder="transformer")
    loaded.save_pretrained(tmp_path / "again")
    cfg = json.loads((tmp_path / "again" / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "svdquant" and cfg["layers"] == svdquant.read_metadata(ours)["layers"]
    first = load_file(str(folder / "transformer" / "diffusion_pytorch_model.safetensors"))
    second = load_file(str(tmp_path / "again" / "diffusion_pytorch_model.safetensors"))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    again = model_class(arch).from_pretrained(tmp_path / "again")
    kwargs = tm.ALL_ARCHS[arch][1](loaded, seed=3)
    assert torch.equal(tm.forward(loaded, kwargs), tm.forward(again, kwargs))


def test_torch_dtype_casts_kept_layers_only(made):
    """torch_dtype applies to the 16-bit layers; the format's own dtypes (fp32 scales, 1/λ) stay."""
    ours, folder = made("flux")
    ref = svdquant.load_quantized(ours)
    loaded = model_class("flux").from_pretrained(folder, subfolder="transformer", torch_dtype=torch.bfloat16)
    checked = 0
    for name, m in loaded.named_modules():
        if isinstance(m, SVDQLinear):
            r = ref.get_submodule(name)
            for b, t in r.state_dict().items():  # every buffer, in its format's dtype, bit for bit
                assert m.state_dict()[b].dtype == t.dtype and torch.equal(m.state_dict()[b], t), (name, b)
            checked += 1
    assert checked and loaded.x_embedder.weight.dtype == torch.bfloat16


def test_pipeline_from_pretrained(tmp_path):
    """A whole saved pipeline whose transformer is quantized loads through DiffusionPipeline.from_pretrained."""
    from diffusers import DiffusionPipeline

    pipe = tm.build_flux_pipeline()
    svdquant.quantize(pipe.transformer, RECIPE,
                      svdquant.Calibration(inputs=tm.calibration_inputs("flux", pipe.transformer, 1)), progress=False)
    attach(pipe.transformer)
    pipe.save_pretrained(tmp_path / "pipe")
    loaded = DiffusionPipeline.from_pretrained(tmp_path / "pipe")
    assert isinstance(loaded.transformer.hf_quantizer, SVDQuantQuantizer)
    assert torch.equal(tm.sample(pipe, steps=1), tm.sample(loaded, steps=1))


def test_no_16bit_weight_is_made_for_quantized_layers(made, monkeypatch):
    ours, folder = made("flux")
    inits = tm.watch_loading(monkeypatch)
    built = tm.watch_quantized_builds(monkeypatch)
    loaded = model_class("flux").from_pretrained(folder, subfolder="transformer")
    assert set(inits) <= {"meta"} and built and set(built) == {"meta"}
    for m in loaded.modules():
        if isinstance(m, SVDQLinear):
            assert not hasattr(m, "weight") and not any(True for _ in m.parameters())
    assert not any(t.is_meta for t in all_tensors(loaded).values())


def test_damaged_config_is_a_checkpoint_error(made, tmp_path):
    import shutil

    _, folder = made("flux")
    dst = tmp_path / "bad"
    shutil.copytree(folder, dst)
    cfg_file = dst / "transformer" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["quantization_config"]["layers"]["transformer_blocks.0.attn.to_q"]["in_features"] = 32
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="to_q"):
        model_class("flux").from_pretrained(dst, subfolder="transformer")


def test_config_refuses_unknown_entries_and_newer_versions():
    layer = {"type": "linear", "in_features": 64, "out_features": 64, "weights": "int4m"}
    assert SVDQuantConfig.from_dict({"quant_method": "svdquant", "layers": {"a": layer}}).layers == {"a": layer}
    with pytest.raises(CheckpointError, match="Upgrade"):
        SVDQuantConfig(layers={"a": layer}, format_version=99)
    with pytest.raises(CheckpointError, match="does not know"):
        SVDQuantConfig(layers={"a": layer}, future_field=1)


def test_registration_happens_on_import():
    from diffusers.quantizers import auto

    assert auto.AUTO_QUANTIZER_MAPPING["svdquant"] is SVDQuantQuantizer
    assert auto.AUTO_QUANTIZATION_CONFIG_MAPPING["svdquant"] is SVDQuantConfig


def test_attach_refuses_an_unquantized_model():
    with pytest.raises(CheckpointError, match="no quantized layers"):
        attach(tm.build_flux())


@pytest.mark.parametrize("call", ["load_quantized", "read_metadata", "load_pipeline"])
def test_offline_hub_id_says_what_to_do(call, monkeypatch):
    """The suite runs with HF_HUB_OFFLINE=1 (tiny_models): a hub id not in the cache cannot be fetched."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    args = ("svdquant-test/not-cached-int4",) if call != "load_pipeline" else ("tiny", "svdquant-test/not-cached-int4")
    with pytest.raises(CheckpointError) as e:
        getattr(svdquant, call)(*args)
    msg = str(e.value)
    assert "svdquant-test/not-cached-int4" in msg and "hf download svdquant-test/not-cached-int4" in msg
    assert "HF_HUB_OFFLINE" in msg


def test_a_missing_local_path_is_not_taken_for_a_hub_id(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        svdquant.load_quantized(tmp_path / "owner" / "name")
    with pytest.raises(CheckpointError, match="does not exist"):
        svdquant.load_quantized("./owner/name")


# Every quantized model saves the diffusers way with no attach(): svdquant.quantize, load_quantized and the
# converters finish it through compat.quantized (issue 25: before, save_pretrained wrote a 16-bit config and
# from_pretrained came back with random weights and only diffusers' "newly initialized" warning).

@pytest.mark.parametrize("arch", list(CLASSES))
def test_quantize_then_save_pretrained_needs_no_attach(made, arch, tmp_path):
    ours, _ = made(arch)
    model = _QUANTIZED[arch]
    model.save_pretrained(tmp_path / "t")
    cfg = json.loads((tmp_path / "t" / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "svdquant" and cfg["layers"] == svdquant.read_metadata(ours)["layers"]
    loaded = model_class(arch).from_pretrained(tmp_path / "t")
    assert isinstance(loaded.hf_quantizer, SVDQuantQuantizer)
    kwargs = tm.ALL_ARCHS[arch][1](model, seed=5)
    assert torch.equal(tm.forward(model, kwargs), tm.forward(loaded, kwargs))


def test_load_quantized_then_save_pretrained_needs_no_attach(made, tmp_path):
    ours, _ = made("flux")
    ref = svdquant.load_quantized(ours)
    ref.save_pretrained(tmp_path / "t")
    loaded = model_class("flux").from_pretrained(tmp_path / "t")
    assert_same_model(ref, loaded)
    kwargs = tm.ARCHS["flux"][1](ref, seed=6)
    assert torch.equal(tm.forward(ref, kwargs), tm.forward(loaded, kwargs))


def test_save_quantized_keeps_the_quantizer_out_of_model_config(made):
    ours, _ = made("flux")
    assert "quantization_config" in _QUANTIZED["flux"].config  # what save_pretrained writes...
    assert not set(compat.QUANTIZER_CONFIG_KEYS) & set(svdquant.read_metadata(ours)["model_config"])  # ...not ours


def test_two_level_conversion_saves_its_new_formats(tmp_path):
    """to_two_level changes the layers' formats: the config save_pretrained writes names the new ones."""
    from svdquant.convert import to_two_level

    model = tm.build_flux()
    svdquant.quantize(model, svdquant.get_recipe("w4a4-float", iterations=1, eval_tokens=64),
                      svdquant.Calibration(inputs=tm.calibration_inputs("flux", model, 1)), progress=False)
    assert to_two_level(model).errors
    model.save_pretrained(tmp_path / "t")
    loaded = model_class("flux").from_pretrained(tmp_path / "t")
    assert_same_model(model, loaded)
    kwargs = tm.flux_inputs(model, seed=2)
    assert torch.equal(tm.forward(model, kwargs), tm.forward(loaded, kwargs))


DAMAGES = {
    "no layers": lambda q: q.pop("layers"),
    "empty layers": lambda q: q.update(layers={}),
    "malformed layer": lambda q: q["layers"]["transformer_blocks.0.attn.to_q"].update(weights=7),
    "unknown format": lambda q: q["layers"]["transformer_blocks.0.attn.to_q"].update(weights="int9"),
    "wrong size": lambda q: q["layers"]["transformer_blocks.0.attn.to_q"].update(in_features=32),
    "format version": lambda q: q.update(format_version="one"),
    "recipe": lambda q: q.update(recipe=[]),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_quantization_config_fails_in_one_line_that_names_the_fix(made, tmp_path, damage):
    import shutil

    _, folder = made("flux")
    dst = tmp_path / "bad"
    shutil.copytree(folder / "transformer", dst)
    cfg = json.loads((dst / "config.json").read_text())
    DAMAGES[damage](cfg["quantization_config"])
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as e:
        model_class("flux").from_pretrained(dst)
    msg = str(e.value)
    assert "\n" not in msg and "config.json is damaged" in msg and ".save_pretrained(folder)" in msg, msg


def test_import_svdquant_leaves_diffusers_unloaded_and_from_pretrained_works(made):
    """Registration waits for diffusers to load its quantizers (any diffusers model class does), so
    ``import svdquant`` stays fast and ``<Model>.from_pretrained`` still finds the backend."""
    _, folder = made("flux")
    code = (
        "import sys, svdquant\n"
        "assert 'diffusers' not in sys.modules, 'import svdquant imported diffusers'\n"
        "from diffusers import FluxTransformer2DModel\n"
        f"m = FluxTransformer2DModel.from_pretrained({str(folder)!r}, subfolder='transformer')\n"
        "print(type(m.hf_quantizer).__name__, sum(type(x).__name__ == 'SVDQLinear' for x in m.modules()))\n"
    )
    name, n = tm.run_fresh_python(code).split()
    assert name == "SVDQuantQuantizer" and int(n) > 0


def test_diffusers_version_check_warns_once_outside_the_tested_range():
    assert compat.in_tested_range("0.42.1") and compat.in_tested_range("0.42.0")
    assert not compat.in_tested_range("0.43.0.dev0") and not compat.in_tested_range("0.41.9")
    assert compat.check_version()  # the installed one (pyproject.toml pins the tested range)
    with pytest.warns(compat.DiffusersVersionWarning, match="9.1.0"):
        assert not compat.check_version("9.1.0")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not compat.check_version("9.1.0")  # once per process
