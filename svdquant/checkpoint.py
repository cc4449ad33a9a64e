"""Checkpoints: a folder with ``svdquant.json`` (metadata) and ``transformer.safetensors``.

    svdquant.save_quantized(pipe.transformer, "flux-int4", base="black-forest-labs/FLUX.1-dev")
    transformer = svdquant.load_quantized("flux-int4", device="cuda")
    pipe = svdquant.load_pipeline("black-forest-labs/FLUX.1-dev", "flux-int4")

``svdquant.json`` holds the format version, the recipe, the model class and config,
the base pipeline it was made from and every quantized layer's layout; the same JSON is
copied into the safetensors header, so the tensor file alone still says what it is.
The safetensors file holds the whole transformer: packed 4-bit layers and the 16-bit
layers that were kept. Loading builds the model on the meta device, swaps in empty
quantized layers and assigns the stored tensors, so the 16-bit weights of quantized
layers are never materialized. safetensors only: nothing is unpickled.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from .modules import SVDQConv1x1, SVDQLinear

FORMAT_VERSION = 2
# Version 2 added the two-level ``int4m`` layers (a ``wmult`` buffer). A checkpoint is written
# with the lowest version that holds its layers, so older svdquant still reads the rest.
_FORMAT_SINCE = {"int4m": 2}
META_FILE = "svdquant.json"
TENSOR_FILE = "transformer.safetensors"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as asked: missing, corrupt, or for another model."""


def _layers(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Every quantized layer's type and constructor arguments, by module name."""
    out, inner = {}, set()
    for name, m in model.named_modules():  # parents come before their children
        if isinstance(m, SVDQConv1x1):
            out[name] = {"type": "conv1x1", **m.linear.config()}
            inner.add(f"{name}.linear")
        elif isinstance(m, SVDQLinear) and name not in inner:
            out[name] = {"type": "linear", **m.config()}
    return out


def _all_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict plus non-persistent buffers (which a meta-device build cannot recreate)."""
    tensors = dict(model.state_dict())
    for name, b in model.named_buffers():
        if b is not None and name not in tensors:
            tensors[name] = b
    return {k: v.detach().contiguous().cpu() for k, v in tensors.items()}


def _model_config(model: nn.Module) -> dict[str, Any]:
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise CheckpointError(f"{type(model).__name__} has no .config; only diffusers-style models can be saved")
    return json.loads(json.dumps(dict(cfg), default=lambda o: list(o) if isinstance(o, tuple) else str(o)))


def save_quantized(model: nn.Module, path: str | os.PathLike, *, base: str | None = None, report=None,
                   overwrite: bool = False) -> Path:
    """Write a quantized model to the folder ``path`` (created; atomically replaced with ``overwrite``).

    ``base`` records the pipeline (local folder or hub id) the model came from, so
    ``load_pipeline`` and the CLI can find its VAE, text encoders and scheduler.
    """
    from . import __version__

    path = Path(path)
    if getattr(model, "_svdquant_loras", None):
        raise CheckpointError(f"LoRAs are loaded ({', '.join(model._svdquant_loras)}); checkpoints hold the "
                              "quantized model alone: unload them (svdquant.unload_lora) before saving")
    layers = _layers(model)
    if not layers:
        raise CheckpointError("the model has no quantized layers; run svdquant.quantize(...) on it first")
    if path.exists() and not overwrite:
        raise CheckpointError(f"{path} already exists; choose another folder or pass overwrite=True (--overwrite)")
    version = max([1] + [_FORMAT_SINCE.get(cfg.get(k), 1) for cfg in layers.values()
                         for k in ("weights", "activations")])
    meta = {
        "format": "svdquant",
        "format_version": version,
        "svdquant_version": __version__,
        "model_class": type(model).__name__,
        "model_config": _model_config(model),
        # A local base is stored relative to the checkpoint, so the two can move together.
        "base": os.path.relpath(Path(base).resolve(), path.resolve()) if base and Path(base).exists() else base,
        "base_is_local": bool(base and Path(base).exists()),
        "recipe": getattr(model, "_svdquant_recipe", None),
        "layers": layers,
        "report": report.to_dict() if report is not None else None,
    }
    text = json.dumps(meta, indent=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes 0700; a checkpoint should be as readable as a normal folder
    try:
        save_file(_all_tensors(model), str(tmp / TENSOR_FILE), metadata={"svdquant": text})
        (tmp / META_FILE).write_text(text)
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
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint's metadata, with a clear error for anything that is not an svdquant checkpoint."""
    path = Path(path)
    meta_file = path / META_FILE if path.is_dir() else path
    if not path.exists():
        raise CheckpointError(f"no svdquant checkpoint at {path}: the path does not exist")
    if path.is_dir() and not meta_file.exists():
        raise CheckpointError(f"{path} is not an svdquant checkpoint: {META_FILE} is missing")
    if meta_file.suffix == ".safetensors":
        try:
            with safe_open(str(meta_file), "pt") as f:
                text = (f.metadata() or {}).get("svdquant")
        except Exception as e:  # safetensors raises its own error types for bad headers
            raise CheckpointError(f"{meta_file} is not a readable safetensors file ({e})") from None
        if text is None:
            raise CheckpointError(f"{meta_file} has no svdquant metadata; was it written by svdquant?")
    else:
        text = meta_file.read_text()
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{meta_file} is not valid JSON ({e}); the checkpoint is corrupt") from None
    if not isinstance(meta, dict) or meta.get("format") != "svdquant":
        raise CheckpointError(f"{meta_file} is not svdquant metadata")
    version = meta.get("format_version")
    if not isinstance(version, int):
        raise CheckpointError(f"{meta_file} has no integer format_version ({version!r}); the checkpoint is corrupt")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{meta_file} has format version {meta['format_version']}; this svdquant reads up to {FORMAT_VERSION}. "
            "Upgrade svdquant."
        )
    for key, kind in (("model_class", str), ("model_config", dict), ("layers", dict)):
        if not isinstance(meta.get(key), kind):
            raise CheckpointError(f"{meta_file} lacks a valid {key!r} entry; the checkpoint is corrupt")
    return meta


def _model_class(name: str, where: Path):
    import diffusers

    cls = getattr(diffusers, name, None)
    if cls is None:
        raise CheckpointError(f"{where} is a checkpoint of {name}, which this diffusers ({diffusers.__version__}) "
                              "lacks; install the diffusers version it was made with")
    return cls


def _empty_quantized_model(meta: dict[str, Any], where: Path, weight_mode: str = "auto") -> nn.Module:
    cls = _model_class(meta["model_class"], where)
    with torch.device("meta"):
        try:
            model = cls.from_config(meta["model_config"])
        except Exception as e:
            raise CheckpointError(f"{where}: {meta['model_class']} cannot be built from the stored config ({e})") from None
    for name, cfg in meta["layers"].items():
        cfg = dict(cfg)
        kind = cfg.pop("type")
        lin = SVDQLinear.from_config(cfg, device="meta")
        lin.weight_mode = weight_mode  # read when the loaded tensors prepare the layer
        new = SVDQConv1x1(lin) if kind == "conv1x1" else lin
        parent, _, child = name.rpartition(".")
        try:
            owner = model.get_submodule(parent) if parent else model
            getattr(owner, child)
        except AttributeError:
            raise CheckpointError(
                f"{where} quantizes layer {name!r}, which {meta['model_class']} built from the stored config "
                "does not have; the checkpoint and the model code disagree"
            ) from None
        setattr(owner, child, new)
    model._svdquant_recipe = meta.get("recipe")
    return model


def load_quantized(path: str | os.PathLike, device: str | torch.device = "cpu", *,
                   weight_mode: str = "auto") -> nn.Module:
    """Rebuild a quantized transformer from a checkpoint folder, straight onto ``device``.

    ``weight_mode``: on a GPU, ``"speed"`` (``"auto"``) expands two-level INT4 codes to INT8 once, at load;
    ``"memory"`` keeps them 4-bit and expands each layer before its GEMM (see :class:`SVDQLinear`)."""
    from .modules.linear import WEIGHT_MODES

    if weight_mode not in WEIGHT_MODES:
        raise ValueError(f"weight_mode={weight_mode!r} is unknown; choose one of {WEIGHT_MODES}")
    path = Path(path)
    meta = read_metadata(path)
    tensor_file = path / TENSOR_FILE if path.is_dir() else path
    if not tensor_file.exists():
        raise CheckpointError(f"{tensor_file} is missing: the checkpoint is incomplete")
    model = _empty_quantized_model(meta, path, weight_mode)
    expected = {**dict(model.state_dict(keep_vars=True)), **dict(model.named_buffers())}
    quantized_keys = {f"{layer}.{k}" for layer in meta["layers"] for k in
                      model.get_submodule(layer).state_dict(keep_vars=True)}
    try:
        with safe_open(str(tensor_file), "pt", device=str(device)) as f:
            keys = set(f.keys())
            missing = sorted(set(expected) - keys)
            if missing:
                raise CheckpointError(f"{tensor_file} lacks {len(missing)} tensors the model needs, e.g. {missing[:3]}")
            unexpected = sorted(keys - set(expected))
            if unexpected:
                raise CheckpointError(
                    f"{tensor_file} has {len(unexpected)} tensors the model does not use, e.g. {unexpected[:3]}; "
                    "is it a checkpoint of another model?"
                )
            tensors = {}
            for k in sorted(keys):
                t = f.get_tensor(k)
                if t.device.type == "cpu":
                    # get_tensor on CPU returns views into one byte buffer at arbitrary offsets, and
                    # unaligned weights make CPU GEMMs round differently from the model that was saved.
                    t = t.clone()
                want = expected[k]
                # Kept layers are built in the default dtype; the stored (e.g. bf16) dtype of a floating
                # tensor wins. Packed codes and scales must match exactly.
                same_kind = t.dtype == want.dtype or (t.dtype.is_floating_point and want.dtype.is_floating_point
                                                      and k not in quantized_keys)
                if tuple(t.shape) != tuple(want.shape) or not same_kind:
                    raise CheckpointError(
                        f"{tensor_file}: tensor {k!r} is {tuple(t.shape)} {t.dtype}, the model expects "
                        f"{tuple(want.shape)} {want.dtype}"
                    )
                tensors[k] = t
    except CheckpointError:
        raise
    except Exception as e:  # truncated or corrupt file: safetensors' own errors
        raise CheckpointError(f"{tensor_file} cannot be read ({e}); the file is truncated or corrupt") from None
    persistent = set(model.state_dict())
    model.load_state_dict({k: v for k, v in tensors.items() if k in persistent}, strict=True, assign=True)
    for k, v in tensors.items():
        if k not in persistent:
            owner, _, name = k.rpartition(".")
            (model.get_submodule(owner) if owner else model)._buffers[name] = v
    model.eval()
    return model


def recorded_base(path: str | os.PathLike, meta: dict[str, Any]) -> str | None:
    """The base pipeline the checkpoint records: a folder (resolved against the checkpoint) or a hub id."""
    base = meta.get("base")
    if base and meta.get("base_is_local"):
        return str((Path(path) / base).resolve())
    return base


def load_pipeline(base: str | os.PathLike | None, quantized: str | os.PathLike, *, device: str = "cpu",
                  torch_dtype: torch.dtype | None = None, weight_mode: str = "auto"):
    """A ready pipeline: ``base``'s components (local folder or hub id; ``None`` = the one recorded in the
    checkpoint) with the quantized transformer from ``quantized``."""
    meta = read_metadata(quantized)
    base = base or recorded_base(quantized, meta)
    if base is None:
        raise CheckpointError(f"{quantized} does not record its base pipeline; pass base= (a folder or hub id)")
    from .pipelines import load_base_pipeline, transformer_class_of

    base_cls = transformer_class_of(base)
    if base_cls is not None and base_cls != meta["model_class"]:
        raise CheckpointError(
            f"{quantized} quantizes a {meta['model_class']}, but the pipeline at {base} has a {base_cls}; "
            "pass the base pipeline the checkpoint was made from"
        )
    transformer = load_quantized(quantized, device=device, weight_mode=weight_mode)
    pipe = load_base_pipeline(base, transformer=transformer, torch_dtype=torch_dtype)
    return pipe.to(device)
