"""The torch reference as a runner: the CPU, and any GPU path without a kernel."""

from __future__ import annotations

import torch

from ...formats import get_format, product_kind
from ...formats.int4 import shift_vector
from .. import reference
from ..branch import assign_branch, branch_sources
from ..runner import Runner, activation_group


class ReferenceRunner(Runner):
    """The torch reference (:mod:`svdquant.ops.reference`): CPU, and any GPU path without a kernel.

    The layer's buffers are read live (a CPU layer filled by hand runs without a ``refresh()``). Outside memory mode
    the unpacked weight and what the product multiplies (:func:`~svdquant.ops.reference.weight_operand`: INT8
    values, 1 byte per weight, or fp32 grouped values for NVFP4 / float-scale INT4, 4 bytes) are kept between
    calls and rebuilt only when a buffer was written since (its ``_version`` moved): unpacking the 4-bit codes on
    every call cost a quantized tiny-model step as much as its products, NVFP4 three times as much. They are
    built at the first call, so a model loaded on the CPU on its way to a GPU never holds them."""

    def __init__(self, m):
        self.wf = get_format(m.weights)
        self.af = get_format(m.activations) if m.activations is not None else None
        self.buffers = m.weight_buffers()
        self.group, self.k = m.group_size, m.in_features
        self.keep_weight = m.weight_mode != "memory"
        self._weight, self._versions = None, None
        self.set_branch(m)
        self.bias = m.bias
        if self.af is not None:
            self.act_group = activation_group(m)
            self.sinv = m.smooth_inv
            self.shift, self.unsigned_from = m.act_shift, m.act_unsigned_from
            self.input_scale = getattr(m, "input_scale", None)

    @classmethod
    def build(cls, m, gpu) -> "ReferenceRunner":
        return cls(m)  # no kernel

    def set_branch(self, m) -> bool:
        """A LoRA was added, rescaled or removed: only the branch changes (in place where it can, see
        :func:`assign_branch`; True if the runner now holds other tensors)."""
        return assign_branch(self, *m.branch(), branch_sources(m))

    def weight(self):
        """``(QTensor, what the product multiplies)`` of the current buffers."""
        if torch.compiler.is_compiling():  # a traced graph recomputes it (version counters cannot be guarded on)
            wq = self.wf.from_buffers(self.buffers, self.group, self.k)
            return wq, (reference.weight_operand(wq, self.af.name) if self.af is not None else None)
        versions = tuple(b._version for b in self.buffers.values())
        if self._weight is not None and versions == self._versions:
            return self._weight
        wq = self.wf.from_buffers(self.buffers, self.group, self.k)
        operand = reference.weight_operand(wq, self.af.name) if self.af is not None else None
        if self.keep_weight:
            self._weight, self._versions = (wq, operand), versions
        return wq, operand

    def __call__(self, x2):
        wq, operand = self.weight()
        if self.af is None:
            w = self.wf.dequantize(wq, x2.dtype)
            return reference.weight_only_linear(x2, w, self.down, self.up, self.bias)
        qin = reference.quantize_input(x2, self.sinv, self.down, self.af.name, self.act_group, self.shift,
                                       self.input_scale, self.unsigned_from)
        return reference.qgemm(qin, wq, self.up, self.bias, x2.dtype, w_operand=operand)


class CpuRunner(ReferenceRunner):
    """Quantized activations on the CPU whose format has an :meth:`~svdquant.formats.Format.operand` (INT8, two-level
    INT4, NVFP4): the reference's numbers in fewer passes. The activations are quantized straight into the fp32
    values the reference multiplies (exact integers, or E2M1 values × E4M3 scales), with no codes built and read
    back; an integer product is :func:`~svdquant.ops.reference.int8_dot_float`'s exact float32 sums; scales,
    branch and bias follow in :func:`~svdquant.ops.reference.qgemm`'s order (the branch added into the product by
    the BLAS, which may round its last bit differently). A quarter to half the time of the reference per layer on
    a 2-core CPU."""

    def __init__(self, m):
        super().__init__(m)
        self.kind = product_kind(m.weights, m.activations)
        # a shift on only the post-GELU channels: its vector made once, not per call
        mixed = bool(self.shift and self.unsigned_from)
        self.shift_vec = shift_vector(self.k, self.shift, self.unsigned_from, self.sinv.device) if mixed else None

    def __call__(self, x2):
        wq, w = self.weight()
        k = self.k
        if self.shift_vec is not None:
            u = (x2.float() + self.shift_vec) * self.sinv
            unsigned = self.unsigned_from
        else:
            u = ((x2.float() + self.shift) if self.shift else x2.float()) * self.sinv
            unsigned = bool(self.shift)
        a, a_s, a_ts = self.af.operand(u, self.act_group, unsigned=unsigned, tensor_scale=self.input_scale)
        if self.kind == "integer":
            acc = reference.int8_dot_float(a[:, :k], w[0][:, :k]).mul_(a_s).mul_(w[1][None, :])
        else:  # grouped
            acc = a @ w.T
            if wq.tensor_scale is not None:
                acc *= a_ts * wq.tensor_scale
        if self.down is not None:  # into acc: a fresh [M, N] product would cost as much as the main one
            acc.addmm_(x2.float() @ self.down.float().T, self.up.float().T)
        if self.bias is not None:
            acc += self.bias.float()
        return acc.to(x2.dtype)
