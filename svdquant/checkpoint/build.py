"""Building a quantized model from checked metadata and filling it from its tensor file: the model class (diffusers
or transformers) built on the meta device, empty quantized layers swapped in where the metadata says, then the
stored tensors assigned after every name, shape, dtype and value is checked."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import safe_open

from .._state import state
from ..modules import SVDQConv1x1, SVDQLinear
from .header import verify_sha256
from .layout import CheckpointError
from .validation import check_values

# the torch dtype each safetensors dtype reads as
_TORCH_DTYPES = {"BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "F8_E4M3": torch.float8_e4m3fn,
                 "F8_E5M2": torch.float8_e5m2, "I16": torch.int16, "F16": torch.float16, "BF16": torch.bfloat16,
                 "I32": torch.int32, "F32": torch.float32, "I64": torch.int64, "F64": torch.float64}
_KEPT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # what a 16-bit layer is stored in


def diffusers_class(name: str, where: Path):
    import diffusers
    from diffusers import ModelMixin

    try:
        cls = getattr(diffusers, name, None)
    except Exception:  # diffusers' lazy module imports optional backends (flax, onnx...) on first access
        cls = None
    if cls is None:
        raise CheckpointError(f"{where} is a checkpoint of {name}, which this diffusers ({diffusers.__version__}) "
                              "lacks; install the diffusers version it was made with")
    if not (isinstance(cls, type) and issubclass(cls, ModelMixin)):
        raise CheckpointError(f"{where} names {name!r} as its model class, which is not a diffusers model")
    return cls


def transformers_class(name: str, where: Path):
    import transformers

    try:
        cls = getattr(transformers, name, None)
    except Exception:  # transformers' lazy module imports optional backends on first access
        cls = None
    if cls is None:
        raise CheckpointError(f"{where} holds a text encoder of class {name[:100]!r}, which this transformers "
                              f"({transformers.__version__}) lacks; install the transformers version it was made with")
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise CheckpointError(f"{where} names {name[:100]!r} as a text encoder class, which is not a transformers "
                              "model")
    return cls


def has_plain_meta_tensors(model: nn.Module) -> bool:
    """A tensor kept as a plain attribute (neither parameter nor buffer: Qwen-Image's rotary tables) is
    in no state dict, so a meta-device build leaves it on meta for good."""
    return any(torch.is_tensor(v) and v.is_meta for m in model.modules() for v in vars(m).values())


def empty_quantized_model(meta: dict[str, Any], where: Path, weight_mode: str = "auto") -> nn.Module:
    cls = diffusers_class(meta["model_class"], where)
    try:
        with torch.device("meta"):
            model = cls.from_config(meta["model_config"])
        if has_plain_meta_tensors(model):
            # rebuild with only the parameters on meta, so those tables are computed as the 16-bit model's are
            from accelerate import init_empty_weights

            with init_empty_weights(include_buffers=False):
                model = cls.from_config(meta["model_config"])
    except Exception as e:
        raise CheckpointError(f"{where}: {meta['model_class']} cannot be built from the stored config ({e})") from None
    swap_quantized_layers(model, meta["layers"], where, weight_mode)
    state(model).recipe = meta.get("recipe")
    return model


def _registered(module: nn.Module, name: str) -> nn.Module | None:
    """The submodule registered at dotted ``name``, else None. Walks ``_modules`` only: ``getattr`` would also find
    methods, buffers and config fields, and diffusers' ``__getattr__`` answers a name like ``__len__`` from the
    config with a KeyError."""
    for part in name.split("."):
        module = module._modules.get(part)
        if module is None:
            return None
    return module


def swap_quantized_layers(model: nn.Module, layers: dict[str, dict[str, Any]], where, weight_mode: str = "auto"):
    """Replace each layer named in ``layers`` (entries checked by :func:`check_layer`) by an empty
    :class:`SVDQLinear` / :class:`SVDQConv1x1` on the meta device; CheckpointError where they do not fit."""
    model_class = type(model).__name__
    for name, cfg in layers.items():
        cfg = dict(cfg)
        kind = cfg.pop("type")
        try:  # the types were checked by read_metadata; the values (format names, sizes) are checked here
            lin = SVDQLinear.from_config(cfg, device="meta")
        except Exception as e:
            raise CheckpointError(f"{where}: quantized layer {name[:100]!r} cannot be built ({type(e).__name__}: "
                                  f"{str(e)[:200]}); the checkpoint is corrupt") from None
        lin.weight_mode = weight_mode  # read when the loaded tensors prepare the layer
        new = SVDQConv1x1(lin) if kind == "conv1x1" else lin
        parent, _, child = name.rpartition(".")
        owner = _registered(model, parent) if parent else model
        old = _registered(owner, child) if owner is not None else None
        if old is None:
            raise CheckpointError(
                f"{where} quantizes layer {name!r}, which {model_class} built from the stored config "
                "does not have; the checkpoint and the model code disagree"
            )
        # The layer it replaces must be a linear (a 1x1 conv) of the same size, or the file lies about the
        # model and the first forward would fail far from here.
        if kind == "conv1x1":
            fits = (isinstance(old, nn.Conv2d) and old.kernel_size == (1, 1)
                    and (old.in_channels, old.out_channels) == (lin.in_features, lin.out_features))
        else:
            fits = isinstance(old, nn.Linear) and (old.in_features, old.out_features) == (lin.in_features,
                                                                                           lin.out_features)
        if not fits:
            raise CheckpointError(f"{where} quantizes {name!r} as a {lin.in_features}->{lin.out_features} "
                                  f"{kind}, but the model has a {type(old).__name__} there"
                                  f"{'' if not isinstance(old, nn.Linear) else f' {old.in_features}->{old.out_features}'}"
                                  "; the checkpoint and the model code disagree")
        setattr(owner, child, new)


def fill_from_file(model: nn.Module, layers: dict[str, dict[str, Any]], tensor_file: Path, header: dict[str, Any],
                   device, tied: dict[str, str] | None = None, verify: dict[str, Any] | None = None,
                   method: str | None = None) -> None:
    """Load ``tensor_file`` (its checked ``header``) into ``model``, built on meta with its quantized ``layers``
    swapped in: every name, shape and dtype is checked against the model before any tensor is read, then the
    values (:func:`check_values`), then, with the metadata as ``verify``, the file's SHA-256 (last: the checks
    before it name the damage they find, and the file it reads again is in the page cache by then; nothing has
    run on the tensors yet). ``tied``: alias -> name of weights the model shares (stored once)."""
    tied = tied or {}
    expected = {**dict(model.state_dict(keep_vars=True)), **dict(model.named_buffers())}
    for alias, source in tied.items():
        if alias not in expected or source not in expected or expected[alias] is not expected[source]:
            raise CheckpointError(f"{tensor_file}: the checkpoint ties {alias[:100]!r} to {source[:100]!r}, which "
                                  f"{type(model).__name__} does not share; the checkpoint is corrupt")
        del expected[alias]
    quantized_keys = {f"{layer}.{k}" for layer in layers for k in
                      model.get_submodule(layer).state_dict(keep_vars=True)}
    missing = sorted(set(expected) - set(header))
    if missing:
        raise CheckpointError(f"{tensor_file} lacks {len(missing)} tensors the model needs, e.g. {missing[:3]}")
    unexpected = sorted(set(header) - set(expected))
    if unexpected:
        raise CheckpointError(
            f"{tensor_file} has {len(unexpected)} tensors the model does not use, e.g. {unexpected[:3]}; "
            "is it a checkpoint of another model?"
        )
    for k in sorted(header):  # from the header: nothing is read until every tensor is known to fit
        shape, dtype, want = tuple(header[k]["shape"]), _TORCH_DTYPES.get(header[k]["dtype"]), expected[k]
        # Kept layers are built in the default dtype; the stored 16/32-bit dtype of a floating tensor
        # wins (an fp8 one would be a quantized layer in disguise). Packed codes and scales match exactly.
        same_kind = dtype is not None and (dtype == want.dtype or (
            dtype in _KEPT_DTYPES and want.dtype.is_floating_point and k not in quantized_keys))
        if shape != tuple(want.shape) or not same_kind:
            raise CheckpointError(
                f"{tensor_file}: tensor {k!r} is {shape} {dtype or header[k]['dtype']}, the model expects "
                f"{tuple(want.shape)} {want.dtype}"
            )
    try:
        with safe_open(str(tensor_file), "pt", device=str(device)) as f:
            tensors = {}
            for k in sorted(header):
                t = f.get_tensor(k)
                if t.device.type == "cpu":
                    # get_tensor on CPU returns views into one byte buffer at arbitrary offsets, and
                    # unaligned weights make CPU GEMMs round differently from the model that was saved.
                    t = t.clone()
                tensors[k] = t
    except Exception as e:  # changed under us since the header check: safetensors' own errors
        raise CheckpointError(f"{tensor_file} cannot be read ({e}); the file is truncated or corrupt") from None
    check_values(model, tensors, quantized_keys, tensor_file, method)
    if verify is not None:
        verify_sha256(tensor_file, verify)
    persistent = set(model.state_dict())
    for alias, source in tied.items():
        tensors[alias] = tensors[source]
    try:
        model.load_state_dict({k: v for k, v in tensors.items() if k in persistent}, strict=True, assign=True)
    except RuntimeError as e:  # every name, shape and dtype was checked above: a mismatch here is a format gap
        raise CheckpointError(f"{tensor_file} does not fit the model ({str(e)[:300]})") from None
    for alias, source in tied.items():  # assign=True wrapped each name in its own Parameter: one again
        owner, _, name = alias.rpartition(".")
        setattr(model.get_submodule(owner) if owner else model, name, model.get_parameter(source))
    for k, v in tensors.items():
        if k not in persistent:
            owner, _, name = k.rpartition(".")
            (model.get_submodule(owner) if owner else model)._buffers[name] = v
