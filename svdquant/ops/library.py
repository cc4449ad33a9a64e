"""The kernel paths as torch custom ops (``torch.ops.svdquant.*``), so ``torch.compile`` and CUDA graphs
capture a quantized model whole.

Dynamo cannot trace a Triton launch that builds host-side TMA descriptors and picks configs in Python;
a custom op is opaque to it: the compiled graph holds one node per quantized linear, and the op's fake
implementation tells it the output's shape and dtype without running anything (the pattern of
https://pytorch.org/tutorials/advanced/python_custom_ops.html). Every argument is a tensor or a
number decided at :func:`svdquant.ops.prepare` time, so the op makes no capability query and no host
sync: it records into a CUDA graph as it is.

Eager calls skip the dispatcher (a few microseconds per layer, ~400 layers per FLUX step) and call the
same ``*_impl`` functions with the prepared weight descriptor; the runners switch on
``torch.compiler.is_compiling()``, which dynamo folds to a constant.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import reference


_KERNELS = []


def _kernels():
    """svdquant.kernels, imported at the first launch (importing it loads Triton) and held from then on: the
    eager path calls this once or twice per layer call."""
    if not _KERNELS:
        from .. import kernels

        _KERNELS.append(kernels)
    return _KERNELS[0]


def int8_gemm_impl(a: Tensor, a_scale: Tensor, lora_act: Tensor | None, lora_up: Tensor | None, bias: Tensor | None,
                   weight: Tensor, weight_mult: Tensor | None, weight_scale: Tensor, group_size: int, tma: bool,
                   num_programs: int, gelu: bool, out_dtype: torch.dtype, sm90: bool = False, w_desc=None) -> Tensor:
    """The INT8 GEMM of quantized activations ``a`` [M, K_pad] (scales ``a_scale`` [M]) with ``weight``: INT8
    ``code · m`` [N, K_pad] (speed mode), or the packed 4-bit codes [N, K_pad/2] with ``weight_mult`` (memory
    mode: expanded into a fresh buffer here); ``lora_act·L2ᵀ``, the bias and (``gelu``) tanh-GELU in its
    epilogue. ``sm90``: an H100 / H200 with the CUTLASS DSL, whose GEMM (:mod:`svdquant.kernels.cutlass_launch`)
    runs the layers it takes (and compiles here); the Triton kernel runs the others."""
    k = _kernels()
    sm90 = sm90 and _sm90_takes(k, out_dtype, lora_up, bias, weight, weight_scale, a.shape[0], a.shape[1]) and \
        all(t.is_contiguous() and t.data_ptr() % 16 == 0 for t in (a, a_scale, lora_act) if t is not None)
    return _gemm(k, a, a_scale, lora_act, lora_up, bias, weight, weight_mult, weight_scale, group_size, tma,
                 num_programs, gelu, out_dtype, sm90, w_desc)


def _gemm(k, a, a_scale, lora_act, lora_up, bias, weight, weight_mult, weight_scale, group_size, tma, num_programs,
          gelu, out_dtype, sm90, w_desc):
    """:func:`int8_gemm_impl` once ``sm90`` is decided (the CUTLASS GEMM takes this product)."""
    if weight_mult is not None:
        weight, w_desc = k.expand_int4m(weight, weight_mult, group_size=group_size), None
    if sm90:
        if lora_act is not None and lora_act.dtype != torch.bfloat16:  # activations quantized in the graph
            lora_act = lora_act.to(torch.bfloat16)
        y = k.int8_gemm_sm90(a, a_scale, weight, weight_scale, lora_act, lora_up, bias, out_dtype, gelu=gelu)
        if y is not None:
            return y
    if lora_act is not None and lora_act.dtype != torch.float32:  # rounded to bf16 for the Hopper GEMM
        lora_act = lora_act.float()
    return k.int8_gemm(a.contiguous(), a_scale, weight, weight_scale, lora_act, lora_up, bias, out_dtype, gelu=gelu,
                       tma=tma, w_desc=w_desc, num_programs=num_programs or None,
                       config=k.int8_tile_config(tma, out_dtype))


def _sm90_takes(k, out_dtype, lora_up, bias, weight, weight_scale, m, width) -> bool:
    """Whether the Hopper GEMM takes this product of ``m`` tokens over ``width`` (K_pad): its formats and tiles
    (:func:`svdquant.kernels.cutlass_takes`) and the layer's tensors contiguous and 16-byte aligned (TMA's; the
    kernel reads the fp32 scales as dense vectors). The activation side is checked where it comes from elsewhere
    (:func:`int8_gemm_impl`); the activation pass makes it so."""
    if not k.cutlass_takes(out_dtype, lora_up, bias, m, weight.shape[0], width) or weight_scale.dtype != torch.float32:
        return False
    return all(t.is_contiguous() and t.data_ptr() % 16 == 0 for t in (weight, weight_scale, lora_up, bias)
               if t is not None)


def _rows(x: Tensor) -> Tensor:
    """``x`` [M, K] as the activation kernels read it: unit column stride, any row stride (a column slice of a
    wider tensor, e.g. a split of a stacked GEMM's output, is read where it is, not copied)."""
    return x if x.stride(1) == 1 and x.stride(0) >= x.shape[1] else x.contiguous()


def int8_linear_impl(x: Tensor, smooth_inv: Tensor, lora_down: Tensor | None, lora_up: Tensor | None,
                     bias: Tensor | None, weight: Tensor, weight_mult: Tensor | None, weight_scale: Tensor,
                     a4: bool, group_size: int, shift: float, unsigned_from: int, tma: bool, num_programs: int,
                     gelu: bool = False, tail: Tensor | None = None, input_gelu_from: int | None = None,
                     sm90: bool = False, w_desc=None) -> Tensor:
    """Activation pass (the Triton kernel: smooth, quantize, ``X·L1ᵀ``) + :func:`int8_gemm_impl`.
    ``gelu``: tanh-GELU applied in the GEMM's epilogue (an MLP's up projection, see modules/fused.py).
    ``tail``: the input is ``[x | tail]`` along K, read from both where they are (no concatenated copy).
    ``input_gelu_from``: the input's channels from this one on are pre-activations, tanh-GELU'd as they are read
    (an MLP's down projection, see modules/fused.py). ``sm90``: see :func:`int8_gemm_impl` (the Hopper GEMM's
    branch takes ``X·L1ᵀ`` in bf16, written so by the activation pass)."""
    k = _kernels()
    width = weight.shape[1] * (2 if weight_mult is not None else 1)  # memory mode: packed 4-bit codes
    sm90 = sm90 and _sm90_takes(k, x.dtype, lora_up, bias, weight, weight_scale, x.shape[0], width)
    if input_gelu_from is not None and not k.reads_in_place(input_gelu_from, smooth_inv.shape[0], a4=a4,
                                                           group_size=group_size):
        x, tail, input_gelu_from = reference.gelu_columns(x, tail, input_gelu_from), None, None
    a, a_s, lora_act = k.quantize_activations(_rows(x), smooth_inv, lora_down,
                                              tail=_rows(tail) if tail is not None else None,
                                              input_gelu_from=input_gelu_from, a4=a4, group_size=group_size,
                                              shift=shift, unsigned_from=unsigned_from,
                                              lora_dtype=torch.bfloat16 if sm90 else torch.float32)
    return _gemm(k, a, a_s, lora_act, lora_up, bias, weight, weight_mult, weight_scale, group_size, tma, num_programs,
                 gelu, x.dtype, sm90, w_desc)  # decided above; a, a_s and lora_act are the pass's own allocations


@torch.library.custom_op("svdquant::int8_linear", mutates_args=())
def int8_linear(x: Tensor, smooth_inv: Tensor, lora_down: Tensor | None, lora_up: Tensor | None,
                bias: Tensor | None, weight: Tensor, weight_mult: Tensor | None, weight_scale: Tensor,
                a4: bool, group_size: int, shift: float, unsigned_from: int, tma: bool, num_programs: int,
                gelu: bool, tail: Tensor | None = None, input_gelu_from: int | None = None,
                sm90: bool = False) -> Tensor:
    return int8_linear_impl(x, smooth_inv, lora_down, lora_up, bias, weight, weight_mult, weight_scale, a4,
                            group_size, shift, unsigned_from, tma, num_programs, gelu, tail, input_gelu_from, sm90)


@int8_linear.register_fake
def _(x, smooth_inv, lora_down, lora_up, bias, weight, weight_mult, weight_scale, a4, group_size, shift,
      unsigned_from, tma, num_programs, gelu, tail=None, input_gelu_from=None, sm90=False):
    return x.new_empty(x.shape[0], weight.shape[0])


@torch.library.custom_op("svdquant::int8_gemm", mutates_args=())
def int8_gemm(a: Tensor, a_scale: Tensor, lora_act: Tensor | None, lora_up: Tensor | None, bias: Tensor | None,
              weight: Tensor, weight_mult: Tensor | None, weight_scale: Tensor, group_size: int, tma: bool,
              num_programs: int, gelu: bool, out_dtype: torch.dtype, sm90: bool = False) -> Tensor:
    """The GEMM alone, for activations quantized in the compiled graph (:func:`svdquant.ops.reference.int8_activations`:
    inductor fuses that into the kernel producing ``x``)."""
    return int8_gemm_impl(a, a_scale, lora_act, lora_up, bias, weight, weight_mult, weight_scale, group_size, tma,
                          num_programs, gelu, out_dtype, sm90)


@int8_gemm.register_fake
def _(a, a_scale, lora_act, lora_up, bias, weight, weight_mult, weight_scale, group_size, tma, num_programs, gelu,
      out_dtype, sm90=False):
    return a.new_empty(a.shape[0], weight.shape[0], dtype=out_dtype)


def expand_rows_impl(packed: list[Tensor], mult: list[Tensor], group_size: int) -> Tensor:
    """Memory mode's stacked weight: each layer's packed 4-bit codes expanded to INT8 ``code · m`` into its rows of
    one fresh ``[sum N, K_pad]`` buffer (a q/k/v stack's GEMM operand; the codes stay in their layers' buffers)."""
    k = _kernels()
    w = torch.empty(sum(p.shape[0] for p in packed), packed[0].shape[1] * 2, dtype=torch.int8,
                    device=packed[0].device)
    start = 0
    for p, m in zip(packed, mult):
        k.expand_int4m(p, m, out=w[start:start + p.shape[0]], group_size=group_size)
        start += p.shape[0]
    return w


@torch.library.custom_op("svdquant::expand_rows", mutates_args=())
def expand_rows(packed: list[Tensor], mult: list[Tensor], group_size: int) -> Tensor:
    return expand_rows_impl(packed, mult, group_size)


@expand_rows.register_fake
def _(packed, mult, group_size):
    return packed[0].new_empty(sum(p.shape[0] for p in packed), packed[0].shape[1] * 2, dtype=torch.int8)


def float_scales_linear_impl(x: Tensor, smooth_inv: Tensor, lora_down: Tensor | None, lora_up: Tensor | None,
                             bias: Tensor | None, qweight: Tensor, wscales: Tensor, wtensor_scale: Tensor | None,
                             input_scale: Tensor | None, fp4: bool, group_size: int, shift: float,
                             unsigned_from: int) -> Tensor:
    """The paper's float-group-scale W4A4 (``fp4=False``) or NVFP4: quantize kernel + grouped GEMM."""
    k = _kernels()
    x = x.contiguous()
    if fp4:
        values, _, lora_act = k.quantize_input_float_scales(x, smooth_inv, lora_down, fp4=True,
                                                            group_size=group_size, input_scale=input_scale)
        return k.fp4_gemm(values, qweight, wscales, wtensor_scale, input_scale, lora_act, lora_up, bias, x.dtype)
    codes, scales_t, lora_act = k.quantize_input_float_scales(x, smooth_inv, lora_down, fp4=False,
                                                              group_size=group_size, shift=shift,
                                                              unsigned_from=unsigned_from)
    return k.w4a4_gemm(codes, scales_t, qweight, wscales, lora_act, lora_up, bias, x.dtype)


@torch.library.custom_op("svdquant::float_scales_linear", mutates_args=())
def float_scales_linear(x: Tensor, smooth_inv: Tensor, lora_down: Tensor | None, lora_up: Tensor | None,
                        bias: Tensor | None, qweight: Tensor, wscales: Tensor, wtensor_scale: Tensor | None,
                        input_scale: Tensor | None, fp4: bool, group_size: int, shift: float,
                        unsigned_from: int) -> Tensor:
    return float_scales_linear_impl(x, smooth_inv, lora_down, lora_up, bias, qweight, wscales, wtensor_scale,
                                    input_scale, fp4, group_size, shift, unsigned_from)


@float_scales_linear.register_fake
def _(x, smooth_inv, lora_down, lora_up, bias, qweight, wscales, wtensor_scale, input_scale, fp4, group_size,
      shift, unsigned_from):
    return x.new_empty(x.shape[0], qweight.shape[0])


@torch.library.custom_op("svdquant::w4a16_linear", mutates_args=())
def w4a16_linear(x: Tensor, qweight: Tensor, wscales: Tensor, bias: Tensor | None, wzeros: Tensor | None,
                 group_size: int) -> Tensor:
    """Weight-only INT4 for a few tokens (the memory-bound kernel); ``wzeros``: per-group zero points (int4z)."""
    return _kernels().w4a16_linear(x.contiguous(), qweight, wscales, bias, zeros=wzeros, group_size=group_size)


@w4a16_linear.register_fake
def _(x, qweight, wscales, bias, wzeros, group_size):
    return x.new_empty(x.shape[0], qweight.shape[0])


@torch.library.custom_op("svdquant::dequantize_int4", mutates_args=())
def dequantize_int4(qweight: Tensor, wscales: Tensor, wzeros: Tensor | None, k: int, dtype: torch.dtype,
                    group_size: int) -> Tensor:
    """The 16-bit weight of a weight-only INT4 layer (its many-token path: then a cuBLAS GEMM)."""
    return _kernels().dequantize_int4(qweight, wscales, k, dtype, zeros=wzeros, group_size=group_size)


@dequantize_int4.register_fake
def _(qweight, wscales, wzeros, k, dtype, group_size):
    return qweight.new_empty(qweight.shape[0], k, dtype=dtype)


def int8_attention_impl(q: Tensor, k: Tensor, v: Tensor, q_mean: Tensor, k_mean: Tensor, q_factor: Tensor,
                        k_factor: Tensor, mask_bias: Tensor | None, qk_scale: float) -> Tensor:
    """Attention with INT8 Q·Kᵀ per token and a 16-bit P·V (:mod:`svdquant.ops.int8_attention`), ``[B, S, H, D]``
    in and out; ``q_mean`` / ``k_mean`` / ``q_factor`` / ``k_factor`` ``[B, H, D]``: the smoothing; ``mask_bias``
    ``[B or 1, S_k]`` fp32: a padding mask, added to the raw scores; ``qk_scale``: the scores' factor times log2(e). The kernel picks TMA from the device's capability, asked once per device and kept
    (:func:`svdquant.kernels.int8_attention.hopper`), not per call."""
    return _kernels().int8_attention(q, k, v, qk_scale, k_mean, q_factor, k_factor, q_mean=q_mean, mask_bias=mask_bias)


@torch.library.custom_op("svdquant::int8_attention", mutates_args=())
def int8_attention(q: Tensor, k: Tensor, v: Tensor, q_mean: Tensor, k_mean: Tensor, q_factor: Tensor,
                   k_factor: Tensor, mask_bias: Tensor | None, qk_scale: float) -> Tensor:
    return int8_attention_impl(q, k, v, q_mean, k_mean, q_factor, k_factor, mask_bias, qk_scale)


@int8_attention.register_fake
def _(q, k, v, q_mean, k_mean, q_factor, k_factor, mask_bias, qk_scale):
    return v.new_empty(q.shape)


__all__ = ["dequantize_int4", "expand_rows", "expand_rows_impl", "int8_attention", "int8_attention_impl", "int8_gemm", "int8_gemm_impl", "int8_linear", "int8_linear_impl", "float_scales_linear", "float_scales_linear_impl", "w4a16_linear"]
