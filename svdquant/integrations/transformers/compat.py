"""The transformers versions svdquant's text-encoder backend works with, checked in one place.

The backend (:mod:`.quantizer`) is written against transformers 5's loading: ``from_pretrained`` builds the
model on the meta device, the quantizer swaps in empty layers (``HfQuantizer._process_model_before_weight_loading``,
handed the checkpoint files), and ``core_model_loading.convert_and_load_state_dict_in_model`` assigns each stored
tensor to the parameter or buffer of that name in the empty tensor's dtype (``transformers/core_model_loading.py``).
transformers 4 is another interface: it cast every floating tensor to the load dtype unless the quantizer took the
tensor over through ``check_quantized_param`` / ``create_quantized_param`` (4.x ``modeling_utils.
_load_state_dict_into_meta_model``), which transformers 5 removed; ``register_quantizer`` and
``register_quantization_config`` came with transformers PR #35915 (2025), after 4.45. So below
:data:`TRANSFORMERS_SUPPORTED` the backend refuses, in one line (:func:`require`), wherever it would be used:
reading a ``quant_method: "svdquant"`` config, loading, saving. Outside :data:`TRANSFORMERS_TESTED` it warns once
(:class:`TransformersVersionWarning`), as the diffusers side does.

:func:`add_quantizer` registers through transformers' public ``register_quantization_config`` /
``register_quantizer`` (``transformers/quantizers/auto.py``); a transformers older than those has only the
mappings they write, and gets the entries there, so that its ``from_pretrained`` meets :func:`require` instead of
skipping an unknown method and initializing the layers at random.

It imports the standard library and the diffusers side's version comparison; transformers only inside
:func:`add_quantizer` (``import svdquant`` stays fast).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import warnings

from ..diffusers.compat import in_tested_range

# Keep TRANSFORMERS_TESTED in step with what tests/test_transformers_quantizer.py last passed on; when bumping,
# run it with tests/test_text_encoders.py.
TRANSFORMERS_SUPPORTED = ">=5.0"
TRANSFORMERS_TESTED = ">=5.25,<6"
QUANTIZER_AUTO = "transformers.quantizers.auto"  # holds the quantizer mappings and their register functions


class TransformersVersionError(ImportError):
    """The installed transformers predates the interface the text-encoder backend is written against."""


class TransformersVersionWarning(UserWarning):
    """The installed transformers is outside :data:`TRANSFORMERS_TESTED`."""


_WARNED: set[str] = set()


def installed_version() -> str | None:
    """The installed transformers' version (``None``: a source checkout without metadata)."""
    try:
        return importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        return None


def require(what: str = "svdquant's transformers backend", version: str | None = None) -> None:
    """Raise :class:`TransformersVersionError` (one line, with the fix) below :data:`TRANSFORMERS_SUPPORTED`;
    warn once outside :data:`TRANSFORMERS_TESTED`. ``version``: ``None`` is the installed one."""
    version = installed_version() if version is None else version
    if version is None:
        return
    if not in_tested_range(version, TRANSFORMERS_SUPPORTED):
        raise TransformersVersionError(
            f"{what} needs transformers{TRANSFORMERS_SUPPORTED} (this is {version}): pip install -U "
            f"'transformers{TRANSFORMERS_SUPPORTED}', or save and load with svdquant.save_quantized(pipe, folder) "
            "and svdquant.load_pipeline(base, folder)")
    if not in_tested_range(version, TRANSFORMERS_TESTED) and version not in _WARNED:
        _WARNED.add(version)
        warnings.warn(f"transformers {version} is outside the range svdquant's text-encoder backend is tested with "
                      f"({TRANSFORMERS_TESTED}); its loading may have changed "
                      "(svdquant/integrations/transformers/compat.py)", TransformersVersionWarning, stacklevel=3)


def add_quantizer(method: str, quantizer_cls: type, config_cls: type) -> None:
    """``quant_method: method`` in a config.json loads through ``quantizer_cls`` (idempotent)."""
    # by name: this can run while transformers.quantizers is still importing it (the import hook)
    auto = importlib.import_module(QUANTIZER_AUTO)
    entries = ((auto.AUTO_QUANTIZATION_CONFIG_MAPPING, config_cls, getattr(auto, "register_quantization_config", None)),
               (auto.AUTO_QUANTIZER_MAPPING, quantizer_cls, getattr(auto, "register_quantizer", None)))
    for mapping, cls, register in entries:
        held = mapping.get(method)
        if held is cls:
            continue
        if held is not None:
            raise ValueError(f"transformers already has a quantization method {method!r} ({held.__module__}."
                             f"{held.__qualname__}); svdquant's text encoders cannot load beside it")
        if register is not None:
            register(method)(cls)
        else:
            mapping[method] = cls


__all__ = ["TRANSFORMERS_SUPPORTED", "TRANSFORMERS_TESTED", "QUANTIZER_AUTO", "TransformersVersionError",
           "TransformersVersionWarning", "installed_version", "require", "add_quantizer"]
