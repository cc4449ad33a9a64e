"""Pipelines: loading the 16-bit base a checkpoint came from, and the project's tiny offline model."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .tiny import CIFAR10_CLASSES, PIPELINE_FILE, ClassConditioner, TinyFluxPipeline, tiny_flux_config


def _is_tiny(base) -> bool:
    return Path(base, PIPELINE_FILE).is_file()


def transformer_class_of(base: str | os.PathLike) -> str | None:
    """The transformer class a base pipeline (folder or hub id) holds, from its config files."""
    if _is_tiny(base):
        return json.loads(Path(base, PIPELINE_FILE).read_text())["transformer_class"]
    from diffusers import DiffusionPipeline

    try:
        cfg = DiffusionPipeline.load_config(str(base))
    except Exception as e:
        raise FileNotFoundError(
            f"cannot read the base pipeline {base!s}: {e}. Pass a local diffusers pipeline folder "
            "(with model_index.json) or a hub id you can download"
        ) from None
    entry = cfg.get("transformer")
    return entry[1] if isinstance(entry, (list, tuple)) and len(entry) == 2 else None


def _dtype_keyword() -> str:
    """``dtype`` on diffusers that renamed ``torch_dtype`` (and warn about the old name), else ``torch_dtype``."""
    from diffusers.utils import deprecation_utils

    return "dtype" if hasattr(deprecation_utils, "_TORCH_DTYPE_DEPRECATION_MESSAGE") else "torch_dtype"


def load_base_pipeline(base: str | os.PathLike, transformer=None, torch_dtype: torch.dtype | None = None):
    """The 16-bit pipeline at ``base``, optionally with ``transformer`` in place of its own."""
    if _is_tiny(base):
        return TinyFluxPipeline.from_pretrained(base, transformer=transformer, torch_dtype=torch_dtype)
    from diffusers import DiffusionPipeline

    kw = {"transformer": transformer} if transformer is not None else {}
    if torch_dtype is not None:
        kw[_dtype_keyword()] = torch_dtype
    try:
        return DiffusionPipeline.from_pretrained(str(base), **kw)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"cannot load the base pipeline {base!s}: {e}") from None


__all__ = ["TinyFluxPipeline", "ClassConditioner", "CIFAR10_CLASSES", "tiny_flux_config", "load_base_pipeline",
           "transformer_class_of"]
