"""Float-scale W4A4 layers (``w4a4-float``: Nunchaku's INT4, the paper's) -> two-level INT4 (``w4a4``).

Why: a 16-bit scale per group of 64 makes the GEMM rescale its accumulator after every group, on the CUDA
cores; on Hopper that rescale sets the speed (see :mod:`svdquant.formats.int4m`). Two-level scales
(an fp32 per row × an integer 1-18 per group) make every layer a plain INT8 GEMM. The conversion is not
exact: a product ``code · scale`` of a 16-bit group scale is in general not ``code' · m · s_row`` for any
integer ``m``, and activations then take two-level scales too. So it re-quantizes each weight from its
dequantized values (the ``int4m`` weight rule, best multiplier per group), keeps smoothing, branch and
shift, re-compensates the post-GELU shift in the bias for the new codes, and measures what it costs.

The measure, per layer, on a probe of 64 tokens whose smoothed inputs are standard normal (``x = z · λ``;
on post-GELU channels ``|z| · λ − shift``, the non-negative range those layers quantize): the relative
output error ``‖y − y_ref‖ / ‖y_ref‖`` of the float-scale layer and of the two-level one against ``y_ref``,
the same layer with the imported weights and unquantized (16-bit) activations. The 16-bit model an
imported checkpoint was made from is not at hand, so this is what can be measured: the error the
conversion adds to the layer's own (4-bit activation and weight) error.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .._state import peek, state
from ..formats import get_format, quantize
from ..formats.int4 import shift_vector
from ..integrations.diffusers import compat  # h-diffusers
from ..modules import SVDQLinear
from ..recipes import get_recipe

FLOAT_PAIR = ("int4", "int4")    # weights, activations with 16-bit group scales
TWO_LEVEL = "int4m"
PROBE_TOKENS = 64


@dataclass
class TwoLevelReport:
    """What :func:`to_two_level` changed: per converted layer, the relative output error on the probe of the
    float-scale layer and of the two-level one, both against the 16-bit-activation reference."""

    errors: dict[str, tuple[float, float]] = field(default_factory=dict)  # layer -> (float scales, two-level)

    def median(self, which: int) -> float:
        return statistics.median(e[which] for e in self.errors.values()) if self.errors else 0.0

    @property
    def worst(self) -> tuple[str, float, float]:
        """The layer whose error grew the most: (name, float-scale error, two-level error)."""
        name, (a, b) = max(self.errors.items(), key=lambda kv: kv[1][1] - kv[1][0])
        return name, a, b

    def __str__(self) -> str:
        if not self.errors:
            return "two-level scales: no float-scale W4A4 layer to convert"
        name, a, b = self.worst
        return (f"two-level scales: {len(self.errors)} W4A4 layers converted. Relative output error on a probe "
                f"({PROBE_TOKENS} tokens per layer) against the same weights with 16-bit activations: median "
                f"{self.median(0):.2%} with float scales -> {self.median(1):.2%} two-level "
                f"(largest increase: {name}, {a:.2%} -> {b:.2%})")


def _probe(m: SVDQLinear, gen: torch.Generator) -> torch.Tensor:
    z = torch.randn(PROBE_TOKENS, m.in_features, generator=gen)
    lam = 1.0 / m.smooth_inv.detach().float().cpu()
    shifted = shift_vector(m.in_features, m.act_shift, m.act_unsigned_from if m.act_shift else None).bool()
    x = torch.where(shifted, z.abs() * lam - m.act_shift, z * lam)
    return x.to(m.dtype).to(m.device)


@torch.no_grad()
def _reference(m: SVDQLinear, x: torch.Tensor) -> torch.Tensor:
    """The layer with its stored weights, branch and bias but unquantized activations, in float64."""
    xd = x.double()
    shift = shift_vector(m.in_features, m.act_shift, m.act_unsigned_from if m.act_shift else None, x.device)
    y = ((xd + shift.double()) * m.smooth_inv.double()) @ m.dequantized_weight(torch.float64).T
    if m.rank:
        y = y + (xd @ m.lora_down.double().T) @ m.lora_up.double().T
    return y + m.bias.double() if m.bias is not None else y


@torch.no_grad()
def _convert(m: SVDQLinear) -> SVDQLinear:
    k = m.in_features
    w_old = m.dequantized_weight(torch.float32)
    q = quantize(w_old, TWO_LEVEL, m.group_size, weight=True, check=False)
    new = SVDQLinear(k, m.out_features, bias=m.bias is not None, weights=TWO_LEVEL, activations=TWO_LEVEL,
                     group_size=m.group_size, rank=m.rank, act_shift=m.act_shift,
                     act_unsigned_from=m.act_unsigned_from, dtype=m.dtype, device=m.device)
    for name, t in get_format(TWO_LEVEL).to_buffers(q).items():
        getattr(new, name).copy_(t)
    new.smooth_inv.copy_(m.smooth_inv)
    if m.rank:
        new.lora_down.copy_(m.lora_down)
        new.lora_up.copy_(m.lora_up)
    if m.bias is not None:
        bias = m.bias.double()
        if m.act_shift:  # b' = b − shift · Σ_k Q(R)_nk / λ_k over the shifted channels: redo it for the new codes
            s = (shift_vector(k, m.act_shift, m.act_unsigned_from, m.device).double() * m.smooth_inv.double())
            bias = bias + (w_old.double() - q.dequantize(torch.float64)[:, :k]) @ s
        new.bias.copy_(bias.to(m.dtype))
    new.refresh()
    return new


def to_two_level(model: nn.Module, *, seed: int = 0) -> TwoLevelReport:
    """Convert every float-scale W4A4 layer of ``model`` to two-level scales in place (they then run the INT8
    GEMM path on any GPU with compute capability 8.0+, Hopper's fast path); returns the error each added.
    Weight-only layers are left as they are (their W4A16 kernel has no per-group rescale to avoid)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"to_two_level takes the quantized model (e.g. pipe.transformer), got {type(model).__name__}")
    if peek(model).loras:
        raise ValueError(f"LoRAs are loaded ({', '.join(peek(model).loras)}); unload them "
                         "(svdquant.unload_lora) before converting")
    report = TwoLevelReport()
    gen = torch.Generator().manual_seed(seed)
    targets = [(n, m) for n, m in model.named_modules()
               if isinstance(m, SVDQLinear) and (m.weights, m.activations) == FLOAT_PAIR]
    rank = 0
    for name, m in targets:
        x = _probe(m, gen)
        ref = _reference(m, x)
        new = _convert(m)
        with torch.no_grad():
            errs = [float((mod(x).double() - ref).norm() / ref.norm().clamp_min(1e-30)) for mod in (m, new)]
        report.errors[name] = (errs[0], errs[1])
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
        rank = max(rank, m.rank)
    if targets:
        state(model).recipe = get_recipe("w4a4", rank=rank).to_dict()
        compat.quantized(model)  # h-diffusers: its quantization_config names the new formats
    return report
