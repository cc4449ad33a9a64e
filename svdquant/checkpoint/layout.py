"""What a checkpoint is: its file names, format versions and errors, and what is stored of a model (its quantized
layers' entries, its config, every tensor). The rest of the package reads and writes this layout."""

from __future__ import annotations

import json
from typing import Any

import torch
import torch.nn as nn

from ..integrations.diffusers import compat
from ..modules import SVDQConv1x1, SVDQLinear

FORMAT_VERSION = 5
# Version 2 added the two-level ``int4m`` layers (a ``wmult`` buffer); version 3 the zero-point ``int4z``
# layers (``wzeros``: AWQ adaLN layers imported from Nunchaku) and the quantized text encoders
# (``text_encoders``). A checkpoint is written with the lowest version that holds its contents, so older
# svdquant still reads the rest: a checkpoint with text encoders is refused by svdquant before 3
# ("upgrade") rather than loaded with the base's 16-bit encoders in their place.
_FORMAT_SINCE = {"int4m": 2, "int4z": 3}
TEXT_ENCODERS_SINCE = 3
# Version 4: a layer may hold its bias in fp32 (``bias_dtype``: Nunchaku adaLN scale biases the model dtype cannot
# hold exactly once the folded 1 is taken out); older svdquant would refuse the key as a malformed entry.
BIAS_DTYPE_SINCE = 4
# Version 5: a two-expert pipeline's second transformer (Wan 2.2 A14B's ``transformer_2``) stored beside the first
# (``experts`` in the metadata, ``transformer_2.safetensors``); older svdquant refuses such a checkpoint
# ("upgrade") rather than loading the first expert and leaving the base's 16-bit second one in the pipeline.
EXPERTS_SINCE = 5
META_FILE = "svdquant.json"
TENSOR_FILE = "transformer.safetensors"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as asked: missing, corrupt, or for another model."""


def quantized_layers(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Every quantized layer's type and constructor arguments, by module name."""
    out, inner = {}, set()
    for name, m in model.named_modules():  # parents come before their children
        if isinstance(m, SVDQConv1x1):
            out[name] = {"type": "conv1x1", **m.linear.config()}
            inner.add(f"{name}.linear")
        elif isinstance(m, SVDQLinear) and name not in inner:
            out[name] = {"type": "linear", **m.config()}
    return out


def format_version(layers: dict[str, dict[str, Any]]) -> int:
    """The lowest format version that holds these layers."""
    return max([1] + [_FORMAT_SINCE.get(cfg.get(k), 1) for cfg in layers.values() for k in ("weights", "activations")]
               + [BIAS_DTYPE_SINCE for cfg in layers.values() if "bias_dtype" in cfg])


def all_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict plus non-persistent buffers (which a meta-device build cannot recreate)."""
    tensors = dict(model.state_dict())
    for name, b in model.named_buffers():
        if b is not None and name not in tensors:
            tensors[name] = b
    return {k: v.detach().contiguous().cpu() for k, v in tensors.items()}


def encoder_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """:func:`all_tensors` with each tied weight once (safetensors refuses shared memory), and the ties
    as alias -> stored name."""
    tensors, tied, seen = {}, {}, {}
    for name, t in _all_tensors_live(model).items():
        if id(t) in seen:
            tied[name] = seen[id(t)]
            continue
        seen[id(t)] = name
        tensors[name] = t.detach().contiguous().cpu()
    return tensors, tied


def _all_tensors_live(model: nn.Module) -> dict[str, torch.Tensor]:
    tensors = dict(model.state_dict(keep_vars=True))
    for name, b in model.named_buffers():
        if b is not None and name not in tensors:
            tensors[name] = b
    return tensors


def quantized_encoders(pipe) -> dict[str, nn.Module]:
    from ..models.text_encoders import text_encoders

    return {n: te for n, te in text_encoders(pipe).items() if quantized_layers(te)}


# Config entries that say where the model was loaded from (a user's absolute path, e.g. /home/ann/FLUX.1-dev/
# transformer), not what it is: never written into a checkpoint that may be published.
_WHERE_FROM = ("_name_or_path",)


def model_config_of(model: nn.Module) -> dict[str, Any]:
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise CheckpointError(f"{type(model).__name__} has no .config; only diffusers-style models can be saved")
    cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)  # a transformers config, or diffusers' dict
    # diffusers writes its quantization_config into the model config; ours is the checkpoint header
    cfg = {k: v for k, v in cfg.items() if k not in _WHERE_FROM and k not in compat.QUANTIZER_CONFIG_KEYS}
    return json.loads(json.dumps(cfg, default=lambda o: list(o) if isinstance(o, tuple) else str(o)))


def tensor_count(model: nn.Module) -> int:
    """The tensors a checkpoint of ``model`` holds (parameters and buffers, persistent or not, by name)."""
    return len({**dict(model.state_dict(keep_vars=True)), **dict(model.named_buffers())})
