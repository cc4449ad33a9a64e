"""Quantization recipes: one frozen config object per scheme (torchao style).

    from svdquant.recipes import Int4Config
    recipe = Int4Config()                      # SVDQuant INT4 weights (two-level scales), INT8 activations
    recipe = Int4Config(rank=64, svd="full")   # any knob
    recipe = Int4Config(method="lorc")         # an ablation baseline, same interface
    recipe = get_recipe("nvfp4")               # by name, as the CLI does

``method`` picks how the low-rank branch and the smoothing factor are chosen:

| method      | smoothing λ | low-rank branch                        |
| ----------- | ----------- | -------------------------------------- |
| svdquant    | grid search | SVD of the smoothed weight, refined    |
| naive       | none        | none (round to nearest)                |
| smooth      | grid search | none                                   |
| lowrank     | none        | SVD of the weight (no refinement)      |
| lorc        | grid search | SVD of the quantization error (LoRC)   |
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

METHODS = ("svdquant", "naive", "smooth", "lowrank", "lorc")
SVD_KINDS = ("randomized", "full")
SMOOTH_SEARCHES = ("coarse-to-fine", "full")  # svdquant.algorithm.search

POST_GELU_SHIFT = 0.171875  # GELU(x) >= -0.17; exact in bf16/fp16


def default_smooth_grid() -> tuple[tuple[float, float], ...]:
    """The 39 (α, β) candidates: identity, (α, 0) and (α, 1 − α) for α = 0.05 … 0.95."""
    alphas = [round(0.05 * i, 2) for i in range(1, 20)]
    return ((0.0, 0.0),) + tuple((a, 0.0) for a in alphas) + tuple((a, round(1 - a, 2)) for a in alphas)


@dataclass(frozen=True)
class QuantConfig:
    """Base of every recipe. Subclasses only change defaults.

    weights / activations: format names from :mod:`svdquant.formats`; ``activations=None``
        keeps activations 16-bit (weight-only). The weight format's record says which
        activation formats it multiplies with.
    group_size: channels per scale along K for the weights, and for activations in a grouped
        format (per-row formats such as int8 take one scale per token).
    rank: rank of the 16-bit low-rank branch (a multiple of 16 is fastest on GPU).
    method: see the module docstring.
    smooth_grid: (α, β) candidates, ``λ_j = max|X_j|^α / max|W_j|^β``.
    iterations: at most this many low-rank refinement steps; stops at the first that
        does not lower the output error. 10 by default: on an H100 the 57-block FLUX.1-dev-size quantization
        takes 57.6-58.2 s with it against 63.0-65.0 with 100, at 0.04 dB more output error on random weights and
        within the seeds' noise on the tiny FLUX (BENCHMARKS.md, sessions 27 and 28).
    svd: "randomized" (``torch.svd_lowrank``, the fast default) or "full" (float64).
    eval_tokens: calibration tokens used to score candidates (a deterministic subsample).
    gptq: round the residual with GPTQ (Hessian of the calibration inputs, act-order, damping) instead of to
        nearest; see :mod:`svdquant.algorithm.gptq`. The Hessian leaves out the scoring tokens (at most half of
        the tokens then score), and GPTQ is kept per layer only where it lowers the output error on them.
    gptq_damp: GPTQ's damping, a fraction of the Hessian's mean diagonal added to it.
    smooth_search: "coarse-to-fine" (every 4th α of each family of the grid, then the neighbours of the best:
        about half the candidates, the same choice where the error has one minimum along α) or "full" (every
        candidate); see :mod:`svdquant.algorithm.search`.
    """

    name: str = "custom"
    weights: str = "int4m"
    activations: str | None = "int8"
    group_size: int = 64
    rank: int = 32
    method: str = "svdquant"
    smooth_grid: tuple[tuple[float, float], ...] = field(default_factory=default_smooth_grid, repr=False)
    iterations: int = 10
    svd: str = "randomized"
    eval_tokens: int = 512
    smooth_search: str = "coarse-to-fine"
    gptq: bool = False
    gptq_damp: float = 0.01

    def __post_init__(self):
        from .formats import FORMATS

        wf = FORMATS.get(self.weights)
        if wf is None or not wf.weight:
            raise ValueError(f"weights={self.weights!r} is not a weight format; choose one of "
                             f"{tuple(n for n, f in FORMATS.items() if f.weight)}")
        if self.activations is not None:
            af = FORMATS.get(self.activations)
            if af is None or not af.activation:
                raise ValueError(f"activations={self.activations!r} is not an activation format; choose one of "
                                 f"{tuple(n for n, f in FORMATS.items() if f.activation)} or None")
            if self.activations not in wf.pairs_with:
                raise ValueError(
                    f"weights={self.weights!r} with activations={self.activations!r}: no product of the two; "
                    f"{self.weights} weights take activations in {wf.pairs_with} (or activations=None for weight-only)"
                )
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r} is unknown; choose one of {METHODS}")
        if self.smooth_search not in SMOOTH_SEARCHES:
            raise ValueError(f"smooth_search={self.smooth_search!r} is unknown; choose one of {SMOOTH_SEARCHES}")
        if self.gptq and not wf.has_weight_grid:
            raise ValueError(f"gptq=True needs weights GPTQ can round (int4, int4m, nvfp4, nf4), not "
                             f"{self.weights!r}; use gptq=False")
        if not 0 < self.gptq_damp <= 1:
            raise ValueError(f"gptq_damp must be in (0, 1] (a fraction of the Hessian's mean diagonal), "
                             f"got {self.gptq_damp}")
        if self.svd not in SVD_KINDS:
            raise ValueError(f"svd={self.svd!r} is unknown; choose one of {SVD_KINDS}")
        if self.rank < 0:
            raise ValueError(f"rank must be >= 0, got {self.rank}")
        if self.method in ("svdquant", "lowrank", "lorc") and self.rank == 0:
            raise ValueError(f"method={self.method!r} needs rank > 0; use method='naive' or 'smooth' for rank 0")
        if self.activations is None and self.method in ("svdquant", "smooth", "lorc"):
            raise ValueError(
                "smoothing needs quantized activations; weight-only recipes take method='naive' or 'lowrank'"
            )
        if wf.group_sizes == (0,) and self.group_size != 0:
            raise ValueError(f"{self.weights} uses one scale per row: group_size=0")
        if wf.group_sizes is not None and self.group_size not in wf.group_sizes:
            raise ValueError(f"{self.weights} uses groups of {' or '.join(map(str, wf.group_sizes))}")
        if wf.group_sizes is None and (self.group_size <= 0 or self.group_size % 2):
            raise ValueError(f"{self.weights} needs a positive even group_size (default 64)")

    @property
    def act_group_size(self) -> int:
        """Channels per activation scale: the recipe's group for grouped formats, 0 (per token) for per-row ones."""
        from .formats import FORMATS

        af = FORMATS[self.activations] if self.activations else None
        return 0 if af is None or af.group_sizes == (0,) else self.group_size

    @property
    def smooths(self) -> bool:
        return self.method in ("svdquant", "smooth", "lorc")

    @property
    def lowrank(self) -> str:
        """"svd", "lorc" or "none": how the branch is computed."""
        return {"svdquant": "svd", "lowrank": "svd", "lorc": "lorc"}.get(self.method, "none")

    @property
    def branch_rank(self) -> int:
        return self.rank if self.lowrank != "none" else 0

    def replace(self, **changes) -> "QuantConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["smooth_grid"] = [list(p) for p in self.smooth_grid]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QuantConfig":
        d = dict(d)
        d.setdefault("gptq", False)  # written before GPTQ existed: the residual was rounded to nearest
        if "smooth_grid" in d:
            d["smooth_grid"] = tuple(tuple(p) for p in d["smooth_grid"])
        known = {f.name for f in dataclasses.fields(QuantConfig)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"recipe has unknown fields {sorted(unknown)}; was it written by a newer svdquant?")
        named = RECIPES.get(d.get("name", ""))
        target = type(named) if named is not None and cls is QuantConfig else cls
        return target(**d)


@dataclass(frozen=True)
class Int4Config(QuantConfig):
    """SVDQuant INT4 weights with two-level scales (``int4m``), INT8 per-token activations, rank 32.

    Every quantized linear is then a plain INT8 GEMM with the scales in its epilogue: the
    fast path on GPUs without 4-bit tensor cores (Hopper, Ampere, Ada), and activations
    lose less than at 4 bits. The checkpoint is 4-bit either way.
    """

    name: str = "int4"
    gptq: bool = True  # measured better on every seed (BENCHMARKS.md, "GPTQ on the residual")


@dataclass(frozen=True)
class W4A4Config(QuantConfig):
    """SVDQuant W4A4 with two-level scales on both sides (``int4m`` × ``int4m``): 4-bit activations
    as a float per token × an integer multiplier per group; still exact in an INT8 GEMM."""

    name: str = "w4a4"
    gptq: bool = True  # measured better on every seed (BENCHMARKS.md, "GPTQ on the residual")
    activations: str | None = "int4m"


@dataclass(frozen=True)
class W4A4FloatConfig(QuantConfig):
    """The paper's SVDQuant INT W4A4: a 16-bit scale per group of 64 on both sides (the format of
    checkpoints made before the two-level scales; its GEMM rescales per group, slow on Hopper)."""

    name: str = "w4a4-float"
    gptq: bool = True  # measured better on every seed (BENCHMARKS.md, "GPTQ on the residual")
    weights: str = "int4"
    activations: str | None = "int4"


@dataclass(frozen=True)
class NVFP4Config(QuantConfig):
    """SVDQuant FP W4A4: NVFP4 weights and activations (group 16), rank-32 branch."""

    name: str = "nvfp4"
    gptq: bool = True  # measured better on every seed (BENCHMARKS.md, "GPTQ on the residual")
    weights: str = "nvfp4"
    activations: str | None = "nvfp4"
    group_size: int = 16


@dataclass(frozen=True)
class W8A8Config(QuantConfig):
    """INT8 per-channel weights, per-token INT8 activations, SVDQuant with rank 16 (the paper's)."""

    name: str = "w8a8"
    weights: str = "int8"
    activations: str | None = "int8"
    group_size: int = 0
    rank: int = 16


@dataclass(frozen=True)
class FP8Config(QuantConfig):
    """FP8 E4M3 row-wise weights and activations (the torch._scaled_mm recipe), no branch."""

    name: str = "fp8"
    weights: str = "fp8"
    activations: str | None = "fp8"
    group_size: int = 0
    rank: int = 0
    method: str = "naive"


@dataclass(frozen=True)
class NF4Config(QuantConfig):
    """NF4 W4A16 (the bitsandbytes baseline): 4-bit weights, 16-bit activations."""

    name: str = "nf4"
    weights: str = "nf4"
    activations: str | None = None
    rank: int = 0
    method: str = "naive"


@dataclass(frozen=True)
class W4A16Config(QuantConfig):
    """INT4 g64 weights (16-bit group scales) with 16-bit activations; used for FLUX's adaLN modulation linears."""

    name: str = "w4a16"
    weights: str = "int4"
    activations: str | None = None
    rank: int = 0
    method: str = "naive"


RECIPES: dict[str, QuantConfig] = {
    "int4": Int4Config(),
    "w4a4": W4A4Config(),
    "w4a4-float": W4A4FloatConfig(),
    "nvfp4": NVFP4Config(),
    "w8a8": W8A8Config(),
    "fp8": FP8Config(),
    "nf4": NF4Config(),
    "w4a16": W4A16Config(),
}


# What `svdquant demo` compares by default: the schemes, and naive W4A4 as the floor.
DEMO_VARIANTS = ("int4", "w4a4", "nvfp4", "w8a8", "nf4", "int4-naive")


def get_recipe(recipe: str | QuantConfig, **overrides) -> QuantConfig:
    """A recipe by name (``"int4"``, ``"w4a4"``, ``"w4a4-float"``, ``"nvfp4"``, ``"w8a8"``, ``"fp8"``, ``"nf4"``,
    ``"w4a16"``) or as given.

    A name may carry an ablation method after a dash: ``"int4-naive"``, ``"w4a4-float-lorc"``, ``"w8a8-naive"``.
    Ablations are the paper's baselines and round to nearest (``gptq=False``) unless an override says otherwise.
    """
    if isinstance(recipe, QuantConfig):
        base = recipe
    elif recipe in RECIPES:
        base = RECIPES[recipe]
    elif "-" in recipe and recipe.rsplit("-", 1)[0] in RECIPES:
        name, method = recipe.rsplit("-", 1)
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r} in {recipe!r}; choose one of {METHODS}")
        base = RECIPES[name].replace(name=recipe, method=method, gptq=False)
    else:
        raise ValueError(f"unknown recipe {recipe!r}; choose one of {sorted(RECIPES)} (optionally -<method>)")
    return base.replace(**overrides) if overrides else base
