"""Fused Triton kernels for CUDA GPUs of compute capability 8.0 and newer (A100, RTX 30/40, H100/H200...).

:func:`linear` runs a :class:`~svdquant.SVDQLinear` on them: kernel 1
(:mod:`.quantize`) then kernel 2 (:mod:`.gemm`). Each kernel is tested against its torch
reference in :mod:`svdquant.ops.reference`.
"""

from __future__ import annotations

import functools

import torch

MIN_CAPABILITY = (8, 0)


class UnsupportedGPUError(RuntimeError):
    pass


@functools.lru_cache(maxsize=None)
def _check_device(index: int) -> None:
    cap = torch.cuda.get_device_capability(index)
    if cap < MIN_CAPABILITY:
        name = torch.cuda.get_device_name(index)
        raise UnsupportedGPUError(
            f"svdquant's GPU kernels need compute capability 8.0 or newer (A100, RTX 30xx, L40, H100, ...); "
            f"{name} is sm_{cap[0]}{cap[1]}. Run the model on the CPU, or set SVDQUANT_REFERENCE=1 to use the "
            "slow torch reference on this GPU."
        )
    try:
        import triton  # noqa: F401
    except ImportError:
        raise UnsupportedGPUError("svdquant's GPU kernels need triton (pip install triton), which ships with "
                                  "CUDA builds of torch") from None


@functools.lru_cache(maxsize=None)
def _warn_once(msg: str) -> None:
    import warnings

    warnings.warn(msg, stacklevel=3)


def _pow2_rank(r: int) -> int:
    p = 16
    while p < r:
        p *= 2
    return p


class KernelWeights:
    """The kernel-side view of a layer's tensors, built once per device: scales transposed to
    ``[groups, N]`` and the branch padded to a power-of-two rank (zero rows/columns add nothing)."""

    def __init__(self, m):
        self.device = m.qweight.device
        self.version = m.branch_version
        self.wscales_t = m.wscales.t().contiguous() if m.weights == "int4" else m.wscales
        down, up = m.branch()
        if down is not None:
            r = down.shape[0]
            rp = _pow2_rank(r)
            self.lora_down = torch.zeros(rp, m.in_features, dtype=down.dtype, device=self.device)
            self.lora_down[:r] = down
            self.lora_up = torch.zeros(m.out_features, rp, dtype=up.dtype, device=self.device)
            self.lora_up[:, :r] = up
        else:
            self.lora_down = self.lora_up = None


def prepared(m) -> KernelWeights:
    kw = getattr(m, "_kernel_weights", None)
    if kw is None or kw.device != m.qweight.device or kw.version != m.branch_version:
        kw = KernelWeights(m)
        m._kernel_weights = kw
    return kw


def linear(x2: torch.Tensor, m, *, gelu: bool = False) -> torch.Tensor:
    """``[M, K]`` -> ``[M, N]`` for an INT4 or NVFP4 :class:`SVDQLinear` on a CUDA device."""
    from .gemm import fp4_gemm, w4a4_gemm
    from .quantize import quantize_input

    _check_device(x2.device.index or 0)
    kw = prepared(m)
    x2 = x2.contiguous()
    if m.weights == "int4":
        codes, scales_t, lora_act = quantize_input(x2, m.smooth_inv, kw.lora_down, fmt="int4", group_size=m.group_size,
                                                   shift=m.act_shift, unsigned_from=m.act_unsigned_from)
        return w4a4_gemm(codes, scales_t, m.qweight, kw.wscales_t, lora_act, kw.lora_up, m.bias, x2.dtype, gelu=gelu)
    if m.weights == "nvfp4":
        if torch.cuda.get_device_capability(x2.device) < (8, 9):  # no FP8 conversions before Ada/Hopper
            _warn_once("NVFP4 layers need compute capability 8.9+ for the fused kernels; using the torch "
                       "reference on this GPU (correct, slower)")
            from ..ops import reference_linear

            return reference_linear(x2, m)
        values, _, lora_act = quantize_input(x2, m.smooth_inv, kw.lora_down, fmt="nvfp4", group_size=m.group_size,
                                             input_scale=m.input_scale)
        return fp4_gemm(values, m.qweight, m.wscales, m.wtensor_scale, m.input_scale, lora_act, kw.lora_up, m.bias,
                        x2.dtype, gelu=gelu)
    raise ValueError(f"no fused kernel for W{m.weights}A{m.activations}")


__all__ = ["linear", "UnsupportedGPUError", "MIN_CAPABILITY"]
