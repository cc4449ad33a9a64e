"""Saving a checkpoint: :func:`save_quantized` writes the folder (metadata, tensor files, SHA-256 hashes, an
optional model card) into a temporary folder, synced to disk, and renames it into place, so a failure or a
crash leaves the old checkpoint or the new one, never a mix."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
from safetensors.torch import save_file

from .._state import peek
from .. import _checks
from .._tiny_facts import TINY_BASE
from .._version import __version__
from .card import base_license, render
from .header import sha256_of
from .layout import (EXPERTS_SINCE, META_FILE, TENSOR_FILE, TEXT_ENCODERS_SINCE, CheckpointError, all_tensors,
                     encoder_tensors, format_version, model_config_of, quantized_encoders, quantized_layers)


def save_quantized(model, path: str | os.PathLike, *, base: str | None = None, report=None,
                   overwrite: bool = False, model_card: bool = False) -> Path:
    """Write a quantized model to the folder ``path`` (created; atomically replaced with ``overwrite``).

    ``model``: the quantized transformer, or its pipeline, which also saves the pipeline's quantized text
    encoders (``text_encoder_2.safetensors``...; see the package doc) and, of a two-expert pipeline (Wan 2.2
    A14B), the second expert (``transformer_2.safetensors``): one checkpoint of both.

    ``base`` records the pipeline (local folder or hub id) the model came from, so
    ``load_pipeline`` and the CLI can find its VAE, text encoders and scheduler.
    ``model_card=True`` also writes README.md for the Hugging Face Hub (:mod:`svdquant.checkpoint.card`):
    base model, license (the base's, when its README is at hand), recipe, ranks, the report's quality
    figures and the GPUs the layers run on.
    """
    from ..quantize import QuantReport

    model, encoders, experts = _saved_models(model)
    path = Path(path)
    loras = [n for m in (model, *encoders.values(), *experts.values()) for n in (peek(m).loras or ())]
    if loras:
        raise CheckpointError(f"LoRAs are loaded ({', '.join(loras)}); checkpoints hold the "
                              "quantized model alone: unload them (svdquant.unload_lora) before saving")
    layers = quantized_layers(model)
    if not layers:
        raise CheckpointError("the model has no quantized layers; run svdquant.quantize(...) on it first")
    for name, expert in experts.items():
        if not quantized_layers(expert):
            raise CheckpointError(f"the pipeline's {name} has no quantized layers, and a checkpoint of the pipeline "
                                  f"holds both experts: svdquant.quantize(pipe, ...) quantizes both (or save "
                                  "pipe.transformer alone)")
    check_output_folder(path, overwrite)
    others = [*encoders.values(), *experts.values()]
    version = max([format_version(layers)] + [format_version(quantized_layers(m)) for m in others]
                  + [TEXT_ENCODERS_SINCE] * bool(encoders) + [EXPERTS_SINCE] * bool(experts))
    if report is not None and not isinstance(report, QuantReport):
        raise TypeError(f"report= takes the QuantReport svdquant.quantize returned, got {type(report).__name__}")
    base, local = _checked_base(base)
    meta = {
        "format": "svdquant",
        "format_version": version,
        "svdquant_version": __version__,
        "model_class": type(model).__name__,
        "model_config": model_config_of(model),
        # A local base is stored relative to the checkpoint, so the two can move together.
        "base": os.path.relpath(Path(base).resolve(), path.resolve()) if local else base,
        "base_is_local": local,
        "recipe": peek(model).recipe,
        "layers": layers,
        # where the layers came from when not from svdquant's quantizer ("nunchaku"): the load then checks only
        # what holds for any quantizer (see check_values)
        **({"source": peek(model).source} if peek(model).source else {}),
        "report": report.to_dict() if report is not None else None,
    }
    files = _encoder_entries(meta, encoders)
    files.update(_expert_entries(meta, experts))
    readme = (lambda meta: render(meta, license=base_license(base, local))) if model_card else None
    _write_folder(path, meta, all_tensors(model), files, readme)
    return path


def _saved_models(model) -> tuple[nn.Module, dict[str, nn.Module], dict[str, nn.Module]]:
    """What :func:`save_quantized` was given: a pipeline (its transformer, quantized text encoders and second
    expert) or a model (alone)."""
    from ..models.pipeline_needs import SECOND_EXPERT, second_expert

    encoders, experts = {}, {}
    if not isinstance(model, nn.Module) and isinstance(getattr(model, "transformer", None), nn.Module):
        encoders = quantized_encoders(model)
        if second_expert(model) is not None:
            experts[SECOND_EXPERT] = second_expert(model)
        model = model.transformer
    elif peek(model).text_encoders:
        warnings.warn(f"the pipeline's text encoders ({', '.join(peek(model).text_encoders)}) were quantized "
                      "too; save_quantized(pipe, ...) saves them with the transformer, this saves the transformer "
                      "alone", stacklevel=3)
    if not isinstance(model, nn.Module):
        raise TypeError(f"save_quantized takes the quantized model (e.g. pipe.transformer, pipe.unet) or a pipeline "
                        f"with a .transformer, got {type(model).__name__}")
    return model, encoders, experts


def _checked_base(base) -> tuple[str | None, bool]:
    """``base=`` as recorded, and whether it is a local folder (stored relative to the checkpoint)."""
    if base is not None:
        base = str(base)
        if base != TINY_BASE and base.startswith(("/", ".", "~")) and not Path(base).expanduser().exists():
            raise CheckpointError(f"base={base!r} does not exist; pass the base pipeline's folder or hub id")
    # "tiny" names the shipped model even if the current folder happens to hold a "tiny" folder
    return base, bool(base) and base != TINY_BASE and Path(base).exists()


# a tensor file beside the transformer's: its tensors and its safetensors header metadata (what the file is)
_Extra = tuple[dict[str, torch.Tensor], dict[str, str]]


def _encoder_entries(meta: dict[str, Any], encoders: dict[str, nn.Module]) -> dict[str, _Extra]:
    """Each quantized text encoder's entry under ``meta["text_encoders"]``; returns their files by name."""
    encoder_files = {}
    if encoders:
        meta["text_encoders"] = {}
        for name, te in encoders.items():
            tensors, tied = encoder_tensors(te)
            meta["text_encoders"][name] = {"model_class": type(te).__name__, "model_config": model_config_of(te),
                                           "layers": quantized_layers(te), "tied": tied,
                                           "recipe": peek(te).recipe}
            encoder_files[f"{name}.safetensors"] = (tensors, {"svdquant_text_encoder": name})
    return encoder_files


def _expert_entries(meta: dict[str, Any], experts: dict[str, nn.Module]) -> dict[str, _Extra]:
    """The second expert's entry under ``meta["experts"]`` (what the transformer's own entries say of it); returns
    its file by name."""
    files = {}
    if experts:
        meta["experts"] = {}
        for name, m in experts.items():
            meta["experts"][name] = {"model_class": type(m).__name__, "model_config": model_config_of(m),
                                     "layers": quantized_layers(m), "recipe": peek(m).recipe}
            files[f"{name}.safetensors"] = (all_tensors(m), {"svdquant_expert": name})
    return files


def _write_folder(path: Path, meta: dict[str, Any], tensors: dict[str, torch.Tensor],
                  extra_files: dict[str, _Extra], readme: Callable[[dict], str] | None) -> None:
    """The checkpoint folder, written in a temporary folder beside ``path`` and renamed into place (replacing an
    old checkpoint only once the new one is complete on disk). ``readme``: the model card, from the final meta."""
    text = json.dumps(meta, indent=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes 0700; a checkpoint should be as readable as a normal folder
    try:
        # the header keeps the metadata without the hashes: they are hashes of the very file it sits in
        save_file(tensors, str(tmp / TENSOR_FILE), metadata={"svdquant": text})
        (tmp / TENSOR_FILE).chmod(0o666 & ~umask)  # safetensors creates it 0600; follow the umask like the rest
        written = [TENSOR_FILE, META_FILE]
        for fname, (extra, header) in extra_files.items():
            save_file(extra, str(tmp / fname), metadata=header)
            (tmp / fname).chmod(0o666 & ~umask)
            written.append(fname)
        meta["sha256"] = {f: sha256_of(tmp / f) for f in [TENSOR_FILE, *extra_files]}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1))
        if readme is not None:
            (tmp / "README.md").write_text(readme(meta), encoding="utf-8")
            written.append("README.md")
        for f in written:  # on disk before the rename publishes them: a crash leaves the old
            fsync_file(tmp / f)             # checkpoint or the new one, never a renamed folder of empty files
        _publish(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _publish(tmp: Path, path: Path) -> None:
    """Rename the finished folder ``tmp`` to ``path``, the previous checkpoint there put back if that fails."""
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        path.rename(old)
        try:
            tmp.rename(path)
        except BaseException:
            old.rename(path)  # put the previous checkpoint back before reporting the failure
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(path)


def fsync_file(path: Path) -> None:
    """Flush ``path``'s data to disk (before a rename publishes it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_output_folder(path: str | os.PathLike, overwrite: bool, name: str = "path") -> None:
    """Raise CheckpointError unless a checkpoint can be written to the folder ``path``.

    ``overwrite`` replaces an earlier checkpoint (or an empty folder), never a folder of other files:
    a mistyped ``-o .`` must not delete the current folder.
    """
    path = Path(path)
    try:
        _checks.output_parent(name, path)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    if not path.exists():
        return
    if not path.is_dir():
        raise CheckpointError(f"{path} is a file; a checkpoint is a folder: choose another {name}")
    if not overwrite:
        fix = "--overwrite" if name.startswith("-") else "overwrite=True"
        raise CheckpointError(f"{path} already exists; choose another folder or pass {fix}")
    if any(path.iterdir()) and not (path / META_FILE).is_file():
        raise CheckpointError(f"{path} is a folder of other files, not an svdquant checkpoint; overwrite replaces "
                              "only a checkpoint: choose another folder")

