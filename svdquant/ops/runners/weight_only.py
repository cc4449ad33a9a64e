"""Weight-only INT4 on CUDA (16-bit activations): the W4A16 kernel, or a dequantize kernel and cuBLAS."""

from __future__ import annotations

import copy

import torch

from .. import reference
from ..branch import assign_branch, branch_sources
from ..runner import Runner

# the largest stack (weights) the many-token path dequantizes whole into 16 bits: 512 MB in bf16 (q/k/v, 56 MB, is)
DEQUANTIZE_AT_MOST = 1 << 28


class W4A16Runner(Runner):
    """Weight-only INT4 on CUDA: the memory-bound W4A16 kernel for up to 16 tokens; beyond, the weight is
    dequantized by a kernel into a fresh 16-bit buffer for cuBLAS (the reference's numerics, one pass).

    Layers without a branch that read one input stack (FLUX's adaLN modulations, all read ``silu(temb)``:
    :mod:`svdquant.modules.modulations`): one launch over all their rows instead of one latency-bound launch each.
    The stack holds the packed codes; the members hold row views of them (``owns_packed_weight``: their layers drop
    their own copy), so nothing is held twice but the small scales and biases."""

    stacks = True

    def __init__(self, m, kernels):
        self.kernels = kernels
        self.qweight, self.wscales, self.bias = m.qweight, m.wscales, m.bias
        self.wzeros = getattr(m, "wzeros", None)  # int4z: AWQ's zero points
        self.set_branch(m)
        self.group, self.k = m.group_size, m.in_features
        self.chunked = False  # more than 16 tokens: 16 per launch rather than the weight dequantized whole

    def set_branch(self, m) -> bool:
        return assign_branch(self, *m.branch(), branch_sources(m))

    @classmethod
    def stack(cls, runners: list["W4A16Runner"], out_features: list[int]) -> "W4A16Runner":
        first = runners[0]
        for r in runners:
            if r.down is not None:
                raise ValueError("weight-only layers with a branch (a LoRA) do not stack")
            if (r.group, r.k, r.wzeros is None, r.wscales.dtype) != (first.group, first.k, first.wzeros is None,
                                                                     first.wscales.dtype):
                raise ValueError("weight-only layers stack only with one format, group and input width")
        if sum(r.qweight.numel() for r in runners) >= 1 << 31:  # the kernel's byte offsets are 32-bit
            raise ValueError("weight-only layers stack up to 2**31 bytes of codes")
        new = copy.copy(first)
        new.qweight = torch.cat([r.qweight for r in runners], 0)
        new.wscales = torch.cat([r.wscales for r in runners], 0)
        new.wzeros = None if first.wzeros is None else torch.cat([r.wzeros for r in runners], 0)
        some = next((r.bias for r in runners if r.bias is not None), None)
        new.bias = None if some is None else torch.cat(
            [r.bias if r.bias is not None else some.new_zeros(n) for r, n in zip(runners, out_features)], 0)
        new.owns_packed_weight = False
        new.chunked = new.qweight.shape[0] * new.k > DEQUANTIZE_AT_MOST
        start = 0
        for r, n in zip(runners, out_features):  # the members' codes: rows of the stack's
            r.qweight, r.owns_packed_weight = new.qweight[start:start + n], True
            start += n
        return new

    def restack_branch(self, runners) -> bool:
        if any(r.down is not None for r in runners):
            raise ValueError("a member took a LoRA: weight-only layers with a branch do not stack")
        return False

    def packed_weight(self) -> torch.Tensor:
        """A stacked member's codes, as its own tensor again (a view would keep the whole stack alive, and
        safetensors refuses tensors that share memory)."""
        return self.qweight.clone()

    def __call__(self, x2):
        if x2.shape[0] > self.kernels.W4A16_MAX_TOKENS and self.chunked:
            # a large stack (all of FLUX's modulations: ~1 M rows, 6.5 GB in 16 bits) is never dequantized whole
            return torch.cat([self(x2[i:i + self.kernels.W4A16_MAX_TOKENS])
                              for i in range(0, x2.shape[0], self.kernels.W4A16_MAX_TOKENS)], 0)
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
