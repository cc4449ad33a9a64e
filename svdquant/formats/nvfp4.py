"""NVFP4: E2M1 codes, one FP8 E4M3 scale per group of 16, one FP32 scale per tensor.

A 4-bit code is ``sign << 3 | index`` where ``index`` selects the magnitude from
``E2M1_VALUES = (0, 0.5, 1, 1.5, 2, 3, 4, 6)`` (the E2M1 bit pattern: 2 exponent
bits, 1 mantissa bit). Zero is always stored as code 0 (no negative zero).

Quantizing ``x``:
  * ``tensor_scale`` (fp32): given, or ``absmax(x) / (6 * 448)`` so that the largest
    group scale lands on E4M3's largest value;
  * group scale ``s_g = e4m3(absmax_g / 6 / tensor_scale)`` (round-to-nearest-even,
    saturating at 448);
  * ``code = e2m1(x / (s_g * tensor_scale))``, rounded to the nearest E2M1 value with
    ties to the even mantissa (0.25 -> 0, 0.75 -> 1, 2.5 -> 2, 5 -> 4), clamped to ±6.

``dequantize: x ≈ E2M1[code] * s_g * tensor_scale``. Every E2M1 value is exact in FP8
E4M3, which is what lets Hopper run this format on its FP8 tensor cores.
"""

from __future__ import annotations

import torch

from .common import QTensor, check_finite, check_group_size, grouped, pad_to_group, per_element

E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E2M1_MAX = 6.0
E4M3_MAX = 448.0


def e2m1_table(device=None) -> torch.Tensor:
    """The 16 values of the codes ``0..15`` (codes 8..15 are the negatives)."""
    pos = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=device)
    return torch.cat([pos, -pos])


def round_to_e2m1_values(v: torch.Tensor) -> torch.Tensor:
    """Round fp32 values (already divided by their scale) to E2M1 values, ties to even, clamped to ±6.

    The E2M1 grid has step 0.5 below 2, step 1 in [2, 4) and step 2 above; on each
    stretch an even multiple of the step has an even mantissa bit, so round-half-even
    of ``|v| / step`` is exactly the format's tie rule (0.25 -> 0, 0.75 -> 1, 5 -> 4).
    """
    mag = v.abs()
    # The step 2^clamp(floor(log2 |v|) - 1, -1, 1): three times faster on the CPU than selecting it with
    # comparisons. log2 may be an ulp off just below 2 or 4, where the two stretches' steps round alike
    # (1.99 -> 2 with step 0.5 or 1; 3.99 -> 4 with step 1 or 2), so the result is the same.
    step = torch.log2(mag).floor_().sub_(1).clamp_(-1, 1).exp2_()
    return (mag / step).round_().mul_(step).clamp_(max=E2M1_MAX).copysign_(v)


def round_to_e2m1(v: torch.Tensor) -> torch.Tensor:
    """fp32 values (already divided by their scale) -> E2M1 codes (uint8), ties to even."""
    q = round_to_e2m1_values(v)
    mag = q.abs()
    idx = torch.where(mag < 2, mag * 2, torch.where(mag < 4, mag + 2, mag / 2 + 4)).to(torch.uint8)
    sign = ((q < 0) & (idx > 0)).to(torch.uint8) << 3
    return idx | sign


def to_e4m3(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> float8_e4m3fn, round-to-nearest-even, saturating instead of producing NaN."""
    return x.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def nvfp4_tensor_scale(x: torch.Tensor) -> torch.Tensor:
    """``absmax(x) / (6 * 448)``: puts the largest group scale on E4M3's largest value (1 for all-zero x)."""
    amax = x.float().abs().amax()
    return torch.where(amax > 0, amax / (E2M1_MAX * E4M3_MAX), torch.ones_like(amax))


def _nvfp4_grid(x, group_size, tensor_scale, check):
    check_group_size(group_size, (16, 32))
    if check:
        check_finite(x, "input of quantize_nvfp4")
    xf = x.float()
    if tensor_scale is None:
        tensor_scale = nvfp4_tensor_scale(xf)
    ts = torch.as_tensor(tensor_scale, dtype=torch.float32, device=x.device).reshape(())
    xg = grouped(pad_to_group(xf, group_size), group_size)
    gscale = to_e4m3(xg.abs().amax(dim=-1, keepdim=True) / E2M1_MAX / ts)
    full = gscale.float() * ts
    inv = torch.where(full > 0, 1.0 / full, torch.zeros_like(full))
    return xg, ts, gscale, full, inv


def quantize_nvfp4(
    x: torch.Tensor,
    group_size: int = 16,
    *,
    tensor_scale: torch.Tensor | float | None = None,
    check: bool = True,
) -> QTensor:
    """Quantize the last dimension of ``x`` to NVFP4 (codes uint8 in ``[0, 15]``)."""
    xg, ts, gscale, _, inv = _nvfp4_grid(x, group_size, tensor_scale, check)
    codes = round_to_e2m1(xg * inv).flatten(-2)
    return QTensor(codes, gscale.squeeze(-1), "nvfp4", group_size, x.shape[-1], tensor_scale=ts)


def fake_quantize_nvfp4(x, group_size=16, *, tensor_scale=None, check=True) -> torch.Tensor:
    """``dequantize_nvfp4(quantize_nvfp4(x))`` without building the codes."""
    xg, _, _, full, inv = _nvfp4_grid(x, group_size, tensor_scale, check)
    return round_to_e2m1_values(xg * inv).mul_(full).add_(0.0).flatten(-2)[..., : x.shape[-1]]  # -0.0 -> +0.0


def nvfp4_operand(x, group_size=16, *, tensor_scale=None):
    """E2M1 values × their E4M3 group scale as fp32 ``[.., K_pad]`` (exact; what the reference multiplies) and the
    tensor scale, without building codes (the CPU's layers)."""
    xg, ts, gscale, _, inv = _nvfp4_grid(x, group_size, tensor_scale, False)
    return (round_to_e2m1_values(xg * inv) * gscale.float()).flatten(-2), ts


def dequantize_nvfp4(q: QTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    vals = e2m1_table(q.codes.device)[q.codes.long()]
    full = q.scales.float().unsqueeze(-1) * q.tensor_scale
    return (grouped(vals, q.group_size) * full).flatten(-2)[..., : q.in_features].to(dtype)


def nvfp4_weight_grid(q: QTensor):
    """A weight's rounding grid under its fixed E4M3 group scales and tensor scale: element = s_g · t · E2M1 value,
    the 15 distinct values ascending with their codes (zero is code 0) (GPTQ)."""
    factors = per_element(q.scales, q.group_size) * q.tensor_scale
    table = e2m1_table(q.codes.device)
    codes = torch.cat([torch.arange(15, 8, -1), torch.arange(0, 8)]).to(q.codes.device)  # -6 .. -0.5, 0 .. 6
    return factors, table[codes], codes.to(torch.uint8)
