"""Every user input checked before work starts (issue 12): one test per rejected input class and per bug.

A rejected command must exit with status 2, print one ``svdquant CMD: error: ...`` line naming the fix,
no traceback, and leave no new file. The API checks raise ValueError / TypeError / CheckpointError with
one line. Models are the tiny ones (naive W4A4, 2 steps, 16x16 pixels) so the whole file runs in ~1 min.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import tiny_models as tm  # first: sets HF_HUB_OFFLINE before diffusers is imported

import numpy as np
import pytest
import torch
from PIL import Image

import svdquant
from svdquant.checkpoint import META_FILE, TENSOR_FILE, CheckpointError
from svdquant.cli import main

CPU = ["--device", "cpu"]
SAMPLE = ["--steps", "2", "--height", "16", "--width", "16", *CPU]
CALIB = ["--num-prompts", "1", "--steps", "2", "--snapshots", "2", "--tokens", "64", "--height", "16", "--width", "16",
         *CPU]
TINY_CALIB = ["--recipe", "int4", "--method", "naive", "--num-prompts", "1", "--steps", "2", "--snapshots", "2",
              "--tokens", "64", *CPU]
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown when CUDA is absent")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


# ------------------------------------------------------------------------------------------------ helpers
def run(argv) -> tuple[int, str, str]:
    """``main(argv)`` with stdout / stderr captured (not terminals: no progress bars expected)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def files(folder: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``folder`` with its size and mtime: 'no new files, nothing changed'."""
    return {str(p.relative_to(folder)): (p.stat().st_size if p.is_file() else -1, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*"))}


def rejected(argv, *needles, folder: Path, command: str | None = None) -> str:
    """Run a command that must be refused: exit 2, one error line (with ``needles``), no traceback, and
    ``folder`` exactly as before. Returns the line."""
    command = command or str(argv[0])
    before = files(folder)
    rc, out, err = run(argv)
    assert rc == 2, (rc, out, err)
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"svdquant {command}: error: "), err
    for n in needles:
        assert str(n) in lines[0], (n, lines[0])
    assert files(folder) == before, "a refused command changed or left files"
    return lines[0]


# svdquant/_progress.py's line: "quantizing: 5 of 38 groups, 13 %, 1 min 2 s, block 1/8 ..."
PROGRESS_LINE = re.compile(r"[\w ()]+: \d+( of \d+)? \w+(, \d+ %)?, (\d+ s|\d+ min \d+ s|\d+ h \d+ min)(, .+)?")


def log_lines_only(err: str) -> None:
    """stderr that is not a terminal: no progress-bar redraws (carriage returns), at most the plain progress lines
    a step prints when it runs long (every 20 s by default: a slow machine may print some)."""
    assert "\r" not in err, err
    assert all(PROGRESS_LINE.fullmatch(line) for line in err.splitlines()), err


def pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).copy()


# ------------------------------------------------------------------------------------------------ fixtures
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("inputs")


@pytest.fixture(scope="module")
def pipe_dir(root):
    return tm.save_flux_pipeline(root / "pipe")


@pytest.fixture(scope="module")
def ck(root, pipe_dir):
    """A naive-W4A4 checkpoint of the tiny diffusers FLUX pipeline (fp32)."""
    path = root / "ck"
    rc, _, err = run(["quantize", pipe_dir, "-o", path, "--recipe", "int4", "--method", "naive", *CALIB])
    assert rc == 0, err
    return path


@pytest.fixture(scope="module")
def tiny_ck(root):
    """``svdquant quantize tiny`` (naive W4A4): stderr must be empty (no progress bars when not a terminal)."""
    path = root / "tiny"
    rc, out, err = run(["quantize", "tiny", "-o", path, *TINY_CALIB])
    assert rc == 0, err
    return path, out, err


# ------------------------------------------------------------------------------------------------ quantize
QUANTIZE_BAD = {
    "steps-zero": (["--steps", "0"], ["--steps 0", "between 1 and"]),
    "steps-negative": (["--steps", "-3"], ["--steps -3"]),
    "steps-absurd": (["--steps", "100000"], ["--steps 100000", "1000"]),
    "snapshots-zero": (["--snapshots", "0"], ["--snapshots 0"]),
    "calibration-batch-zero": (["--calibration-batch", "0"], ["--calibration-batch 0", "between 1 and 64"]),
    "calibration-batch-with-images": (["--calibration-batch", "2", "--images", "a.png"],
                                      ["--calibration-batch 2 with --images", "leave --calibration-batch out"]),
    "tokens-zero": (["--tokens", "0"], ["--tokens 0", "leave it out"]),
    "num-prompts-zero": (["--num-prompts", "0"], ["--num-prompts 0"]),
    "num-prompts-beyond": (["--num-prompts", "11"], ["--num-prompts 11", "only 10 prompts"]),
    "seed-negative": (["--seed", "-1"], ["--seed -1"]),
    "rank-negative": (["--rank", "-1"], ["--rank -1"]),
    "rank-absurd": (["--rank", "100000"], ["--rank 100000"]),
    "size-tiny": (["--height", "64"], ["--height 64", "32x32"]),
    "size-zero": (["--width", "0"], ["--width 0"]),
    "guidance-nan": (["--guidance-scale", "nan"], ["--guidance-scale nan", "finite"]),
    "recipe-unknown": (["--recipe", "int5"], ["unknown recipe 'int5'"]),
    "method-recipe-clash": (["--recipe", "nf4", "--method", "svdquant"], ["rank"]),
    "device-unknown": (["--device", "tpu0"], ["'tpu0' is not a device"]),
    # --max-gpu-memory (issue 16): parsed before anything else about the GPU, so checkable without one
    "gpu-memory-no-unit": (["--max-gpu-memory", "16"], ["--max-gpu-memory 16", "GB, GiB, MB or MiB"]),
    "gpu-memory-unknown-unit": (["--max-gpu-memory", "16TB"], ["--max-gpu-memory 16TB", "give a unit"]),
    "gpu-memory-zero": (["--max-gpu-memory", "0GB"], ["--max-gpu-memory 0GB", "positive"]),
    "gpu-memory-negative": (["--max-gpu-memory=-3GB"], ["--max-gpu-memory -3GB", "positive"]),
    "gpu-memory-not-a-number": (["--max-gpu-memory", "lotsGB"], ["'lots' is not a number"]),
    "gpu-memory-nan": (["--max-gpu-memory", "nanGiB"], ["--max-gpu-memory nanGiB", "finite"]),
    "gpu-memory-inf": (["--max-gpu-memory", "infGB"], ["finite"]),
    "gpu-memory-unit-slip": (["--max-gpu-memory", "0.5MB"], ["less than 1 MiB", "GB?"]),
    "gpu-memory-on-cpu": (["--max-gpu-memory", "16GB"], ["--max-gpu-memory 16GB", "runs on cpu",
                                                           "leave --max-gpu-memory out"]),
}


@pytest.mark.parametrize("case", list(QUANTIZE_BAD))
def test_quantize_rejects_bad_values(tmp_path, case):
    extra, needles = QUANTIZE_BAD[case]
    rejected(["quantize", "tiny", "-o", tmp_path / "ck", *extra], *needles, folder=tmp_path)


@NO_CUDA
@pytest.mark.parametrize("device", [[], ["--device", "auto"]])
def test_quantize_max_gpu_memory_without_a_gpu(tmp_path, device):
    """The default --device on a machine without CUDA is the CPU: the cap has nothing to cap."""
    rejected(["quantize", "tiny", "-o", tmp_path / "ck", "--max-gpu-memory", "24GB", *device],
             "--max-gpu-memory 24GB", "torch sees no CUDA GPU", folder=tmp_path)


@NO_CUDA
def test_quantize_max_gpu_memory_with_device_cuda_without_a_gpu(tmp_path):
    """--device cuda is refused first, with the message every command gives for it."""
    rejected(["quantize", "tiny", "-o", tmp_path / "ck", "--device", "cuda", "--max-gpu-memory", "24GB"],
             "--device cuda was asked for", "use --device cpu", folder=tmp_path)


def test_quantize_stream_on_the_cpu(tmp_path):
    """--stream with --device cpu: the streaming path end to end (moves are no-ops), the same checkpoint."""
    outs = []
    for extra in ([], ["--stream"]):
        out = tmp_path / f"ck{len(extra)}"
        rc, _, err = run(["quantize", "tiny", "-o", out, *TINY_CALIB, *extra])
        assert rc == 0, err
        log_lines_only(err)
        outs.append(out)
    a, b = (svdquant.load_quantized(o).state_dict() for o in outs)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_quantize_prompts_file_checked_first(tmp_path):
    rejected(["quantize", "tiny", "-o", tmp_path / "ck", "--prompts", tmp_path / "none.txt"], "no such file",
             folder=tmp_path)
    (tmp_path / "prompts").mkdir()
    rejected(["quantize", "tiny", "-o", tmp_path / "ck", "--prompts", tmp_path / "prompts"], "is a folder",
             folder=tmp_path)
    (tmp_path / "blank.txt").write_text("\n  \n")
    rejected(["quantize", "tiny", "-o", tmp_path / "ck", "--prompts", tmp_path / "blank.txt"], "holds no prompts",
             folder=tmp_path)
    (tmp_path / "sunset.txt").write_text("a sunset over the sea\n")  # the tiny model draws CIFAR-10 classes only
    rejected(["quantize", "tiny", "-o", tmp_path / "ck", "--prompts", tmp_path / "sunset.txt", *CPU],
             "draws only the classes", "'a sunset over the sea'", folder=tmp_path)


def test_quantize_output_paths_checked_first(tmp_path, ck, pipe_dir):
    (tmp_path / "afile").write_text("x")
    rejected(["quantize", "tiny", "-o", tmp_path / "afile" / "ck"], "afile is a file, not a folder", folder=tmp_path)
    rejected(["quantize", "tiny", "-o", tmp_path / "afile", "--overwrite"], "is a file", folder=tmp_path)
    # --overwrite replaces an earlier checkpoint, never a folder of other files (a mistyped `-o .`)
    (tmp_path / "project").mkdir()
    (tmp_path / "project" / "notes.txt").write_text("keep me")
    rejected(["quantize", "tiny", "-o", tmp_path / "project", "--overwrite"], "not an svdquant checkpoint",
             folder=tmp_path)
    rejected(["quantize", "tiny", "-o", ck], "already exists", "--overwrite", folder=ck)
    rejected(["quantize", pipe_dir, "-o", pipe_dir / "ck"], "inside the model folder", folder=pipe_dir)


UNWRITABLE = pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc, a folder that takes "
                                "no new files (even for root, whom os.access lets through)")


@UNWRITABLE
@pytest.mark.parametrize("argv", [
    ["quantize", "tiny", "-o", "/proc/ckout", *CPU],
    ["demo", "-o", "/proc/demo"],
    ["convert", "nunchaku", "/nonexistent/svdq.safetensors", "-o", "/proc/ck"],
    ["convert", "/nonexistent/ck", "--to", "nunchaku", "-o", "/proc/ck.safetensors"],
], ids=["quantize", "demo", "convert-import", "convert-export"])
def test_unwritable_output_is_refused_before_any_work(tmp_path, monkeypatch, argv):
    """`quantize tiny -o /proc/ckout` quantized fully, then printed a raw [Errno 2] about its temporary folder."""
    import svdquant.pipelines.demo as demo

    monkeypatch.setattr(demo, "quantize", lambda *a, **k: pytest.fail("quantized"))
    rejected(argv, f"-o {argv[argv.index('-o') + 1]}: cannot write into /proc", "choose another path",
             folder=tmp_path)


@UNWRITABLE
@pytest.mark.parametrize("command", ["generate", "compare"])
def test_unwritable_image_output_is_refused_before_sampling(ck, tmp_path, command):
    rejected([command, ck, "a cat", "-o", "/proc/b5.png", *SAMPLE], "-o /proc/b5.png: cannot write into /proc",
             folder=tmp_path)
    rejected([command, ck, "a cat", "-o", "/proc/new/b5.png", *SAMPLE], "cannot write into /proc", folder=tmp_path)


@UNWRITABLE
def test_unwritable_output_in_the_python_api(ck, tmp_path):
    model = svdquant.load_quantized(ck)
    with pytest.raises(CheckpointError, match="cannot write into /proc"):
        svdquant.save_quantized(model, "/proc/ck")
    from svdquant.pipelines.demo import run_demo

    with pytest.raises(ValueError, match="cannot write into /proc"):
        run_demo("/proc/demo", ["int4"])


def test_write_check_leaves_the_folder_as_it_was(tmp_path):
    """The check writes an empty file and removes it; the folder's mtime is put back too."""
    from svdquant import _checks

    (tmp_path / "out").mkdir()
    os.utime(tmp_path / "out", ns=(10**18, 10**18))
    _checks.output_parent("-o", tmp_path / "out" / "x.png")
    assert list((tmp_path / "out").iterdir()) == [] and (tmp_path / "out").stat().st_mtime_ns == 10**18


def test_quantize_text_encoders_of_a_pipeline_without_them(tmp_path, pipe_dir):
    rejected(["quantize", "tiny", "-o", tmp_path / "ck", "--text-encoders"], "--text-encoders",
             "the tiny model has no text encoder", folder=tmp_path)
    copy = tmp_path / "pipe"
    shutil.copytree(pipe_dir, copy)
    index = json.loads((copy / "model_index.json").read_text())
    index.update(text_encoder=[None, None], text_encoder_2=[None, None])
    (copy / "model_index.json").write_text(json.dumps(index))
    rejected(["quantize", copy, "-o", tmp_path / "ck", "--text-encoders", *CALIB], "has no text encoder",
             "leave --text-encoders out", folder=tmp_path)


def test_quantize_model_that_is_not_a_pipeline(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    rejected(["quantize", tmp_path / "weights.bin", "-o", tmp_path / "ck"], "not a diffusers pipeline folder",
             folder=tmp_path)


def test_quantize_tiny_needs_no_base_folder(tiny_ck):
    path, out, err = tiny_ck
    assert sorted(p.name for p in path.parent.iterdir() if p.name.startswith("tiny")) == ["tiny"]
    assert svdquant.read_metadata(path)["base"] == "tiny"
    log_lines_only(err)  # no progress-bar redraws when stderr is not a terminal
    assert "\r" not in out


def test_progress_lines_in_a_log(tmp_path):
    """stderr into a pipe, as in `svdquant quantize ... 2> log`: no bars, but the calibration and the quantization
    report themselves as plain lines (here after every step: SVDQUANT_PROGRESS_SECONDS=0 instead of 20 s). A
    21-minute quantization once printed nothing to its log."""
    r = subprocess.run([sys.executable, "-m", "svdquant.cli", "quantize", "tiny", "-o", str(tmp_path / "ck"),
                        *TINY_CALIB], capture_output=True, text=True, timeout=600,
                       env={**ENV, "SVDQUANT_PROGRESS_SECONDS": "0"})
    assert r.returncode == 0, r.stderr
    log_lines_only(r.stderr)
    assert "calibrating: 1 of 1 prompt, 100 %" in r.stderr
    done = [tuple(map(int, m.groups())) for m in re.finditer(r"^quantizing: (\d+) of (\d+) groups", r.stderr, re.M)]
    assert len(done) > 10 and done == sorted(done) and done[-1][0] == done[-1][1] > 10, done
    assert ", block 1/8 transformer_blocks.0, 7 left" in r.stderr  # what runs now


def test_quantize_with_batched_calibration_calls(tmp_path, monkeypatch):
    """--calibration-batch 4: the prompts drawn at the same steps run as one call (here four prompts of the tiny
    model, each drawn at both steps: one call), every drawn (prompt, step) pair still a snapshot."""
    from svdquant.pipelines import TinyFluxPipeline

    calls, real_call = [], TinyFluxPipeline.__call__
    monkeypatch.setattr(TinyFluxPipeline, "__call__",
                        lambda self, *a, **kw: calls.append(kw.get("prompt")) or real_call(self, *a, **kw))
    rc, _, err = run(["quantize", "tiny", "-o", tmp_path / "ck", "--recipe", "int4", "--method", "naive",
                      "--num-prompts", "4", "--steps", "2", "--snapshots", "8", "--tokens", "64", *CPU,
                      "--calibration-batch", "4"])
    assert rc == 0, err
    assert calls == [["airplane", "automobile", "bird", "cat"]]
    assert svdquant.read_metadata(tmp_path / "ck")["report"]["snapshots"] == 8


@pytest.mark.parametrize("model", ["tiny", "diffusers"])
def test_sampling_progress_lines_in_a_log(ck, tiny_ck, tmp_path, monkeypatch, model):
    """generate's denoising steps: the tiny pipeline's own loop and a diffusers pipeline's progress_bar."""
    monkeypatch.setenv("SVDQUANT_PROGRESS_SECONDS", "0")
    argv = [tiny_ck[0], "cat", "-o", tmp_path / "a.png", "--steps", "3", *CPU] if model == "tiny" else \
        [ck, "a cat", "-o", tmp_path / "a.png", *SAMPLE[2:], "--steps", "3"]
    rc, _, err = run(["generate", *argv])
    assert rc == 0, err
    log_lines_only(err)
    assert "sampling: 1 of 3 steps, 33 %" in err and "sampling: 3 of 3 steps, 100 %" in err


def test_progress_lines_are_throttled(monkeypatch, capsys):
    """At most one line per interval (and one when the step ends); a step shorter than the interval prints none."""
    from svdquant._progress import LineProgress, progress

    for _ in progress(range(5), desc="short", unit="step"):  # the default 20 s never pass here
        pass
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("SVDQUANT_PROGRESS_SECONDS", "0.2")
    t0 = time.monotonic()
    for _ in LineProgress(range(12), desc="slow", unit="step"):
        time.sleep(0.05)
    elapsed = time.monotonic() - t0
    lines = capsys.readouterr().err.splitlines()
    assert 2 <= len(lines) <= elapsed / 0.2 + 1, (elapsed, lines)
    assert lines[-1].startswith("slow: 12 of 12 steps, 100 %, 0 s") and all(map(PROGRESS_LINE.fullmatch, lines))
    for _ in progress(range(3), desc="off", enabled=False):
        time.sleep(0.25)
    assert capsys.readouterr().err == ""


def test_quantize_size_the_pipeline_cannot_take(tmp_path, pipe_dir):
    # the tiny FLUX pipeline's latents are packed 2x2 from a VAE that halves: sizes are multiples of 4
    rejected(["quantize", pipe_dir, "-o", tmp_path / "ck", *CALIB, "--height", "18"], "--height 18", "multiple of 4",
             folder=tmp_path)


def test_quantize_interrupted_leaves_nothing(tmp_path, monkeypatch):
    import svdquant.checkpoint.save as ckpt

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt, "save_file", interrupted)  # Ctrl-C while the tensor file is written
    rc, out, err = run(["quantize", "tiny", "-o", tmp_path / "ck", *TINY_CALIB])
    assert rc == 130 and err.endswith("svdquant quantize: interrupted\n"), err
    log_lines_only(err.removesuffix("svdquant quantize: interrupted\n"))
    assert list(tmp_path.iterdir()) == []  # no checkpoint, no temporary folder, no <out>-base


# ------------------------------------------------------------------------------------------------ generate / compare
SAMPLE_BAD = {
    "steps-zero": (["--steps", "0"], ["--steps 0"]),  # used to run the pipeline's default
    "steps-negative": (["--steps", "-2"], ["--steps -2"]),
    "num-images-zero": (["--num-images", "0"], ["--num-images 0"]),
    "num-images-absurd": (["--num-images", "100000"], ["--num-images 100000", "one batch"]),
    "height-zero": (["--height", "0"], ["--height 0"]),
    "width-negative": (["--width", "-16"], ["--width -16"]),
    "size-absurd": (["--width", "1000000"], ["--width 1000000"]),
    "seed-huge": (["--seed", str(2**70)], ["--seed"]),
    "guidance-negative": (["--guidance-scale", "-1"], ["--guidance-scale"]),
    "device-unknown": (["--device", "gpu0"], ["'gpu0' is not a device"]),
}


@pytest.mark.parametrize("command", ["generate", "compare"])
@pytest.mark.parametrize("case", list(SAMPLE_BAD))
def test_sampling_rejects_bad_values(ck, tmp_path, command, case):
    extra, needles = SAMPLE_BAD[case]
    rejected([command, ck, "a cat", "-o", tmp_path / "x.png", *SAMPLE, *extra], *needles, folder=tmp_path)


def test_generate_size_the_model_cannot_take(ck, tiny_ck, tmp_path):
    rejected(["generate", ck, "a cat", "-o", tmp_path / "x.png", *SAMPLE, "--height", "18"], "multiple of 4",
             folder=tmp_path)
    # the tiny model draws 32x32 only: a size used to be ignored silently
    rejected(["generate", tiny_ck[0], "a cat", "-o", tmp_path / "x.png", "--steps", "2", "--height", "16", *CPU],
             "--height 16", "32x32", folder=tmp_path)
    rejected(["compare", tiny_ck[0], "a cat", "-o", tmp_path / "x.png", "--steps", "2", "--width", "64", *CPU],
             "--width 64", "32x32", folder=tmp_path)


def test_generate_offload_refusals(ck, tiny_ck, tmp_path, monkeypatch):
    """--offload (model offload to a GPU): refused on the CPU and for the tiny model, before anything loads; the
    library refuses the same (load_pipeline(offload=True))."""
    rejected(["generate", ck, "a cat", "-o", tmp_path / "x.png", *SAMPLE, "--offload"],
             "--offload moves the models", "--device cpu", "leave --offload out", folder=tmp_path)
    rejected(["generate", ck, "a cat", "-o", tmp_path / "x.png", *SAMPLE[:-1], "cpu:0", "--offload"],
             "--offload moves the models", folder=tmp_path)
    rejected(["generate", tiny_ck[0], "a cat", "-o", tmp_path / "x.png", "--steps", "2", "--offload"],
             "--offload: the tiny model fits any GPU", folder=tmp_path)
    from svdquant.pipelines import load as load_module

    monkeypatch.setattr(load_module._checks, "device", lambda name, d: d)  # "cuda" passes without a GPU
    with pytest.raises(ValueError, match="the tiny model's pipeline has no model offload"):
        svdquant.load_pipeline(None, tiny_ck[0], device="cuda", offload=True)


def test_attention_int8_refusals(ck, tmp_path):
    """--attention int8 is set by svdquant.optimize on a CUDA GPU: refused on the CPU, with --no-optimize, and for the
    tiny model's server, before anything loads; load_pipeline refuses the same and an unknown name."""
    rejected(["generate", ck, "a cat", "-o", tmp_path / "x.png", *SAMPLE, "--attention", "int8"],
             "--attention int8 runs on a CUDA GPU; on cpu leave it out", folder=tmp_path)
    rejected(["compare", ck, "a cat", "-o", tmp_path / "x.png", *SAMPLE, "--attention", "int8", "--no-optimize"],
             "--attention int8 is set by svdquant.optimize: drop --no-optimize", folder=tmp_path)
    rejected(["serve", "tiny", "--attention", "int8", "--no-optimize"], "drop --no-optimize", folder=tmp_path)
    rejected(["serve", "tiny", *CPU, "--attention", "int8"], "runs on a CUDA GPU", folder=tmp_path)
    rejected(["generate", ck, "a cat", "-o", tmp_path / "x.png", *SAMPLE, "--attention", "flash4"],
             "--attention flash4 runs on a CUDA GPU; on cpu leave it out", folder=tmp_path)
    from svdquant.cli.common import check_optimize_flags

    import argparse

    check_optimize_flags(argparse.Namespace(attention="int8", optimize=True, device="cuda:0"))  # accepted
    with pytest.raises(ValueError, match=r"^attention='int8' is set by svdquant.optimize, which runs on a CUDA "):
        svdquant.load_pipeline(None, ck, attention="int8")
    with pytest.raises(ValueError, match=r"^attention='sage': use 'auto', None, 'int8', 'flash4' or one of"):
        svdquant.load_pipeline(None, ck, attention="sage")
    from svdquant.serve.engine import load_engine

    with pytest.raises(ValueError, match=r"^attention='int8' is set by svdquant.optimize on a CUDA device"):
        load_engine("tiny", "cpu", attention="int8")


def test_compile_model_refusals(ck, tmp_path, monkeypatch):
    """--compile model is how svdquant.optimize compiles, on a CUDA GPU without --offload: refused on the CPU, with
    --no-optimize, with --offload and for the tiny model's server, before anything loads; the library refuses the
    same, and a compile= it does not know."""
    import argparse

    from svdquant.cli.common import UsageError, check_optimize_flags
    from svdquant.serve.engine import load_engine

    rejected(["generate", ck, "a cat", "-o", tmp_path / "x.png", *SAMPLE, "--compile", "model"],
             "--compile model runs on a CUDA GPU; on cpu leave it out", folder=tmp_path)
    rejected(["compare", ck, "a cat", "-o", tmp_path / "x.png", *SAMPLE, "--compile", "model", "--no-optimize"],
             "--compile model is set by svdquant.optimize: drop --no-optimize", folder=tmp_path)
    rejected(["serve", "tiny", *CPU, "--compile", "model"], "runs on a CUDA GPU", folder=tmp_path)
    check_optimize_flags(argparse.Namespace(compile="model", optimize=True, device="cuda:0"))  # accepted
    with pytest.raises(UsageError, match=r"^--compile model compiles the whole forward, which --offload's hooks run "
                                         r"outside the graph: leave one of them out$"):
        check_optimize_flags(argparse.Namespace(compile="model", optimize=True, device="cuda:0", offload=True))
    for kw, message in ((dict(optimize=False), "compiles the denoiser: leave optimize on, or leave compile out$"),
                        (dict(offload=True), "compiles the whole forward, which offload's hooks run outside the "
                                             "graph: leave offload or compile out$"),
                        (dict(), "compiles the denoiser, on a CUDA device: give device='cuda', or leave compile "
                                 "out$")):
        with pytest.raises(ValueError, match=r"^compile='model' (is how svdquant.optimize )?" + message):
            svdquant.load_pipeline(None, ck, compile="model", **kw)
    with pytest.raises(ValueError, match=r"^compile='whole': use True \(each repeated block: the default\)"):
        svdquant.load_pipeline(None, ck, compile="whole")
    with pytest.raises(ValueError, match=r"^compile='model' is set by svdquant.optimize on a CUDA device"):
        load_engine("tiny", "cpu", compile="model")
    import svdquant.cli.serve as serve_cli

    monkeypatch.setattr(serve_cli, "resolve_device", lambda name: "cuda:0")  # past the GPU check, to the tiny one
    rejected(["serve", "tiny", "--compile", "model"], "--compile model applies to checkpoints and 16-bit pipelines; "
             "the tiny model is served as it is: leave it out", folder=tmp_path)


def test_generate_empty_prompt(ck, tmp_path):
    rejected(["generate", ck, "  ", "-o", tmp_path / "x.png", *SAMPLE], "the prompt is empty", folder=tmp_path)


@pytest.mark.parametrize("name", ["image", "image.txt", "."])
def test_generate_output_not_an_image_name(ck, tmp_path, name):
    rejected(["generate", ck, "a cat", "-o", tmp_path / name, *SAMPLE], "image file name", folder=tmp_path)


def test_generate_output_is_a_folder(ck, tmp_path):
    (tmp_path / "pics.png").mkdir()
    rejected(["generate", ck, "a cat", "-o", tmp_path / "pics.png", *SAMPLE], "is a folder", folder=tmp_path)


def test_generate_output_under_a_file(ck, tmp_path):
    (tmp_path / "afile").write_text("x")
    rejected(["generate", ck, "a cat", "-o", tmp_path / "afile" / "x.png", *SAMPLE], "is a file, not a folder",
             folder=tmp_path)


@pytest.mark.parametrize("command", ["generate", "compare"])
def test_existing_output_needs_overwrite(ck, tmp_path, command):
    target = tmp_path / "x.png"
    Image.new("RGB", (4, 4), "red").save(target)
    rejected([command, ck, "a cat", "-o", target, *SAMPLE], str(target), "already exists", "--overwrite",
             folder=tmp_path)
    rc, out, err = run([command, ck, "a cat", "-o", target, *SAMPLE, "--overwrite"])
    assert rc == 0, err
    assert pixels(target).shape != (4, 4, 3)  # replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.png"]  # no temporary file left


def test_generate_refuses_when_one_of_several_outputs_exists(ck, tmp_path):
    (tmp_path / "x-1.png").write_bytes(b"mine")
    rejected(["generate", ck, "a cat", "-o", tmp_path / "x.png", "--num-images", "2", *SAMPLE], "x-1.png",
             "already exists", folder=tmp_path)


def test_generate_lora_checked_before_loading(ck, tmp_path):
    rejected(["generate", ck, "a cat", "-o", tmp_path / "x.png", "--lora", tmp_path / "none.safetensors:0.5",
              *SAMPLE], "no LoRA file at", folder=tmp_path)
    (tmp_path / "l.safetensors").write_bytes(b"x")
    rejected(["generate", ck, "a cat", "-o", tmp_path / "x.png", "--lora", f"{tmp_path / 'l.safetensors'}:nan",
              *SAMPLE], "strength must be a finite number", folder=tmp_path)


def test_generate_base_folder_missing(ck, tmp_path):
    rejected(["generate", ck, "a cat", "-o", tmp_path / "x.png", "--base", tmp_path / "no-base", *SAMPLE],
             "no base pipeline at", "does not exist", folder=tmp_path)


def test_base_of_another_size_is_refused_before_loading(ck, tmp_path):
    # the class matches (FluxTransformer2DModel) but the shipped tiny model is wider: it crashed mid-sampling
    rejected(["generate", ck, "a cat", "-o", tmp_path / "x.png", *SAMPLE, "--base", "tiny"],
             "attention_head_dim=32", "tiny base", folder=tmp_path)


def test_hub_model_offline_is_one_line(tmp_path):
    # diffusers' multi-line messages and warnings are folded into the one error line
    rejected(["quantize", "no-such-owner/no-such-model", "-o", tmp_path / "ck"], "no-such-owner/no-such-model",
             folder=tmp_path)


def test_checkpoint_moved_without_its_base_names_base(ck, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(ck, moved)  # the recorded base is ../pipe, which is not beside the copy
    line = rejected(["generate", moved, "a cat", "-o", tmp_path / "x.png", *SAMPLE], "--base", "moved without it",
                    folder=tmp_path)
    assert "connect" not in line and "huggingface" not in line  # was a hub connection error
    with pytest.raises(FileNotFoundError, match="base="):
        svdquant.load_pipeline(None, moved)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_dtype_16bit_runs_on_cpu(ck, tiny_ck, tmp_path, dtype):
    # used to crash: the kept 16-bit layers stayed fp32 while the rest of the pipeline ran in bf16/fp16
    for i, c in enumerate((ck, tiny_ck[0])):
        size = SAMPLE if c == ck else ["--steps", "2", *CPU]
        target = tmp_path / f"{i}.png"
        rc, out, err = run(["generate", c, "a cat", "-o", target, *size, "--dtype", dtype])
        assert rc == 0, err
        assert pixels(target).std() > 1


def test_quantize_bf16_then_generate_fp32(tmp_path):
    rc, _, err = run(["quantize", "tiny", "-o", tmp_path / "ck", *TINY_CALIB, "--dtype", "bf16"])
    assert rc == 0, err
    rc, _, err = run(["generate", tmp_path / "ck", "a dog", "-o", tmp_path / "dog.png", "--steps", "2", *CPU])
    assert rc == 0, err


@NO_CUDA
def test_load_pipeline_cuda_without_cuda_says_so(ck):
    for load in (lambda: svdquant.load_pipeline(None, ck, device="cuda"),
                 lambda: svdquant.load_quantized(ck, device="cuda:0")):
        with pytest.raises(ValueError) as e:
            load()
        assert "no CUDA GPU" in str(e.value) and "corrupt" not in str(e.value)
        assert not isinstance(e.value, CheckpointError)


# ------------------------------------------------------------------------------------------------ info
@pytest.mark.parametrize("damage", ["truncated", "garbage", "missing", "header-lies"])
def test_info_reports_a_damaged_tensor_file(ck, tmp_path, damage):
    path = tmp_path / "ck"
    shutil.copytree(ck, path)
    f = path / TENSOR_FILE
    data = f.read_bytes()
    if damage == "truncated":
        f.write_bytes(data[: len(data) - 100])
    elif damage == "garbage":
        f.write_bytes(os.urandom(4096))
    elif damage == "missing":
        f.unlink()
    else:  # a valid-looking header whose offsets point past the data
        f.write_bytes(data + b"\0" * 64)
    why = "is missing" if damage == "missing" else "truncated or corrupt"
    rejected(["info", path], str(f), why, folder=tmp_path)


@pytest.mark.parametrize("name", [META_FILE, TENSOR_FILE])
def test_info_on_one_of_the_checkpoint_files(ck, pipe_dir, name):
    # the tensor file was looked for at svdquant.json, and a local base resolved against the file
    rc, out, err = run(["info", ck / name])
    assert rc == 0, err
    assert f"base         {pipe_dir.resolve()}\n" in out


def test_info_into_a_closed_pipe(ck):
    """`svdquant info CK | head -1`: the reader leaves early; no BrokenPipeError traceback."""
    env = {k: v for k, v in ENV.items() if k != "PYTHONUNBUFFERED"}  # buffered, as in a real pipe
    p = subprocess.Popen([sys.executable, "-m", "svdquant.cli", "info", str(ck)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=env)
    p.stdout.close()  # like head after its line: every write now fails with EPIPE
    err = p.stderr.read().decode()
    p.wait(timeout=120)
    assert "Traceback" not in err and "BrokenPipe" not in err, err
    assert err == "", err
    assert p.returncode == 141


# ------------------------------------------------------------------------------------------------ demo
DEMO_BAD = {
    "recipe-unknown": (["--recipes", "int4", "int5"], ["unknown recipe 'int5'"]),
    "recipe-twice": (["--recipes", "int4", "nf4", "int4"], ["int4 is listed twice"]),
    "steps-zero": (["--steps", "0"], ["--steps 0"]),
    "steps-negative": (["--steps", "-4"], ["--steps -4"]),  # reported PSNR inf: noise against noise
    "seed-negative": (["--seed", "-1"], ["--seed -1"]),
}


@pytest.mark.parametrize("case", list(DEMO_BAD))
def test_demo_rejects_before_quantizing(tmp_path, monkeypatch, case):
    import svdquant.pipelines.demo as demo

    calls = []
    monkeypatch.setattr(demo, "quantize", lambda *a, **k: calls.append(a) or pytest.fail("quantized"))
    extra, needles = DEMO_BAD[case]
    rejected(["demo", "-o", tmp_path / "demo", *extra], *needles, folder=tmp_path)
    assert calls == []


def test_demo_output_checks(tmp_path):
    (tmp_path / "afile").write_text("x")
    rejected(["demo", "-o", tmp_path / "afile"], "is a file", folder=tmp_path)
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "compare.png").write_bytes(b"earlier run")
    rejected(["demo", "-o", tmp_path / "old"], "compare.png", "--overwrite", folder=tmp_path)


def test_demo_api_checks(tmp_path):
    from svdquant.pipelines.demo import run_demo

    with pytest.raises(ValueError, match="steps=0"):
        run_demo(tmp_path / "d", ["int4"], steps=0)
    with pytest.raises(ValueError, match="unknown recipe"):
        run_demo(tmp_path / "d", ["int4", "nope"])
    with pytest.raises(ValueError, match="list of one or more"):
        run_demo(tmp_path / "d", "int4")
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def demo_run(root):
    out = root / "demo"
    rc, stdout, err = run(["demo", "-o", out, "--recipes", "int4-naive", "nf4", "--steps", "1"])
    return out, rc, stdout, err


def test_demo_says_which_variant_runs(demo_run):
    out, rc, stdout, err = demo_run
    assert rc == 0, err
    assert "int4-naive, 1 of 2" in stdout and "nf4, 2 of 2" in stdout
    log_lines_only(err)  # no progress bars in a redirected log
    assert sorted(p.name for p in out.iterdir()) == ["compare.png", "int4-naive", "nf4", "quality.md"]
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".demo")]  # the staging folder is gone
    assert svdquant.read_metadata(out / "nf4")["base"] == "tiny"  # no base/ copy needed


def test_demo_compare_png_has_a_note_under_each_row(demo_run):
    from svdquant.images import grid

    out, rc, _, err = demo_run
    assert rc == 0, err
    with Image.open(out / "compare.png") as im:
        h = im.size[1]
    plain = grid([(n, [Image.new("RGB", (32, 32))] * 10) for n in ("16-bit", "a", "b")], scale=2,
                 col_labels=["x"] * 10)
    assert h == plain.size[1] + 3 * 14  # one 14-pixel text line under each of the 3 rows
    img = pixels(out / "compare.png")
    note_band = img[16 + 64: 16 + 64 + 14, 40:200]  # under the 16-bit row: "reference: ..."
    assert (note_band < 128).any()  # text is drawn there


def test_demo_overwrite(demo_run, tmp_path):
    out, rc, _, err = demo_run
    assert rc == 0, err
    rejected(["demo", "-o", out, "--recipes", "nf4", "--steps", "1"], "already holds", "nf4", folder=out)


# Starts a command as a terminal would: SIGINT at its default and unblocked, whatever an earlier test left in this
# worker process (an ignored or blocked SIGINT is inherited through exec; once in CI the demo then ran to the end)
AS_FROM_A_TERMINAL = ("import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
                      "signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT}); "
                      "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])")


def _signal_state() -> str:
    """This process's ignored and blocked signal masks (Linux), for a failure's message."""
    status = Path("/proc/self/status")
    lines = status.read_text().splitlines() if status.exists() else []
    return " ".join(line.replace("\t", " ") for line in lines if line.startswith(("SigIgn", "SigBlk")))


def test_demo_ctrl_c_leaves_nothing(tmp_path):
    """A real SIGINT while the demo quantizes: one line, status 130, no output folder, no staging folder."""
    p = subprocess.Popen([sys.executable, "-c", AS_FROM_A_TERMINAL, "-m", "svdquant.cli", "demo", "-o",
                          str(tmp_path / "demo"), "--recipes", "int4", "--steps", "1"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.time() + 120
    seen = []
    for line in p.stdout:  # wait until it is quantizing (unbuffered output)
        seen.append(f"{time.time() - deadline + 120:.1f}s {line.strip()[:60]}")
        if "1 of 1" in line or time.time() > deadline:
            break
    p.send_signal(signal.SIGINT)
    sent = time.time() - deadline + 120
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130, (f"status {p.returncode}; SIGINT sent at {sent:.1f}s after {seen}; this worker's "
                                 f"{_signal_state()}; stderr: {err}")
    assert err.endswith("svdquant demo: interrupted\n"), err
    log_lines_only(err.removesuffix("svdquant demo: interrupted\n"))
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------ the Python API
@pytest.mark.parametrize("kwargs, needle", [
    (dict(steps=0), "steps=0"), (dict(snapshots=0), "snapshots=0"), (dict(tokens_per_layer=0), "tokens_per_layer=0"),
    (dict(num_prompts=0), "num_prompts=0"), (dict(seed=-1), "seed=-1"), (dict(prompts="a cat"), "one string"),
    (dict(prompts=[]), "empty"), (dict(pipeline_kwargs=dict(num_inference_steps=4)), "steps="),
    (dict(inputs=[]), "inputs="),
])
def test_calibration_rejects(kwargs, needle):
    with pytest.raises(ValueError) as e:
        svdquant.Calibration(**kwargs)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_quantize_api_checks_before_calibrating():
    from svdquant.pipelines import TinyFluxPipeline

    pipe = TinyFluxPipeline.random(num_layers=1, num_single_layers=1)
    with pytest.raises(ValueError, match="only 10 prompts"):
        svdquant.quantize(pipe, "int4", svdquant.Calibration(num_prompts=11))
    with pytest.raises(ValueError, match="height=16.*32x32"):
        svdquant.quantize(pipe, "int4", svdquant.Calibration(pipeline_kwargs=dict(height=16)))
    with pytest.raises(TypeError, match="list of patterns"):
        svdquant.quantize(pipe, "int4", include="*attn*")
    with pytest.raises(TypeError, match="Calibration"):
        svdquant.quantize(pipe, "int4", ["a cat"])
    # issue 16: device=, max_gpu_memory=, keep_on_device=
    for kw, needle in [(dict(device="tpu"), "'tpu' is not a device"),
                       (dict(max_gpu_memory="16"), "give a unit"), (dict(max_gpu_memory=0), "positive"),
                       (dict(max_gpu_memory=-2**30), "positive"), (dict(max_gpu_memory=16.0), "such as '16GB'"),
                       (dict(max_gpu_memory=True), "such as '16GB'"), (dict(max_gpu_memory="xGB"), "not a number"),
                       (dict(max_gpu_memory=512), "less than 1 MiB"),
                       (dict(max_gpu_memory="16GB"), "caps a CUDA GPU, but the model is quantized on cpu"),
                       (dict(device="cpu", max_gpu_memory="16GB"), "pass device='cuda'")]:
        with pytest.raises(ValueError, match=needle) as e:
            svdquant.quantize(pipe, "int4", **kw)
        assert "\n" not in str(e.value)
    with pytest.raises(TypeError, match="keep_on_device"):
        svdquant.quantize(pipe, "int4", device="cpu", keep_on_device="yes")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device='cuda' was asked for, but torch sees no CUDA GPU"):
            svdquant.quantize(pipe, "int4", device="cuda", max_gpu_memory="16GB")
    assert not any(type(m).__name__ == "SVDQLinear" for m in pipe.transformer.modules())  # nothing was touched


def test_tiny_pipeline_call_checks():
    from svdquant.pipelines import TinyFluxPipeline

    pipe = TinyFluxPipeline.random(num_layers=1, num_single_layers=1)
    for kw, needle in [(dict(num_inference_steps=0), "num_inference_steps=0"), (dict(height=16), "32x32"),
                       (dict(num_images_per_prompt=0), "num_images_per_prompt=0"), (dict(class_labels=[10]), "0 to 9"),
                       (dict(output_type="np"), "output_type"), (dict(guidance_scale=float("inf")), "finite")]:
        with pytest.raises(ValueError, match=needle):
            pipe(**{"prompt": "cat", **kw})


def test_save_quantized_checks_the_folder_first(tmp_path, ck):
    model = svdquant.load_quantized(ck)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="not an svdquant checkpoint"):
        svdquant.save_quantized(model, tmp_path / "notes", overwrite=True)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(CheckpointError, match="is a file"):
        svdquant.save_quantized(model, tmp_path / "afile" / "ck")
    with pytest.raises(CheckpointError, match="does not exist"):
        svdquant.save_quantized(model, tmp_path / "ck", base="/no/such/pipeline")
    assert (tmp_path / "notes" / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "notes"]


def test_load_pipeline_rejects_a_dtype_name(ck):
    with pytest.raises(ValueError, match="torch.dtype"):
        svdquant.load_pipeline(None, ck, torch_dtype="bf16")


# ------------------------------------------------------------------------------------------------ first hour
@pytest.mark.parametrize("argv, needle", [
    (["quantize", "tiny", "-o", "x", "--rank", "abc"], "argument --rank: invalid int value: 'abc'"),
    (["generate"], "the following arguments are required: checkpoint, prompt"),
    (["quantize", "tiny", "-o", "x", "--recipe-name", "int4"], "unrecognized arguments: --recipe-name int4"),
    (["demo", "--steps"], "argument --steps: expected one argument"),
])
def test_argparse_errors_are_one_line(argv, needle, capsys):
    """`--rank abc` printed 12 lines of usage above the error; now the one line every other mistake gets."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err == f"svdquant {argv[0]}: error: {needle}; see svdquant {argv[0]} --help\n", err


def test_every_option_has_help():
    """--seed, --height, --width and --guidance-scale had none."""
    from svdquant.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    missing = [f"{name} {', '.join(a.option_strings)}" for name, p in sub.choices.items() for a in p._actions
               if a.option_strings and not a.help]
    assert not missing, missing


@pytest.mark.parametrize("argv", [
    ["quantize", "tiny", "-o", "x", "--rank", "-5"],
    ["quantize", "tiny", "-o", "x", "--steps", "0"],
    ["demo", "--steps", "0"],
    ["generate", "ck", " ", "-o", "a.png"],
    ["convert", "ck", "--to", "nunchaku", "-o", "a.txt"],
])
def test_mistakes_are_reported_before_diffusers_is_imported(tmp_path, argv):
    """Importing diffusers and transformers takes 3-6 s here (10-50 s on a loaded machine, before this was fixed)
    and trivial mistakes waited for it: the checks now run first."""
    code = ("import sys; from svdquant.cli import main; rc = main(sys.argv[1:]); "
            "print(rc, 'diffusers' in sys.modules, 'transformers' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=300, env=ENV,
                       cwd=tmp_path)
    assert r.stdout.split() == ["2", "False", "False"], (r.stdout, r.stderr)
    assert r.stderr.startswith(f"svdquant {argv[0]}: error: ") and len(r.stderr.splitlines()) == 1, r.stderr


def test_version():
    with pytest.raises(SystemExit) as e, contextlib.redirect_stdout(io.StringIO()) as out:
        main(["--version"])
    assert e.value.code == 0 and out.getvalue().strip() == f"svdquant {svdquant.__version__}"


def test_pytest_q_prints_its_summary_line():
    """README's `python -m pytest tests -q` must end with the pass/fail line (pyproject had addopts -q too)."""
    r = subprocess.run([sys.executable, "-m", "pytest", "tests/test_recipes.py", "-q", "-k", "unknown", "-p",
                        "no:cacheprovider"], capture_output=True, text=True, timeout=300,
                       cwd=Path(__file__).resolve().parent.parent, env=ENV)
    assert r.returncode == 0, r.stdout + r.stderr
    assert " passed" in r.stdout.strip().splitlines()[-1], r.stdout


def test_pytest_names_the_optional_parts_it_skipped(tmp_path):
    """`pytest -q` ends with one line per optional part it skipped (ray, chromium, a GPU), why, and how to get it:
    the browser test was skipped silently on machines without chromium."""
    shutil.copy(Path(__file__).with_name("conftest.py"), tmp_path / "conftest.py")
    (tmp_path / "test_parts.py").write_text(
        "import pytest\n\n"
        "def test_replicas():\n    pytest.importorskip('ray_is_not_here', reason='ray[serve] is not installed')\n\n"
        "@pytest.mark.skipif(True, reason='no /usr/bin/chromium: install it')\ndef test_page():\n    pass\n\n"
        "@pytest.mark.parametrize('i', [1, 2])\n@pytest.mark.skipif(True, reason='needs a CUDA GPU')\n"
        "def test_gpu(i):\n    pass\n\n"
        "def test_runs():\n    pass\n")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path, env=ENV)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.strip().splitlines()
    assert "skipped ray (1 test): ray[serve] is not installed; to run: pip install 'ray[serve]'" in lines, lines
    assert any(line.startswith("skipped chromium (1 test): no /usr/bin/chromium: install it; to run: apt-get")
               for line in lines), lines
    assert "skipped GPU (2 tests): needs a CUDA GPU" in lines, lines
    assert " passed" in lines[-1] and "4 skipped" in lines[-1]


# ------------------------------------------------------------------------------------------------ --push-to-hub
@pytest.fixture
def online_without_token(monkeypatch, tmp_path):
    """What a machine with a network but no Hugging Face login looks like to huggingface_hub (its own
    settings: the offline flag tests set, the token's environment variable and file)."""
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(hc, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(hc, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-stored-tokens"))


def test_push_to_hub_checked_before_quantizing(tmp_path, monkeypatch):
    rejected(["quantize", "tiny", "-o", tmp_path / "ck", "--push-to-hub", "not a repo!"],
             "--push-to-hub 'not a repo!' is not a Hub repo id", folder=tmp_path)
    rejected(["quantize", "tiny", "-o", tmp_path / "ck", "--private"], "--private", "--push-to-hub REPO",
             folder=tmp_path)
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    rejected(["quantize", "tiny", "-o", tmp_path / "ck", "--push-to-hub", "me/flux-int4"],
             "HF_HUB_OFFLINE is set", "hf upload me/flux-int4", folder=tmp_path)


def test_push_to_hub_needs_a_token(tmp_path, online_without_token):
    rejected(["quantize", "tiny", "-o", tmp_path / "ck", "--push-to-hub", "me/flux-int4"],
             "no Hugging Face token", "hf auth login", folder=tmp_path)


def test_push_to_hub_python_checks_the_folder_before_any_upload(tmp_path, online_without_token, monkeypatch,
                                                              tiny_ck):
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")  # checks pass; each case fails before the network
    with pytest.raises(svdquant.CheckpointError):
        svdquant.push_to_hub(tmp_path, "me/flux-int4")  # not a checkpoint folder
    path = tiny_ck[0]
    assert not (path / "README.md").exists()
    with pytest.raises(ValueError, match="no model card"):
        svdquant.push_to_hub(path, "me/flux-int4")
    with pytest.raises(ValueError, match="not a Hub repo id"):
        svdquant.push_to_hub(path, "me/flux/int4")


@pytest.mark.parametrize("argv,gptq,method", [
    ([], True, "svdquant"),                          # the 4-bit recipes round with GPTQ by default
    (["--no-gptq"], False, "svdquant"),
    (["--method", "naive"], False, "naive"),         # an ablation is the paper's baseline: round to nearest
    (["--recipe", "w8a8"], False, "svdquant"),       # no GPTQ for INT8 weights
])
def test_quantize_gptq_option(argv, gptq, method):
    from svdquant.cli import _recipe, build_parser

    r = _recipe(build_parser().parse_args(["quantize", "tiny", "-o", "x", *argv]))
    assert (r.gptq, r.method) == (gptq, method)


# ------------------------------------------------------------------------------------------------ --images (edit pipelines)
@pytest.fixture(scope="module")
def kontext_dir(root):
    folder = root / "kontext"
    tm.build_kontext_pipeline().save_pretrained(folder)
    return folder


KONTEXT_CALIB = ["--num-prompts", "1", "--steps", "2", "--snapshots", "2", "--tokens", "64", "--height", "16",
                 "--width", "16", "--recipe", "int4", "--method", "naive", *CPU]


def test_quantize_edit_pipeline_without_images_is_refused_first(tmp_path, kontext_dir):
    rejected(["quantize", kontext_dir, "-o", tmp_path / "ck", *KONTEXT_CALIB], "FluxKontextPipeline",
             "--images FILE", folder=tmp_path)


def test_quantize_images_checked_first(tmp_path, kontext_dir, pipe_dir):
    (tmp_path / "bad.png").write_bytes(b"not an image")
    rejected(["quantize", kontext_dir, "-o", tmp_path / "ck", "--images", tmp_path / "none.png", *KONTEXT_CALIB],
             "--images", "none.png", "no such file", folder=tmp_path)
    rejected(["quantize", kontext_dir, "-o", tmp_path / "ck", "--images", tmp_path / "bad.png", *KONTEXT_CALIB],
             "bad.png", "cannot be read as an image", folder=tmp_path)
    tm.input_image().save(tmp_path / "a.png")
    rejected(["quantize", pipe_dir, "-o", tmp_path / "ck", "--images", tmp_path / "a.png", *CALIB],
             "FluxPipeline takes no input image", folder=tmp_path)
    rejected(["quantize", "tiny", "-o", tmp_path / "ck", "--images", tmp_path / "a.png", *TINY_CALIB],
             "the tiny model takes no input image", folder=tmp_path)



def test_quantize_a_pipeline_whose_package_is_missing_is_refused_before_loading(tmp_path, monkeypatch):
    """diffusers' WanImageToVideoPipeline runs ftfy on every prompt: without it, quantize says so from the folder's
    model_index.json, before loading the pipeline (two 14B experts for Wan 2.2). The folder holds nothing else, so a
    load would fail another way."""
    import sys

    base = tmp_path / "wan-i2v"
    base.mkdir()
    (base / "model_index.json").write_text('{"_class_name": "WanImageToVideoPipeline"}')
    tm.input_image().save(tmp_path / "a.png")
    monkeypatch.setitem(sys.modules, "ftfy", None)  # what an import sees when the package is not installed
    rejected(["quantize", base, "-o", tmp_path / "ck", "--images", tmp_path / "a.png", *CPU],
             "WanImageToVideoPipeline", "pip install ftfy", folder=tmp_path)
