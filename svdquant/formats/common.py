"""What every number format shares: the quantized-tensor record, padding, input checks."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class QTensor:
    """A quantized 2-D (or batched) tensor, codes unpacked.

    ``codes`` has the input's leading shape and a last dimension padded with zeros
    to a multiple of ``group_size``; ``scales`` has one entry per group along the last
    dimension (``group_size == 0`` means one scale per row). ``in_features`` is the
    unpadded length of the last dimension. ``tensor_scale`` is the extra fp32 per-tensor
    factor of NVFP4 and is ``None`` elsewhere. ``multipliers`` holds the per-group
    integer multipliers of the two-level ``int4m`` format (``scales`` is then one fp32
    per row) and is ``None`` elsewhere. ``zeros`` holds the per-group zero points of
    ``int4z`` (AWQ's asymmetric W4A16) and is ``None`` elsewhere. ``fmt`` names the format
    record that can dequantize it.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    fmt: str
    group_size: int
    in_features: int
    tensor_scale: torch.Tensor | None = None
    multipliers: torch.Tensor | None = None
    zeros: torch.Tensor | None = None

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        from . import dequantize

        return dequantize(self, dtype)


def check_finite(x: torch.Tensor, what: str = "tensor") -> None:
    """Raise a clear error for NaN/Inf; quantization scales would silently become NaN."""
    if not bool(torch.isfinite(x).all()):
        n_nan = int(torch.isnan(x).sum())
        n_inf = int(torch.isinf(x).sum())
        raise ValueError(
            f"cannot quantize {what}: it holds {n_nan} NaN and {n_inf} Inf values. "
            "Quantization needs finite inputs; check the model weights or the calibration inputs."
        )


def pad_to_group(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """Zero-pad the last dimension to a multiple of ``group_size``.

    Zeros are exact in every format and contribute nothing to a dot product, so a
    padded weight times a padded activation equals the unpadded product.
    """
    if group_size <= 0:
        return x
    k = x.shape[-1]
    pad = (-k) % group_size
    return F.pad(x, (0, pad)) if pad else x


def grouped(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """View ``[..., K]`` (K a multiple of the group) as ``[..., K // g, g]``; g=0 means one group per row."""
    if group_size <= 0:
        return x.unsqueeze(-2)
    return x.reshape(*x.shape[:-1], x.shape[-1] // group_size, group_size)


def per_element(scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """Per-group factors ``[.., K_pad / g]`` spread over their groups' elements, ``[.., K_pad]`` fp32."""
    return scales.float().repeat_interleave(group_size, dim=-1)


def check_group_size(group_size: int, allowed: tuple[int, ...] | None = None) -> None:
    if group_size < 0 or (group_size and group_size % 2):
        raise ValueError(f"group_size must be 0 (per row) or a positive even number, got {group_size}")
    if allowed is not None and group_size not in allowed:
        raise ValueError(f"group_size {group_size} is not supported by this format; use one of {allowed}")
