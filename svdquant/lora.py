"""LoRAs on quantized models, without requantization, several at once, with live strengths.

    svdquant.load_lora(pipe, "style.safetensors", name="style", strength=0.8)
    svdquant.load_lora(pipe, "detail.safetensors", name="detail", strength=0.5)
    svdquant.set_lora_strength(pipe, "style", 1.2)     # no reload, no recomputation
    svdquant.unload_lora(pipe, "style")                 # the branch is restored exactly

A LoRA ``(A: r×K, B: N×r)`` on a quantized layer is concatenated onto its 16-bit
low-rank branch: ``L1 ← [L1; A]``, ``L2 ← [L2, s·B]`` (DESIGN.md §1). The branch reads
the raw (unsmoothed) input, so the LoRA applies unchanged, and the fused kernels run
it at the cost of a wider branch. The base branch is never modified: adapters live
beside it, so a strength change rescales one block and unloading is exact. On layers
that stay 16-bit the LoRA is applied as an unmerged delta ``x·Aᵀ·(s·B)ᵀ`` added to the
layer's output (the weights are never touched, so unloading is exact there too).

Formats: diffusers / PEFT keys (``...to_q.lora_A.weight``), kohya keys
(``lora_unet_..._lora_down.weight`` with ``.alpha``) using the model's module names,
and for FLUX, FLUX.2, Wan, Qwen-Image and Z-Image every format diffusers' loader of that model converts (FLUX: kohya
with the original ``double_blocks`` names, XLabs, BFL; Wan: its original ``diffusion_model.blocks.N.self_attn.q``
names and musubi-tuner's). Files are read with safetensors only.

A two-expert pipeline (Wan 2.2 A14B) takes one LoRA per expert, as its LoRAs come (high- and low-noise files):
``load_lora(pipe, "high.safetensors")`` goes to ``pipe.transformer``, ``load_lora(pipe.transformer_2,
"low.safetensors")`` to the low-noise expert.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open

from ._state import peek, state
from .modules import SVDQConv1x1, SVDQLinear
from .modules.lora_linear import LoRALinear

_PREFIXES = ("transformer.", "base_model.model.", "model.diffusion_model.", "diffusion_model.", "unet.")


class LoRAError(ValueError):
    """A LoRA file that cannot be applied: unreadable, malformed, or for other layers."""


def _model(target) -> nn.Module:
    m = getattr(target, "transformer", None)
    return m if isinstance(m, nn.Module) else target


def read_lora_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise LoRAError(f"no LoRA file at {path}")
    if path.suffix != ".safetensors":
        raise LoRAError(f"{path}: only .safetensors LoRAs are read (pickled .bin/.pt files can run code); "
                        "convert it with safetensors first")
    try:
        with safe_open(str(path), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise LoRAError(f"{path} is not a readable safetensors file ({e})") from None


# The models whose LoRAs circulate in their original repositories' names (Wan's ``diffusion_model.blocks.0.
# self_attn.q``, musubi-tuner's ``lora_unet_...``, Qwen-Image's and Z-Image's kohya / ``diffusion_model.`` files,
# FLUX.2's kohya files): diffusers' loader of each model converts them to diffusers' names, and leaves files already
# in diffusers' names as they are (diffusers/loaders/lora_pipeline.py, ``<Mixin>.lora_state_dict``).
DIFFUSERS_CONVERTERS = {
    "WanTransformer3DModel": "WanLoraLoaderMixin",
    "QwenImageTransformer2DModel": "QwenImageLoraLoaderMixin",
    "ZImageTransformer2DModel": "ZImageLoraLoaderMixin",
    "Flux2Transformer2DModel": "Flux2LoraLoaderMixin",
}


def _convert(sd: dict[str, torch.Tensor], model: nn.Module, names) -> dict[str, torch.Tensor]:
    """Other projects' LoRA formats in diffusers' names, through diffusers' own converters: FLUX's (kohya with BFL
    names, XLabs, ...) and those of :data:`DIFFUSERS_CONVERTERS`. ``names``: :func:`_module_names` of ``model``."""
    mixin = DIFFUSERS_CONVERTERS.get(type(model).__name__)
    own, total = _matching(sd, names)
    if mixin is not None and own < total:  # a file in the model's own names needs no converter
        import diffusers.loaders

        try:
            converted, error = getattr(diffusers.loaders, mixin).lora_state_dict(dict(sd)), None
        except Exception as e:
            converted, error = None, e
        # The converter's result is taken when it maps more of the file onto the model than the file's own names
        # do. A file partly in the model's names (a few stray layers) stays as it is, so that load_lora names the
        # strays: the converters drop such a file whole (FLUX.2's) or fail on it (Wan's, with an IndexError).
        if converted is not None and (own == 0 or _matching(converted, names)[0] > own):
            return converted
        if own == 0:  # the converter failed on a file of none of the model's names
            raise LoRAError(f"diffusers could not convert this {type(model).__name__} LoRA "
                            f"({type(error).__name__}: {error})") from None
    if type(model).__name__ == "FluxTransformer2DModel" and any(
        k.startswith(("lora_unet_double_blocks", "lora_unet_single_blocks", "double_blocks", "single_blocks",
                      "diffusion_model.double_blocks", "lora_transformer_single_transformer_blocks"))
        or "processor" in k for k in sd
    ):
        from diffusers.loaders import FluxLoraLoaderMixin

        try:
            return FluxLoraLoaderMixin.lora_state_dict(dict(sd))
        except Exception as e:
            raise LoRAError(f"diffusers could not convert this FLUX LoRA ({type(e).__name__}: {e})") from None
    return sd


def _parse(key: str, modules: dict, underscored: dict) -> tuple[str, str] | None:
    """(the module name a LoRA key addresses, which tensor it is: lora_A / lora_down / lora_B / lora_up / alpha), in
    diffusers' names or kohya's (the module names with underscores), or None for a key of no LoRA pair."""
    m = re.match(r"(.+?)\.(lora_A|lora_down|lora_B|lora_up)(?:\.[^.]+)?\.weight$", key) or re.match(
        r"(.+?)\.(alpha)$", key)
    if m is None:
        return None
    base = m.group(1)
    for p in _PREFIXES:
        if base.startswith(p):
            base = base[len(p):]
    if base.startswith("lora_unet_") or base.startswith("lora_transformer_"):
        base = underscored.get(base.split("_", 2)[2], base)
    elif base not in modules and base in underscored:
        base = underscored[base]
    return base, m.group(2)


def _module_names(model: nn.Module) -> tuple[dict, dict]:
    """``model``'s modules by name, and their names by the underscored form kohya's keys use."""
    modules = dict(model.named_modules())
    return modules, {n.replace(".", "_"): n for n in modules if n}


def _matching(sd: dict[str, torch.Tensor], names) -> tuple[int, int]:
    """(how many keys of ``sd`` are LoRA tensors of a model's modules by its own names, how many keys); ``names``:
    :func:`_module_names` of the model."""
    modules, underscored = names
    parsed = [_parse(k, modules, underscored) for k in sd if "dora_scale" not in k]
    return sum(p is not None and p[0] in modules for p in parsed), len(parsed)


def lora_pairs(sd: dict[str, torch.Tensor], model: nn.Module) -> tuple[dict[str, tuple], list[str]]:
    """``{module name: (A [r, K], B [N, r], scale)}`` and the keys that name no module of ``model``."""
    names = _module_names(model)
    sd = _convert(sd, model, names)
    modules, underscored = names
    downs, ups, alphas, other = {}, {}, {}, []
    for key, t in sd.items():
        parsed = _parse(key, modules, underscored)
        if parsed is None:
            other.append(key)
            continue
        base, kind = parsed
        {"lora_A": downs, "lora_down": downs, "lora_B": ups, "lora_up": ups, "alpha": alphas}[kind][base] = t
    unmatched = [k for k in other if "dora_scale" not in k]
    pairs = {}
    for base in sorted(set(downs) | set(ups)):
        if base not in downs or base not in ups:
            raise LoRAError(f"LoRA layer {base!r} has {'no up (B)' if base not in ups else 'no down (A)'} matrix")
        a, b = downs[base], ups[base]
        a = a.reshape(a.shape[0], -1) if a.ndim == 4 else a  # 1x1 conv LoRAs
        b = b.reshape(b.shape[0], -1) if b.ndim == 4 else b
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise LoRAError(f"LoRA layer {base!r}: A {tuple(a.shape)} and B {tuple(b.shape)} do not form a low-rank pair")
        scale = float(alphas[base]) / a.shape[0] if base in alphas else 1.0
        pairs[base] = (a, b, scale)
    return pairs, unmatched


def _target_module(model: nn.Module, name: str):
    m = model.get_submodule(name)
    if isinstance(m, SVDQConv1x1):
        return m.linear
    return m


def load_lora(target, path: str | os.PathLike, name: str | None = None, strength: float = 1.0) -> str:
    """Apply a LoRA file to a model or pipeline; returns the adapter's name (default: the file's stem)."""
    model = _model(target)
    name = name or Path(path).stem
    loaded = peek(model).loras
    if name in loaded:
        raise LoRAError(f"a LoRA named {name!r} is already loaded; unload it or choose another name")
    pairs, unmatched = lora_pairs(read_lora_file(path), model)
    if not pairs:
        raise LoRAError(f"{path} holds no LoRA layers (no lora_A/lora_B or lora_down/lora_up pairs)")
    modules = dict(model.named_modules())
    missing = [n for n in pairs if n not in modules]
    if missing or unmatched:
        keys = missing + unmatched
        raise LoRAError(
            f"{path}: {len(keys)} LoRA entries match no layer of {type(model).__name__}, e.g. {keys[:5]}; "
            "is it a LoRA for another model?"
        )
    for n, (a, b, _) in pairs.items():  # check every shape before touching the model
        mod = _target_module(model, n)
        k, out = (mod.in_features, mod.out_features) if hasattr(mod, "in_features") else (None, None)
        if not isinstance(mod, (SVDQLinear, nn.Linear, LoRALinear)):
            raise LoRAError(f"{path}: layer {n!r} is a {type(mod).__name__}; LoRAs apply to linear layers only")
        if a.shape[1] != k or b.shape[0] != out:
            raise LoRAError(f"{path}: LoRA for {n!r} is {b.shape[0]}x{a.shape[1]} (B·A), the layer is {out}x{k}")
    for n, (a, b, scale) in pairs.items():
        mod = _target_module(model, n)
        if isinstance(mod, nn.Linear):
            wrapped = LoRALinear(mod)
            parent, _, child = n.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, wrapped)
            mod = wrapped
        mod.add_adapter(name, a, b * scale, strength)
    state(model).loras = {**loaded, name: float(strength)}
    return name


def _adapted(model: nn.Module, name: str):
    if name not in peek(model).loras:
        raise LoRAError(f"no LoRA named {name!r} is loaded (loaded: {sorted(peek(model).loras)})")
    return [m for m in model.modules() if isinstance(m, (SVDQLinear, LoRALinear)) and name in m.adapters]


def set_lora_strength(target, name: str, strength: float) -> None:
    """Change a loaded LoRA's strength at run time (no reload, no recomputation of the 4-bit weights)."""
    model = _model(target)
    for m in _adapted(model, name):
        m.set_adapter_strength(name, strength)
    state(model).loras[name] = float(strength)


def unload_lora(target, name: str) -> None:
    """Remove a LoRA; the quantized branch and any wrapped 16-bit layer are restored exactly."""
    model = _model(target)
    for m in _adapted(model, name):
        m.remove_adapter(name)
    for n, m in list(model.named_modules()):
        if isinstance(m, LoRALinear) and not m.adapters:
            parent, _, child = n.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, m.base)
    del state(model).loras[name]


def loaded_loras(target) -> dict[str, float]:
    """Loaded LoRA names and their strengths."""
    return dict(peek(_model(target)).loras)
