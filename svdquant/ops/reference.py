"""The numerics of a quantized linear, in plain torch: the reference every kernel is tested against.

Split the way the fused GPU kernels split the work:

1. :func:`quantize_input` (kernel 1): one pass over X computes ``u = (X + shift) · λ⁻¹``,
   quantizes ``u`` per token and per group, and the branch's down projection
   ``lora_act = X · L1ᵀ`` in fp32 (from the *raw* X).
2. :func:`qgemm` (kernel 2): per group, the integer (or E2M1) dot product of the codes,
   rescaled by ``s_x · s_w`` into an fp32 accumulator; then ``+ lora_act · L2ᵀ + bias``;
   cast to the output dtype.

Products of 4-bit codes with their 16-bit group scales are exact in fp32, so the grouped
product is one fp32 matmul of scaled codes (see :func:`_grouped_dot`); INT8 rows, whose
integer sums can exceed fp32's 24 bits, use float64. Runs on any device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..formats import QTensor, dequantize, quantize, unpack_4bit_halves
from ..formats.int4 import shift_vector
from ..formats.nvfp4 import e2m1_table

@dataclass
class QuantizedInput:
    """Kernel 1's outputs, in logical layout: codes ``[M, K_pad]``, scales ``[M, groups]``."""

    codes: torch.Tensor
    scales: torch.Tensor
    tensor_scale: torch.Tensor | None
    lora_act: torch.Tensor | None  # [M, rank] fp32


def quantize_input(
    x: torch.Tensor,
    smooth_inv: torch.Tensor,
    lora_down: torch.Tensor | None,
    fmt: str,
    group_size: int,
    shift: float = 0.0,
    input_scale: torch.Tensor | None = None,
    unsigned_from: int = 0,
) -> QuantizedInput:
    """``x``: ``[M, K]`` in bf16/fp16/fp32. Scales of INT4 activations are stored in x's dtype.

    With a post-GELU ``shift``, channels ``>= unsigned_from`` get ``+shift`` and unsigned
    INT4 codes; channels before it stay signed and unshifted.
    """
    if shift and unsigned_from:
        u = (x.float() + shift_vector(x.shape[-1], shift, unsigned_from, x.device)) * smooth_inv
        unsigned = unsigned_from
    else:
        u = (x.float() + shift) * smooth_inv
        unsigned = bool(shift)
    q = quantize(u, fmt, group_size or None, unsigned=unsigned, scale_dtype=x.dtype,
                 tensor_scale=input_scale, check=False)
    lora_act = x.float() @ lora_down.float().T if lora_down is not None else None
    return QuantizedInput(q.codes, q.scales, q.tensor_scale, lora_act)


def _grouped_dot(a: torch.Tensor, a_s: torch.Tensor, w: torch.Tensor, w_s: torch.Tensor, g: int) -> torch.Tensor:
    """Σ_groups (a_g · w_gᵀ) · (s_a,g · s_w,g) in fp32. a: [M, K], w: [N, K] code values.

    A 4-bit code times its 16-bit (or E4M3) group scale is exact in fp32, and so is the
    product of two such values, so folding each scale into its operand and running one
    fp32 matmul computes the same per-group sums; only the order of the fp32 additions
    differs from a kernel that accumulates group by group.
    """
    m, n, groups = a.shape[0], w.shape[0], a.shape[1] // g
    a = (a.reshape(m, groups, g) * a_s.float().unsqueeze(-1)).reshape(m, groups * g)
    w = (w.reshape(n, groups, g) * w_s.float().unsqueeze(-1)).reshape(n, groups * g)
    return a @ w.T


def _int8_dot(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Exact int32 sums of int8 products: ``torch._int_mm`` where it runs (CPU; cuBLAS when M > 16 and
    K, N are multiples of 8), else float64 (exact for any K a layer has)."""
    cuda_ok = a.shape[0] > 16 and w.shape[1] % 8 == 0 and w.shape[0] % 8 == 0
    if hasattr(torch, "_int_mm") and (not a.is_cuda or cuda_ok):
        try:
            return torch._int_mm(a.contiguous(), w.t())
        except RuntimeError:  # a build or shape without an int8 kernel
            pass
    return a.double() @ w.double().T


def qgemm(
    qin: QuantizedInput,
    fmt: str,
    group_size: int,
    qweight: torch.Tensor,
    wscales: torch.Tensor,
    wtensor_scale: torch.Tensor | None,
    lora_up: torch.Tensor | None,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """The quantized product plus the branch's up projection and the bias: ``[M, N]`` in ``out_dtype``."""
    if fmt == "int4":
        a = qin.codes.float()
        w = unpack_4bit_halves(qweight, group_size, signed=True).float()
        acc = _grouped_dot(a, qin.scales, w, wscales, group_size)
    elif fmt == "nvfp4":
        table = e2m1_table(qin.codes.device)
        a = table[qin.codes.long()]
        w = table[unpack_4bit_halves(qweight, group_size).long()]
        acc = _grouped_dot(a, qin.scales, w, wscales, group_size)
        acc *= qin.tensor_scale * wtensor_scale
    elif fmt == "int8":
        acc = _int8_dot(qin.codes, qweight).float()
        acc *= qin.scales.float()[:, None] * wscales.float()[None, :]
    elif fmt == "fp8":
        acc = qin.codes.float() @ qweight.float().T
        acc *= qin.scales.float()[:, None] * wscales.float()[None, :]
    else:
        raise ValueError(f"no W{fmt}A{fmt} product for format {fmt!r}")
    if qin.lora_act is not None:
        acc += qin.lora_act @ lora_up.float().T
    if bias is not None:
        acc += bias.float()
    return acc.to(out_dtype)


def dequantize_weight(
    fmt: str, group_size: int, in_features: int, qweight, wscales, wtensor_scale, dtype
) -> torch.Tensor:
    """The stored weight as a dense ``[N, K]`` tensor (for weight-only recipes and inspection)."""
    if fmt in ("int4", "nvfp4", "nf4"):
        codes = unpack_4bit_halves(qweight, group_size, signed=fmt == "int4")
    else:
        codes = qweight
    q = QTensor(codes, wscales, fmt, group_size, in_features, tensor_scale=wtensor_scale)
    return dequantize(q, dtype)


def weight_only_linear(x, weight, lora_down, lora_up, bias) -> torch.Tensor:
    """W4A16: the dequantized weight times 16-bit activations (``x``'s dtype), plus branch and bias."""
    y = F.linear(x, weight.to(x.dtype))
    if lora_down is not None:
        y = y + ((x.float() @ lora_down.float().T) @ lora_up.float().T).to(x.dtype)
    if bias is not None:
        y = y + bias.to(x.dtype)
    return y
