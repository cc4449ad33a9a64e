"""svdquant in diffusers: ``quant_method: "svdquant"`` in a model's config.json loads through
``<Model>.from_pretrained``, and every quantized model saves with ``save_pretrained``.

* here: :func:`register` / :func:`register_on_first_use` (the backend in diffusers' quantizer mappings, and
  svdquant's INT8 attention among diffusers' attention backends: :func:`register_attention`, :mod:`.attention`) and
  :func:`attach` (a quantized model's ``quantization_config``; run for every model svdquant quantizes, loads or
  converts, through :func:`compat.quantized`);
* :mod:`.quantizer`: :class:`SVDQuantConfig` and :class:`SVDQuantQuantizer`, diffusers' quantizer API;
* :mod:`.compat`: the version check and every use of diffusers' internals, for the whole library (it sits on the
  foundation floor, so ``quantize``, ``checkpoint``, ``modules`` and ``pipelines`` call it).

Registering imports diffusers' quantizers (~3 s), which ``import svdquant`` (and every ``svdquant`` command, even
one that only reports a typo) must not pay. diffusers reads its mappings only in ``from_pretrained``, after
importing them, and every diffusers model class imports them: so :func:`register_on_first_use`, called by
``import svdquant``, registers at once if they are imported and otherwise right after diffusers imports them.
"""

from __future__ import annotations

import torch.nn as nn

from ..._state import peek
from . import compat


def register() -> None:
    """Add the backend to diffusers' quantizer mappings (idempotent)."""
    from . import quantizer  # noqa: F401  (registers at its end; see there)


def register_attention() -> None:
    """Add svdquant's INT8 attention to diffusers' attention backends (idempotent): then
    ``model.set_attention_backend("svdquant_int8")`` works on any diffusers model (:mod:`.attention`; flash-attn-4's
    backend is registered by ``attention.register_flash4()``, which checks the GPUs: not at import)."""
    from . import attention

    attention.register()


def register_on_first_use() -> None:
    """:func:`register` now if diffusers' quantizer mappings are imported, else when diffusers imports them; the
    same for :func:`register_attention` and diffusers' attention dispatcher."""
    compat.when_imported(compat.QUANTIZER_AUTO, register)
    compat.when_imported(compat.ATTENTION_DISPATCH, register_attention)


def attach(model: nn.Module) -> nn.Module:
    """Give a quantized diffusers model its ``quantization_config``: ``save_pretrained`` then writes it into
    config.json, and ``from_pretrained`` loads the folder as quantized. ``svdquant.quantize``,
    ``svdquant.load_quantized`` and the converters do this themselves; call it after changing a model's
    quantized layers by hand."""
    from ...checkpoint import CheckpointError, quantized_layers

    layers = quantized_layers(model)
    if not layers:
        raise CheckpointError("the model has no quantized layers; run svdquant.quantize(...) on it first")
    if not hasattr(model, "register_to_config"):
        raise TypeError(f"{type(model).__name__} is not a diffusers model; save it with svdquant.save_quantized")
    return _attach(model, layers)


def _attach(model: nn.Module, layers: dict) -> nn.Module:
    from ...checkpoint import format_version
    from .quantizer import SVDQuantConfig, SVDQuantQuantizer

    config = SVDQuantConfig(layers=layers, format_version=format_version(layers),
                            recipe=peek(model).recipe)
    model.register_to_config(quantization_config=config)
    model.hf_quantizer = SVDQuantQuantizer(config, pre_quantized=True)
    return model


def _attach_diffusers_model(model: nn.Module) -> None:
    """:func:`attach` for what :func:`compat.quantized` is given, when it is a diffusers model with quantized layers
    (a plain ``nn.Module`` has no ``save_pretrained``: ``svdquant.save_quantized`` saves it)."""
    from ...checkpoint import quantized_layers

    layers = quantized_layers(model) if hasattr(model, "register_to_config") else None
    if layers:
        _attach(model, layers)


compat.when_quantized(_attach_diffusers_model)

__all__ = ["attach", "register", "register_attention", "register_on_first_use", "compat"]
