"""The numerics of a quantized linear, in plain torch: the reference every kernel is tested against.

Split the way the fused GPU kernels split the work:

1. :func:`quantize_input` (the activation kernel): one pass over X computes
   ``u = (X + shift) · λ⁻¹``, quantizes ``u`` in the activation format, and the branch's
   down projection ``lora_act = X · L1ᵀ`` in fp32 (from the *raw* X).
2. :func:`qgemm` (the GEMM): the product of the two quantized operands, then
   ``+ lora_act · L2ᵀ + bias``, cast to the output dtype.

How a product is computed depends on the two formats (:func:`svdquant.formats.product_kind`):

* "integer" (``int4m`` / ``int8`` on both sides): each operand is an exact INT8 matrix times
  one float per row, so the product is an exact int32 matrix product scaled by
  ``s_row · s_col``, what the INT8 GEMM kernel computes;
* "grouped" (``int4`` × ``int4``, ``nvfp4`` × ``nvfp4``): a 4-bit code times its 16-bit (or E4M3)
  group scale is exact in fp32, so folding each scale into its operand and one fp32 matmul
  gives the per-group sums (only the order of fp32 additions differs from a kernel);
* "dense" (any other pair, e.g. ``int4`` weights with ``int8`` activations): both dequantized,
  float64 matmul.

Runs on any device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..formats import QTensor, get_format, product_kind
from ..formats.int4 import shift_vector


@dataclass
class QuantizedInput:
    """The activation kernel's outputs: the quantized input and ``lora_act = X · L1ᵀ`` (fp32, or None)."""

    q: QTensor
    lora_act: torch.Tensor | None


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
    """``x``: ``[M, K]`` in bf16/fp16/fp32. 16-bit group scales (``int4``) are stored in x's dtype.

    With a post-GELU ``shift``, channels ``>= unsigned_from`` get ``+shift`` and unsigned
    codes; channels before it stay signed and unshifted.
    """
    if shift and unsigned_from:
        u = (x.float() + shift_vector(x.shape[-1], shift, unsigned_from, x.device)) * smooth_inv
        unsigned = unsigned_from
    else:
        u = ((x.float() + shift) if shift else x.float()) * smooth_inv  # + 0.0 would only turn -0.0 into +0.0
        unsigned = bool(shift)
    q = get_format(fmt).quantize(u, group_size, unsigned=unsigned, scale_dtype=x.dtype, tensor_scale=input_scale,
                                 check=False)
    lora_act = x.float() @ lora_down.float().T if lora_down is not None else None
    return QuantizedInput(q, lora_act)


_MM_OUT_DTYPE = torch.__version__ >= "2.8"  # torch.mm(..., out_dtype=torch.float32) for 16-bit CUDA inputs


def gelu_columns(x: torch.Tensor, tail: torch.Tensor | None, start: int) -> torch.Tensor:
    """``[x | tail]`` (``x`` alone without a tail) with tanh-GELU on its columns from ``start`` on, in the input's
    dtype as diffusers' GELU module gives it: a layer's input whose GELU was moved into it (``input_gelu_from``)."""
    if tail is not None and start == x.shape[-1]:  # a FLUX single block's proj_out: the MLP's part
        return torch.cat([x, F.gelu(tail, approximate="tanh")], -1)
    whole = torch.cat([x, tail], -1) if tail is not None else x
    if start == 0:
        return F.gelu(whole, approximate="tanh")
    return torch.cat([whole[..., :start], F.gelu(whole[..., start:], approximate="tanh")], -1)


def int8_activations(x: torch.Tensor, smooth_inv: torch.Tensor, lora_down: torch.Tensor | None, k_pad: int):
    """The A8 activation pass in torch ops, as the INT8 GEMM takes it: ``(values [M, k_pad] int8, scales [M] fp32,
    lora_act [M, R] fp32 or None)``, the numbers :func:`quantize_input` gives for ``int8``.

    Under ``torch.compile`` the INT8 runner quantizes this way instead of calling the activation kernel: an opaque
    kernel cannot be fused, while these pointwise ops and the row maximum fuse into the kernel inductor writes for
    whatever produced ``x`` (LayerNorm + adaLN modulation, GELU), so the 16-bit ``x`` is not read again to be
    quantized (what torchao's FP8 recipe gets from inductor). The down projection is a cuBLAS GEMM with fp32
    output where that exists (CUDA, 16-bit ``x``; ``torch.mm(..., out_dtype=)``, torch >= 2.8)."""
    q = get_format("int8").quantize(x.float() * smooth_inv, 0, check=False)
    values = F.pad(q.codes, (0, k_pad - x.shape[-1])) if k_pad != x.shape[-1] else q.codes
    lora_act = None
    if lora_down is not None:
        if _MM_OUT_DTYPE and x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and x.dtype == lora_down.dtype:
            lora_act = torch.mm(x, lora_down.mT, out_dtype=torch.float32)
        else:
            lora_act = x.float() @ lora_down.float().mT
    return values, q.scales, lora_act


def _grouped_values(q: QTensor) -> torch.Tensor:
    """Code values with their group scales folded in (exact in fp32), ``[.., K_pad]``."""
    vals = get_format(q.fmt).code_values(q)
    g = q.group_size
    out = vals.reshape(*vals.shape[:-1], vals.shape[-1] // g, g) * q.scales.float().unsqueeze(-1)
    return out.reshape(vals.shape)


def weight_operand(wq: QTensor, activations: str):
    """What :func:`qgemm` multiplies for this weight, which a caller may keep between calls: the integer operand
    ``(int8 values, fp32 row scales)``, the grouped fp32 values, or None (the "dense" kind dequantizes per call)."""
    kind = product_kind(wq.fmt, activations)
    if kind == "integer":
        return get_format(wq.fmt).integer_operand(wq)
    if kind == "grouped":
        return _grouped_values(wq)
    return None


# Float32 holds every integer below 2**24 exactly, and 1024 · 127² < 2**24: a float32 product of int8 values summed
# over at most 1024 of K has only exact partial sums, whatever order the BLAS adds them in (bf16 or tf32 operands,
# which a reduced matmul precision may pick, hold int8 values exactly too).
EXACT_FLOAT_K = 1024


def int8_dot(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Exact int32 sums of int8 products ``a [M, K] · w [N, K]ᵀ``.

    On the CPU: float32 matmuls over chunks of at most :data:`EXACT_FLOAT_K` of K, each exact, summed in int32
    (``torch._int_mm`` is 20-40× slower there: it took 89 % of a quantized tiny-model step). On CUDA:
    ``torch._int_mm`` (cuBLAS) when M > 16 and K, N are multiples of 8, else float64 (exact for any K a layer has)."""
    if not a.is_cuda:
        acc = None
        for k0 in range(0, a.shape[1], EXACT_FLOAT_K):
            part = (a[:, k0:k0 + EXACT_FLOAT_K].float() @ w[:, k0:k0 + EXACT_FLOAT_K].float().T).to(torch.int32)
            acc = part if acc is None else acc.add_(part)
        return acc if acc is not None else a.new_zeros(a.shape[0], w.shape[0], dtype=torch.int32)
    if a.shape[0] > 16 and w.shape[1] % 8 == 0 and w.shape[0] % 8 == 0:
        try:
            return torch._int_mm(a.contiguous(), w.t())
        except RuntimeError:  # a build or shape without an int8 kernel
            pass
    return (a.double() @ w.double().T).to(torch.int32)


def int8_dot_float(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``int8_dot(a, w).float()``; ``a`` may also hold the int8 values as floats. On the CPU with
    K <= EXACT_FLOAT_K one float32 matmul gives those numbers directly (its sums are exact integers)."""
    if not a.is_cuda and a.shape[1] <= EXACT_FLOAT_K:
        return a.float() @ w.float().T
    if a.is_floating_point():
        a = a.to(torch.int8)
    return int8_dot(a, w).float()


def qgemm(
    qin: QuantizedInput,
    wq: QTensor,
    lora_up: torch.Tensor | None,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    w_operand=None,
) -> torch.Tensor:
    """The quantized product plus the branch's up projection and the bias: ``[M, N]`` in ``out_dtype``.
    ``w_operand``: :func:`weight_operand` of ``wq``, when the caller keeps it."""
    qa, k = qin.q, wq.in_features
    kind = product_kind(wq.fmt, qa.fmt)
    if kind == "integer":
        a, a_s = get_format(qa.fmt).integer_operand(qa)
        w, w_s = w_operand if w_operand is not None else get_format(wq.fmt).integer_operand(wq)
        acc = int8_dot_float(a[:, :k], w[:, :k])
        acc = acc.mul_(a_s[:, None]).mul_(w_s[None, :])
    elif kind == "grouped":
        acc = _grouped_values(qa) @ (w_operand if w_operand is not None else _grouped_values(wq)).T
        if wq.tensor_scale is not None:
            acc *= qa.tensor_scale * wq.tensor_scale
    else:
        a = get_format(qa.fmt).dequantize(qa, torch.float64)
        w = get_format(wq.fmt).dequantize(wq, torch.float64)
        acc = (a @ w.T).float()
    if qin.lora_act is not None:
        acc += qin.lora_act @ lora_up.float().T
    if bias is not None:
        acc += bias.float()
    return acc.to(out_dtype)


def weight_only_linear(x, weight, lora_down, lora_up, bias) -> torch.Tensor:
    """W4A16: the dequantized weight times 16-bit activations (``x``'s dtype), plus branch and bias."""
    y = F.linear(x, weight.to(x.dtype))
    if lora_down is not None:
        y = y + ((x.float() @ lora_down.float().T) @ lora_up.float().T).to(x.dtype)
    if bias is not None:
        y = y + bias.to(x.dtype)
    return y
