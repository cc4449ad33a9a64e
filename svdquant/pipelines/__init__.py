"""Pipelines: loading the 16-bit base a checkpoint came from, and the project's tiny offline model."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..integrations.diffusers.compat import dtype_keyword
from ..models.sizes import check_size, size_multiple
from .tiny import (
    ASSET_DIR, CIFAR10_CLASSES, PIPELINE_FILE, TINY_BASE, ClassConditioner, TinyFluxPipeline, tiny_flux_config,
)


def _is_tiny(base) -> bool:
    return Path(base, PIPELINE_FILE).is_file()


def _check_local(base) -> None:
    """A base spelled as a path (``/x``, ``./x``, ``~/x``) that is not there: say so, instead of
    letting diffusers try it as a hub id and report a connection error."""
    if str(base).startswith(("/", ".", "~")) and not Path(base).expanduser().exists():
        raise FileNotFoundError(f"no base pipeline at {base}: the folder does not exist")


def transformer_class_of(base: str | os.PathLike, component: str = "transformer") -> str | None:
    """The transformer class a base pipeline (folder or hub id) holds, from its config files; ``component``:
    another one (``transformer_2``, a two-expert pipeline's second expert); None where it has none."""
    if str(base) == TINY_BASE:
        return "FluxTransformer2DModel" if component == "transformer" else None
    _check_local(base)
    if _is_tiny(base):
        tiny = json.loads(Path(base, PIPELINE_FILE).read_text())["transformer_class"]
        return tiny if component == "transformer" else None
    from diffusers import DiffusionPipeline

    try:
        cfg = DiffusionPipeline.load_config(str(base))
    except Exception as e:
        raise FileNotFoundError(
            f"cannot read the base pipeline {base!s}: {e}. Pass a local diffusers pipeline folder "
            "(with model_index.json) or a hub id you can download"
        ) from None
    entry = cfg.get(component)
    # an optional component the pipeline lacks is saved as [null, null]
    return entry[1] if isinstance(entry, (list, tuple)) and len(entry) == 2 and isinstance(entry[1], str) else None


def pipeline_class_of(base: str | os.PathLike) -> str | None:
    """The pipeline class a base pipeline (folder or hub id) is, from its model_index.json (``TinyFluxPipeline`` for
    the tiny model); None where it names none. Read before loading, to check a command's inputs against it."""
    if str(base) == TINY_BASE or _is_tiny(base):
        return TinyFluxPipeline.__name__
    from diffusers import DiffusionPipeline

    try:
        name = DiffusionPipeline.load_config(str(base)).get("_class_name")
    except Exception:  # unreadable: loading the pipeline reports it in its own words
        return None
    return name if isinstance(name, str) else None


def frame_step_of(base: str | os.PathLike) -> int:
    """The temporal compression of a video pipeline's VAE (its frame counts are k x this + 1), from the VAE's
    config.json as the pipeline reads it (``vae.config.scale_factor_temporal``, default 4: Wan's)."""
    from diffusers import ModelMixin

    try:
        step = ModelMixin.load_config(str(base), subfolder="vae").get("scale_factor_temporal", 4)
    except Exception:  # no readable VAE config: the pipeline's own fallback, as diffusers' Wan pipelines take it
        return 4
    return step if isinstance(step, int) and not isinstance(step, bool) and step > 0 else 4


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
    kw = {"transformer": transformer} if transformer is not None else {}
    kw.update(components)
    if torch_dtype is not None:
        kw[dtype_keyword()] = torch_dtype
    try:
        # safetensors only, for every component (diffusers passes it on to transformers): a pickled .bin can run
        # code as it loads, and a base folder may come from the same download as the checkpoint naming it
        return _pipeline_class(base).from_pretrained(str(base), use_safetensors=True, **kw)
    except (OSError, ValueError) as e:
        raise pickled_only_error(base, e) from None


def _pipeline_class(base):
    """The pipeline class ``base``'s model_index.json names, else DiffusionPipeline. DiffusionPipeline.from_pretrained
    asks DiffusionPipeline, not the class it resolves, which components are optional (diffusers 0.42), so an
    optional component given to it (Wan's ``transformer`` and ``transformer_2``) is dropped and the base's own
    16-bit one loaded in its place; the pipeline's own class honours it."""
    import diffusers
    from diffusers import DiffusionPipeline

    try:
        name = DiffusionPipeline.load_config(str(base)).get("_class_name")
        cls = getattr(diffusers, name, None) if isinstance(name, str) else None
    except Exception:  # unreadable or unknown: from_pretrained reports it in its own words
        return DiffusionPipeline
    return cls if isinstance(cls, type) and issubclass(cls, DiffusionPipeline) else DiffusionPipeline


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


__all__ = ["TinyFluxPipeline", "ClassConditioner", "CIFAR10_CLASSES", "tiny_flux_config", "load_base_pipeline",
           "transformer_class_of", "pipeline_class_of", "frame_step_of", "check_size", "TINY_BASE"]
