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

from . import _checks
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
    from .pipelines.tiny import TINY_BASE
    from .quantize import QuantReport

    if not isinstance(model, nn.Module):
        raise TypeError(f"save_quantized takes the quantized model (e.g. pipe.transformer), got {type(model).__name__}")
    path = Path(path)
    if getattr(model, "_svdquant_loras", None):
        raise CheckpointError(f"LoRAs are loaded ({', '.join(model._svdquant_loras)}); checkpoints hold the "
                              "quantized model alone: unload them (svdquant.unload_lora) before saving")
    layers = _layers(model)
    if not layers:
        raise CheckpointError("the model has no quantized layers; run svdquant.quantize(...) on it first")
    check_output_folder(path, overwrite)
    version = max([1] + [_FORMAT_SINCE.get(cfg.get(k), 1) for cfg in layers.values()
                         for k in ("weights", "activations")])
    if report is not None and not isinstance(report, QuantReport):
        raise TypeError(f"report= takes the QuantReport svdquant.quantize returned, got {type(report).__name__}")
    if base is not None:
        base = str(base)
        if base != TINY_BASE and base.startswith(("/", ".", "~")) and not Path(base).expanduser().exists():
            raise CheckpointError(f"base={base!r} does not exist; pass the base pipeline's folder or hub id")
    # "tiny" names the shipped model even if the current folder happens to hold a "tiny" folder
    local = bool(base) and base != TINY_BASE and Path(base).exists()
    meta = {
        "format": "svdquant",
        "format_version": version,
        "svdquant_version": __version__,
        "model_class": type(model).__name__,
        "model_config": _model_config(model),
        # A local base is stored relative to the checkpoint, so the two can move together.
        "base": os.path.relpath(Path(base).resolve(), path.resolve()) if local else base,
        "base_is_local": local,
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
        (tmp / TENSOR_FILE).chmod(0o666 & ~umask)  # safetensors creates it 0600; follow the umask like the rest
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


# bytes per element of each safetensors dtype
_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "I16": 2, "U16": 2, "F16": 2,
                "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


def check_tensor_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a safetensors file's header and check it against the file: every tensor's byte range
    matches its shape and dtype, the ranges tile the data, and the file is exactly that long.
    Returns the header; raises CheckpointError naming the damage. Reads no tensor data."""
    path = Path(path)
    bad = f"{path} is truncated or corrupt"
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: the checkpoint is incomplete")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{bad}: {size} bytes, too short for a safetensors header")
        n = int.from_bytes(head, "little")
        if n > size - 8:
            raise CheckpointError(f"{bad}: the header claims {n} bytes, the file has {size - 8} after the length")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise CheckpointError(f"{bad}: its header is not JSON (not a safetensors file?)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{bad}: its header is not a JSON object")
    end = 0
    try:
        spans = []
        for name, t in header.items():
            if name == "__metadata__":
                continue
            begin, stop = t["data_offsets"]
            numel = 1
            for d in t["shape"]:
                numel *= d
            width = _DTYPE_BYTES.get(t["dtype"])  # a dtype newer than this table: only the tiling is checked
            if width is not None and stop - begin != numel * width:
                raise CheckpointError(f"{bad}: tensor {name!r} has {stop - begin} bytes for shape {t['shape']} "
                                      f"{t['dtype']}")
            spans.append((begin, stop))
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{bad}: malformed tensor entry in its header ({type(e).__name__}: {e})") from None
    for begin, stop in sorted(spans):
        if begin != end:
            raise CheckpointError(f"{bad}: tensor data overlaps or leaves a gap at byte {end}")
        end = stop
    if 8 + n + end != size:
        raise CheckpointError(f"{bad}: the header describes {8 + n + end} bytes, the file has {size}")
    return header


def tensor_file_of(path: str | os.PathLike) -> Path:
    """The tensor file of a checkpoint given as its folder, its tensor file or its svdquant.json."""
    path = Path(path)
    if path.is_dir():
        return path / TENSOR_FILE
    return path if path.suffix == ".safetensors" else path.with_name(TENSOR_FILE)


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
        try:
            text = meta_file.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise CheckpointError(f"{meta_file} is not svdquant metadata (not text); pass a checkpoint folder") from None
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
    device = _checks.device("device", device)  # before any file is read, so a missing GPU is not blamed on them
    path = Path(path)
    meta = read_metadata(path)
    tensor_file = tensor_file_of(path)
    check_tensor_file(tensor_file)
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
        folder = Path(path) if Path(path).is_dir() else Path(path).parent  # given as one of its files
        return str((folder / base).resolve())
    return base


def base_of(quantized: str | os.PathLike, meta: dict[str, Any], base=None) -> str:
    """The base pipeline to load ``quantized`` with: ``base`` if given, else the recorded one, which must
    still be there (a checkpoint copied without its base folder is the usual case)."""
    if base is not None:
        return str(base)
    base = recorded_base(quantized, meta)
    if base is None:
        raise CheckpointError(f"{quantized} does not record its base pipeline; pass base= (svdquant --base) with "
                              "the pipeline's folder or hub id")
    if meta.get("base_is_local") and not Path(base).exists():
        raise FileNotFoundError(
            f"{quantized} was made from the base pipeline {base} ({meta['base']} relative to the checkpoint), which "
            "is not there: the checkpoint moved without it; pass base= (svdquant --base) with its folder or hub id"
        )
    return base


def check_base(quantized: str | os.PathLike, meta: dict[str, Any], base: str) -> None:
    """Raise CheckpointError if the base pipeline holds another model than the checkpoint quantizes
    (read from config files only, before anything is loaded)."""
    from .pipelines import tiny_transformer_config, transformer_class_of

    base_cls = transformer_class_of(base)
    if base_cls is not None and base_cls != meta["model_class"]:
        raise CheckpointError(
            f"{quantized} quantizes a {meta['model_class']}, but the pipeline at {base} has a {base_cls}; "
            "pass the base pipeline the checkpoint was made from"
        )
    tiny = tiny_transformer_config(base)
    if tiny is not None:
        ours = meta["model_config"]
        diff = [k for k in sorted(tiny) if not k.startswith("_") and k in ours and ours[k] != tiny[k]]
        if diff:
            k = diff[0]
            raise CheckpointError(f"{quantized} quantizes a {meta['model_class']} with {k}={ours[k]}, but the tiny "
                                  f"base {base} has {k}={tiny[k]}; pass the base pipeline it was made from")


def load_pipeline(base: str | os.PathLike | None, quantized: str | os.PathLike, *, device: str = "cpu",
                  torch_dtype: torch.dtype | None = None, weight_mode: str = "auto"):
    """A ready pipeline: ``base``'s components (local folder or hub id; ``None`` = the one recorded in the
    checkpoint) with the quantized transformer from ``quantized``. ``torch_dtype`` (``None``: as stored)
    applies to the whole pipeline, the quantized transformer's 16-bit layers included. ``weight_mode``: see
    :func:`load_quantized`."""
    _checks.device("device", device)
    if torch_dtype is not None and not (isinstance(torch_dtype, torch.dtype) and torch_dtype.is_floating_point):
        raise ValueError(f"torch_dtype={torch_dtype!r}: use a floating torch.dtype such as torch.bfloat16, or None")
    meta = read_metadata(quantized)
    base = base_of(quantized, meta, base)
    check_base(quantized, meta, base)
    from .pipelines import load_base_pipeline

    transformer = load_quantized(quantized, device=device, weight_mode=weight_mode)
    if torch_dtype is not None:
        # The kept 16-bit layers load in the stored dtype; the rest of the pipeline runs in torch_dtype,
        # and a mix fails in the first matmul. Quantized layers keep their formats (SVDQLinear._apply).
        # nn.Module.to: diffusers' own .to warns about fp32-kept modules even when the list is empty.
        nn.Module.to(transformer, torch_dtype)
    pipe = load_base_pipeline(base, transformer=transformer, torch_dtype=torch_dtype)
    return pipe.to(device)
