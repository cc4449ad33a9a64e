"""Input images for calibrating an edit pipeline (FLUX.1 Kontext, Qwen-Image-Edit, Wan image-to-video).

``Calibration(images=[...])`` takes PIL images or image file paths; prompt ``i`` edits image ``i mod n``.
Paths are checked (and opened) when the Calibration is made, so that a missing or unreadable file fails in one
line before the pipeline loads, not after minutes of calibration.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

MAX_IMAGES = 1024  # more than the 128 default prompts can use: a glob that caught a whole photo library


def check_images(images: Sequence[Any], name: str = "images") -> list:
    """``images`` as a list of PIL images (paths opened and converted to RGB); ValueError naming the fix."""
    from PIL import Image

    if isinstance(images, (str, os.PathLike)) or isinstance(images, Image.Image):
        raise ValueError(f"{name}= takes a list of images (PIL images or file paths), got one; use {name}=[...]")
    try:
        images = list(images)
    except TypeError:
        raise ValueError(f"{name}= takes a list of PIL images or image file paths, got "
                         f"{type(images).__name__}") from None
    if not images:
        raise ValueError(f"{name}=[] is empty; give at least one input image, or leave {name} out")
    if len(images) > MAX_IMAGES:
        raise ValueError(f"{name}= holds {len(images)} images; calibration uses one per prompt: give at most "
                         f"{MAX_IMAGES}")
    return [_open(im, name) for im in images]


def _open(im, name: str):
    from PIL import Image, UnidentifiedImageError

    if isinstance(im, Image.Image):
        return im.convert("RGB") if im.mode != "RGB" else im
    if not isinstance(im, (str, os.PathLike)):
        raise ValueError(f"{name}= items must be PIL images or image file paths, got {type(im).__name__}")
    path = Path(im).expanduser()
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "no such file"
        raise ValueError(f"{name}: {path}: {what}; give image files (PNG, JPEG, WebP...)")
    try:
        with Image.open(path) as f:
            return f.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{name}: {path} cannot be read as an image ({e}); give PNG, JPEG or WebP files") from None


def image_for(images: list | None, prompt_index: int) -> dict:
    """The pipeline keyword for prompt ``prompt_index``: ``{"image": ...}`` (none without images)."""
    if images is None:
        return {}
    return {"image": images[prompt_index % len(images)]}
