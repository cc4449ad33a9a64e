"""svdquant: 4-bit weights and activations for diffusion models, fast on every GPU."""

from .modules import SVDQLinear
from .recipes import (
    RECIPES, FP8Config, Int4Config, NF4Config, NVFP4Config, QuantConfig, W4A16Config, W8A8Config, get_recipe,
)

__version__ = "0.1.0"

__all__ = [
    "SVDQLinear", "QuantConfig", "Int4Config", "NVFP4Config", "W8A8Config", "FP8Config", "NF4Config",
    "W4A16Config", "RECIPES", "get_recipe", "__version__",
]
