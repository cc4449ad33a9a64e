"""The paper's formats with float group scales on CUDA: INT4 W4A4 and NVFP4 (quantize kernel + grouped GEMM)."""

from __future__ import annotations

import torch

from ...formats import get_format
from .. import library
from ..branch import assign_branch, branch_sources, padded_branch
from ..runner import Runner


class FloatScalesRunner(Runner):
    """The paper's formats with float group scales: INT4 W4A4 and NVFP4 (quantize kernel + grouped GEMM)."""

    def __init__(self, m, kernels):
        self.kernels = kernels
        self.fp4 = get_format(m.weights).fp4
        self.qweight = m.qweight
        self.wscales = m.wscales if self.fp4 else m.wscales.t().contiguous()
        self.wtensor_scale = getattr(m, "wtensor_scale", None)
        self.input_scale = getattr(m, "input_scale", None)
        self.sinv, self.group = m.smooth_inv, m.group_size
        self.shift, self.unsigned_from = m.act_shift, m.act_unsigned_from
        self.set_branch(m)
        self.bias = m.bias

    def set_branch(self, m) -> bool:
        return assign_branch(self, *padded_branch(m), branch_sources(m))

    def __call__(self, x2):
        args = (x2, self.sinv, self.down, self.up, self.bias, self.qweight, self.wscales, self.wtensor_scale,
                self.input_scale, self.fp4, self.group, self.shift, self.unsigned_from)
        if torch.compiler.is_compiling():
            return torch.ops.svdquant.float_scales_linear(*args)
        return library.float_scales_linear_impl(*args)
