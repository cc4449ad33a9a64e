"""End-to-end tests of the ``svdquant`` command: ``main(argv)`` in-process on the tiny models, plus the
real console script in a subprocess.

Every expensive step (saving the tiny diffusers FluxPipeline, each quantization, the demo) runs once per
module; the sampling calls use 2 steps at 16x16 pixels.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import tiny_models as tm  # first: sets HF_HUB_OFFLINE before diffusers is imported

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from svdquant.checkpoint import META_FILE, TENSOR_FILE
from svdquant.cli import main

CPU = ["--device", "cpu"]
SAMPLE = ["--steps", "2", "--height", "16", "--width", "16", *CPU]  # for generate / compare on the FLUX pipeline
CALIB = ["--num-prompts", "1", "--steps", "2", "--snapshots", "2", "--tokens", "64", "--height", "16", "--width", "16",
         *CPU]
D = tm.HIDDEN  # 64


# ------------------------------------------------------------------------------------------------ helpers
def run_main(argv) -> tuple[int, str, str]:
    """``main(argv)`` with stdout / stderr captured (usable in module-scoped fixtures, unlike capsys)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def call(capsys, argv) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).copy()


def listing(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_user_error(rc, err, command, *needles):
    """Exit status 2, one ``svdquant CMD: error: ...`` line naming the problem, no traceback."""
    assert rc == 2, err
    assert "Traceback" not in err, err
    assert f"svdquant {command}: error:" in err, err
    for n in needles:
        assert str(n) in err, (n, err)


def peft_lora(path, layers: dict[str, tuple[int, int]], rank=4, seed=0, scale=0.3) -> Path:
    """A LoRA in diffusers / PEFT key format (``transformer.<module>.lora_A.weight``)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, (n_out, k) in layers.items():
        sd[f"transformer.{name}.lora_A.weight"] = torch.randn(rank, k, generator=g) * scale
        sd[f"transformer.{name}.lora_B.weight"] = torch.randn(n_out, rank, generator=g) * scale
    save_file(sd, str(path))
    return Path(path)


# quantized layers (to_q is fused with to_k / to_v; the single block's proj_out) and one that stays 16-bit
LORA_LAYERS = {"transformer_blocks.0.attn.to_q": (D, D), "single_transformer_blocks.0.proj_out": (D, 5 * D),
               "proj_out": (tm.FLUX_CONFIG["out_channels"], D)}


# ------------------------------------------------------------------------------------------------ fixtures
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def flux_pipe(root):
    """A tiny random diffusers FluxPipeline saved as a pipeline folder."""
    return tm.save_flux_pipeline(root / "flux-pipe")


@pytest.fixture(scope="module")
def flux_ck(root, flux_pipe):
    """``svdquant quantize <pipeline folder> -o CK --recipe int4`` -> (CK, rc, stdout, stderr)."""
    ck = root / "flux-int4"
    rc, out, err = run_main(["quantize", flux_pipe, "-o", ck, "--recipe", "int4", *CALIB])
    return ck, rc, out, err


@pytest.fixture
def ck(flux_ck):
    path, rc, _, err = flux_ck
    assert rc == 0, err
    return path


@pytest.fixture(scope="module")
def tiny_ck(root):
    """``svdquant quantize tiny -o CK`` (the shipped trained TinyFluxPipeline) -> (CK, rc, stdout, stderr)."""
    ck = root / "tiny-int4"
    rc, out, err = run_main(["quantize", "tiny", "-o", ck, "--num-prompts", "1", "--steps", "2", "--snapshots", "2",
                             "--tokens", "64", *CPU])
    return ck, rc, out, err


@pytest.fixture(scope="module")
def demo(root):
    out = root / "demo"
    rc, stdout, err = run_main(["demo", "-o", out, "--recipes", "int4", "--steps", "2"])
    return out, rc, stdout, err


# ------------------------------------------------------------------------------------------------ quantize
def test_quantize_pipeline_folder(flux_ck, flux_pipe):
    ck, rc, out, err = flux_ck
    assert rc == 0, err
    assert (ck / META_FILE).is_file() and (ck / TENSOR_FILE).is_file()
    assert (ck / TENSOR_FILE).stat().st_size > 10_000
    # the printed report: summary line, per-layer table, the kept-16-bit list, and where it was saved
    assert "FluxTransformer2DModel with recipe 'int4'" in out
    assert "2 snapshots" in out
    assert re.search(r"transformer_blocks\.0\.attn\.to_q\+to_k\+to_v\s+Wint4mAint8", out), out
    assert "SQNR" in out and "kept 16-bit:" in out
    assert f"saved {ck}" in out
    meta = json.loads((ck / META_FILE).read_text())
    assert meta["model_class"] == "FluxTransformer2DModel"
    assert meta["recipe"]["name"] == "int4" and meta["recipe"]["method"] == "svdquant"
    assert meta["report"]["snapshots"] == 2
    assert (ck / meta["base"]).resolve() == flux_pipe.resolve()


@pytest.fixture(scope="module")
def te_ck(root, flux_pipe):
    """``svdquant quantize <pipeline folder> -o CK --text-encoders`` -> (CK, rc, stdout, stderr)."""
    ck = root / "flux-int4-te"
    rc, out, err = run_main(["quantize", flux_pipe, "-o", ck, "--recipe", "int4", "--text-encoders", *CALIB])
    return ck, rc, out, err


def test_quantize_text_encoders_then_info_and_generate(te_ck, tmp_path, capsys):
    ck, rc, out, err = te_ck
    assert rc == 0, err
    assert sorted(p.name for p in ck.iterdir()) == [META_FILE, "text_encoder.safetensors",
                                                   "text_encoder_2.safetensors", TENSOR_FILE]
    assert "text_encoder_2 (T5EncoderModel): 6 linears int4 weight-only, group 64" in out
    assert "text_encoder (CLIPTextModel): 6 linears int4 weight-only" in out
    assert json.loads((ck / META_FILE).read_text())["format_version"] == 3
    rc, out, err = call(capsys, ["info", ck])
    assert rc == 0, err
    assert "format       version 3" in out
    assert re.search(r"text_encoder_2\s+T5EncoderModel: 6 layers int4 weight-only, \d\.\d{3} GB", out), out
    rc, out, err = call(capsys, ["generate", ck, "a cat", "-o", tmp_path / "cat.png", *SAMPLE])
    assert rc == 0, err
    assert pixels(tmp_path / "cat.png").shape == (16, 16, 3)


def test_quantize_refuses_existing_output_without_overwrite(ck, flux_pipe, capsys):
    before = listing(ck)
    rc, out, err = call(capsys, ["quantize", flux_pipe, "-o", ck, *CALIB])
    assert_user_error(rc, err, "quantize", str(ck), "already exists", "--overwrite")
    assert listing(ck) == before  # not a byte or an mtime changed


def test_quantize_overwrite_replaces_folder(root, ck, flux_pipe, capsys):
    target = root / "overwrite-me"
    shutil.copytree(ck, target)  # an earlier checkpoint (overwrite never replaces a folder of other files)
    (target / "stale.txt").write_text("old")
    rc, out, err = call(capsys, ["quantize", flux_pipe, "-o", target, "--recipe", "int4", "--method", "naive",
                                 "--overwrite", *CALIB])
    assert rc == 0, err
    assert f"saved {target}" in out
    assert sorted(p.name for p in target.iterdir()) == sorted([META_FILE, TENSOR_FILE])  # replaced, not merged
    assert json.loads((target / META_FILE).read_text())["recipe"]["method"] == "naive"
    assert not [p for p in root.iterdir() if p.name.startswith(".overwrite-me")]  # no temp / old folders left


def test_quantize_tiny(tiny_ck, capsys, tmp_path):
    ck, rc, out, err = tiny_ck
    assert rc == 0, err
    assert (ck / META_FILE).is_file() and (ck / TENSOR_FILE).is_file()
    assert f"saved {ck}" in out and "recipe 'int4'" in out
    meta = json.loads((ck / META_FILE).read_text())
    # the base is the shipped model, recorded by name: nothing is written beside the checkpoint
    assert meta["base"] == "tiny" and meta["base_is_local"] is False
    assert sorted(p.name for p in ck.parent.iterdir() if p.name.startswith(ck.name)) == [ck.name]
    assert meta["model_config"]["num_layers"] == 2 and meta["report"]["snapshots"] == 2
    # the checkpoint is usable: a class-name prompt gives a 32x32 image
    rc, out, err = call(capsys, ["generate", ck, "a cat", "-o", tmp_path / "cat.png", "--steps", "2", *CPU])
    assert rc == 0, err
    with Image.open(tmp_path / "cat.png") as im:
        assert im.size == (32, 32)
    assert pixels(tmp_path / "cat.png").std() > 1  # not a blank image


# ------------------------------------------------------------------------------------------------ generate
def test_generate_one_image(ck, tmp_path, capsys):
    target = tmp_path / "sub" / "img.png"  # the parent folder is created
    rc, out, err = call(capsys, ["generate", ck, "a cat", "-o", target, *SAMPLE])
    assert rc == 0, err
    assert f"wrote {target}" in out
    with Image.open(target) as im:
        assert im.format == "PNG" and im.size == (16, 16)
    assert not (tmp_path / "sub" / "img-0.png").exists()


def test_generate_num_images(ck, tmp_path, capsys):
    rc, out, err = call(capsys, ["generate", ck, "a cat", "-o", tmp_path / "img.png", "--num-images", "2", *SAMPLE])
    assert rc == 0, err
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["img-0.png", "img-1.png"]
    for n in names:
        with Image.open(tmp_path / n) as im:
            assert im.size == (16, 16)
    assert not np.array_equal(pixels(tmp_path / "img-0.png"), pixels(tmp_path / "img-1.png"))  # two samples


def test_generate_same_seed_same_image(ck, tmp_path, capsys):
    paths = [tmp_path / f"{n}.png" for n in ("a", "b", "c")]
    for p, seed in zip(paths, (3, 3, 4)):
        rc, _, err = call(capsys, ["generate", ck, "a cat", "-o", p, "--seed", seed, *SAMPLE])
        assert rc == 0, err
    assert paths[0].read_bytes() == paths[1].read_bytes()
    assert np.array_equal(pixels(paths[0]), pixels(paths[1]))
    assert not np.array_equal(pixels(paths[0]), pixels(paths[2]))  # the seed matters


# ------------------------------------------------------------------------------------------------ LoRA
@pytest.fixture(scope="module")
def lora_file(root):
    return peft_lora(root / "style.safetensors", LORA_LAYERS)


@pytest.fixture
def no_lora_image(ck, tmp_path):
    p = tmp_path / "plain.png"
    rc, _, err = run_main(["generate", ck, "a cat", "-o", p, *SAMPLE])
    assert rc == 0, err
    return pixels(p)


def test_generate_with_lora(ck, lora_file, no_lora_image, tmp_path, capsys):
    rc, out, err = call(capsys, ["generate", ck, "a cat", "-o", tmp_path / "lora.png", "--lora", f"{lora_file}:0.5",
                                 *SAMPLE])
    assert rc == 0, err
    img = pixels(tmp_path / "lora.png")
    assert img.shape == (16, 16, 3)
    assert not np.array_equal(img, no_lora_image)  # the LoRA was applied


def test_generate_lora_strength_zero_is_no_lora(ck, lora_file, no_lora_image, tmp_path, capsys):
    rc, _, err = call(capsys, ["generate", ck, "a cat", "-o", tmp_path / "zero.png", "--lora", f"{lora_file}:0",
                               *SAMPLE])
    assert rc == 0, err
    assert np.array_equal(pixels(tmp_path / "zero.png"), no_lora_image)


def test_generate_two_loras(ck, lora_file, root, tmp_path, capsys):
    other = peft_lora(root / "detail.safetensors", {"transformer_blocks.0.ff.net.2": (D, 4 * D)}, seed=1)
    rc, _, err = call(capsys, ["generate", ck, "a cat", "-o", tmp_path / "two.png", "--lora", lora_file,
                               "--lora", f"{other}:0.7", *SAMPLE])
    assert rc == 0, err
    assert (tmp_path / "two.png").is_file()


def _bad_lora(kind, folder: Path) -> tuple[Path, str]:
    if kind == "garbage":
        p = folder / "garbage.safetensors"
        p.write_bytes(b"\x00\x01 this is not a safetensors file" * 10)
        return p, "not a readable safetensors file"
    if kind == "other-model":
        return peft_lora(folder / "other.safetensors", {"down_blocks.0.attn.to_q": (D, D)}), "match no layer"
    if kind == "wrong-shape":
        return peft_lora(folder / "shape.safetensors", {"transformer_blocks.0.attn.to_q": (D, 2 * D)}), "the layer is"
    if kind == "no-pairs":
        p = folder / "empty.safetensors"
        save_file({"transformer.proj_out.lora_A.weight": torch.zeros(4, D)}, str(p))
        return p, "no up (B)"
    if kind == "pickle":
        p = folder / "lora.bin"
        p.write_bytes(b"not read")
        return p, "only .safetensors"
    p = folder / "missing.safetensors"
    return p, "no LoRA file at"


@pytest.mark.parametrize("kind", ["garbage", "other-model", "wrong-shape", "no-pairs", "pickle", "missing"])
def test_generate_bad_lora_is_a_clean_error(ck, tmp_path, capsys, kind):
    path, why = _bad_lora(kind, tmp_path)
    target = tmp_path / "img.png"
    rc, out, err = call(capsys, ["generate", ck, "a cat", "-o", target, "--lora", f"{path}:0.5", *SAMPLE])
    assert_user_error(rc, err, "generate", str(path), why)
    assert f"{path}:0.5" not in err  # the ":STRENGTH" suffix was split off
    assert not target.exists()


# ------------------------------------------------------------------------------------------------ compare
def test_compare(ck, tmp_path, capsys):
    target = tmp_path / "cmp.png"
    rc, out, err = call(capsys, ["compare", ck, "a cat", "-o", target, *SAMPLE])
    assert rc == 0, err
    with Image.open(target) as im:
        assert im.format == "PNG"
        w, h = im.size
    assert w >= 16 * 2 and h >= 16  # two 16x16 images side by side, upscaled
    assert "| image | PSNR (dB) | SSIM |" in out
    rows = re.findall(r"^\| (\d+) \| (\S+) \| (\S+) \|$", out, re.M)
    assert len(rows) == 1, out
    psnr, ssim = float(rows[0][1]), float(rows[0][2])
    assert math.isfinite(psnr) and math.isfinite(ssim)
    assert 10 < psnr < 200 and 0 < ssim <= 1
    assert f"wrote {target}" in out


# ------------------------------------------------------------------------------------------------ info
def test_info(ck, capsys):
    rc, out, err = call(capsys, ["info", ck])
    assert rc == 0, err
    meta = json.loads((ck / META_FILE).read_text())
    assert f"checkpoint   {ck}" in out
    assert "model        FluxTransformer2DModel" in out
    assert "recipe       int4 (svdquant, group 64, rank 32" in out
    assert f"layers       {len(meta['layers'])} quantized" in out
    assert "17 × Wint4mAint8 rank 32" in out and "3 × Wint4A16 rank 0" in out
    assert "from 2 snapshots" in out
    assert "{" not in out  # no JSON without --json


def test_info_json(ck, capsys):
    rc, out, err = call(capsys, ["info", ck, "--json"])
    assert rc == 0, err
    meta = json.loads(out)  # the JSON alone, so it pipes into other tools
    assert meta == json.loads((ck / META_FILE).read_text())
    assert meta["recipe"]["name"] == "int4" and meta["format"] == "svdquant"


# ------------------------------------------------------------------------------------------------ demo
@pytest.mark.slow  # ~15-25 s: quantizes the shipped tiny model
def test_demo(demo):
    out, rc, stdout, err = demo
    assert rc == 0, err
    with Image.open(out / "compare.png") as im:
        assert im.format == "PNG" and im.size[0] > 100
    md = (out / "quality.md").read_text()
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| (\S+) \| ([^|]+) \|", md, re.M)}
    assert "16-bit" in rows and "int4" in rows, md
    assert rows["16-bit"].strip() == "inf"
    assert 15 < float(rows["int4"]) < 100  # PSNR of int4 against 16-bit
    assert (out / "int4" / META_FILE).is_file()
    assert md.strip() in stdout and f"wrote {out / 'compare.png'}" in stdout


# ------------------------------------------------------------------------------------------------ user errors
def test_generate_missing_checkpoint(tmp_path, capsys):
    rc, _, err = call(capsys, ["generate", tmp_path / "nope", "a cat", "-o", tmp_path / "x.png", *SAMPLE])
    assert_user_error(rc, err, "generate", tmp_path / "nope", "does not exist")
    assert not (tmp_path / "x.png").exists()


def test_info_missing_checkpoint(tmp_path, capsys):
    rc, _, err = call(capsys, ["info", tmp_path / "nope"])
    assert_user_error(rc, err, "info", tmp_path / "nope", "does not exist")


def test_compare_missing_checkpoint(tmp_path, capsys):
    rc, _, err = call(capsys, ["compare", tmp_path / "nope", "a cat", "-o", tmp_path / "c.png", *SAMPLE])
    assert_user_error(rc, err, "compare", tmp_path / "nope", "does not exist")


@pytest.mark.parametrize("command", ["info", "generate", "compare"])
def test_folder_that_is_not_a_checkpoint(flux_pipe, tmp_path, capsys, command):
    argv = [command, flux_pipe] + ([] if command == "info" else ["a cat", "-o", tmp_path / "x.png", *SAMPLE])
    rc, _, err = call(capsys, argv)
    assert_user_error(rc, err, command, flux_pipe, "is not an svdquant checkpoint", f"{META_FILE} is missing")


def test_quantize_missing_model(tmp_path, capsys):
    out = tmp_path / "ck"
    rc, _, err = call(capsys, ["quantize", tmp_path / "no-such-model", "-o", out, *CALIB])
    assert_user_error(rc, err, "quantize", tmp_path / "no-such-model", "does not exist", "model_index.json")
    assert not out.exists()


def test_quantize_folder_that_is_not_a_pipeline(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "ck"
    rc, _, err = call(capsys, ["quantize", tmp_path / "empty", "-o", out, *CALIB])
    assert_user_error(rc, err, "quantize", tmp_path / "empty", "model_index.json")
    assert not out.exists()


def test_quantize_unknown_recipe(flux_pipe, tmp_path, capsys):
    out = tmp_path / "ck"
    rc, _, err = call(capsys, ["quantize", flux_pipe, "-o", out, "--recipe", "int5", *CALIB])
    assert_user_error(rc, err, "quantize", "unknown recipe 'int5'", "choose one of", "int4", "nvfp4")
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown when CUDA is absent")
@pytest.mark.parametrize("command", ["quantize", "generate", "compare"])
def test_device_cuda_without_cuda(ck, flux_pipe, tmp_path, capsys, command):
    if command == "quantize":
        argv = ["quantize", flux_pipe, "-o", tmp_path / "ck", "--device", "cuda"]
    else:
        argv = [command, ck, "a cat", "-o", tmp_path / "x.png", "--device", "cuda"]
    rc, _, err = call(capsys, argv)
    assert_user_error(rc, err, command, "no CUDA GPU", "--device cpu")
    assert not (tmp_path / "ck").exists() and not (tmp_path / "x.png").exists()


def test_device_name_invalid(ck, tmp_path, capsys):
    rc, _, err = call(capsys, ["generate", ck, "a cat", "-o", tmp_path / "x.png", "--device", "gpu0"])
    assert_user_error(rc, err, "generate", "'gpu0' is not a device", "cpu")
    assert "corrupt" not in err  # not blamed on the checkpoint file


def test_generate_output_under_a_file(ck, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    rc, _, err = call(capsys, ["generate", ck, "a cat", "-o", tmp_path / "afile" / "img.png", *SAMPLE])
    assert_user_error(rc, err, "generate", tmp_path / "afile")


def test_generate_prompt_the_tiny_model_cannot_draw(tiny_ck, tmp_path, capsys):
    ck, rc, _, err = tiny_ck
    assert rc == 0, err
    rc, _, err = call(capsys, ["generate", ck, "a photo of a sunset", "-o", tmp_path / "x.png", "--steps", "1", *CPU])
    assert_user_error(rc, err, "generate", "draws only the classes", "cat", "'a photo of a sunset'")


def test_missing_arguments_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err == ("svdquant generate: error: the following arguments are required: checkpoint, prompt; see svdquant "
                   "generate --help\n")


# ------------------------------------------------------------------------------------------------ --help
HELP = {
    None: ["demo", "quantize", "generate", "compare", "info", "convert"],
    "demo": ["--output", "--recipes", "--steps", "--seed"],
    "quantize": ["model", "--output", "--recipe", "--method", "--rank", "--prompts", "--num-prompts", "--snapshots",
                 "--overwrite", "--device", "--dtype"],
    "generate": ["checkpoint", "prompt", "--output", "--base", "--lora", "--steps", "--seed", "--num-images", "--offload",
                 "--height", "--width", "--device"],
    "compare": ["checkpoint", "prompt", "--output", "--base", "--steps", "--seed", "--device"],
    "info": ["checkpoint", "--json"],
    "convert": ["SOURCE", "--to", "--output", "--base", "--two-level", "--overwrite", "nunchaku FILE.safetensors"],
}


@pytest.mark.parametrize("command", list(HELP), ids=lambda c: c or "svdquant")
def test_help(command, capsys):
    argv = ([command] if command else []) + ["--help"]
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: svdquant{' ' + command if command else ''}")
    for opt in HELP[command]:
        assert opt in out, (opt, out)


def _console_script() -> str:
    exe = Path(sys.executable).parent / "svdquant"
    return str(exe) if exe.is_file() else shutil.which("svdquant")


def test_console_script_subprocess(tmp_path):
    script = _console_script()
    assert script, "the svdquant console script is not installed (pip install -e .)"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    r = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage: svdquant") and "quantize" in r.stdout and "generate" in r.stdout
    # `python -m svdquant.cli`, and a user error through the real process: exit status 2, no traceback
    r = subprocess.run([sys.executable, "-m", "svdquant.cli", "info", str(tmp_path / "nope")],
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 2, r.stderr
    assert "svdquant info: error:" in r.stderr and "does not exist" in r.stderr
    assert "Traceback" not in r.stderr
