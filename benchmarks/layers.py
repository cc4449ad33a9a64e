"""Synthetic FLUX-width layers with trained-model-like outliers, shared by the layer benchmarks.

Activations: Gaussian tokens with a log-normal per-token scale and a few channels
(0.5 %) 10–100× larger than the rest, the pattern SVDQuant is built for. The
12288 → 3072 layer reads post-GELU activations (its pre-activations carry the outlier
channels), as FLUX's MLP down projection does. Weights: Student-t (ν = 4) entries with
log-normal row scales, i.e. heavy tails.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

FLUX_LAYERS = {
    # name: (in_features, out_features, post_gelu)
    "attn 3072->3072": (3072, 3072, False),
    "mlp up 3072->12288": (3072, 12288, False),
    "mlp down 12288->3072": (12288, 3072, True),
}


@dataclass
class LayerCase:
    name: str
    linear: torch.nn.Linear
    calib: torch.Tensor   # inputs to quantize from
    test: torch.Tensor    # held-out inputs to measure on
    post_gelu: bool


def outlier_activations(tokens: int, k: int, gen: torch.Generator, outlier_frac: float = 0.005) -> torch.Tensor:
    n_out = max(2, int(k * outlier_frac))
    perm = torch.randperm(k, generator=gen)
    chan_scale = torch.ones(k)
    chan_scale[perm[:n_out]] = torch.logspace(1, 2, n_out)  # 10x .. 100x
    tok_scale = torch.exp(0.5 * torch.randn(tokens, 1, generator=gen))
    return torch.randn(tokens, k, generator=gen) * tok_scale * chan_scale


def heavy_tailed_weight(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    # Student-t with 4 degrees of freedom: z / sqrt(chi2_4 / 4)
    z = torch.randn(n, k, generator=gen)
    chi2 = torch.randn(n, k, 4, generator=gen).square().sum(-1)
    t = z / torch.sqrt(chi2 / 4)
    row = torch.exp(0.3 * torch.randn(n, 1, generator=gen))
    return t * row / math.sqrt(k)


def make_layer(name: str, tokens: int = 256, seed: int = 0, dtype=torch.bfloat16) -> LayerCase:
    k, n, post_gelu = FLUX_LAYERS[name]
    gen = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(k, n, dtype=dtype)
    with torch.no_grad():
        lin.weight.copy_(heavy_tailed_weight(n, k, gen))
        lin.bias.copy_(0.02 * torch.randn(n, generator=gen))
    # One stream of tokens split into calibration and held-out halves: same channels are outliers.
    x = outlier_activations(2 * tokens, k, gen)
    if post_gelu:
        x = F.gelu(x, approximate="tanh")
    x = x.to(dtype)
    return LayerCase(name, lin, x[:tokens], x[tokens:], post_gelu)


def rel_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref.float()).norm() / ref.float().norm())


def sqnr_db(rel: float) -> float:
    return -20 * math.log10(max(rel, 1e-12))
