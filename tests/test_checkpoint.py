"""Checkpoints: quantize -> save_quantized -> load_quantized / load_pipeline on the tiny transformers,
the metadata, every error case (missing / truncated / mismatched files, another architecture,
newer format), and saves that fail or overwrite.

The round trips use fp32 models, plus one bf16 round trip. Their forwards are compared bit for bit: a loaded
model runs the same ops on the same shapes and the same tensor values as the saved one (only the tensors' memory
alignment could differ, which is why the loader aligns them; ``test_loaded_tensors_are_allocator_aligned``).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

import tiny_models as tm  # first: sets HF_HUB_OFFLINE before diffusers is imported

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import svdquant
from svdquant._state import peek
import svdquant.checkpoint as ckpt_mod
import svdquant.checkpoint.save as ckpt_save
from svdquant import CheckpointError, SVDQConv1x1, SVDQLinear
from svdquant.checkpoint import FORMAT_VERSION, META_FILE, TENSOR_FILE

RECIPE = svdquant.Int4Config(iterations=3, eval_tokens=128)
ARCHS = list(tm.ALL_ARCHS)


# ------------------------------------------------------------------------------------------------ helpers
def quantize(arch: str, dtype=torch.float32, seed: int = 0):
    build, _ = tm.ALL_ARCHS[arch]
    model = build(seed=seed, dtype=dtype)
    report = svdquant.quantize(model, RECIPE, svdquant.Calibration(inputs=tm.calibration_inputs(arch, model, 2)),
                               progress=False)
    return model, report


def all_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    t = dict(model.state_dict())
    t.update({k: v for k, v in model.named_buffers() if k not in t})
    return t


def quantized_names(model: nn.Module) -> set[str]:
    convs = {n for n, m in model.named_modules() if isinstance(m, SVDQConv1x1)}
    lins = {n for n, m in model.named_modules() if isinstance(m, SVDQLinear)}
    return convs | {n for n in lins if n.rpartition(".")[0] not in convs}


def realign(model: nn.Module) -> nn.Module:
    """Copy every parameter and buffer into fresh (allocator-aligned) memory, values unchanged."""
    for mod in model.modules():
        for n, p in list(mod._parameters.items()):
            if p is not None:
                mod._parameters[n] = nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
        for n, b in list(mod._buffers.items()):
            if b is not None:
                mod._buffers[n] = b.clone()
    return model


def listing(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (recursively) with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def rewrite_tensors(path: Path, change):
    """Rewrite ``path/transformer.safetensors`` with ``change(tensors)`` applied, keeping its metadata, and record
    its new SHA-256 (as whoever wrote a hostile file would): the checks behind the hash get the file."""
    f = path / TENSOR_FILE
    with safe_open(str(f), "pt") as h:
        meta = h.metadata()
    tensors = load_file(str(f))
    change(tensors)
    save_file(tensors, str(f), metadata=meta)
    if (path / META_FILE).is_file():
        edit_meta(path, lambda m: m.get("sha256", {}).update({TENSOR_FILE: ckpt_mod.sha256_of(f)}))


def edit_meta(path: Path, change):
    meta = json.loads((path / META_FILE).read_text())
    change(meta)
    (path / META_FILE).write_text(json.dumps(meta))


_CACHE: dict = {}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """``saved(arch)`` -> (in-memory quantized fp32 model, report, checkpoint folder), built once."""
    root = tmp_path_factory.mktemp("ckpts")

    def get(arch):
        if arch not in _CACHE:
            model, report = quantize(arch)
            path = svdquant.save_quantized(model, root / arch, report=report)
            _CACHE[arch] = (model, report, path)
        return _CACHE[arch]

    return get


@pytest.fixture
def fresh(saved, tmp_path):
    """``fresh(arch)`` -> a private copy of the arch's checkpoint folder, free to corrupt."""
    def get(arch="flux"):
        dst = tmp_path / f"{arch}-copy"
        shutil.copytree(saved(arch)[2], dst)
        return dst

    return get


# ------------------------------------------------------------------------------------------------ round trip
@pytest.mark.parametrize("arch", ARCHS)
def test_roundtrip_tensors_exact(saved, arch):
    model, _, path = saved(arch)
    loaded = svdquant.load_quantized(path)
    assert type(loaded) is type(model) and not loaded.training
    assert quantized_names(loaded) == quantized_names(model)
    a, b = all_tensors(model), all_tensors(loaded)
    assert set(a) == set(b)
    for k in a:
        assert b[k].dtype == a[k].dtype and b[k].shape == a[k].shape, k
        assert b[k].device.type == "cpu", k
        assert torch.equal(a[k], b[k]), k
    for name in quantized_names(model):
        m, l = model.get_submodule(name), loaded.get_submodule(name)
        m, l = (m.linear, l.linear) if isinstance(m, SVDQConv1x1) else (m, l)
        assert type(l) is type(m) and l.config() == m.config(), name
    assert peek(loaded).recipe == RECIPE.to_dict()


@pytest.mark.parametrize("arch", ARCHS)
def test_roundtrip_forward_exact_once_realigned(saved, arch):
    """The loaded model computes exactly what the in-memory one does (given the same memory alignment)."""
    model, _, path = saved(arch)
    loaded = realign(svdquant.load_quantized(path))
    make = tm.ALL_ARCHS[arch][1]
    for seed in range(2):
        x = make(model, seed=seed)
        assert torch.equal(tm.forward(loaded, x), tm.forward(model, x))


@pytest.mark.parametrize("arch", ARCHS)
def test_roundtrip_forward_close(saved, arch):
    model, _, path = saved(arch)
    loaded = svdquant.load_quantized(path)
    x = tm.ALL_ARCHS[arch][1](model, seed=0)
    torch.testing.assert_close(tm.forward(loaded, x), tm.forward(model, x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", [
    "flux", "sd3", "pixart", "sana", "qwenimage", "sdxl"])
def test_roundtrip_forward_exact(saved, arch):
    model, _, path = saved(arch)
    loaded = svdquant.load_quantized(path)
    make = tm.ALL_ARCHS[arch][1]
    for seed in range(2):
        x = make(model, seed=seed)
        assert torch.equal(tm.forward(loaded, x), tm.forward(model, x))


def test_loaded_tensors_are_allocator_aligned(saved):
    loaded = svdquant.load_quantized(saved("flux")[2])
    misaligned = [k for k, t in all_tensors(loaded).items() if t.data_ptr() % 16]
    assert not misaligned, misaligned[:5]


@pytest.mark.parametrize("arch", ["flux", "sana"])
def test_bf16_roundtrip(tmp_path, arch):
    model, report = quantize(arch, dtype=torch.bfloat16)
    path = svdquant.save_quantized(model, tmp_path / "ck", report=report)
    loaded = realign(svdquant.load_quantized(path))
    x = tm.ALL_ARCHS[arch][1](model, seed=0)
    assert torch.equal(tm.forward(loaded, x), tm.forward(model, x))


@pytest.mark.parametrize("arch", ARCHS)
def test_load_never_materializes_16bit_weights(saved, arch, monkeypatch):
    model, _, path = saved(arch)
    inits = tm.watch_loading(monkeypatch)  # every weight initialization must happen on the meta device
    loaded = svdquant.load_quantized(path)
    assert set(inits) <= {"meta"}
    for name in quantized_names(loaded):
        m = loaded.get_submodule(name)
        lin = m.linear if isinstance(m, SVDQConv1x1) else m
        assert not hasattr(lin, "weight") and not hasattr(m, "weight"), name
        assert not any(True for _ in m.parameters()), name  # all state is packed buffers
    n_params = sum(p.numel() for p in loaded.parameters())
    assert n_params == sum(p.numel() for p in model.parameters())
    assert n_params < sum(p.numel() for p in tm.ALL_ARCHS[arch][0]().parameters())  # fewer than the 16-bit model
    assert not any(t.is_meta for t in all_tensors(loaded).values())
    assert sum(t.numel() * t.element_size() for t in all_tensors(loaded).values()) == \
        sum(t.numel() * t.element_size() for t in all_tensors(model).values())


# ------------------------------------------------------------------------------------------------ metadata
@pytest.mark.parametrize("arch", ARCHS)
def test_metadata(saved, arch):
    model, report, path = saved(arch)
    assert sorted(os.listdir(path)) == [META_FILE, TENSOR_FILE]
    meta = svdquant.read_metadata(path)
    # int4m layers: version 2; 3 only with int4z layers or text encoders, 4 with an fp32 bias, 5 (FORMAT_VERSION)
    # with a second expert
    assert meta["format"] == "svdquant" and meta["format_version"] == 2 and FORMAT_VERSION == 5
    assert meta["svdquant_version"] == svdquant.__version__
    assert meta["model_class"] == type(model).__name__
    cfg = meta["model_config"]
    # the UNet has no num_layers; its per-level sizes are tuples (JSON lists in the metadata); Z-Image names its sizes
    # dim / n_layers / n_heads
    keys = [k for k in ("num_layers", "attention_head_dim", "num_attention_heads", "in_channels", "block_out_channels",
                        "down_block_types", "dim", "n_layers", "n_heads") if k in model.config]
    assert len(keys) >= 4, keys
    for k in keys:
        assert cfg[k] == json.loads(json.dumps(model.config[k])), k
    assert meta["recipe"] == json.loads(json.dumps(RECIPE.to_dict()))
    assert svdquant.QuantConfig.from_dict(meta["recipe"]) == RECIPE
    assert meta["base"] is None and meta["base_is_local"] is False
    # one entry per quantized layer, its type and exact layout
    assert set(meta["layers"]) == quantized_names(model)
    for name, cfg in meta["layers"].items():
        m = model.get_submodule(name)
        kind = "conv1x1" if isinstance(m, SVDQConv1x1) else "linear"
        lin = m.linear if kind == "conv1x1" else m
        assert cfg == {"type": kind, **lin.config()}, name
        # INT8 weight-only: the layers FLUX.2's adapter keeps at 8 bits (its modulation and embedders)
        assert (cfg["weights"], cfg["activations"]) in (("int4m", "int8"), ("int4", None), ("int8", None))
        assert cfg["dtype"] == "float32"
    # the report, JSON-friendly
    rep = meta["report"]
    assert rep["snapshots"] == 2 and rep["model"] == type(model).__name__
    assert [tuple(s) for s in rep["skipped"]] == report.skipped
    assert [r["names"] for r in rep["rows"]] == [r.names for r in report.rows]
    assert rep["seconds_total"] > 0
    # the tensor file carries the same metadata, less its own hash: alone it still says what it is
    inside = {k: v for k, v in meta.items() if k != "sha256"}
    assert svdquant.read_metadata(path / TENSOR_FILE) == inside
    with safe_open(str(path / TENSOR_FILE), "pt") as f:
        assert json.loads(f.metadata()["svdquant"]) == inside


def test_metadata_fields_svdquant_info_prints(saved, capsys):
    from svdquant.cli import main

    model, report, path = saved("flux")
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "FluxTransformer2DModel" in out and "version 2" in out
    assert f"{len(svdquant.read_metadata(path)['layers'])} quantized" in out
    assert "17 × Wint4mAint8 rank 32" in out  # 8 attention + 4 MLP in the double block, 5 in the single
    assert "3 × Wint4A16 rank 0" in out  # the adaLN linears
    assert f"kept 16-bit: {len(report.skipped)} layers" in out


# ------------------------------------------------------------------------------------------------ errors: loading
def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist") as e:
        svdquant.load_quantized(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(e.value)


def test_missing_metadata_file(fresh):
    path = fresh()
    (path / META_FILE).unlink()
    with pytest.raises(CheckpointError) as e:
        svdquant.load_quantized(path)
    assert str(path) in str(e.value) and f"{META_FILE} is missing" in str(e.value)


@pytest.mark.parametrize("text", ["", "{not json", "half"])
def test_corrupt_metadata_json(fresh, text):
    path = fresh()
    if text == "half":
        full = (path / META_FILE).read_text()
        text = full[: len(full) // 2]
    (path / META_FILE).write_text(text)
    with pytest.raises(CheckpointError) as e:
        svdquant.load_quantized(path)
    assert str(path / META_FILE) in str(e.value) and "not valid JSON" in str(e.value)


@pytest.mark.parametrize("case", ["list", "string-version", "missing-keys"])
def test_malformed_metadata_is_a_checkpoint_error(fresh, case):
    path = fresh()
    if case == "list":
        (path / META_FILE).write_text("[1, 2]")
    elif case == "string-version":
        edit_meta(path, lambda m: m.update(format_version="2"))
    else:
        (path / META_FILE).write_text(json.dumps({"format": "svdquant", "format_version": 1}))
    with pytest.raises(CheckpointError) as e:
        svdquant.load_quantized(path)
    assert str(path / META_FILE) in str(e.value)


def test_not_svdquant_metadata(fresh):
    path = fresh()
    edit_meta(path, lambda m: m.update(format="something-else"))
    with pytest.raises(CheckpointError, match="is not svdquant metadata") as e:
        svdquant.load_quantized(path)
    assert str(path / META_FILE) in str(e.value)


def test_newer_format_version(fresh):
    path = fresh()
    edit_meta(path, lambda m: m.update(format_version=FORMAT_VERSION + 1))
    with pytest.raises(CheckpointError) as e:
        svdquant.load_quantized(path)
    msg = str(e.value)
    assert str(path / META_FILE) in msg and f"format version {FORMAT_VERSION + 1}" in msg and "Upgrade" in msg


def test_missing_tensor_file(fresh):
    path = fresh()
    (path / TENSOR_FILE).unlink()
    with pytest.raises(CheckpointError) as e:
        svdquant.load_quantized(path)
    assert str(path / TENSOR_FILE) in str(e.value) and "missing" in str(e.value)


@pytest.mark.parametrize("keep", ["half", "all-but-8-bytes", "100-bytes", "empty"])
def test_truncated_tensor_file(fresh, keep):
    path = fresh()
    f = path / TENSOR_FILE
    data = f.read_bytes()
    n = {"half": len(data) // 2, "all-but-8-bytes": len(data) - 8, "100-bytes": 100, "empty": 0}[keep]
    f.write_bytes(data[:n])
    with pytest.raises(CheckpointError) as e:
        svdquant.load_quantized(path)
    assert str(f) in str(e.value) and "truncated or corrupt" in str(e.value)


def test_garbage_tensor_file(fresh):
    path = fresh()
    (path / TENSOR_FILE).write_bytes(b"\x00" * 4096)
    with pytest.raises(CheckpointError, match="truncated or corrupt") as e:
        svdquant.load_quantized(path)
    assert str(path / TENSOR_FILE) in str(e.value)


def test_tensor_with_wrong_shape(fresh):
    path = fresh()
    key = "transformer_blocks.0.attn.to_q.lora_up"
    rewrite_tensors(path, lambda t: t.update({key: t[key][:, :-1].contiguous()}))
    with pytest.raises(CheckpointError) as e:
        svdquant.load_quantized(path)
    msg = str(e.value)
    assert str(path / TENSOR_FILE) in msg and repr(key) in msg
    assert "(64, 31)" in msg and "(64, 32)" in msg


def test_tensor_with_wrong_dtype(fresh):
    path = fresh()
    key = "single_transformer_blocks.0.proj_out.wscales"
    rewrite_tensors(path, lambda t: t.update({key: t[key].half()}))
    with pytest.raises(CheckpointError) as e:
        svdquant.load_quantized(path)
    assert str(path / TENSOR_FILE) in str(e.value) and repr(key) in str(e.value) and "float16" in str(e.value)


def test_missing_tensor(fresh):
    path = fresh()
    key = "transformer_blocks.0.ff.net.2.smooth_inv"
    rewrite_tensors(path, lambda t: t.pop(key))
    with pytest.raises(CheckpointError) as e:
        svdquant.load_quantized(path)
    assert str(path / TENSOR_FILE) in str(e.value) and key in str(e.value) and "lacks 1 tensors" in str(e.value)


def test_extra_tensor(fresh):
    path = fresh()
    rewrite_tensors(path, lambda t: t.update({"bogus.extra": torch.zeros(3)}))
    with pytest.raises(CheckpointError) as e:
        svdquant.load_quantized(path)
    assert str(path / TENSOR_FILE) in str(e.value) and "bogus.extra" in str(e.value)


def test_tensor_file_of_another_architecture(saved, fresh):
    """FLUX metadata next to SD3 tensors: the tensor names disagree."""
    path = fresh("flux")
    shutil.copy(saved("sd3")[2] / TENSOR_FILE, path / TENSOR_FILE)
    with pytest.raises(CheckpointError) as e:
        svdquant.load_quantized(path)
    assert str(path / TENSOR_FILE) in str(e.value) and "tensors" in str(e.value)


def test_tensor_file_of_another_recipe(tmp_path, fresh):
    """int4 metadata next to nvfp4 tensors of the same model: shapes and dtypes disagree."""
    path = fresh("flux")
    model = tm.build_flux()
    svdquant.quantize(model, svdquant.NVFP4Config(iterations=1, eval_tokens=64),
                      svdquant.Calibration(inputs=tm.calibration_inputs("flux", model, 1)), progress=False)
    other = svdquant.save_quantized(model, tmp_path / "nvfp4")
    shutil.copy(other / TENSOR_FILE, path / TENSOR_FILE)
    with pytest.raises(CheckpointError) as e:
        svdquant.load_quantized(path)
    assert str(path / TENSOR_FILE) in str(e.value)


def test_safetensors_without_svdquant_metadata(tmp_path):
    f = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(2)}, str(f))
    with pytest.raises(CheckpointError, match="has no svdquant metadata") as e:
        svdquant.read_metadata(f)
    assert str(f) in str(e.value)


def test_unknown_model_class(fresh):
    path = fresh()
    edit_meta(path, lambda m: m.update(model_class="NoSuchTransformer2DModel"))
    with pytest.raises(CheckpointError, match="NoSuchTransformer2DModel"):
        svdquant.load_quantized(path)


def test_config_without_a_quantized_layer(fresh):
    path = fresh()
    edit_meta(path, lambda m: m["model_config"].update(num_single_layers=0))
    with pytest.raises(CheckpointError) as e:
        svdquant.load_quantized(path)
    assert "'single_transformer_blocks.0." in str(e.value)


@pytest.mark.parametrize("case", ["class", "config"])
def test_model_mismatch_errors_name_the_checkpoint(fresh, case):
    path = fresh()
    if case == "class":
        edit_meta(path, lambda m: m.update(model_class="NoSuchTransformer2DModel"))
    else:
        edit_meta(path, lambda m: m["model_config"].update(num_single_layers=0))
    with pytest.raises(CheckpointError) as e:
        svdquant.load_quantized(path)
    assert str(path) in str(e.value)


# ------------------------------------------------------------------------------------------------ errors: saving
def test_save_unquantized_model_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="no quantized layers"):
        svdquant.save_quantized(tm.build_flux(), tmp_path / "ck")
    assert not (tmp_path / "ck").exists()


def test_save_model_without_config_is_refused(tmp_path):
    model = nn.Sequential(nn.Linear(64, 64))
    svdquant.quantize(model, RECIPE, svdquant.Calibration(inputs=[{"input": torch.randn(8, 64)}]), include=["*"],
                      progress=False)
    with pytest.raises(CheckpointError, match="no .config"):
        svdquant.save_quantized(model, tmp_path / "ck")
    assert os.listdir(tmp_path) == []


def test_save_into_existing_folder_without_overwrite(saved, fresh):
    path = fresh()
    before = listing(path)
    model = saved("flux")[0]
    with pytest.raises(CheckpointError, match="already exists") as e:
        svdquant.save_quantized(model, path)
    assert str(path) in str(e.value) and "overwrite" in str(e.value)
    assert listing(path) == before
    assert sorted(os.listdir(path.parent)) == [path.name]


def _failing_save_file(exc):
    def save(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial" * 100)  # some bytes made it to disk, then:
        raise exc

    return save


@pytest.mark.parametrize("exc", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_failed_save_leaves_nothing_behind(saved, tmp_path, monkeypatch, exc):
    model = saved("flux")[0]
    parent = tmp_path / "out"
    parent.mkdir()
    monkeypatch.setattr(ckpt_save, "save_file", _failing_save_file(exc))
    with pytest.raises(type(exc)):
        svdquant.save_quantized(model, parent / "ck")
    assert os.listdir(parent) == []  # no checkpoint, no temporary folder


def test_failed_overwrite_keeps_the_old_checkpoint(saved, fresh, monkeypatch):
    path = fresh()
    before = listing(path)
    monkeypatch.setattr(ckpt_save, "save_file", _failing_save_file(OSError(28, "No space left on device")))
    with pytest.raises(OSError):
        svdquant.save_quantized(saved("sd3")[0], path, overwrite=True)
    assert listing(path) == before
    assert sorted(os.listdir(path.parent)) == [path.name]
    monkeypatch.undo()
    assert type(svdquant.load_quantized(path)).__name__ == "FluxTransformer2DModel"


def test_overwrite_replaces(saved, fresh):
    path = fresh("flux")
    sd3, report, _ = saved("sd3")
    assert svdquant.save_quantized(sd3, path, report=report, overwrite=True) == path
    assert sorted(os.listdir(path.parent)) == [path.name]  # no temporary or old folder left
    assert sorted(os.listdir(path)) == [META_FILE, TENSOR_FILE]
    assert svdquant.read_metadata(path)["model_class"] == "SD3Transformer2DModel"
    loaded = svdquant.load_quantized(path)
    assert type(loaded).__name__ == "SD3Transformer2DModel"


def test_overwrite_failing_at_the_last_rename_keeps_the_old_checkpoint(saved, fresh, monkeypatch):
    path = fresh()
    before = listing(path)
    real_rename = Path.rename

    def rename(self, target):
        if self.name.startswith(f".{path.name}.tmp-"):
            raise OSError(16, "Device or resource busy")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(OSError):
        svdquant.save_quantized(saved("sd3")[0], path, overwrite=True)
    monkeypatch.undo()
    assert path.is_dir() and listing(path) == before
    assert sorted(os.listdir(path.parent)) == [path.name]


def test_checkpoint_folder_has_normal_permissions(saved, tmp_path):
    ref = tmp_path / "ref"
    ref.mkdir()
    path = svdquant.save_quantized(saved("flux")[0], tmp_path / "ck")
    assert path.stat().st_mode & 0o777 == ref.stat().st_mode & 0o777


def test_checkpoint_files_follow_the_umask(saved, tmp_path):
    """The tensor file was created 0600 by safetensors while the rest followed the umask."""
    ref = tmp_path / "ref.txt"
    ref.write_text("x")
    path = svdquant.save_quantized(saved("flux")[0], tmp_path / "ck")
    for name in (META_FILE, TENSOR_FILE):
        assert (path / name).stat().st_mode & 0o777 == ref.stat().st_mode & 0o777, name


def test_tensor_file_longer_than_its_header_says(fresh):
    path = fresh()
    with open(path / TENSOR_FILE, "ab") as f:
        f.write(b"\0" * 64)
    with pytest.raises(CheckpointError, match="truncated or corrupt.*the header describes"):
        svdquant.load_quantized(path)


# ------------------------------------------------------------------------------------------------ load_pipeline
@pytest.fixture(scope="module")
def pipeline_setup(tmp_path_factory):
    """A tiny diffusers FluxPipeline saved offline, its transformer quantized (through the pipeline) and saved."""
    root = tmp_path_factory.mktemp("pipes")
    base = tm.save_flux_pipeline(root / "project" / "base")
    pipe = tm.build_flux_pipeline()
    ref = tm.sample(pipe)
    report = svdquant.quantize(pipe, RECIPE, svdquant.Calibration(prompts=["a cat", "a dog"], steps=2, snapshots=3,
                                                                  pipeline_kwargs=dict(tm.PIPE_KWARGS)),
                               progress=False)
    ck = svdquant.save_quantized(pipe.transformer, root / "project" / "ck", base=base, report=report)
    return dict(root=root, base=base, ck=ck, pipe=pipe, ref16=ref, refq=tm.sample(pipe))


def _check_pipeline(p, setup):
    from diffusers import FluxPipeline

    assert type(p) is FluxPipeline
    assert type(p.transformer.transformer_blocks[0].attn.to_q) is SVDQLinear
    assert type(p.transformer.single_transformer_blocks[0].norm.linear) is SVDQLinear
    assert type(p.transformer.proj_out) is nn.Linear
    img = tm.sample(p)
    assert img.shape == (1, 3, 16, 16) and torch.isfinite(img).all()
    torch.testing.assert_close(img, setup["refq"], rtol=0, atol=1e-5)  # what the in-memory quantized pipe drew
    assert not torch.equal(img, setup["ref16"])


def test_load_pipeline_with_local_base(pipeline_setup):
    s = pipeline_setup
    meta = svdquant.read_metadata(s["ck"])
    assert meta["base_is_local"] is True and meta["base"] == os.path.join("..", "base")
    _check_pipeline(svdquant.load_pipeline(s["base"], s["ck"]), s)


def test_load_pipeline_uses_recorded_base(pipeline_setup):
    _check_pipeline(svdquant.load_pipeline(None, pipeline_setup["ck"]), pipeline_setup)


def test_load_pipeline_fuse_is_exact_and_checked(pipeline_setup):
    p = svdquant.load_pipeline(None, pipeline_setup["ck"], fuse=True)  # default: only on a CUDA device
    assert p.transformer.transformer_blocks[0].attn.fused_projections
    _check_pipeline(p, pipeline_setup)
    assert not svdquant.load_pipeline(None, pipeline_setup["ck"]).transformer.transformer_blocks[0].attn \
        .fused_projections
    with pytest.raises(ValueError, match="fuse='yes'"):
        svdquant.load_pipeline(None, pipeline_setup["ck"], fuse="yes")


def test_recorded_relative_base_survives_moving_both(pipeline_setup, tmp_path):
    s = pipeline_setup
    moved = tmp_path / "elsewhere" / "project-moved"
    shutil.copytree(s["base"].parent, moved)
    # the original location is gone: only the relative path can find the base
    hidden = s["base"].parent.with_name("project-hidden")
    s["base"].parent.rename(hidden)
    try:
        _check_pipeline(svdquant.load_pipeline(None, moved / "ck"), s)
        with pytest.raises(FileNotFoundError):  # the base alone moved: a clear error, not a crash
            shutil.rmtree(moved / "base")
            svdquant.load_pipeline(None, moved / "ck")
    finally:
        hidden.rename(s["base"].parent)


def test_load_pipeline_rejects_a_checkpoint_of_another_architecture(pipeline_setup, saved):
    s = pipeline_setup
    sd3_ck = saved("sd3")[2]
    with pytest.raises(CheckpointError) as e:
        svdquant.load_pipeline(s["base"], sd3_ck)
    msg = str(e.value)
    assert str(sd3_ck) in msg and str(s["base"]) in msg
    assert "SD3Transformer2DModel" in msg and "FluxTransformer2DModel" in msg


def test_load_pipeline_rejects_another_architecture_on_a_tiny_base(saved, tmp_path):
    from svdquant.pipelines import TinyFluxPipeline

    base = tmp_path / "tiny-base"
    TinyFluxPipeline.random(num_single_layers=1, num_layers=1).save_pretrained(base)
    with pytest.raises(CheckpointError, match="SD3Transformer2DModel.*FluxTransformer2DModel"):
        svdquant.load_pipeline(base, saved("sd3")[2])


def test_load_pipeline_without_base(saved):
    path = saved("flux")[2]
    with pytest.raises(CheckpointError, match="does not record its base") as e:
        svdquant.load_pipeline(None, path)
    assert str(path) in str(e.value)


def test_load_pipeline_missing_base_folder(saved, tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        svdquant.load_pipeline(tmp_path / "no-base", saved("flux")[2])
    assert str(tmp_path / "no-base") in str(e.value)


# ------------------------------------------------------------------------------------------------ loading safety
def _copy_checkpoint(ck: Path, to: Path, **meta_changes) -> Path:
    """``ck`` copied to ``to`` with svdquant.json entries replaced (no hashes: this is what a hand-edited or
    hostile checkpoint looks like)."""
    shutil.copytree(ck, to)
    meta = json.loads((to / META_FILE).read_text())
    meta.update(meta_changes)
    meta.pop("sha256", None)
    (to / META_FILE).write_text(json.dumps(meta))
    return to


def test_a_recorded_base_outside_the_checkpoints_folder_is_refused(pipeline_setup, tmp_path):
    """A downloaded checkpoint whose svdquant.json points (through ``..``, an absolute path or a symlink) outside
    the folder holding it and the current directory is refused before anything is read from there."""
    s = pipeline_setup
    base = s["base"].resolve()
    climb = os.path.relpath(base, tmp_path / "downloads" / "ck")   # ../../.. up to base: escapes downloads/
    cases = {
        "dotdot": _copy_checkpoint(s["ck"], tmp_path / "downloads" / "ck", base=climb, base_is_local=True),
        "absolute": _copy_checkpoint(s["ck"], tmp_path / "downloads2" / "ck", base=str(base), base_is_local=False),
    }
    link_home = tmp_path / "downloads3"
    cases["symlink"] = _copy_checkpoint(s["ck"], link_home / "ck", base=os.path.join("..", "base"), base_is_local=True)
    (link_home / "base").symlink_to(base, target_is_directory=True)   # a sibling name, a target elsewhere
    for kind, ck in cases.items():
        with pytest.raises(CheckpointError, match="outside.*pass the base yourself.*allow_base_outside") as e:
            svdquant.load_pipeline(None, ck)
        assert str(base) in str(e.value), kind
    # trusted: the flag, or the base given by the caller, loads it
    _check_pipeline(svdquant.load_pipeline(None, cases["dotdot"], allow_base_outside=True), s)
    _check_pipeline(svdquant.load_pipeline(s["base"], cases["absolute"]), s)


def test_a_recorded_base_inside_the_current_directory_loads(pipeline_setup, tmp_path, monkeypatch):
    s = pipeline_setup
    ck = tmp_path / "a" / "b" / "ck"
    ck = _copy_checkpoint(s["ck"], ck, base=os.path.relpath(s["base"], ck), base_is_local=True)
    with pytest.raises(CheckpointError, match="outside"):
        svdquant.load_pipeline(None, ck)
    monkeypatch.chdir(s["base"].parent)   # where the user keeps the base: allowed
    _check_pipeline(svdquant.load_pipeline(None, ck), s)


def test_a_symlinked_checkpoint_is_followed_as_its_target(pipeline_setup, tmp_path):
    """Decided: a checkpoint folder reached through a symlink loads as its target (the hub cache's snapshots are
    links too); its recorded base is looked for next to the target, and must lie inside the target's parent."""
    s = pipeline_setup
    link = tmp_path / "elsewhere" / "ck-link"
    link.parent.mkdir()
    link.symlink_to(s["ck"].resolve(), target_is_directory=True)
    _check_pipeline(svdquant.load_pipeline(None, link), s)   # ../base of the target, not of the link
    assert not (link.parent / "base").exists()


class _Exploit:
    """A pickle that touches ``marker`` when it is unpickled: what a hostile .bin does (with worse commands)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


@pytest.mark.parametrize("component,safe,pickled", [
    ("vae", "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
    ("text_encoder", "model.safetensors", "pytorch_model.bin"),
    ("text_encoder_2", "model.safetensors", "pytorch_model.bin"),
])
def test_a_base_with_pickled_weights_is_refused_unread(pipeline_setup, tmp_path, component, safe, pickled):
    """diffusers / transformers would unpickle a .bin in place of a missing .safetensors: every component is loaded
    with use_safetensors=True, so the pickle is never opened. (The base's transformer is never read at all.)"""
    import pickle

    s = pipeline_setup
    base = tmp_path / "base"
    shutil.copytree(s["base"], base)
    (base / component / safe).unlink()
    marker = tmp_path / "pwned"
    (base / component / pickled).write_bytes(pickle.dumps(_Exploit(marker)))
    with pytest.raises(ValueError, match="pickled weights.*never unpickles"):
        svdquant.load_pipeline(base, s["ck"])
    assert not marker.exists()


def test_a_tiny_base_with_pickled_weights_is_refused_unread(tmp_path):
    import pickle

    from svdquant.pipelines import TinyFluxPipeline, load_base_pipeline

    base = tmp_path / "tiny"
    TinyFluxPipeline.random(num_layers=1, num_single_layers=1).save_pretrained(base)
    (base / "conditioner" / "diffusion_pytorch_model.safetensors").unlink()
    marker = tmp_path / "pwned"
    (base / "conditioner" / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps(_Exploit(marker)))
    with pytest.raises(ValueError, match="pickled weights"):
        load_base_pipeline(base)
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------ hashes
def _flip_low_bit(tensor_file: Path, name: str) -> None:
    """Flip the lowest bit of ``name``'s first element (little-endian: its first byte), the file staying well formed."""
    raw = bytearray(tensor_file.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    entry = json.loads(raw[8:8 + n])[name]
    raw[8 + n + entry["data_offsets"][0]] ^= 1
    tensor_file.write_bytes(bytes(raw))


def test_save_records_a_sha256_per_tensor_file_and_load_checks_it(fresh):
    import hashlib

    path = fresh()
    meta = json.loads((path / META_FILE).read_text())
    assert meta["sha256"] == {TENSOR_FILE: hashlib.sha256((path / TENSOR_FILE).read_bytes()).hexdigest()}
    with safe_open(str(path / TENSOR_FILE), "pt") as f:   # the header's copy of the metadata cannot hold it
        assert "sha256" not in json.loads(f.metadata()["svdquant"])
    _flip_low_bit(path / TENSOR_FILE, "proj_out.weight")    # a kept fp32 weight: loads fine unverified
    with pytest.raises(CheckpointError, match="SHA-256 .* records .*verify=False"):
        svdquant.load_quantized(path)
    svdquant.load_quantized(path, verify=False)
    svdquant.load_quantized(path / TENSOR_FILE)          # given as its tensor file: no hashes to compare


def test_a_checkpoint_without_hashes_loads_unverified(fresh):
    path = fresh()
    meta = json.loads((path / META_FILE).read_text())
    del meta["sha256"]                                      # as written before hashes came in
    (path / META_FILE).write_text(json.dumps(meta))
    _flip_low_bit(path / TENSOR_FILE, "proj_out.weight")
    svdquant.load_quantized(path)


@pytest.mark.parametrize("value,words", [
    ("abc", "malformed 'sha256'"),
    ({TENSOR_FILE: "0" * 63}, "malformed 'sha256'"),
    ({TENSOR_FILE: "0" * 64, "../etc/passwd": "0" * 64}, "malformed 'sha256'"),
    ({"text_encoder.safetensors": "0" * 64}, "malformed .sha256."),   # not a file of this checkpoint
    ({}, "none for transformer.safetensors"),
])
def test_malformed_hashes_are_refused(fresh, value, words):
    path = fresh()
    meta = json.loads((path / META_FILE).read_text())
    meta["sha256"] = value
    (path / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=words):
        svdquant.load_quantized(path)


def test_text_encoder_files_are_hashed_and_verified(tmp_path):
    pipe = tm.build_flux_pipeline(0)
    svdquant.quantize(pipe.transformer, svdquant.get_recipe("int4", iterations=0, eval_tokens=32),
                      svdquant.Calibration(inputs=tm.calibration_inputs("flux", pipe.transformer, 1)), progress=False)
    svdquant.quantize_text_encoders(pipe, progress=False)
    path = svdquant.save_quantized(pipe, tmp_path / "ck")
    meta = json.loads((path / META_FILE).read_text())
    assert sorted(meta["sha256"]) == sorted([TENSOR_FILE, "text_encoder.safetensors", "text_encoder_2.safetensors"])
    te = path / "text_encoder_2.safetensors"
    with safe_open(str(te), "pt") as f:
        kept = next(k for k in f.keys() if k.endswith("layer_norm.weight"))
    _flip_low_bit(te, kept)
    with pytest.raises(CheckpointError, match="text_encoder_2.safetensors has SHA-256"):
        svdquant.load_text_encoders(path)
    assert set(svdquant.load_text_encoders(path, verify=False)) == {"text_encoder", "text_encoder_2"}


# ------------------------------------------------------------------------------------------------ value bounds
BOUNDED = [  # (tensor, change, words): values a file can hold but svdquant's quantizer cannot write
    ("transformer_blocks.0.attn.to_q.smooth_inv", lambda t: t.mul_(1e7), "within \\[1e-6, 1e6\\]"),
    ("transformer_blocks.0.attn.to_q.smooth_inv", lambda t: t.mul_(1e-7), "within \\[1e-6, 1e6\\]"),
    ("transformer_blocks.0.attn.to_k.lora_up", lambda t: t[:, 3].mul_(4.0), "out of balance \\(component 3"),
    ("transformer_blocks.0.ff.net.2.lora_down", lambda t: t[0].mul_(2.0 ** 20), "out of balance \\(component 0"),
    ("single_transformer_blocks.0.proj_mlp.wscales", lambda t: t[5].mul_(2.0 ** 40), "above 4× the branch"),
]


@pytest.mark.parametrize("name,change,words", BOUNDED, ids=[f"{b[0].rsplit('.', 1)[1]}-{i}" for i, b in enumerate(BOUNDED)])
def test_values_out_of_the_quantizers_bounds_are_refused(fresh, name, change, words):
    path = fresh()
    rewrite_tensors(path, lambda t: change(t[name]))
    with pytest.raises(CheckpointError, match=words) as e:
        svdquant.load_quantized(path)
    assert str(path / TENSOR_FILE) in str(e.value) and "corrupt" in str(e.value)


@pytest.mark.parametrize("name", ["proj_out.weight", "transformer_blocks.0.attn.to_q.bias",
                                  "transformer_blocks.0.norm1.linear.wscales"])   # kept, a bias, a W4A16 layer
def test_base_model_values_beyond_float16_warn(fresh, name):
    """What the quantizer takes from the base model as it is has no bound but the base's own range: beyond
    float16's largest value, a NonFiniteWarning (the load goes on)."""
    path = fresh()
    rewrite_tensors(path, lambda t: t[name].view(-1)[0].fill_(1e30))
    with pytest.warns(svdquant.checkpoint.NonFiniteWarning, match="beyond ±65504"):
        svdquant.load_quantized(path)


def test_imported_layers_are_held_to_what_any_quantizer_writes(fresh):
    """A Nunchaku import (``source``) splits its branch its own way: the even-split check does not apply."""
    path = fresh()
    rewrite_tensors(path, lambda t: t["transformer_blocks.0.ff.net.2.lora_down"].mul_(2.0))
    with pytest.raises(CheckpointError, match="out of balance"):
        svdquant.load_quantized(path)
    edit_meta(path, lambda m: m.update(source="nunchaku"))
    assert peek(svdquant.load_quantized(path)).source == "nunchaku"


@pytest.mark.parametrize("fmt", ["int4", "int4m", "int4z", "nvfp4", "int8", "fp8", "nf4"])
def test_magnitude_bound_covers_every_value(fmt):
    from svdquant.formats import get_format

    f = get_format(fmt)
    w = torch.randn(48, 256, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 2, 48)[:, None]
    q = f.quantize(w, None, weight=True, scale_dtype=torch.bfloat16)
    bound, real = f.magnitude_bound(f.to_buffers(q)), f.dequantize(q).abs().amax(-1)
    assert bool((bound >= real).all()) and bool((bound <= real * 8 / 7 * 1.001).all())


# ------------------------------------------------------------------------------------------------ versions
def test_float_scale_checkpoints_stay_version_1_and_load(tmp_path):
    """The paper's float-scale W4A4 (every checkpoint before two-level scales) is written as version 1, so
    older svdquant reads it, and a version-1 file with the old recipe entry loads and runs bit-exactly."""
    model = tm.build_flux()
    old = svdquant.W4A4FloatConfig(iterations=1, eval_tokens=64)
    svdquant.quantize(model, old, svdquant.Calibration(inputs=tm.calibration_inputs("flux", model, 1)),
                      progress=False)
    path = svdquant.save_quantized(model, tmp_path / "v1")
    meta = svdquant.read_metadata(path)
    assert meta["format_version"] == 1
    assert {cfg["weights"] for cfg in meta["layers"].values()} == {"int4"}
    # what a checkpoint of the earlier release recorded: recipe "int4" meaning float group scales
    meta["recipe"] = dict(meta["recipe"], name="int4")
    (path / META_FILE).write_text(json.dumps(meta))
    loaded = svdquant.load_quantized(path)
    recipe = svdquant.QuantConfig.from_dict(peek(loaded).recipe)
    assert (recipe.weights, recipe.activations) == ("int4", "int4")
    inputs = tm.calibration_inputs("flux", model, 1)[0]
    with torch.no_grad():
        assert torch.equal(loaded(**inputs)[0], model(**inputs)[0])
