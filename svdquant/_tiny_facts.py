"""What the command line checks about the tiny model and its demo before any work: the model's name, classes
and size, and ``run_demo``'s arguments.

Kept apart from ``pipelines/``, which imports diffusers (~3-6 s on a 2-core machine): a mistyped option of
``svdquant quantize tiny`` or ``svdquant demo`` is reported before diffusers is imported. ``pipelines.tiny`` and
``pipelines.demo`` re-export these.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from . import _checks
from .recipes import DEMO_VARIANTS, get_recipe

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
PIPELINE_FILE = "pipeline.json"
# As a base pipeline name (``svdquant quantize tiny``, a checkpoint's recorded base), the tiny model
# shipped in the package: nothing needs to be saved next to a checkpoint made from it.
TINY_BASE = "tiny"
IMAGE_SIZE = 32


def check_tiny_size(image_size: int, name: str, value) -> None:
    """The tiny model was trained at one size only; any other would silently be a different model."""
    if value is not None and value != image_size:
        raise ValueError(f"{_checks.show(name, value)}: the tiny model draws {image_size}x{image_size} images only; "
                         "leave height and width unset")


OUTPUTS = ("compare.png", "quality.md")  # plus one checkpoint folder per variant


def check_demo_args(out: str | Path, recipes: Sequence[str], steps: int, seed: int, overwrite: bool,
                    names=("out", "recipes", "steps", "seed")) -> list:
    """Every argument of :func:`run_demo`, checked before anything is quantized; returns the recipes.

    ``names`` are how the caller spells the arguments (the CLI passes its option names)."""
    n_out, n_recipes, n_steps, n_seed = names
    _checks.steps(n_steps, steps)
    _checks.seed(n_seed, seed)
    if isinstance(recipes, str) or not recipes:
        raise ValueError(f"{_checks.show(n_recipes, recipes)}: give a list of one or more variants, "
                         f"e.g. {' '.join(DEMO_VARIANTS)}")
    built = [get_recipe(r) for r in recipes]  # an unknown name fails here, before the first quantization
    seen = set()
    for r in built:
        if r.name in seen:
            raise ValueError(f"{_checks.show(n_recipes, ' '.join(recipes))}: {r.name} is listed twice")
        seen.add(r.name)
    out = Path(out)
    _checks.output_parent(n_out, out)  # the demo is staged beside out, then moved into it
    if out.exists() and not out.is_dir():
        raise ValueError(f"{_checks.show(n_out, out)} is a file; the demo writes a folder")
    if out.is_dir():
        _checks.writable_folder(n_out, out, out)
    clash = [name for name in (*OUTPUTS, *seen) if (out / name).exists()]
    if clash and not overwrite:
        fix = "--overwrite" if n_out.startswith("-") else "overwrite=True"
        raise ValueError(f"{out} already holds {', '.join(clash)}; choose another folder or pass {fix}")
    return built
