"""A 1×1 convolution is a linear over channels: quantize it as one (SANA's GLUMBConv)."""

from __future__ import annotations

import torch
import torch.nn as nn

from .linear import SVDQLinear


class SVDQConv1x1(nn.Module):
    """``[B, C, H, W] -> [B, N, H, W]`` through an :class:`SVDQLinear` on channels-last tokens."""

    def __init__(self, linear: SVDQLinear):
        super().__init__()
        self.linear = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4:
            raise ValueError(f"SVDQConv1x1 expects [B, C, H, W] inputs, got shape {tuple(x.shape)}")
        y = self.linear(x.permute(0, 2, 3, 1))
        return y.permute(0, 3, 1, 2)


def as_linear(conv: nn.Conv2d) -> nn.Linear:
    """The 1×1 convolution's weights as an ``nn.Linear`` (shares no storage with it)."""
    lin = nn.Linear(conv.in_channels, conv.out_channels, bias=conv.bias is not None,
                    dtype=conv.weight.dtype, device=conv.weight.device)
    with torch.no_grad():
        lin.weight.copy_(conv.weight.reshape(conv.out_channels, conv.in_channels))
        if conv.bias is not None:
            lin.bias.copy_(conv.bias)
    return lin
