"""svdquant: 4-bit weights and activations for diffusion models, fast on every GPU."""

from .calibration import DEFAULT_PROMPTS, Calibration
from .checkpoint import (CheckpointError, load_experts, load_quantized, load_text_encoders, read_metadata,
                         save_quantized)
from . import convert  # noqa: F401  (registers the Nunchaku reader: load_quantized / read_metadata take its files)
from .hub import push_to_hub
from .lora import LoRAError, load_lora, loaded_loras, set_lora_strength, unload_lora
from .modules import SVDQConv1x1, SVDQLinear
from .quantize import QuantReport, quantize, quantize_text_encoders
from .modules.linear import WEIGHT_MODES
from .recipes import (
    RECIPES, FP8Config, Int4Config, NF4Config, NVFP4Config, QuantConfig, W4A4Config, W4A4FloatConfig, W4A16Config,
    W8A8Config, get_recipe,
)

from ._version import __version__

from .integrations.diffusers import register_on_first_use  # noqa: E402
from .integrations import transformers as _transformers_backend  # noqa: E402

# quant_method "svdquant" in diffusers' from_pretrained, registered when diffusers loads its quantizers, and in
# transformers' (quantized text encoders), when transformers loads its own
register_on_first_use()
_transformers_backend.register_on_first_use()


def set_weight_mode(target, mode: str) -> int:
    """Every INT8-path layer of a model (or pipeline) to ``"speed"`` (INT8 codes resident, fastest) or
    ``"memory"`` (4-bit codes resident, expanded before each GEMM: per layer, or once per call for the layers
    ``svdquant.fuse`` stacks); returns how many layers."""
    if mode not in WEIGHT_MODES:
        raise ValueError(f"weight mode {mode!r} is unknown; choose one of {WEIGHT_MODES}")
    models = _models_of(target, "set_weight_mode")
    layers = [m for model in models for m in model.modules() if isinstance(m, SVDQLinear)]
    for m in layers:
        m.set_weight_mode(mode)
    return len(layers)


def _models_of(target, what: str) -> list:
    """The denoiser(s) a pipeline-or-model call acts on (both experts of Wan 2.2)."""
    from .pipelines.optimize import denoisers

    return denoisers(target, what)


def _summed(counts: list[dict[str, int]]) -> dict[str, int]:
    return {k: sum(c[k] for c in counts) for k in counts[0]}


def fuse(target, *, gelu: bool = True, compiled_activations: bool = False,
         modulations: bool = False, norm_rope: bool = False) -> dict[str, int]:
    """Run-time fusions for speed on a GPU, exact on the CPU (svdquant/modules/fused.py): each attention's quantized
    q/k/v as one activation pass and one GEMM (FLUX.1/.2, SD3, Wan, Qwen-Image, Z-Image, PixArt-Σ, SANA, SDXL),
    and (``gelu``) each quantized MLP's tanh-GELU moved into its down projection's INT8 activation pass (a FLUX
    single block's ``proj_out`` then reads its two inputs without their concatenation), or where that layer has no
    such pass, into the up projection's GEMM epilogue. ``compiled_activations=True``: under ``torch.compile``, INT8
    activations are quantized in torch ops that inductor fuses into the kernel producing them (LayerNorm +
    modulation, GELU) instead of a separate activation kernel. ``modulations=True``: a FLUX.1 transformer's adaLN
    modulations, every block's, computed at the start of the step in one weight-only GEMV
    (svdquant/modules/modulations.py). ``norm_rope=True`` (``svdquant.optimize`` turns it on: a FLUX.1-dev step
    2.4 ms faster on an H100, BENCHMARKS.md "Session 37"): a FLUX attention's q/k RMSNorm and rotary embedding as
    one op, one Triton launch per stream for q and k on a GPU (svdquant/modules/norm_rope.py); Qwen-Image's and
    Z-Image's too (a Z-Image pipeline 7.5 % faster on an H100, BENCHMARKS.md "Session 42").
    Takes a pipeline or a model; returns how many of each (``{"qkv": n, "gelu": m, "compiled_activations": k,
    "modulations": j, "norm_rope": r}``). Checkpoints and LoRAs address the same layers."""
    from .modules.fusions import fuse_model

    for name, value in (("gelu", gelu), ("compiled_activations", compiled_activations), ("modulations", modulations),
                        ("norm_rope", norm_rope)):
        if not isinstance(value, bool):
            raise ValueError(f"{name}={value!r}: use True or False")
    return _summed([fuse_model(m, gelu=gelu, compiled_activations=compiled_activations, modulations=modulations,
                               norm_rope=norm_rope) for m in _models_of(target, "fuse")])


def unfuse(target) -> dict[str, int]:
    """Undo :func:`fuse`."""
    from .modules.fusions import unfuse_model

    return _summed([unfuse_model(m) for m in _models_of(target, "unfuse")])

__all__ = [
    "quantize", "quantize_text_encoders", "QuantReport", "Calibration", "DEFAULT_PROMPTS",
    "save_quantized", "push_to_hub", "load_quantized", "load_experts", "load_text_encoders", "load_pipeline", "read_metadata", "CheckpointError",
    "load_lora", "set_lora_strength", "unload_lora", "loaded_loras", "LoRAError",
    "SVDQLinear", "SVDQConv1x1", "QuantConfig", "Int4Config", "W4A4Config", "W4A4FloatConfig", "NVFP4Config", "W8A8Config", "FP8Config", "NF4Config",
    "W4A16Config", "RECIPES", "get_recipe", "set_weight_mode", "WEIGHT_MODES",
    "fuse", "unfuse", "optimize", "deoptimize", "Optimized", "__version__",
]


def __getattr__(name: str):
    # svdquant.optimize and svdquant.load_pipeline live with the pipelines, whose package imports diffusers (~3 s):
    # loaded at first use, so `import svdquant` (and a CLI mistake reported before any heavy import) stays fast
    if name in ("optimize", "deoptimize", "Optimized"):
        from .pipelines import optimize as module
    elif name == "load_pipeline":
        from .pipelines import load as module
    else:
        raise AttributeError(f"module 'svdquant' has no attribute {name!r}")
    return getattr(module, name)
