"""``svdquant generate`` on every kind of pipeline (issue 26): an edit pipeline's ``--image`` (FLUX.1 Kontext, Wan
image-to-video), a video pipeline's animated .webp / .gif and .mp4 (Wan), each file the same as the Python API draws
from the same seed; and every mistake refused in one line before any weight loads, with no file written.

The tiny pipelines are quantized once per module (``int4``, one refinement iteration, 2 calibration calls), saved
with a saved tiny base folder, and sampled in 2 steps at 64 x 64 (5 frames for Wan).
"""

from __future__ import annotations

import contextlib
import io
import sys
from pathlib import Path

import tiny_models as tm  # first: sets HF_HUB_OFFLINE before diffusers is imported
import tiny_pipelines as tp

import numpy as np
import pytest
import torch
from PIL import Image

import svdquant
from svdquant.cli import main
from svdquant.cli.media import write_whole

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py

RECIPE = svdquant.get_recipe("int4", iterations=1, eval_tokens=64)
CPU = ["--device", "cpu"]
SIZE = 64  # every pipeline here draws 64 x 64: Kontext's 16x VAE makes that 2 x 2 tokens
SAMPLE = ["--steps", "2", "--height", SIZE, "--width", SIZE, *CPU]
WAN = [*SAMPLE, "--num-frames", "5"]  # 5 frames: 2 latent frames


# ------------------------------------------------------------------------------------------------ helpers
def run(argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def generated(argv) -> str:
    rc, out, err = run(argv)
    assert rc == 0, err
    return out


def frames(path) -> list[np.ndarray]:
    """Every frame of an image or animation file, as RGB arrays."""
    with Image.open(path) as im:
        n = getattr(im, "n_frames", 1)
        out = []
        for i in range(n):
            im.seek(i)
            out.append(np.asarray(im.convert("RGB")).copy())
    return out


def arrays(pil_frames) -> list[np.ndarray]:
    return [np.asarray(f.convert("RGB")) for f in pil_frames]


@pytest.fixture
def no_loading(monkeypatch):
    """A tripwire on the two ways a command loads weights (the quantized transformer, the base pipeline): a
    refusal must come before either."""
    import diffusers

    import svdquant.pipelines.load as load

    def loaded(*a, **k):
        raise AssertionError("a model was loaded before the command was refused")

    monkeypatch.setattr(load, "load_quantized", loaded)
    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", classmethod(loaded))


def rejected(argv, *needles, folder: Path, command: str = "generate") -> str:
    """Exit 2, one ``svdquant CMD: error: ...`` line holding ``needles``, no traceback, ``folder`` unchanged."""
    before = sorted(folder.rglob("*"))
    rc, out, err = run([command, *argv])
    assert rc == 2, (rc, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"svdquant {command}: error: "), err
    for n in needles:
        assert str(n) in lines[0], (n, lines[0])
    assert sorted(folder.rglob("*")) == before, "a refused command wrote a file"
    return lines[0]


def quantized(pipe, root: Path, name: str, kwargs: dict, images=None) -> Path:
    """``pipe`` saved as a base folder, quantized through itself, saved as a checkpoint recording that base."""
    base = root / f"{name}-base"
    pipe.save_pretrained(base)
    calib = svdquant.Calibration(prompts=["a cat"], steps=2, snapshots=2, pipeline_kwargs=dict(kwargs), images=images)
    svdquant.quantize(pipe, RECIPE, calib, progress=False)
    return svdquant.save_quantized(pipe, root / name, base=str(base))


def api(ck, seed: int = 0, **kwargs):
    """The Python API's call for what the CLI options say: the checkpoint loaded, one seeded CPU generator."""
    pipe = svdquant.load_pipeline(None, ck)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        return pipe(num_inference_steps=2, generator=torch.Generator("cpu").manual_seed(seed), output_type="pil",
                    **kwargs)


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("media")


def kontext_16x(seed: int = 0):
    """:func:`tiny_models.build_kontext_pipeline` with a 16x VAE: diffusers' Kontext resizes the input picture to one
    of its ~1024 x 1024 training sizes (the CLI keeps that default), which the 2x tiny VAE would turn into 65,536
    tokens; 16x makes it 1,024 (as tests/tiny_pipelines.py's Qwen-Image-Edit VAE does)."""
    from diffusers import AutoencoderKL, FluxKontextPipeline

    k = tm.build_kontext_pipeline(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 5)
        vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 5,
                            up_block_types=("UpDecoderBlock2D",) * 5, block_out_channels=(4, 4, 4, 8, 16),
                            layers_per_block=1, latent_channels=tm.FLUX_CONFIG["in_channels"] // 4, norm_num_groups=4,
                            sample_size=SIZE, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0,
                            scaling_factor=1.0).eval()
    pipe = FluxKontextPipeline(vae=vae, **{n: c for n, c in k.components.items() if n in (
        "scheduler", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "transformer")})
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def kontext_ck(root):
    kwargs = dict(height=SIZE, width=SIZE, max_area=SIZE * SIZE, _auto_resize=False, max_sequence_length=8)
    return quantized(kontext_16x(), root, "kontext-int4", kwargs, images=[tm.input_image(0, SIZE)])


@pytest.fixture(scope="module")
def wan_ck(root):
    return quantized(tm.build_wan_pipeline(), root, "wan-int4", tm.WAN_KWARGS)


@pytest.fixture(scope="module")
def flux_ck(root):
    """A text-to-image checkpoint: the tiny FluxPipeline."""
    return quantized(tm.build_flux_pipeline(), root, "flux-int4", tm.PIPE_KWARGS)


@pytest.fixture(scope="module")
def wan_i2v_ck(root):
    pytest.importorskip("ftfy", reason="WanImageToVideoPipeline needs ftfy (pip install ftfy, or '.[dev]')")
    return quantized(tp.build_wan_i2v_pipeline(), root, "wan-i2v-int4", tp.WAN_I2V_KWARGS,
                     images=[tm.input_image(0, SIZE)])


@pytest.fixture(scope="module")
def pictures(root):
    """Two input pictures, and a file that is no picture."""
    folder = root / "inputs"
    folder.mkdir()
    for i in range(2):
        tm.input_image(i, SIZE).save(folder / f"in{i}.png")
    (folder / "bad.png").write_bytes(b"not an image at all")
    return folder


# ------------------------------------------------------------------------------------------------ edit pipelines
def test_generate_kontext_edits_the_input_image_as_the_api_does(kontext_ck, pictures, tmp_path):
    out = generated(["generate", kontext_ck, "make it red", "--image", pictures / "in0.png", "-o", tmp_path / "a.png",
                     "--seed", "3", *SAMPLE])
    assert f"wrote {tmp_path / 'a.png'}" in out
    [drawn] = frames(tmp_path / "a.png")
    assert drawn.shape == (SIZE, SIZE, 3)  # the size asked for: the CLI passes it to Kontext as max_area too
    with Image.open(pictures / "in0.png") as im:
        ref = api(kontext_ck, 3, prompt="make it red", image=im.convert("RGB"), height=SIZE, width=SIZE,
                  max_area=SIZE * SIZE).images[0]
    assert np.array_equal(drawn, np.asarray(ref))
    # the picture is what the edit reads: another input, another output
    generated(["generate", kontext_ck, "make it red", "--image", pictures / "in1.png", "-o", tmp_path / "b.png",
               "--seed", "3", *SAMPLE])
    assert not np.array_equal(frames(tmp_path / "b.png")[0], drawn)


def test_compare_kontext_with_an_input_image(kontext_ck, pictures, tmp_path):
    out = generated(["compare", kontext_ck, "make it red", "--image", pictures / "in0.png", "-o", tmp_path / "c.png",
                     *SAMPLE])
    assert "| 0 |" in out and f"wrote {tmp_path / 'c.png'}" in out
    with Image.open(tmp_path / "c.png") as im:
        assert im.width >= 2 * SIZE and im.height >= SIZE  # 16-bit | int4 side by side


def test_edit_pipeline_without_image_is_refused_before_loading(kontext_ck, tmp_path, no_loading):
    rejected([kontext_ck, "make it red", "-o", tmp_path / "a.png", *SAMPLE],
             "FluxKontextPipeline edits an input image: give it with --image FILE", folder=tmp_path)
    rejected([kontext_ck, "make it red", "-o", tmp_path / "a.png", *SAMPLE], "--image FILE", folder=tmp_path,
             command="compare")


def test_image_for_a_text_to_image_checkpoint_is_refused(flux_ck, wan_ck, pictures, tmp_path, no_loading):
    rejected([flux_ck, "a cat", "--image", pictures / "in0.png", "-o", tmp_path / "a.png", *SAMPLE],
             "--image is for edit pipelines", "FluxPipeline takes no input image: leave --image out", folder=tmp_path)
    rejected([wan_ck, "a cat", "--image", pictures / "in0.png", "-o", tmp_path / "a.webp", *WAN],
             "WanPipeline takes no input image", folder=tmp_path)


def test_unreadable_image_is_refused_before_loading(kontext_ck, pictures, tmp_path, no_loading):
    rejected([kontext_ck, "make it red", "--image", pictures / "bad.png", "-o", tmp_path / "a.png", *SAMPLE],
             "--image", "bad.png cannot be read as an image", folder=tmp_path)
    rejected([kontext_ck, "make it red", "--image", pictures / "none.png", "-o", tmp_path / "a.png", *SAMPLE],
             "--image", "none.png: no such file", folder=tmp_path)
    rejected([kontext_ck, "make it red", "--image", pictures, "-o", tmp_path / "a.png", *SAMPLE],
             "is a folder", folder=tmp_path)


# ------------------------------------------------------------------------------------------------ video pipelines
def test_generate_wan_writes_a_lossless_webp_of_the_api_frames(wan_ck, tmp_path):
    target = tmp_path / "clip.webp"
    generated(["generate", wan_ck, "a cat", "-o", target, "--seed", "5", *WAN])
    drawn = frames(target)
    ref = arrays(api(wan_ck, 5, prompt="a cat", height=SIZE, width=SIZE, num_frames=5).frames[0])
    assert len(drawn) == 5 and drawn[0].shape == (SIZE, SIZE, 3)
    assert all(np.array_equal(d, r) for d, r in zip(drawn, ref))  # bit for bit: lossless WebP
    with Image.open(target) as im:
        im.load()  # PIL reads a WebP frame's duration as it decodes it
        assert im.format == "WEBP" and im.info["loop"] == 0 and im.info["duration"] == round(1000 / 16)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.webp"]  # no temporary file left


def test_generate_wan_gifs_numbered_at_the_fps_asked(wan_ck, tmp_path):
    generated(["generate", wan_ck, "a cat", "-o", tmp_path / "clip.gif", "--num-images", "2", "--fps", "8", *WAN])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip-0.gif", "clip-1.gif"]
    ref = api(wan_ck, 0, prompt="a cat", height=SIZE, width=SIZE, num_frames=5, num_videos_per_prompt=2).frames
    for i in range(2):
        drawn = frames(tmp_path / f"clip-{i}.gif")
        assert len(drawn) == 5
        with Image.open(tmp_path / f"clip-{i}.gif") as im:
            assert im.format == "GIF" and im.info["duration"] == 120  # 125 ms in GIF's 10 ms ticks
        # 256 colours a frame: close to the API's frames, not equal
        err = np.mean([np.abs(d.astype(int) - r.astype(int)).mean() for d, r in zip(drawn, arrays(ref[i]))])
        assert err < 8, err
    assert not np.array_equal(frames(tmp_path / "clip-0.gif")[0], frames(tmp_path / "clip-1.gif")[0])


def test_generate_wan_mp4(wan_ck, tmp_path):
    from svdquant.cli.media import mp4_encoder_missing

    if mp4_encoder_missing():
        pytest.skip(f"no .mp4 encoder for diffusers' export_to_video: pip install {mp4_encoder_missing()}")
    generated(["generate", wan_ck, "a cat", "-o", tmp_path / "clip.mp4", *WAN])
    import imageio

    reader = imageio.get_reader(str(tmp_path / "clip.mp4"), "ffmpeg")  # decoded back: 5 frames at 16 fps
    assert sum(1 for _ in reader) == 5 and reader.get_meta_data()["fps"] == 16
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4"]


def test_generate_wan_i2v_animates_the_input_image_as_the_api_does(wan_i2v_ck, pictures, tmp_path):
    target = tmp_path / "clip.webp"
    generated(["generate", wan_i2v_ck, "a cat", "--image", pictures / "in0.png", "-o", target, *WAN])
    with Image.open(pictures / "in0.png") as im:
        ref = arrays(api(wan_i2v_ck, 0, prompt="a cat", image=im.convert("RGB"), height=SIZE, width=SIZE,
                         num_frames=5).frames[0])
    drawn = frames(target)
    assert len(drawn) == 5 and all(np.array_equal(d, r) for d, r in zip(drawn, ref))


def test_wrong_extension_for_the_pipeline_kind(wan_ck, flux_ck, tmp_path, no_loading):
    rejected([wan_ck, "a cat", "-o", tmp_path / "clip.png", *WAN], "WanPipeline makes videos",
             ".webp or .gif, or .mp4", folder=tmp_path)
    rejected([flux_ck, "a cat", "-o", tmp_path / "a.mp4", *SAMPLE], "is a video file, but FluxPipeline draws images",
             folder=tmp_path)
    rejected([flux_ck, "a cat", "-o", tmp_path / "a.avi", *SAMPLE], "image file name", folder=tmp_path)
    rejected([wan_ck, "a cat", "-o", tmp_path / "clip.gif", "--fps", "60", *WAN], "--fps 60",
             "a GIF plays at most 50 frames a second", "clip.webp", folder=tmp_path)


def test_video_options_for_an_image_pipeline_are_refused(flux_ck, tmp_path, no_loading):
    rejected([flux_ck, "a cat", "-o", tmp_path / "a.png", "--num-frames", "5", *SAMPLE],
             "--num-frames is for video pipelines", "FluxPipeline draws images: leave --num-frames out", folder=tmp_path)
    rejected([flux_ck, "a cat", "-o", tmp_path / "a.png", "--fps", "8", *SAMPLE], "--fps is for video pipelines",
             folder=tmp_path)


@pytest.mark.parametrize("n, needles", [
    ("6", ["--num-frames 6", "makes k x 4 + 1 frames", "use 5 or 9"]),
    ("80", ["use 77 or 81"]),
    ("0", ["--num-frames 0", "between 1"]),
])
def test_bad_num_frames_is_refused_before_loading(wan_ck, tmp_path, no_loading, n, needles):
    rejected([wan_ck, "a cat", "-o", tmp_path / "clip.webp", *SAMPLE, "--num-frames", n], *needles, folder=tmp_path)


def test_mp4_without_an_encoder_is_refused_before_loading(wan_ck, tmp_path, monkeypatch, no_loading):
    """This machine may have imageio or OpenCV installed: their absence is simulated where diffusers' own
    export_to_video reads it, its import_utils checks (the command asks the same functions)."""
    from diffusers.utils import import_utils

    monkeypatch.setattr(import_utils, "is_imageio_available", lambda: False)
    monkeypatch.setattr(import_utils, "is_opencv_available", lambda: False)
    rejected([wan_ck, "a cat", "-o", tmp_path / "clip.mp4", *WAN], "writing .mp4 needs a video encoder",
             "pip install imageio imageio-ffmpeg", "or write an animated", "clip.webp", folder=tmp_path)


def test_wan_i2v_without_ftfy_is_refused_before_loading(wan_i2v_ck, pictures, tmp_path, monkeypatch, no_loading):
    monkeypatch.setitem(sys.modules, "ftfy", None)  # what an import sees when the package is not installed
    rejected([wan_i2v_ck, "a cat", "--image", pictures / "in0.png", "-o", tmp_path / "clip.webp", *WAN],
             "WanImageToVideoPipeline runs every prompt through the ftfy package", "pip install ftfy", folder=tmp_path)


def test_compare_and_serve_refuse_what_they_cannot_draw(wan_ck, kontext_ck, tmp_path, no_loading):
    rejected([wan_ck, "a cat", "-o", tmp_path / "c.png", *SAMPLE], "compare draws images",
             "WanPipeline makes videos: for a video pipeline use svdquant generate", folder=tmp_path, command="compare")
    for ck, needle in ((wan_ck, "WanPipeline makes videos; run it with: svdquant generate CHECKPOINT PROMPT -o "
                                "video.webp"),
                       (wan_ck.parent / "wan-int4-base", "WanPipeline makes videos"),
                       (kontext_ck, "FluxKontextPipeline edits an input image; run it with: svdquant generate "
                                    "CHECKPOINT PROMPT --image FILE")):
        rejected([ck, *CPU, "--port", "0"], "serve draws images from a prompt alone", needle, folder=tmp_path,
                 command="serve")


def test_the_server_refuses_a_video_pipeline_built_in_python():
    from svdquant.serve import Engine

    with pytest.raises(ValueError, match="the server draws images from a prompt alone; WanPipeline makes videos"):
        Engine(tm.build_wan_pipeline(), "wan", "cpu")


def test_default_output_follows_the_pipeline(wan_ck, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = generated(["generate", wan_ck, "a cat", *WAN])
    assert "wrote video.webp" in out and len(frames(tmp_path / "video.webp")) == 5


def test_a_failed_write_leaves_no_file(tmp_path):
    """Several files are written whole or not at all: the second one failing removes the first."""
    def write(item, path):
        if item == "bad":
            raise OSError("disk full")
        path.write_text(item)

    with pytest.raises(OSError, match="disk full"):
        write_whole([("good", tmp_path / "a-0.webp"), ("bad", tmp_path / "a-1.webp")], write)
    assert list(tmp_path.iterdir()) == []
