"""Weight-only INT4 on CUDA (16-bit activations): the W4A16 kernel, or a dequantize kernel and cuBLAS."""

from __future__ import annotations

import torch

from .. import reference
from ..branch import assign_branch, branch_sources
from ..runner import Runner


class W4A16Runner(Runner):
    """Weight-only INT4 on CUDA: the memory-bound W4A16 kernel for up to 16 tokens; beyond, the weight is
    dequantized by a kernel into a fresh 16-bit buffer for cuBLAS (the reference's numerics, one pass)."""

    def __init__(self, m, kernels):
        self.kernels = kernels
        self.qweight, self.wscales, self.bias = m.qweight, m.wscales, m.bias
        self.wzeros = getattr(m, "wzeros", None)  # int4z: AWQ's zero points
        self.set_branch(m)
        self.group, self.k = m.group_size, m.in_features

    def set_branch(self, m) -> bool:
        return assign_branch(self, *m.branch(), branch_sources(m))

    def __call__(self, x2):
        if x2.shape[0] > self.kernels.W4A16_MAX_TOKENS:
            # compute-bound: one pass writes the 16-bit weight (what the reference dequantizes), then cuBLAS
            if torch.compiler.is_compiling():
                w = torch.ops.svdquant.dequantize_int4(self.qweight, self.wscales, self.wzeros, self.k, x2.dtype,
                                                       self.group)
            else:
                w = self.kernels.dequantize_int4(self.qweight, self.wscales, self.k, x2.dtype, zeros=self.wzeros,
                                                 group_size=self.group)
            return reference.weight_only_linear(x2, w, self.down, self.up, self.bias)
        if torch.compiler.is_compiling():
            y = torch.ops.svdquant.w4a16_linear(x2, self.qweight, self.wscales, self.bias, self.wzeros, self.group)
        else:
            y = self.kernels.w4a16_linear(x2.contiguous(), self.qweight, self.wscales, self.bias, zeros=self.wzeros,
                                          group_size=self.group)
        if self.down is not None:
            y = y + ((x2.float() @ self.down.float().T) @ self.up.float().T).to(y.dtype)
        return y
