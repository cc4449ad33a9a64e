"""What a ``quantization_config`` with ``quant_method: "svdquant"`` holds, checked once for both backends.

diffusers' and transformers' configs are different classes (each library's ``QuantizationConfigMixin``), holding
the same entries: the format version, the recipe and every quantized layer's constructor arguments (as in
``svdquant.json``'s ``layers``). A config.json is a file anyone can edit: every entry is checked before a layer is
built from it, and a damaged one fails in one line that ends with ``repair`` (how to write the folder again).
"""

from __future__ import annotations

from enum import Enum
from typing import Any

from ..checkpoint import FORMAT_VERSION, CheckpointError, check_layer, is_int


class SVDQuantMethod(str, Enum):
    # diffusers reads ``quant_method.value`` (its own methods are a str Enum), transformers ``getattr(quant_method,
    # "value", quant_method)``; a str Enum member also hashes and compares as its value, so both libraries' mappings
    # keyed by "svdquant" find it, and json writes it as "svdquant"
    SVDQUANT = "svdquant"


def fill_config(config, layers: Any, format_version: Any, recipe: Any, quant_method: Any, unknown: dict[str, Any],
                repair: str) -> None:
    """Either backend's config object, given the entries of a ``quantization_config``: checked
    (:func:`check_quantization_config`), then set."""
    check_quantization_config(layers, format_version, recipe, quant_method, unknown, repair)
    config.quant_method = SVDQuantMethod.SVDQUANT
    config.format_version = format_version
    config.recipe = recipe
    config.layers = layers


def check_quantization_config(layers: Any, format_version: Any, recipe: Any, quant_method: Any,
                              unknown: dict[str, Any], repair: str) -> None:
    """CheckpointError (ValueError for another method) unless the entries are ones this svdquant can load."""
    if quant_method != "svdquant":
        raise ValueError(f"an svdquant quantization config is for quant_method 'svdquant', got {quant_method!r}")
    if unknown:
        raise CheckpointError(f"quantization_config has entries this svdquant does not know: {sorted(unknown)}; "
                              "upgrade svdquant")
    if not is_int(format_version) or format_version < 1:
        raise CheckpointError(f"quantization_config has format_version {str(format_version)[:50]!r}{repair}")
    if format_version > FORMAT_VERSION:
        raise CheckpointError(f"quantization_config has format_version {format_version!r}; this svdquant reads "
                              f"1 to {FORMAT_VERSION}. Upgrade svdquant.")
    if not isinstance(layers, dict) or not layers:
        raise CheckpointError(f"quantization_config has no quantized layers{repair}")
    if recipe is not None and not isinstance(recipe, dict):
        raise CheckpointError(f"quantization_config has a malformed 'recipe' entry{repair}")
    try:
        for name, cfg in layers.items():
            check_layer(name, cfg, "quantization_config")
    except CheckpointError as e:
        raise CheckpointError(f"{e}{repair}") from None


def recipe_name(recipe: dict | None) -> str | None:
    """The recipe's name, for a config's short repr (the mixins' own repr prints every layer)."""
    return (recipe or {}).get("name")


__all__ = ["SVDQuantMethod", "check_quantization_config", "fill_config", "recipe_name"]
