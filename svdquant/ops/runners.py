"""Runners: a quantized linear's forward with everything prepared, one class per path.

Each is built by :func:`svdquant.ops.prepare` from a layer's buffers and holds
kernel-ready tensors (transposed scales, a power-of-two-rank branch, INT8 weights...);
``__call__(x2)`` maps ``[M, K]`` to ``[M, N]`` and does nothing but compute.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..formats import get_format, pack_4bit_halves
from . import reference


def _pow2_rank(r: int) -> int:
    p = 16
    while p < r:
        p *= 2
    return p


def padded_branch(m):
    """The branch (with LoRAs) padded to a power-of-two rank >= 16 for ``tl.dot`` (zero rows add nothing)."""
    down, up = m.branch()
    if down is None:
        return None, None
    r = down.shape[0]
    rp = _pow2_rank(r)
    down_p = torch.zeros(rp, m.in_features, dtype=down.dtype, device=down.device)
    down_p[:r] = down
    up_p = torch.zeros(m.out_features, rp, dtype=up.dtype, device=up.device)
    up_p[:, :r] = up
    return down_p, up_p


def _act_group(m) -> int:
    return 0 if get_format(m.activations).group_sizes == (0,) else m.group_size


class Unready:
    """A layer whose tensors are not there yet: calling it says what to do."""

    def __init__(self, message: str):
        self.message = message

    def set_branch(self, m) -> None:
        pass

    def __call__(self, x2):
        raise RuntimeError(self.message)


ON_META = Unready("this SVDQLinear is on the meta device: load its tensors (load_state_dict / "
                  "svdquant.load_quantized) before running it")
EMPTY_ON_GPU = Unready("this SVDQLinear was built empty on a GPU: fill its buffers (load_state_dict, or copy_ "
                       "and then .refresh()) before running it")


class ReferenceRunner:
    """The torch reference (:mod:`svdquant.ops.reference`): CPU, and any GPU path without a kernel."""

    def __init__(self, m):
        self.wf = get_format(m.weights)
        self.af = get_format(m.activations) if m.activations is not None else None
        self.buffers = m.weight_buffers()
        self.group, self.k = m.group_size, m.in_features
        self.set_branch(m)
        self.bias = m.bias
        if self.af is not None:
            self.act_group = _act_group(m)
            self.sinv = m.smooth_inv
            self.shift, self.unsigned_from = m.act_shift, m.act_unsigned_from
            self.input_scale = getattr(m, "input_scale", None)

    def set_branch(self, m) -> None:
        """A LoRA was added, rescaled or removed: only the branch changes."""
        self.down, self.up = m.branch()

    def __call__(self, x2):
        wq = self.wf.from_buffers(self.buffers, self.group, self.k)
        if self.af is None:
            w = self.wf.dequantize(wq, x2.dtype)
            return reference.weight_only_linear(x2, w, self.down, self.up, self.bias)
        qin = reference.quantize_input(x2, self.sinv, self.down, self.af.name, self.act_group, self.shift,
                                       self.input_scale, self.unsigned_from)
        return reference.qgemm(qin, wq, self.up, self.bias, x2.dtype)


class Int8Runner:
    """Two-level INT4 (or INT8) weights × INT8 / two-level A4 activations: activation kernel + INT8 GEMM.

    Weight modes: "speed" (default) expands ``code · m`` to INT8 once here and drops the
    packed copy (``owns_packed_weight``); "memory" keeps the 4-bit codes and expands per call.
    """

    def __init__(self, m, kernels, *, tma: bool, num_sms: int):
        self.kernels = kernels
        self.tma = tma
        self.config = dict(kernels.HOPPER_CONFIG if tma else kernels.DEFAULT_CONFIG)
        self.config_fp32 = dict(kernels.HOPPER_CONFIG_FP32 if tma else kernels.DEFAULT_CONFIG)
        self.num_programs = num_sms if tma else None
        wf = get_format(m.weights)
        self.a4 = _act_group(m) > 0
        self.shift = m.act_shift if self.a4 else 0.0
        self.unsigned_from = m.act_unsigned_from
        self.sinv = m.smooth_inv
        self.set_branch(m)
        self.bias = m.bias
        self.w_scale = m.wscales.float().contiguous()
        self.group = m.group_size if wf.packed else 64
        self.k = m.in_features
        self.kp = self.k + (-self.k) % self.group
        self.w = self.packed = self.mult = self.w_desc = None
        self.owns_packed_weight = False
        self.mode = "memory" if (wf.packed and m.weight_mode == "memory") else "speed"
        if wf.packed:
            self.mult = m.wmult
            if self.mode == "speed":
                self.w = kernels.expand_int4m(m.packed_weight(), self.mult, group_size=self.group)
                self.owns_packed_weight = True
            else:
                self.packed = m.packed_weight()
        else:  # int8 weights: zero-pad K to the activation kernel's padded width
            self.w = F.pad(m.qweight, (0, self.kp - self.k)).contiguous()
        if self.w is not None and tma:
            self.w_desc = kernels.weight_descriptor(self.w, self.config)

    def set_branch(self, m) -> None:
        self.down, self.up = padded_branch(m)

    def packed_weight(self) -> torch.Tensor:
        """Speed mode's 4-bit codes again, from ``code · m`` (exact: m divides it)."""
        n = self.w.shape[0]
        codes = self.w.view(n, -1, self.group).to(torch.int16) // self.mult.to(torch.int16).unsqueeze(-1)
        return pack_4bit_halves(codes.to(torch.int8).reshape(n, -1), self.group)

    def __call__(self, x2):
        k = self.kernels
        a, a_s, lora_act = k.quantize_activations(x2.contiguous(), self.sinv, self.down, a4=self.a4,
                                                  group_size=self.group, shift=self.shift,
                                                  unsigned_from=self.unsigned_from)
        w = self.w if self.w is not None else k.expand_int4m(self.packed, self.mult, group_size=self.group)
        cfg = self.config_fp32 if x2.dtype == torch.float32 else self.config
        return k.int8_gemm(a, a_s, w, self.w_scale, lora_act, self.up, self.bias, x2.dtype, tma=self.tma,
                           w_desc=self.w_desc, num_programs=self.num_programs, config=cfg)


class FloatScalesRunner:
    """The paper's formats with float group scales: INT4 W4A4 and NVFP4 (quantize kernel + grouped GEMM)."""

    PAIRS = (("int4", "int4"), ("nvfp4", "nvfp4"))

    def __init__(self, m, kernels):
        self.kernels = kernels
        self.fp4 = m.weights == "nvfp4"
        self.qweight = m.qweight
        self.wscales = m.wscales if self.fp4 else m.wscales.t().contiguous()
        self.wtensor_scale = getattr(m, "wtensor_scale", None)
        self.input_scale = getattr(m, "input_scale", None)
        self.sinv, self.group = m.smooth_inv, m.group_size
        self.shift, self.unsigned_from = m.act_shift, m.act_unsigned_from
        self.set_branch(m)
        self.bias = m.bias

    def set_branch(self, m) -> None:
        self.down, self.up = padded_branch(m)

    def __call__(self, x2):
        k = self.kernels
        x2 = x2.contiguous()
        if self.fp4:
            values, _, lora_act = k.quantize_input_float_scales(x2, self.sinv, self.down, fmt="nvfp4",
                                                                group_size=self.group, input_scale=self.input_scale)
            return k.fp4_gemm(values, self.qweight, self.wscales, self.wtensor_scale, self.input_scale, lora_act,
                              self.up, self.bias, x2.dtype)
        codes, scales_t, lora_act = k.quantize_input_float_scales(x2, self.sinv, self.down, fmt="int4",
                                                                  group_size=self.group, shift=self.shift,
                                                                  unsigned_from=self.unsigned_from)
        return k.w4a4_gemm(codes, scales_t, self.qweight, self.wscales, lora_act, self.up, self.bias, x2.dtype)


class W4A16Runner:
    """Weight-only INT4 on CUDA: the memory-bound W4A16 kernel for up to 16 tokens, the reference beyond."""

    FORMATS = ("int4", "int4z")

    def __init__(self, m, kernels):
        self.kernels = kernels
        self.qweight, self.wscales, self.bias = m.qweight, m.wscales, m.bias
        self.wzeros = getattr(m, "wzeros", None)  # int4z: AWQ's zero points
        self.reference = ReferenceRunner(m)
        self.set_branch(m)
        self.group = m.group_size

    def set_branch(self, m) -> None:
        self.down, self.up = m.branch()
        self.reference.set_branch(m)

    def __call__(self, x2):
        if x2.shape[0] > self.kernels.W4A16_MAX_TOKENS:
            return self.reference(x2)
        y = self.kernels.w4a16_linear(x2.contiguous(), self.qweight, self.wscales, self.bias, zeros=self.wzeros,
                                      group_size=self.group)
        if self.down is not None:
            y = y + ((x2.float() @ self.down.float().T) @ self.up.float().T).to(y.dtype)
        return y


class Fp8ScaledMMRunner:
    """FP8 row-wise W8A8 on cuBLAS (``torch._scaled_mm``): the recipe users run on Hopper, behind the same module."""

    def __init__(self, m):
        self.qweight_t = m.qweight.t()
        self.w_scale = m.wscales.float()[None, :]
        self.sinv = m.smooth_inv
        self.bias = m.bias
        self.reference = ReferenceRunner(m)
        self.set_branch(m)
        self.fp8 = get_format("fp8")

    def set_branch(self, m) -> None:
        self.down, self.up = m.branch()
        self.reference.set_branch(m)

    def __call__(self, x2):
        if x2.dtype not in (torch.bfloat16, torch.float16):
            return self.reference(x2)
        q = self.fp8.quantize(x2.float() * self.sinv, check=False)
        y = torch._scaled_mm(q.codes, self.qweight_t, scale_a=q.scales.float()[:, None], scale_b=self.w_scale,
                             out_dtype=x2.dtype)
        if self.down is not None:
            y = y + ((x2.float() @ self.down.float().T) @ self.up.float().T).to(y.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y
