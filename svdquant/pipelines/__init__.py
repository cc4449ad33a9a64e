"""Pipelines: loading the 16-bit base a checkpoint came from, and the project's tiny offline model."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .. import _checks
from .tiny import (
    ASSET_DIR, CIFAR10_CLASSES, PIPELINE_FILE, TINY_BASE, ClassConditioner, TinyFluxPipeline, check_tiny_size, tiny_flux_config,
)


def _is_tiny(base) -> bool:
    return Path(base, PIPELINE_FILE).is_file()


def _check_local(base) -> None:
    """A base spelled as a path (``/x``, ``./x``, ``~/x``) that is not there: say so, instead of
    letting diffusers try it as a hub id and report a connection error."""
    if str(base).startswith(("/", ".", "~")) and not Path(base).expanduser().exists():
        raise FileNotFoundError(f"no base pipeline at {base}: the folder does not exist")


def transformer_class_of(base: str | os.PathLike) -> str | None:
    """The transformer class a base pipeline (folder or hub id) holds, from its config files."""
    if str(base) == TINY_BASE:
        return "FluxTransformer2DModel"
    _check_local(base)
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


def tiny_transformer_config(base) -> dict | None:
    """The transformer config of a tiny base (the name ``tiny`` or a saved TinyFluxPipeline folder), else None.
    A FLUX checkpoint of another size passes the class check against these; the config tells them apart."""
    if str(base) == TINY_BASE:
        if not (ASSET_DIR / PIPELINE_FILE).exists():
            return tiny_flux_config()
        folder = ASSET_DIR
    elif _is_tiny(base):
        folder = Path(base)
    else:
        return None
    return json.loads((folder / "transformer" / "config.json").read_text())


def _dtype_keyword() -> str:
    """``dtype`` on diffusers that renamed ``torch_dtype`` (and warn about the old name), else ``torch_dtype``."""
    from diffusers.utils import deprecation_utils

    return "dtype" if hasattr(deprecation_utils, "_TORCH_DTYPE_DEPRECATION_MESSAGE") else "torch_dtype"


def load_base_pipeline(base: str | os.PathLike, transformer=None, torch_dtype: torch.dtype | None = None,
                       **components):
    """The 16-bit pipeline at ``base``, optionally with ``transformer`` (and ``components``, e.g. quantized
    ``text_encoder_2=``) in place of its own: those are not read from ``base``."""
    if components and (str(base) == TINY_BASE or _is_tiny(base)):
        raise ValueError(f"the tiny model has no {', '.join(components)}; a checkpoint of it holds none")
    if str(base) == TINY_BASE:
        if torch_dtype is None:  # as stored: match the transformer given, so the two can run together
            floats = [p.dtype for p in (transformer.parameters() if transformer is not None else ())
                      if p.dtype.is_floating_point]
            torch_dtype = floats[0] if floats else torch.float32
        pipe = TinyFluxPipeline.default(torch_dtype)
        if transformer is not None:
            pipe.transformer = transformer.eval()
        return pipe
    _check_local(base)
    if _is_tiny(base):
        return TinyFluxPipeline.from_pretrained(base, transformer=transformer, torch_dtype=torch_dtype)
    from diffusers import DiffusionPipeline

    kw = {"transformer": transformer} if transformer is not None else {}
    kw.update(components)
    if torch_dtype is not None:
        kw[_dtype_keyword()] = torch_dtype
    try:
        # safetensors only, for every component (diffusers passes it on to transformers): a pickled .bin can run
        # code as it loads, and a base folder may come from the same download as the checkpoint naming it
        return DiffusionPipeline.from_pretrained(str(base), use_safetensors=True, **kw)
    except (OSError, ValueError) as e:
        raise pickled_only_error(base, e) from None


PICKLED = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def pickled_only_error(base, e: Exception) -> Exception:
    """The error for a base pipeline that failed to load: a clear one when it holds pickled weights only."""
    folder = Path(str(base)).expanduser()
    pickles = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.suffix in PICKLED) \
        if folder.is_dir() else []
    if pickles and "safetensors" in str(e).lower():
        return ValueError(f"the base pipeline {base} holds pickled weights ({pickles[0]}) where safetensors are "
                          "needed; "
                          "svdquant never unpickles (a pickle can run code as it loads): convert them to .safetensors "
                          "(e.g. load and save_pretrained it once in a trusted environment)")
    return FileNotFoundError(f"cannot load the base pipeline {base!s}: {e}")


def size_multiple(pipe) -> int:
    """What image heights and widths must be a multiple of for ``pipe`` (diffusers otherwise resizes quietly,
    or refuses): its transformer's adapter knows the latent pixels per token (:mod:`svdquant.models`)."""
    from ..models.pipeline_needs import size_multiple as from_adapter

    return from_adapter(pipe)


def check_size(pipe, height=None, width=None, names=("height", "width")) -> None:
    """Raise ValueError if ``pipe`` cannot draw at this size, naming the sizes it can."""
    for name, v in zip(names, (height, width)):
        if v is None:
            continue
        if isinstance(pipe, TinyFluxPipeline):
            check_tiny_size(pipe.image_size, name, v)
        else:
            _checks.size(name, v, size_multiple(pipe))


__all__ = ["TinyFluxPipeline", "ClassConditioner", "CIFAR10_CLASSES", "tiny_flux_config", "load_base_pipeline",
           "transformer_class_of", "check_size", "TINY_BASE"]
