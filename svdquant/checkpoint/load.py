"""Loading a checkpoint: the quantized transformer (:func:`load_quantized`; a foreign file is imported), a
two-expert pipeline's second one (:func:`load_experts`) and the quantized text encoders (:func:`load_text_encoders`),
each built on meta and filled after every check."""

from __future__ import annotations

import os

import torch
import torch.nn as nn

from .._state import state
from .. import _checks
from ..integrations.diffusers import compat
from .build import (empty_quantized_model, fill_from_file, has_plain_meta_tensors, swap_quantized_layers,
                    transformers_class)
from .foreign import foreign_format
from .header import check_tensor_file
from .layout import CheckpointError, tensor_count
from .locate import resolve, tensor_file_of
from .metadata import read_metadata
from .validation import check_layer_counts_unparsed, quantizer_method


def load_quantized(path: str | os.PathLike, device: str | torch.device = "cpu", *,
                   weight_mode: str = "auto", verify: bool = True) -> nn.Module:
    """Rebuild a quantized transformer from a checkpoint folder, straight onto ``device``. ``path`` may also be
    a Nunchaku single-file INT4 FLUX.1 or Qwen-Image checkpoint (``.safetensors``): it is imported
    (:mod:`svdquant.convert.nunchaku`). The checkpoint's other models are not returned here: a two-expert
    pipeline's ``transformer_2`` comes from :func:`load_experts`, quantized text encoders from
    :func:`load_text_encoders`; :func:`svdquant.load_pipeline` loads all of them into the base pipeline.

    ``weight_mode``: on a GPU, ``"speed"`` (``"auto"``) expands two-level INT4 codes to INT8 once, at load;
    ``"memory"`` keeps them 4-bit and expands each layer before its GEMM (see :class:`SVDQLinear`).

    ``verify``: compare the tensor file with the SHA-256 that ``svdquant.json`` records (written by every save
    since format hashes came in; a checkpoint without them loads unverified, and so does one given as its
    tensor file), once the other checks have passed and before the model is built from the tensors. It catches
    any damage in transfer or on disk that those let through; ``verify=False`` skips the read it costs.

    Hostile files: everything the files state (lengths, names, shapes, dtypes, offsets, sizes in the
    config) is checked before anything of that size is read or built, and the values afterwards
    (:func:`check_values`); every failure is a :class:`CheckpointError`."""
    _check_weight_mode(weight_mode)
    device = _checks.device("device", device)  # before any file is read, so a missing GPU is not blamed on them
    path = resolve(path)
    if path.suffix == ".safetensors" and path.is_file():
        foreign = foreign_format(check_tensor_file(path).get("__metadata__", {}))
        if foreign is not None:
            return foreign.load(path, device, weight_mode=weight_mode)
    meta = read_metadata(path)
    return _load_model(meta, meta, tensor_file_of(path), path, device, weight_mode, verify)


def load_experts(path: str | os.PathLike, device: str | torch.device = "cpu", *, weight_mode: str = "auto",
                 verify: bool = True) -> dict[str, nn.Module]:
    """A two-expert checkpoint's second transformer by pipeline attribute (``{"transformer_2": model}``; ``{}`` for
    a checkpoint of one), straight onto ``device``, after the same checks as :func:`load_quantized`'s
    (``weight_mode`` and ``verify`` too): ``pipe.transformer_2 = load_experts(path)["transformer_2"]`` beside
    ``pipe.transformer = load_quantized(path)``; :func:`svdquant.load_pipeline` does both."""
    _check_weight_mode(weight_mode)
    device = _checks.device("device", device)
    path = resolve(path)
    meta = read_metadata(path)
    folder = path if path.is_dir() else path.parent
    return {name: _load_model(entry, meta, folder / f"{name}.safetensors", folder / f"{name}.safetensors", device,
                              weight_mode, verify)
            for name, entry in (meta.get("experts") or {}).items()}


def _load_model(entry: dict, meta: dict, tensor_file, where, device, weight_mode: str, verify: bool) -> nn.Module:
    """The diffusers model ``entry`` describes (the transformer's metadata, or an expert's entry in it), filled from
    ``tensor_file`` once every check has passed; ``meta``: the whole metadata (its hashes and source)."""
    check_layer_counts_unparsed(entry, tensor_file, where)  # before a hostile config builds millions of blocks
    model = empty_quantized_model(entry, where, weight_mode)
    # no more entries than the model has tensors, counted before the header is parsed
    header = check_tensor_file(tensor_file, max_entries=tensor_count(model))
    header.pop("__metadata__", None)
    fill_from_file(model, entry["layers"], tensor_file, header, device, verify=meta if verify else None,
                   method=quantizer_method({**entry, "source": meta.get("source")}))
    state(model).source = meta.get("source")
    model.eval()
    return compat.quantized(model)  # save_pretrained then writes its quantization_config


def load_text_encoders(path: str | os.PathLike, device: str | torch.device = "cpu", *, weight_mode: str = "auto",
                       verify: bool = True) -> dict[str, nn.Module]:
    """The checkpoint's quantized text encoders by pipeline attribute (``{}`` if it has none), straight onto
    ``device``: built on meta from the stored config, quantized layers swapped in, tensors assigned from
    ``text_encoder*.safetensors`` after the same checks as :func:`load_quantized`'s (``weight_mode`` and ``verify``
    too)."""
    _check_weight_mode(weight_mode)
    device = _checks.device("device", device)
    path = resolve(path)
    meta = read_metadata(path)
    folder = path if path.is_dir() else path.parent
    out = {}
    for name, entry in (meta.get("text_encoders") or {}).items():
        tensor_file = folder / f"{name}.safetensors"
        check_layer_counts_unparsed(entry, tensor_file, tensor_file)
        cls = transformers_class(entry["model_class"], tensor_file)
        try:
            config = cls.config_class.from_dict(entry["model_config"])
            with torch.device("meta"):
                model = cls(config)
            if has_plain_meta_tensors(model):  # see empty_quantized_model
                from accelerate import init_empty_weights

                with init_empty_weights(include_buffers=False):
                    model = cls(config)
        except Exception as e:
            raise CheckpointError(f"{tensor_file}: {entry['model_class']} cannot be built from the stored config "
                                  f"({type(e).__name__}: {str(e)[:200]})") from None
        swap_quantized_layers(model, entry["layers"], tensor_file, weight_mode)
        tied = entry.get("tied") or {}
        header = check_tensor_file(tensor_file, max_entries=max(0, tensor_count(model) - len(tied)))
        header.pop("__metadata__", None)
        fill_from_file(model, entry["layers"], tensor_file, header, device, tied, verify=meta if verify else None,
                       method=quantizer_method({**entry, "source": meta.get("source")}))
        from ..models.text_encoders import fit_quantized

        fit_quantized(model)
        state(model).recipe = entry.get("recipe")
        out[name] = compat.quantized(model.eval())  # so its save_pretrained writes its quantization_config
    return out


def _check_weight_mode(weight_mode: str) -> None:
    from ..modules.linear import WEIGHT_MODES

    if weight_mode not in WEIGHT_MODES:
        raise ValueError(f"weight_mode={weight_mode!r} is unknown; choose one of {WEIGHT_MODES}")
