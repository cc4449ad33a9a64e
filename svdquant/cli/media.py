"""What ``generate`` and ``compare`` write, and what a pipeline of each kind needs from the command line: image
files; a video pipeline's frames as an animated WebP or GIF (PIL) or an MP4 (diffusers' ``export_to_video``);
an edit pipeline's ``--image``. Everything here is decided before a model loads (the pipeline's kind is read from
its base's model_index.json), and every file is written under a temporary name and renamed once all are done."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from .. import _checks
from .common import UsageError

IMAGE_HINT = ".png, .jpg or .webp"
VIDEO_SUFFIXES = (".webp", ".gif", ".mp4")  # .webp / .gif: animated, written with PIL; .mp4: export_to_video
VIDEO_HINT = "an animated .webp or .gif, or .mp4"
DEFAULT_VIDEO = "video.webp"  # needs nothing beyond PIL, unlike .mp4
DEFAULT_FPS = 16  # Wan 2.1's frame rate (what its videos were trained at)


def _is_image_name(suffix: str) -> bool:
    from PIL import Image

    fmt = Image.registered_extensions().get(suffix)
    return fmt is not None and fmt in Image.SAVE


def targets(name: str, output, n: int, overwrite: bool) -> list[Path]:
    """The files a command will write (``n`` of them: ``stem-i.ext`` for more than one), checked before it samples
    anything; whether the name fits the pipeline is :func:`check_output_kind`'s."""
    out = Path(output)
    suffix = out.suffix.lower()
    if not (_is_image_name(suffix) or suffix in VIDEO_SUFFIXES):
        raise UsageError(f"{name} {out}: give an image file name ending in {IMAGE_HINT} (a video pipeline's: "
                         f"{VIDEO_HINT})")
    if out.is_dir():
        raise UsageError(f"{name} {out} is a folder; give an image file name such as {out / 'image.png'}")
    _checks.output_parent(name, out)
    paths = [out] if n == 1 else [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(n)]
    for t in paths:
        if t.is_dir():
            raise UsageError(f"{name} {out}: {t} is a folder")
        if t.exists() and not overwrite:
            raise UsageError(f"{t} already exists; choose another {name} or pass --overwrite")
    return paths


GIF_MAX_FPS = 50  # GIF times frames in 10 ms ticks, and browsers play a frame of under 2 ticks at 100 ms


def check_output_kind(name: str, out: Path, cls: str, video: bool, fps: int | None = None) -> None:
    """The file name fits what the pipeline makes: a video pipeline writes an animation (a GIF at most
    :data:`GIF_MAX_FPS` frames a second) or an .mp4 (whose encoder must be installed), an image pipeline no .mp4."""
    suffix = out.suffix.lower()
    if video and suffix == ".gif" and (fps or DEFAULT_FPS) > GIF_MAX_FPS:
        raise UsageError(f"--fps {fps}: a GIF plays at most {GIF_MAX_FPS} frames a second; write "
                         f"{out.with_suffix('.webp')} or .mp4 instead, or use --fps {GIF_MAX_FPS} or less")
    if video and suffix not in VIDEO_SUFFIXES:
        raise UsageError(f"{name} {out}: {cls} makes videos; give {VIDEO_HINT} file name, e.g. "
                         f"{out.with_suffix('.webp')}")
    if not video and suffix == ".mp4":
        raise UsageError(f"{name} {out} is a video file, but {cls} draws images; give an image file name ending "
                         f"in {IMAGE_HINT}")
    missing = mp4_encoder_missing() if video and suffix == ".mp4" else None
    if missing:
        raise UsageError(f"{name} {out}: writing .mp4 needs a video encoder, which is not installed: pip install "
                         f"{missing}, or write an animated {out.with_suffix('.webp')}")


def mp4_encoder_missing() -> str | None:
    """What to install before diffusers' ``export_to_video`` can write an .mp4, or None: it writes with imageio
    (whose ffmpeg comes from imageio-ffmpeg) when imageio is installed, and only otherwise with OpenCV."""
    from diffusers.utils import import_utils

    if import_utils.is_imageio_available():
        return None if importlib.util.find_spec("imageio_ffmpeg") is not None else "imageio-ffmpeg"
    return None if import_utils.is_opencv_available() else "imageio imageio-ffmpeg"


def check_frames(num_frames: int, step: int, cls: str) -> None:
    """``--num-frames`` as the pipeline's VAE takes it: k x ``step`` + 1 (diffusers rounds any other count down
    with a warning in the log only)."""
    if (num_frames - 1) % step:
        lo = (num_frames - 1) // step * step + 1
        raise UsageError(f"--num-frames {num_frames}: {cls} makes k x {step} + 1 frames (its VAE packs {step} frames "
                         f"into each latent frame after the first); use {lo} or {lo + step}")


def input_image(path):
    """``--image``: the file opened as an RGB picture, checked (exists, is an image) before anything loads."""
    from ..calibration.inputs import check_images

    try:
        return check_images([path], name="--image")[0]
    except ValueError as e:
        raise UsageError(str(e)) from None


def write_whole(pairs, write) -> None:
    """``write(item, path)`` each item under a temporary name beside its target, then rename them all: an error or
    Ctrl-C part way leaves no partial file and no half-set of files."""
    tmps = []
    try:
        for item, target in pairs:
            target.parent.mkdir(parents=True, exist_ok=True)
            # the same suffix: PIL and ffmpeg pick the format from it
            tmps.append(target.with_name(f".{target.stem}.tmp-{os.getpid()}{target.suffix}"))
            write(item, tmps[-1])
        for tmp, (_, target) in zip(tmps, pairs):
            os.replace(tmp, target)
    finally:
        for tmp in tmps:
            tmp.unlink(missing_ok=True)


def save_image(image, path: Path) -> None:
    image.save(path)


def video_writer(fps: int):
    """A ``write(frames, path)`` for :func:`write_whole`: ``frames`` (PIL images) at ``fps`` frames a second."""

    def write(frames, path: Path) -> None:
        if path.suffix.lower() == ".mp4":
            from diffusers.utils import export_to_video

            export_to_video(frames, str(path), fps=fps)
            return
        # WebP lossless: the frames as the pipeline drew them, as PNG keeps an image (.mp4 is the small file).
        # GIF: 256 colours a frame, chosen by PIL, and durations in 10 ms ticks (16 fps plays at 16.7).
        extra = {"lossless": True} if path.suffix.lower() == ".webp" else {}
        frames[0].save(path, save_all=True, append_images=list(frames[1:]), duration=round(1000 / fps), loop=0,
                       **extra)

    return write
