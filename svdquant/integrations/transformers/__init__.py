"""svdquant in transformers: a text encoder svdquant quantized saves with ``save_pretrained`` carrying
``quantization_config`` (``quant_method: "svdquant"``), and loads with plain ``<Model>.from_pretrained``, alone or
inside ``DiffusionPipeline.from_pretrained`` of a saved pipeline.

* here: :func:`register` / :func:`register_on_first_use` (the backend in transformers' quantizer mappings) and
  :func:`attach` (a quantized text encoder's ``quantization_config``; run for every text encoder svdquant
  quantizes, through ``integrations.diffusers.compat.quantized``, the hook every finished quantized model passes);
* :mod:`.quantizer`: :class:`SVDQuantTextConfig` and :class:`SVDQuantHfQuantizer`, transformers' quantizer API;
* :mod:`.compat`: the transformers versions it works with, checked in one place.

The same rule as the diffusers side: ``import svdquant`` does not import transformers (seconds). transformers reads
its quantizer mappings only in ``from_pretrained``, and every transformers model class imports them
(``modeling_utils`` imports ``quantizers.auto``): so :func:`register_on_first_use`, called by ``import svdquant``,
registers at once if they are imported and otherwise right after transformers imports them. Quantizing a text
encoder registers too (transformers is loaded by then).
"""

from __future__ import annotations

import sys

import torch.nn as nn

from ..._state import peek
from ..diffusers import compat as hooks
from . import compat


def register() -> None:
    """Add the backend to transformers' quantizer mappings (idempotent)."""
    from . import quantizer  # noqa: F401  (registers at its end; see there)


def register_on_first_use() -> None:
    """:func:`register` now if transformers' quantizer mappings are imported, else when transformers imports them."""
    hooks.when_imported(compat.QUANTIZER_AUTO, register)


def attach(model: nn.Module) -> nn.Module:
    """Give a quantized transformers text encoder its ``quantization_config``: ``save_pretrained`` then writes it
    into config.json, and ``from_pretrained`` loads the folder as quantized. ``svdquant.quantize_text_encoders``
    (and ``quantize(..., text_encoders=True)``) does this itself; call it after changing an encoder's quantized
    layers by hand."""
    from ...checkpoint import CheckpointError, quantized_layers

    if not _is_transformers_model(model):
        raise TypeError(f"{type(model).__name__} is not a transformers model; save it with svdquant.save_quantized")
    layers = quantized_layers(model)
    if not layers:
        raise CheckpointError("the model has no quantized layers; run svdquant.quantize_text_encoders(pipe) first")
    return _attach(model, layers)


def _is_transformers_model(model) -> bool:
    # a model of transformers' has had transformers.modeling_utils imported: without it, nothing to import or check
    modeling = sys.modules.get("transformers.modeling_utils")
    return modeling is not None and isinstance(model, modeling.PreTrainedModel)


def _attach(model: nn.Module, layers: dict) -> nn.Module:
    from ...checkpoint import format_version

    register()
    from .quantizer import SVDQuantHfQuantizer, SVDQuantTextConfig

    config = SVDQuantTextConfig(layers=layers, format_version=format_version(layers), recipe=peek(model).recipe)
    # what transformers' from_pretrained leaves on a model it loaded quantized (quantizers/base.py postprocess_model
    # and modeling_utils): save_pretrained writes config.quantization_config and asks hf_quantizer.is_serializable()
    model.config.quantization_config = config
    model.hf_quantizer = SVDQuantHfQuantizer(config, pre_quantized=True)
    return model


def _attach_transformers_model(model: nn.Module) -> None:
    """:func:`attach` for what ``compat.quantized`` is given, when it is a transformers model with quantized layers
    (diffusers models have their own backend)."""
    from ...checkpoint import quantized_layers

    layers = quantized_layers(model) if _is_transformers_model(model) else None
    if layers:
        _attach(model, layers)


hooks.when_quantized(_attach_transformers_model)

__all__ = ["attach", "register", "register_on_first_use", "compat"]
