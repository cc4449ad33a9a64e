"""The numerics of a quantized linear, in plain torch: the reference every kernel is tested against.

Split the way the fused GPU kernels split the work:

1. :func:`quantize_input` (kernel 1): one pass over X computes ``u = (X + shift) · λ⁻¹``,
   quantizes ``u`` per token and per group, and the branch's down projection
   ``lora_act = X · L1ᵀ`` in fp32 (from the *raw* X).
2. :func:`qgemm` (kernel 2): per group, the integer (or E2M1) dot product of the codes,
   rescaled by ``s_x · s_w`` into an fp32 accumulator; then ``+ lora_act · L2ᵀ + bias``;
   cast to the output dtype.

Integer dot products of 4-bit codes over a group of 64 are at most 64·15·7 in
magnitude, so fp32 matmuls of integer-valued tensors compute them exactly; INT8 rows
use float64 for the same reason. Runs on any device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..formats import QTensor, dequantize, quantize, unpack_4bit
from ..formats.nvfp4 import e2m1_table

_CHUNK_ELEMS = 1 << 25  # cap on the [groups, M, N] partial products held at once


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
) -> QuantizedInput:
    """``x``: ``[M, K]`` in bf16/fp16/fp32. Scales of INT4 activations are stored in x's dtype."""
    u = (x.float() + shift) * smooth_inv
    q = quantize(u, fmt, group_size or None, unsigned=shift > 0, scale_dtype=x.dtype,
                 tensor_scale=input_scale, check=False)
    lora_act = x.float() @ lora_down.float().T if lora_down is not None else None
    return QuantizedInput(q.codes, q.scales, q.tensor_scale, lora_act)


def _grouped_dot(a: torch.Tensor, a_s: torch.Tensor, w: torch.Tensor, w_s: torch.Tensor, g: int) -> torch.Tensor:
    """Σ_groups (a_g · w_gᵀ) · (s_a,g · s_w,g) in fp32. a: [M, K], w: [N, K] code values."""
    m, n, groups = a.shape[0], w.shape[0], a.shape[1] // g
    a3 = a.reshape(m, groups, g).permute(1, 0, 2)
    w3 = w.reshape(n, groups, g).permute(1, 2, 0)
    a_s, w_s = a_s.float().T, w_s.float().T  # [groups, M], [groups, N]
    acc = torch.zeros(m, n, dtype=torch.float32, device=a.device)
    step = max(1, _CHUNK_ELEMS // max(1, m * n))
    for g0 in range(0, groups, step):
        g1 = min(groups, g0 + step)
        part = torch.bmm(a3[g0:g1], w3[g0:g1])
        part *= a_s[g0:g1, :, None] * w_s[g0:g1, None, :]
        acc += part.sum(0)
    return acc


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
        w = unpack_4bit(qweight, signed=True).float()
        acc = _grouped_dot(a, qin.scales, w, wscales, group_size)
    elif fmt == "nvfp4":
        table = e2m1_table(qin.codes.device)
        a = table[qin.codes.long()]
        w = table[unpack_4bit(qweight).long()]
        acc = _grouped_dot(a, qin.scales, w, wscales, group_size)
        acc *= qin.tensor_scale * wtensor_scale
    elif fmt == "int8":
        acc = (qin.codes.double() @ qweight.double().T).float()
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
        codes = unpack_4bit(qweight, signed=fmt == "int4")
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
