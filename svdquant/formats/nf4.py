"""NF4, the weight-only 4-bit format of bitsandbytes (QLoRA), block 64.

Each block of 64 consecutive values along K is divided by its absmax (fp32 scale)
and snapped to the nearest of the 16 NormalFloat levels below (the bitsandbytes
codebook, quantiles of a normal distribution with an exact zero). A value exactly
halfway between two levels goes to the lower one, as in bitsandbytes. Codes are the
level indices ``0..15``. Used as the W4A16 baseline: activations stay 16-bit.
"""

from __future__ import annotations

import torch

from .common import QTensor, check_finite, check_group_size, grouped, pad_to_group, per_element

NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip


def nf4_table(device=None) -> torch.Tensor:
    return torch.tensor(NF4_LEVELS, dtype=torch.float32, device=device)


def quantize_nf4(x: torch.Tensor, group_size: int = 64, *, check: bool = True) -> QTensor:
    """Quantize the last dimension of ``x`` to NF4 codes (uint8 ``0..15``), fp32 absmax per block."""
    check_group_size(group_size)
    if check:
        check_finite(x, "input of quantize_nf4")
    k = x.shape[-1]
    xg = grouped(pad_to_group(x.float(), group_size), group_size)
    absmax = xg.abs().amax(dim=-1, keepdim=True)
    inv = torch.where(absmax > 0, 1.0 / absmax, torch.zeros_like(absmax))
    levels = nf4_table(x.device)
    mids = (levels[1:] + levels[:-1]) / 2
    codes = torch.bucketize((xg * inv).clamp_(-1, 1), mids, right=False).to(torch.uint8)
    return QTensor(codes.flatten(-2), absmax.squeeze(-1), "nf4", group_size, k)


def dequantize_nf4(q: QTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    vals = grouped(nf4_table(q.codes.device)[q.codes.long()], q.group_size)
    return (vals * q.scales.float().unsqueeze(-1)).flatten(-2)[..., : q.in_features].to(dtype)


def nf4_weight_grid(q: QTensor):
    """A weight's rounding grid under its fixed block absmax: element = absmax · level, codes 0..15 (GPTQ)."""
    return per_element(q.scales, q.group_size), nf4_table(q.codes.device), torch.arange(16, dtype=torch.uint8, device=q.codes.device)
