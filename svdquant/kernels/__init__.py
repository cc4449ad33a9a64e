"""Triton kernels for CUDA GPUs of compute capability 8.0 and newer (A100, RTX 30/40, L40, H100/H200...).

Each module is one stage with its launcher, tested against its torch reference in
:mod:`svdquant.ops.reference` (under ``TRITON_INTERPRET=1`` on the CPU, at real shapes on a GPU)
and timed in ``benchmarks/kernels.py``. Which kernel runs for a layer is decided in
:mod:`svdquant.ops`; nothing here imports the rest of the library.

| module                   | stage                                                                   |
| ------------------------ | ----------------------------------------------------------------------- |
| activations.py           | smooth + per-token INT8 (A8) or two-level A4 quantization + X·L1ᵀ        |
| int8_gemm.py             | INT8 GEMM (persistent + TMA on Hopper), scales/branch/bias/GELU epilogue |
| cutlass_gemm.py          | the same GEMM in NVIDIA's CuTe DSL for H100 / H200 (faster than FP8)     |
| cutlass_launch.py        | that kernel from torch: whether it applies, compile per variant, launch  |
| expand.py                | two-level INT4 weights -> INT8 ``code · m`` (load time, or memory mode)  |
| w4a16.py                 | weight-only INT4: a few tokens (FLUX's adaLN), or dequantize for many    |
| round_weights.py         | two-level INT4 rounding of weights (the quantizer's smoothing search)    |
| gptq.py                  | GPTQ's inner block: columns rounded in turn, errors spread (quantizer)   |
| scoring.py               | the search's error products X·Wᵀ on TF32 tensor cores (quantizer)       |
| int8_attention.py        | attention with INT8 Q·Kᵀ per token and a 16-bit P·V (opt-in)             |
| norm_rope.py             | FLUX's q/k RMSNorm + rotary embedding, one read and one write (optimize) |
| float_scales_quantize.py | the paper's W4A4 / NVFP4 activation kernel (float group scales)          |
| float_scales_gemm.py     | the paper's W4A4 / NVFP4 GEMMs (per-group rescale in the main loop)      |
"""

from .activations import quantize_activations, reads_in_place
from .cutlass_launch import (available as cutlass_available, int8_gemm_sm90, pad_columns as cutlass_pad_columns,
                             takes as cutlass_takes)
from .common import interpreting
from .expand import expand_int4m
from .float_scales_gemm import fp4_gemm, w4a4_gemm
from .gptq import gptq_round_block
from .int8_attention import int8_attention, quantize_tokens as quantize_attention_tokens
from .norm_rope import norm_rope_into
from .float_scales_quantize import quantize_input as quantize_input_float_scales
from .int8_gemm import (DEFAULT_CONFIG, HOPPER_CONFIG, HOPPER_CONFIG_FP32, int8_gemm, tile_config as int8_tile_config,
                        weight_descriptor)
from .round_weights import round_int4m_weights
from .scoring import scoring_product
from .w4a16 import MAX_TOKENS as W4A16_MAX_TOKENS, dequantize_int4, w4a16_linear

__all__ = [
    "quantize_activations", "reads_in_place", "int8_gemm", "weight_descriptor", "expand_int4m", "w4a16_linear", "W4A16_MAX_TOKENS", "dequantize_int4",
    "round_int4m_weights", "scoring_product", "gptq_round_block", "int8_attention", "quantize_attention_tokens",
    "quantize_input_float_scales", "w4a4_gemm", "fp4_gemm", "interpreting", "HOPPER_CONFIG", "HOPPER_CONFIG_FP32", "DEFAULT_CONFIG",
    "int8_tile_config", "cutlass_available", "cutlass_takes", "int8_gemm_sm90", "cutlass_pad_columns",
    "norm_rope_into",
]
