"""svdquant: 4-bit weights and activations for diffusion models, fast on every GPU."""

from .calibration import DEFAULT_PROMPTS, Calibration
from .checkpoint import CheckpointError, load_pipeline, load_quantized, read_metadata, save_quantized
from .lora import LoRAError, load_lora, loaded_loras, set_lora_strength, unload_lora
from .modules import SVDQConv1x1, SVDQLinear
from .quantize import QuantReport, quantize
from .recipes import (
    RECIPES, FP8Config, Int4Config, NF4Config, NVFP4Config, QuantConfig, W4A16Config, W8A8Config, get_recipe,
)

__version__ = "0.1.0"

__all__ = [
    "quantize", "QuantReport", "Calibration", "DEFAULT_PROMPTS",
    "save_quantized", "load_quantized", "load_pipeline", "read_metadata", "CheckpointError",
    "load_lora", "set_lora_strength", "unload_lora", "loaded_loras", "LoRAError",
    "SVDQLinear", "SVDQConv1x1", "QuantConfig", "Int4Config", "NVFP4Config", "W8A8Config", "FP8Config", "NF4Config",
    "W4A16Config", "RECIPES", "get_recipe", "__version__",
]
