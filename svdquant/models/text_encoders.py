"""Text encoders: which linears of a pipeline's T5 / UMT5 / CLIP / Qwen2.5-VL / Qwen3 / Mistral 3 / Gemma encoders are
quantized.

A text encoder runs once per prompt, not once per denoising step, so its cost is memory, not time:
T5-XXL is 9.5 GB in 16-bit, more than FLUX.1-dev's 4-bit transformer. Its linears are quantized
weight-only (W4A16: INT4, a 16-bit scale per group of 64, 16-bit activations), which needs no
calibration: with no smoothing and no branch the rounding rule alone decides the result.

Quantized: every ``nn.Linear`` inside the encoder's stack of blocks (T5 / UMT5 ``encoder.block``, CLIP
``encoder.layers``, Qwen2.5-VL and Mistral 3 ``model.language_model.layers``, Qwen3 and Gemma ``layers`` /
``model.layers``): attention q/k/v/o
and the feed-forward linears (T5 ``wi`` / ``wi_0`` / ``wi_1`` / ``wo``, CLIP ``fc1`` / ``fc2``,
Qwen / Gemma ``gate`` / ``up`` / ``down``). They hold nearly all the weights (T5-XXL: 4.63 of 4.76 B parameters).

Kept 16-bit, each for a reason:

* token and position embeddings, and T5's relative-attention bias table: lookups, nothing is
  multiplied, and a lookup table in 4 bits changes every token that reads the row;
* every norm (T5's ``final_layer_norm`` included): a few thousand values that set the scale of what
  the transformer reads;
* layers after the block stack (CLIP's ``text_projection``, the pooled vector FLUX and SDXL condition
  on directly; Qwen2.5-VL's ``lm_head``, which pipelines never call): their output *is* the embedding,
  with no later block to average their error out;
* Qwen2.5-VL's and Mistral 3's vision towers and projectors: only the edit pipelines run Qwen2.5-VL's, on images,
  and FLUX.2 reads Mistral 3's text path alone; nothing here measures them.

Nunchaku's published 4-bit T5 (AWQ, group 128) quantizes ``q, k, v, o, wi_0`` and keeps ``wi_1`` and
``wo`` 16-bit (``deepcompressor``'s ``quantize_t5_encoder``); this module quantizes all of them, and
the error it reports per layer is what a caller can use to exclude more.

:func:`check_text_encoders` checks a pipeline's encoders before anything runs and :func:`quantize_encoder` rounds
one in place; ``svdquant.quantize_text_encoders`` (in :mod:`svdquant.quantize`) drives them and reports.
"""

from __future__ import annotations

import re

import torch
import torch.nn as nn

from .._state import state
from .._memory import tensor_bytes
from ..integrations.diffusers import compat
from .._progress import progress as progress_bar
from ..recipes import QuantConfig
from .base import set_module

# Where each family keeps its blocks, across transformers versions (CLIPTextModel lost its
# ``text_model.`` prefix in transformers 5); the first that exists as a non-empty ModuleList is used.
BLOCK_STACKS = ("encoder.block", "encoder.layers", "text_model.encoder.layers", "model.language_model.layers",
                "language_model.layers", "model.layers", "layers")

# Pipeline attributes that hold text encoders (FLUX: text_encoder = CLIP, text_encoder_2 = T5;
# SD3: a third, T5; Qwen-Image, PixArt, SANA: one). A checkpoint names its files after them.
NAME = re.compile(r"text_encoder(_[2-9])?")


def text_encoders(pipe) -> dict[str, nn.Module]:
    """The pipeline's text encoders by attribute name, in name order (absent or ``None`` ones left out)."""
    names = ["text_encoder"] + [f"text_encoder_{i}" for i in range(2, 10)]
    return {n: m for n in names if isinstance(m := getattr(pipe, n, None), nn.Module)}


def block_stack(encoder: nn.Module) -> str:
    """The path of the encoder's block stack; ValueError for an encoder svdquant does not know."""
    for path in BLOCK_STACKS:
        try:
            m = encoder.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(m, nn.ModuleList) and len(m):
            return path
    raise ValueError(f"svdquant does not know where {type(encoder).__name__} keeps its blocks (looked for "
                     f"{', '.join(BLOCK_STACKS)}); quantize the transformer alone (text_encoders=False)")


def encoder_layers(encoder: nn.Module) -> list[str]:
    """Names of the linears to quantize: every ``nn.Linear`` in the block stack (see the module doc)."""
    stack = block_stack(encoder)
    return [f"{stack}.{n}" for n, m in encoder.get_submodule(stack).named_modules() if isinstance(m, nn.Linear)]


def fit_quantized(encoder: nn.Module) -> None:
    """What transformers' code asks of a linear that :class:`~svdquant.SVDQLinear` does not have.

    T5's feed-forward (``T5DenseActDense`` / ``T5DenseGatedActDense`` in transformers'
    ``modeling_t5.py``) reads ``self.wo.weight.dtype`` and casts its input to it: a T5 loaded in fp16
    keeps ``wo`` in fp32 (``_keep_in_fp32_modules``) because T5's feed-forward overflows fp16. A quantized
    ``wo`` gets an empty tensor of its own dtype as ``weight``, so the cast, and the fp32 residual
    stream that follows from it, stay as in the 16-bit model (Nunchaku's T5 does the same).
    Called after quantizing and after loading.
    """
    from ..modules import SVDQLinear

    for name, m in encoder.named_modules():
        if isinstance(m, SVDQLinear) and name.rpartition(".")[2] == "wo" and "weight" not in vars(m):
            m.weight = torch.empty(0, dtype=m.dtype)


def check_text_encoders(pipe, recipe: QuantConfig) -> dict[str, list[str]]:
    """The pipeline's text encoders and the layers to quantize in each, checked before anything runs."""
    from ..modules import SVDQLinear

    if pipe is None:
        raise ValueError("text_encoders=True needs the pipeline, whose text encoders it quantizes: pass the "
                         "pipeline itself, not its transformer")
    if recipe.activations is not None or recipe.branch_rank:
        raise ValueError(f"text encoders are quantized weight-only; recipe {recipe.name!r} is not (use 'w4a16' "
                         "or 'nf4')")
    found = text_encoders(pipe)
    if not found:
        raise ValueError(f"{type(pipe).__name__} has no text encoder (pipe.text_encoder...); leave text_encoders "
                         "False")
    plan = {}
    for name, te in found.items():
        if any(isinstance(m, SVDQLinear) for m in te.modules()):
            raise ValueError(f"{name} ({type(te).__name__}) is already quantized; quantize a fresh pipeline")
        plan[name] = encoder_layers(te)
    return plan


def quantize_layer_weight_only(root: nn.Module, layer: str, recipe: QuantConfig, *, device=None):
    """The linear ``layer`` of ``root`` replaced by its weight-only quantization under ``recipe`` (no calibration
    inputs: rounded to nearest), the weight rounded on ``device`` when given and the new layer put where the old
    one was. Returns the algorithm's report (the weight's own error)."""
    from ..algorithm import quantize_weight_only
    from ..modules import SVDQLinear

    lin = root.get_submodule(layer)
    w, b = lin.weight, lin.bias
    if device is not None:
        w, b = w.to(device), b.to(device) if b is not None else None
    qw, rep = quantize_weight_only(w, b, recipe)
    set_module(root, layer, SVDQLinear.from_quantized(qw, recipe, w.dtype).to(lin.weight.device))
    return rep


def quantize_encoder(name: str, encoder: nn.Module, layers: list[str], recipe: QuantConfig, *, device=None,
                     progress: bool = True) -> tuple[list[tuple[str, object]], dict]:
    """Quantize ``layers`` of the text encoder ``name`` weight-only, in place (each weight rounded on ``device``
    when given, the layer brought back to where the weight was). Returns, per layer, its full name
    (``"text_encoder_2.encoder.block.0..."``) with the algorithm's report, and the encoder's summary (class,
    sizes before and after)."""
    before = tensor_bytes(encoder)
    done = []
    for layer in progress_bar(layers, desc=f"quantizing {name}", unit="layer", enabled=progress):
        done.append((f"{name}.{layer}", quantize_layer_weight_only(encoder, layer, recipe, device=device)))
    fit_quantized(encoder)
    state(encoder).recipe = recipe.to_dict()
    compat.quantized(encoder)  # save_pretrained then writes its quantization_config (integrations/transformers)
    kept = sum(1 for n, m in encoder.named_modules() if isinstance(m, nn.Linear))
    summary = {"class": type(encoder).__name__, "layers": len(layers), "kept": kept, "weights": recipe.weights,
               "group_size": recipe.group_size, "bytes_16bit": before, "bytes_quantized": tensor_bytes(encoder)}
    return done, summary


__all__ = ["BLOCK_STACKS", "NAME", "text_encoders", "block_stack", "encoder_layers", "fit_quantized",
           "check_text_encoders", "quantize_layer_weight_only", "quantize_encoder"]
