"""Checkpoints: a folder with ``svdquant.json`` (metadata) and ``transformer.safetensors``.

    svdquant.save_quantized(pipe.transformer, "flux-int4", base="black-forest-labs/FLUX.1-dev")
    svdquant.save_quantized(pipe, "flux-int4", base=...)   # + the 4-bit text encoders, if quantized
    transformer = svdquant.load_quantized("flux-int4", device="cuda")
    pipe = svdquant.load_pipeline("black-forest-labs/FLUX.1-dev", "flux-int4")   # svdquant/pipelines/load.py

``svdquant.json`` holds the format version, the recipe, the model class and config,
the base pipeline it was made from and every quantized layer's layout; the same JSON is
copied into the safetensors header, so the tensor file alone still says what it is.
The safetensors file holds the whole transformer: packed 4-bit layers and the 16-bit
layers that were kept. Loading builds the model on the meta device, swaps in empty
quantized layers and assigns the stored tensors, so the 16-bit weights of quantized
layers are never materialized. safetensors only: nothing is unpickled.

Quantized text encoders (``svdquant.quantize(pipe, ..., text_encoders=True)``) are stored the same
way, whole, one file each (``text_encoder_2.safetensors``...), under ``text_encoders`` in the
metadata: their transformers class and config, quantized layers and tied weights (T5's token
embedding is one tensor under two names, stored once). ``load_pipeline`` builds them on meta and
hands them to the base pipeline, so the base's 16-bit encoders are never read.

A two-expert pipeline (Wan 2.2 A14B: ``transformer`` for the high-noise steps, ``transformer_2`` for the
low-noise ones), saved as ``save_quantized(pipe, ...)``, is one checkpoint of both (format version 5): the
first expert is the checkpoint's transformer as above, the second is stored whole in
``transformer_2.safetensors`` and described under ``experts`` in the metadata (its class, config, quantized
layers and recipe), checked as the transformer's entries are. ``load_experts`` rebuilds it; ``load_pipeline``
loads both and refuses, before loading anything, a base whose experts do not match the checkpoint's. A
checkpoint of one transformer is unchanged (the lowest version that holds it).

Where things live (each module imports only the ones above it in this list):

* :mod:`.layout` — file names, format versions, :class:`CheckpointError`, what is stored of a model;
* :mod:`.header` — bounded reads: the safetensors header checked against its file, JSON, SHA-256;
* :mod:`.validation` — what a hostile file is checked against: config and layer entries, counts, values;
* :mod:`.locate` — a checkpoint's local path (or hub id) and the base pipeline it records;
* :mod:`.foreign` — readers of other projects' files, registered by :mod:`svdquant.convert`;
* :mod:`.metadata` — :func:`read_metadata`;
* :mod:`.build` — the empty quantized model on meta, and filling it from a tensor file;
* :mod:`.card` — the model card (README.md) of ``save_quantized(..., model_card=True)``;
* :mod:`.save` — :func:`save_quantized`; :mod:`.load` — :func:`load_quantized`, :func:`load_experts`,
  :func:`load_text_encoders`.
"""

from .build import empty_quantized_model, swap_quantized_layers
from .foreign import ForeignFormat, register_foreign_format
from .header import (MAX_HEADER_BYTES, MAX_METADATA_BYTES, MAX_METADATA_KEYS, MAX_TENSORS, check_tensor_file, is_int,
                     json_object, sha256_of)
from .layout import (BIAS_DTYPE_SINCE, EXPERTS_SINCE, FORMAT_VERSION, META_FILE, TENSOR_FILE, TEXT_ENCODERS_SINCE,
                     CheckpointError, all_tensors, format_version, model_config_of, quantized_layers)
from .load import load_experts, load_quantized, load_text_encoders
from .locate import base_of, check_base_location, recorded_base, resolve, tensor_file_of
from .metadata import read_metadata
from .save import check_output_folder, fsync_file, save_quantized
from .validation import (BASE_VALUE_WARN, BRANCH_BALANCE_TOL, RESIDUAL_BOUND, SMOOTH_INV_RANGE, NonFiniteWarning,
                         check_config, check_layer, check_layer_counts, check_values, count_nonfinite)

__all__ = [
    "save_quantized", "load_quantized", "load_experts", "load_text_encoders", "read_metadata", "CheckpointError",
    "NonFiniteWarning",
    "check_output_folder", "check_tensor_file", "sha256_of", "resolve", "tensor_file_of", "recorded_base", "base_of",
    "check_base_location", "META_FILE", "TENSOR_FILE", "FORMAT_VERSION", "TEXT_ENCODERS_SINCE", "BIAS_DTYPE_SINCE",
    "EXPERTS_SINCE",
    "MAX_HEADER_BYTES", "MAX_METADATA_BYTES", "MAX_METADATA_KEYS", "MAX_TENSORS", "SMOOTH_INV_RANGE",
    "BRANCH_BALANCE_TOL", "RESIDUAL_BOUND", "BASE_VALUE_WARN",
    # for the converters and the diffusers integration, which read and write the same layout
    "quantized_layers", "format_version", "all_tensors", "model_config_of", "json_object", "is_int", "check_config",
    "check_layer", "check_layer_counts", "check_values", "count_nonfinite", "empty_quantized_model",
    "swap_quantized_layers", "fsync_file", "ForeignFormat", "register_foreign_format",
]
