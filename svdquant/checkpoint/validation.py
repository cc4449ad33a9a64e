"""What a checkpoint from the internet is checked against before it is built or run: the metadata's entries
(model config, quantized layers, text encoders, a second expert), the layer counts against the tensor file, and
the values (:func:`check_values`: what svdquant's quantizer can write). Every failure is a
:class:`CheckpointError`; suspect 16-bit values a :class:`NonFiniteWarning`."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..modules import SVDQLinear
from .header import MAX_TENSORS, check_tensor_file, header_budget, header_bytes, is_int
from .layout import EXPERTS_SINCE, TEXT_ENCODERS_SINCE, CheckpointError

# no real model config has a size this large, or lists this long (it would build forever even on meta)
_MAX_CONFIG_INT = 1 << 24
_MAX_CONFIG_LIST = 1024

_ENCODER_KEYS = {"model_class", "model_config", "layers", "tied", "recipe"}
_EXPERT_KEYS = {"model_class", "model_config", "layers", "recipe"}


def check_text_encoders(meta: dict[str, Any], meta_file: Path) -> None:
    """The ``text_encoders`` entry: names that are file names we write (never a path), and per encoder the
    same checks as the transformer's entries."""
    from ..models.text_encoders import NAME

    tes = meta["text_encoders"]
    if not isinstance(tes, dict) or not tes:
        raise CheckpointError(f"{meta_file} has a malformed 'text_encoders' entry; the checkpoint is corrupt")
    if meta["format_version"] < TEXT_ENCODERS_SINCE:
        raise CheckpointError(f"{meta_file} holds text encoders but says format version {meta['format_version']} "
                              f"(they came with {TEXT_ENCODERS_SINCE}); the checkpoint is corrupt")
    for name, entry in tes.items():
        if not NAME.fullmatch(name):
            raise CheckpointError(f"{meta_file} names a text encoder {name[:100]!r}; svdquant writes text_encoder, "
                                  "text_encoder_2 ... only: the checkpoint is corrupt")
        _check_model_entry(entry, f"{meta_file}: text encoder {name[:100]!r}", _ENCODER_KEYS)
        tied = entry.get("tied") or {}
        if not isinstance(tied, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in tied.items()):
            raise CheckpointError(f"{meta_file}: text encoder {name[:100]!r} has a malformed entry (tied)")
        check_config(entry["model_config"], f"{meta_file}: {name}.model_config")
        for layer, cfg in entry["layers"].items():
            check_layer(layer, cfg, meta_file)


def check_experts(meta: dict[str, Any], meta_file: Path) -> None:
    """The ``experts`` entry (a two-expert pipeline's second transformer): the one name svdquant writes (it names
    the expert's tensor file, so never a path), a format version that has experts, and the same checks as the
    transformer's entries."""
    from ..models.pipeline_needs import SECOND_EXPERT

    experts = meta["experts"]
    if not isinstance(experts, dict) or set(experts) != {SECOND_EXPERT}:
        names = sorted(map(str, experts))[:3] if isinstance(experts, dict) else type(experts).__name__
        raise CheckpointError(f"{meta_file} has a malformed 'experts' entry ({str(names)[:100]}; svdquant writes "
                              f"one, {SECOND_EXPERT!r}): the checkpoint is corrupt")
    if meta["format_version"] < EXPERTS_SINCE:
        raise CheckpointError(f"{meta_file} holds a second expert but says format version {meta['format_version']} "
                              f"(experts came with {EXPERTS_SINCE}); the checkpoint is corrupt")
    for name, entry in experts.items():
        _check_model_entry(entry, f"{meta_file}: expert {name!r}", _EXPERT_KEYS)
        check_config(entry["model_config"], f"{meta_file}: {name}.model_config")
        for layer, cfg in entry["layers"].items():
            check_layer(layer, cfg, meta_file)


def _check_model_entry(entry, what: str, keys: set[str]) -> None:
    """A model stored beside the transformer: its class, config and layers (required), its recipe, no other key."""
    bad = f"{what} has a malformed entry"
    if not isinstance(entry, dict) or not set(entry) <= keys or not {"model_class", "model_config",
                                                                   "layers"} <= set(entry):
        raise CheckpointError(f"{bad} (it needs model_class, model_config and layers, at most {sorted(keys)})")
    for key, kind in (("model_class", str), ("model_config", dict), ("layers", dict)):
        if not isinstance(entry[key], kind):
            raise CheckpointError(f"{bad} ({key})")
    if entry.get("recipe") is not None and not isinstance(entry["recipe"], dict):
        raise CheckpointError(f"{bad} (recipe)")


def check_config(value, where: str, depth: int = 0) -> None:
    """A model config is sizes and flags: bounded integers, short lists, shallow nesting. A huge one
    would make even a meta-device build run for hours."""
    if depth > 6:
        raise CheckpointError(f"{where} is nested too deeply; the checkpoint is corrupt")
    if is_int(value) and abs(value) > _MAX_CONFIG_INT:
        raise CheckpointError(f"{where} = {value} is larger than any real model's; the checkpoint is corrupt")
    if isinstance(value, list):
        if len(value) > _MAX_CONFIG_LIST:
            raise CheckpointError(f"{where} has {len(value)} entries; the checkpoint is corrupt")
        for i, v in enumerate(value):
            check_config(v, f"{where}[{i}]", depth + 1)
    if isinstance(value, dict):
        for k, v in value.items():
            check_config(v, f"{where}.{k[:100]}", depth + 1)


_LAYER_REQUIRED = {"type", "in_features", "out_features", "weights"}
_LAYER_KEYS = _LAYER_REQUIRED | {"bias", "activations", "group_size", "rank", "act_shift", "act_unsigned_from", "dtype",
                                  "bias_dtype"}
_LAYER_DTYPES = ("float32", "bfloat16", "float16")


def check_layer(name: str, cfg, meta_file: Path) -> None:
    """One ``layers`` entry: exactly SVDQLinear's constructor arguments, each of the right type and size."""
    bad = f"{meta_file}: quantized layer {name[:100]!r} has a malformed entry"
    if not isinstance(cfg, dict) or not _LAYER_REQUIRED <= set(cfg) <= _LAYER_KEYS:
        raise CheckpointError(f"{bad} (it needs {sorted(_LAYER_REQUIRED)} and at most {sorted(_LAYER_KEYS)})")
    if cfg["type"] not in ("linear", "conv1x1"):
        raise CheckpointError(f"{bad} (type {str(cfg['type'])[:50]!r})")
    for key, low in (("in_features", 1), ("out_features", 1), ("group_size", 0), ("rank", 0),
                     ("act_unsigned_from", 0)):
        if key in cfg and not (is_int(cfg[key]) and low <= cfg[key] <= _MAX_CONFIG_INT):
            raise CheckpointError(f"{bad} ({key} = {str(cfg[key])[:50]})")
    for key, ok in (("bias", lambda v: isinstance(v, bool)), ("weights", lambda v: isinstance(v, str)),
                    ("activations", lambda v: v is None or isinstance(v, str)),
                    ("act_shift", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
                     and abs(v) < 1e6), ("dtype", lambda v: v in _LAYER_DTYPES),
                    ("bias_dtype", lambda v: v in _LAYER_DTYPES)):
        if key in cfg and not ok(cfg[key]):
            raise CheckpointError(f"{bad} ({key} = {str(cfg[key])[:50]!r})")


def check_layer_counts_unparsed(meta: dict[str, Any], tensor_file: Path, where: Path) -> None:
    """:func:`check_layer_counts` against how many tensors the header can describe at most, from its unparsed
    text (:func:`header_budget`). When that fails, the header (then known to be under the hard cap) is parsed:
    a damaged one is reported as such, a sound one with its exact count."""
    try:
        check_layer_counts(meta, header_budget(tensor_file, header_bytes(tensor_file), MAX_TENSORS), where)
    except CheckpointError:
        header = check_tensor_file(tensor_file)
        header.pop("__metadata__", None)
        check_layer_counts(meta, len(header), where)
        raise


def check_layer_counts(meta: dict[str, Any], n_tensors: int, where: Path) -> None:
    """Every block holds at least one tensor, so a config with more blocks than the file has tensors lies;
    refusing it first keeps a hostile config from building millions of (meta) blocks."""
    for key, value in meta["model_config"].items():
        if ("layers" in key or "blocks" in key) and is_int(value) and value > n_tensors:
            raise CheckpointError(f"{where}: model_config {key} = {value}, but the tensor file holds only "
                                  f"{n_tensors} tensors; the checkpoint is corrupt")


class NonFiniteWarning(UserWarning):
    """A loaded checkpoint's 16-bit (kept) layers hold NaN or Inf values."""


def count_nonfinite(t: torch.Tensor) -> int:
    """How many NaN / Inf values ``t`` holds (float8 has no isfinite on the CPU: read the bit patterns)."""
    if t.dtype == torch.float8_e4m3fn:
        return int(((t.view(torch.uint8) & 0x7F) == 0x7F).sum())  # e4m3fn: only NaN, no Inf
    if t.dtype == torch.float8_e5m2:
        return int(((t.view(torch.uint8) & 0x7C) == 0x7C).sum())
    if not t.dtype.is_floating_point:
        return 0
    return int((~torch.isfinite(t)).sum())


# What the quantizer can write, derived from svdquant/algorithm (checked on load, so a damaged or hostile file
# cannot load values that make NaN images; measured margins on the tiny test models in the comments):
# * 1/λ: candidate_smoothing clamps λ to [1e-6, 1e6] (λ = 1 without smoothing);
SMOOTH_INV_RANGE = (1e-6 * (1 - 1e-6), 1e6 * (1 + 1e-6))
# * the branch: low_rank splits each singular value evenly, up = U·√S and down·λ = √S·Vᵀ (layers reading one input
#   share one down and split the rows of up), so for every rank component j, summed over the layers sharing a
#   down, ‖up[:, j]‖² = ‖(down·λ)[j]‖² = s_j. Tolerance 2⁻⁴ for 16-bit rounding (measured ≤ 0.5 %);
BRANCH_BALANCE_TOL = 2.0 ** -4
# * the residual, for methods whose branch is the top of Ŵ's spectrum (svdquant, lowrank): every entry of Ŵ and of
#   its rank-r part is at most the spectral norm σ₁ ≈ s₀ (the branch's first component), so |Q(R)| ≤ 2·s₀ plus
#   rounding; 4·s₀ allowed (measured ≤ 0.14·s₀). LoRC fits the branch to the rounding error instead: no bound;
RESIDUAL_BOUND = 4.0
# * everything the algorithm takes from the base model as it is (kept layers, biases, weight-only layers, and any
#   layer without the bounds above): finite, and beyond float16's largest value a NonFiniteWarning (no diffusion
#   model's weights come near; bit flips in an exponent do).
BASE_VALUE_WARN = 65504.0
_DERIVED_METHODS = {"svdquant": True, "lowrank": True, "lorc": False}  # method -> residual bounded by the branch


def check_values(model: nn.Module, tensors: dict[str, torch.Tensor], quantized_keys: set[str],
                 tensor_file: Path, method: str | None = None) -> None:
    """Values a file can hold but svdquant never writes. In quantized layers (scales, 1/λ, branch, bias,
    codes) they are a CheckpointError: the quantizer checks its inputs and never writes NaN / Inf,
    int4m multipliers outside [1, 18] or the code -8, and an INT8 kernel would overflow on the last two.
    ``method``: the recipe's method when svdquant's quantizer wrote the layers (not an import): then 1/λ, the
    branch and the residual's scales must also lie within the bounds it can produce (SMOOTH_INV_RANGE,
    BRANCH_BALANCE_TOL, RESIDUAL_BOUND above). Kept 16-bit layers are the base model's own weights: NaN / Inf
    there, and values the base model cannot have held (beyond BASE_VALUE_WARN) anywhere, get a NonFiniteWarning."""
    from ..formats import get_format
    from ..formats.int4m import MULT_MAX

    kept, huge = [], []
    for k, t in tensors.items():
        bad = count_nonfinite(t)
        if bad and k in quantized_keys:
            raise CheckpointError(f"{tensor_file}: tensor {k!r} holds {bad} NaN / Inf values, which svdquant never "
                                  "writes into a quantized layer; the checkpoint is corrupt")
        if bad:
            kept.append(f"{k} ({bad})")
        elif k not in quantized_keys and t.is_floating_point() and t.numel() and float(t.abs().max()) > BASE_VALUE_WARN:
            huge.append(k)
    shared: dict[tuple, list[str]] = {}
    for name, m in model.named_modules():
        if not isinstance(m, SVDQLinear):
            continue
        prefix = f"{name}." if name else ""
        t = {k: tensors[prefix + k] for k in m._buffers if prefix + k in tensors}
        if "wmult" in t:
            mult, codes = t["wmult"], t["qweight"]
            if mult.numel() and (int(mult.min()) < 1 or int(mult.max()) > MULT_MAX):
                raise CheckpointError(f"{tensor_file}: {prefix}wmult holds multipliers outside [1, {MULT_MAX}]; "
                                      "the checkpoint is corrupt")
            if bool(((codes & 0x0F) == 8).any() or ((codes >> 4) == 8).any()):
                raise CheckpointError(f"{tensor_file}: {prefix}qweight holds the 4-bit code -8 (codes are in "
                                      "[-7, 7]); the checkpoint is corrupt")
        sinv = t.get("smooth_inv")
        if method in _DERIVED_METHODS or method in ("naive", "smooth"):
            if sinv is not None and sinv.numel() and not (SMOOTH_INV_RANGE[0] <= float(sinv.min())
                                                          and float(sinv.max()) <= SMOOTH_INV_RANGE[1]):
                raise CheckpointError(f"{tensor_file}: {prefix}smooth_inv holds {float(sinv.min()):g} .. "
                                      f"{float(sinv.max()):g}; svdquant's smoothing keeps 1/λ within [1e-6, 1e6]: "
                                      "the checkpoint is corrupt")
        if "bias" in t and t["bias"].numel() and float(t["bias"].abs().max()) > BASE_VALUE_WARN:
            huge.append(prefix + "bias")  # the base model's bias (less the post-GELU shift's compensation)
        if m.rank and method in _DERIVED_METHODS:
            key = tuple(None if x is None else x.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
                        for x in (t["lora_down"], sinv))  # bit-identical down and 1/λ: one shared branch
            shared.setdefault(key, []).append(prefix)
            continue
        # no relation to check: bound what the layer can add to an output entry by the base model's range
        scale = float(sinv.max()) if sinv is not None and sinv.numel() else 1.0
        reach = float(get_format(m.weights).magnitude_bound(t).max()) * scale if m.out_features else 0.0
        if m.rank:
            reach = max(reach, m.rank * float(t["lora_up"].abs().max()) * float(t["lora_down"].abs().max()))
        if reach > BASE_VALUE_WARN:
            huge.append(prefix.rstrip("."))
    for prefixes in shared.values():
        _check_branch(model, tensors, prefixes, tensor_file, method)
    if kept:
        warnings.warn(f"{tensor_file}: {len(kept)} tensors of 16-bit layers hold NaN / Inf values, e.g. "
                      f"{', '.join(kept[:3])}; the model will likely produce NaN images", NonFiniteWarning,
                      stacklevel=3)
    if huge:
        warnings.warn(f"{tensor_file}: {len(huge)} tensors or layers hold values beyond ±{BASE_VALUE_WARN:g} (float16's "
                      f"largest; no model's weights come near), e.g. {', '.join(huge[:3])}; the model will likely "
                      "produce NaN images", NonFiniteWarning, stacklevel=3)


def _check_branch(model: nn.Module, tensors: dict[str, torch.Tensor], prefixes: list[str], tensor_file: Path,
                  method: str) -> None:
    """The layers sharing one down projection (and 1/λ): their branch against the even split of the singular
    values, and (svdquant, lowrank) their residual's reach against the largest singular value."""
    from ..formats import get_format

    first = prefixes[0]
    down = tensors[first + "lora_down"].double()
    sinv = tensors.get(first + "smooth_inv")
    if sinv is not None:
        down = down / sinv.double()  # down·λ = √S·Vᵀ
    s = down.square().sum(1)
    u = sum(tensors[p + "lora_up"].double().square().sum(0) for p in prefixes)
    top = float(torch.maximum(s, u).max())
    off = (u - s).abs() > BRANCH_BALANCE_TOL * torch.maximum(u, s) + 2.0 ** -20 * top
    if bool(off.any()):
        j = int(off.nonzero()[0])
        raise CheckpointError(
            f"{tensor_file}: the low-rank branch of {', '.join(p.rstrip('.') for p in prefixes)[:200]} is out of "
            f"balance (component {j}: ‖up‖² = {float(u[j]):.4g}, ‖down·λ‖² = {float(s[j]):.4g}); svdquant splits "
            "each singular value evenly between the two: the checkpoint is corrupt")
    if not _DERIVED_METHODS[method]:
        return
    s0 = float(s.max())
    for p in prefixes:
        m = model.get_submodule(p.rstrip("."))
        t = {k: tensors[p + k] for k in m._buffers if p + k in tensors}
        reach = float(get_format(m.weights).magnitude_bound(t).max())
        if reach > RESIDUAL_BOUND * s0 + 2.0 ** -10:
            raise CheckpointError(
                f"{tensor_file}: {p}wscales reach {reach:.4g}, above {RESIDUAL_BOUND:g}× the branch's largest "
                f"singular value ({s0:.4g}), which svdquant's residual never exceeds: the checkpoint is corrupt")


def quantizer_method(meta: dict[str, Any]) -> str | None:
    """The recipe's method when svdquant's quantizer wrote the layers, else None (an import, an unknown recipe)."""
    from ..recipes import METHODS

    recipe = meta.get("recipe")
    if meta.get("source") is not None or not isinstance(recipe, dict):
        return None
    return recipe.get("method") if recipe.get("method") in METHODS else None
