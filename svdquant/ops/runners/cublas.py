"""The cuBLAS paths: a quantized layer run as one 16-bit linear (``svdquant.optimize``'s choice), and FP8 W8A8
through ``torch._scaled_mm``."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...formats import get_format
from ...formats.int4 import shift_vector
from ..branch import assign_branch, branch_sources
from ..runner import Runner
from .reference import ReferenceRunner


class DenseRunner(Runner):
    """A quantized layer computed as one 16-bit cuBLAS linear, for shapes where that measures faster on this GPU
    (``svdquant.optimize``'s layer choice: few tokens, narrow layers): ``W = Q(R)·diag(λ⁻¹) + L2·L1`` (LoRAs
    included) and ``b = b' + Q(R)·(s·λ⁻¹)`` (the post-GELU shift the bias compensated), both in the layer's
    dtype. The same layer minus the activation rounding: at least as close to the 16-bit model. Holds 2 bytes
    per weight; the layer keeps its packed 4-bit codes for checkpoints. A LoRA change rebuilds ``W`` in place."""

    stacks = True  # q/k/v: one GEMM over the members' rows

    def __init__(self, m):
        self.weight, self.bias = None, None
        self.set_branch(m)

    def set_branch(self, m) -> bool:
        wf = get_format(m.weights)
        w = wf.dequantize(wf.from_buffers(m.weight_buffers(), m.group_size, m.in_features), torch.float32)
        w = w[:, : m.in_features]
        bias = m.bias.float() if m.bias is not None else None
        if m.activations is not None:
            shift = shift_vector(m.in_features, m.act_shift, m.act_unsigned_from, w.device) * m.smooth_inv
            if m.act_shift:
                bias = (w @ shift) + (bias if bias is not None else 0.0)
            w = w * m.smooth_inv
        down, up = m.branch()
        if down is not None:
            w = w.addmm_(up.float(), down.float())
        w = w.to(m.dtype)
        bias = bias.to(m.dtype) if bias is not None else None
        if self.weight is not None and self.weight.shape == w.shape and (self.bias is None) == (bias is None):
            with torch.no_grad():  # in place: a captured CUDA graph keeps reading the same memory
                self.weight.copy_(w)
                if bias is not None:
                    self.bias.copy_(bias)
            return False
        self.weight, self.bias = w.contiguous(), bias
        return True

    @classmethod
    def stacked(cls, runners: list["DenseRunner"]) -> "DenseRunner":
        """One GEMM over the members' rows (q/k/v); the members then hold row views of it."""
        new = cls.__new__(cls)
        new.weight = torch.cat([r.weight for r in runners], 0)
        biases = [r.bias for r in runners]
        some = next((b for b in biases if b is not None), None)
        new.bias = None if some is None else torch.cat(
            [b if b is not None else some.new_zeros(r.weight.shape[0]) for b, r in zip(biases, runners)], 0)
        start = 0
        for r in runners:
            n = r.weight.shape[0]
            r.weight = new.weight[start:start + n]
            if new.bias is not None:
                r.bias = new.bias[start:start + n]
            start += n
        return new

    @classmethod
    def stack(cls, runners: list["DenseRunner"], out_features: list[int]) -> "DenseRunner":
        return cls.stacked(runners)

    def __call__(self, x2):
        if x2.dtype != self.weight.dtype:  # a layer made in another dtype than it now reads (model.to(dtype))
            return F.linear(x2, self.weight.to(x2.dtype), self.bias.to(x2.dtype) if self.bias is not None else None)
        return F.linear(x2, self.weight, self.bias)


class Fp8ScaledMMRunner(Runner):
    """FP8 row-wise W8A8 on cuBLAS (``torch._scaled_mm``): the recipe users run on Hopper, behind the same module."""

    @classmethod
    def build(cls, m, gpu) -> "Fp8ScaledMMRunner":
        return cls(m)  # cuBLAS: no kernel of ours

    def __init__(self, m):
        self.qweight_t = m.qweight.t()
        self.w_scale = m.wscales.float()[None, :]
        self.sinv = m.smooth_inv
        self.bias = m.bias
        self.reference = ReferenceRunner(m)
        self.set_branch(m)
        self.fp8 = get_format(m.activations)  # the route's: FP8 row-wise

    def set_branch(self, m) -> bool:
        replaced = assign_branch(self, *m.branch(), branch_sources(m))
        return self.reference.set_branch(m) or replaced

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
