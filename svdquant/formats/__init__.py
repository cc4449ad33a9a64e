"""Number formats: quantize -> codes + scales, dequantize, 4-bit packing.

| format  | values                   | scale                                   | module    |
| ------- | ------------------------ | --------------------------------------- | --------- |
| int4    | [-7, 7]                  | absmax/7 per group of 64 (model dtype)  | int4.py   |
| uint4   | [0, 15]                  | max/15 per group (shifted post-GELU)    | int4.py   |
| nvfp4   | E2M1 ±{0,.5,1,1.5,2,3,4,6} | E4M3 per 16 × fp32 per tensor         | nvfp4.py  |
| int8    | [-127, 127]              | absmax/127 per row (fp32)               | int8.py   |
| fp8     | E4M3                     | absmax/448 per row (fp32)               | fp8.py    |
| nf4     | 16 NormalFloat levels    | absmax per block of 64 (fp32)           | nf4.py    |

Every ``quantize_*`` returns a :class:`QTensor`; :func:`dequantize` inverts any of them;
:func:`fake_quantize` is quantize-then-dequantize, the simulation the algorithm scores with.
"""

from __future__ import annotations

import torch

from .common import QTensor, check_finite, pad_to_group
from .fp8 import dequantize_fp8, quantize_fp8
from .int4 import dequantize_int4, fake_quantize_int4, quantize_int4
from .int8 import dequantize_int8, fake_quantize_int8, quantize_int8
from .nf4 import NF4_LEVELS, dequantize_nf4, quantize_nf4
from .nvfp4 import E2M1_VALUES, dequantize_nvfp4, fake_quantize_nvfp4, nvfp4_tensor_scale as _nvfp4_tensor_scale, quantize_nvfp4
from .packing import pack_4bit, pack_4bit_halves, unpack_4bit, unpack_4bit_halves

WEIGHT_FORMATS = ("int4", "nvfp4", "int8", "fp8", "nf4")
ACTIVATION_FORMATS = ("int4", "nvfp4", "int8", "fp8")
FOUR_BIT = ("int4", "uint4", "nvfp4", "nf4")

_DEQUANT = {
    "int4": dequantize_int4,
    "uint4": dequantize_int4,
    "nvfp4": dequantize_nvfp4,
    "int8": dequantize_int8,
    "fp8": dequantize_fp8,
    "nf4": dequantize_nf4,
}


def dequantize(q: QTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return _DEQUANT[q.fmt](q, dtype)


def quantize(
    x: torch.Tensor,
    fmt: str,
    group_size: int | None = None,
    *,
    unsigned: bool | int = False,
    scale_dtype: torch.dtype | None = None,
    tensor_scale=None,
    check: bool = True,
) -> QTensor:
    """Quantize with any format by name; ``group_size=None`` takes the format's default."""
    if fmt == "int4":
        return quantize_int4(x, 64 if group_size is None else group_size, unsigned=unsigned,
                             scale_dtype=scale_dtype, check=check)
    if fmt == "nvfp4":
        return quantize_nvfp4(x, 16 if group_size is None else group_size, tensor_scale=tensor_scale,
                              check=check)
    if fmt == "int8":
        return quantize_int8(x, check=check)
    if fmt == "fp8":
        return quantize_fp8(x, check=check)
    if fmt == "nf4":
        return quantize_nf4(x, 64 if group_size is None else group_size, check=check)
    raise ValueError(f"unknown format {fmt!r}; choose one of {WEIGHT_FORMATS}")


def fake_quantize(
    x: torch.Tensor,
    fmt: str,
    group_size: int | None = None,
    *,
    unsigned: bool | int = False,
    scale_dtype: torch.dtype | None = None,
    tensor_scale=None,
    check: bool = True,
) -> torch.Tensor:
    """``dequantize(quantize(x))`` in fp32, same shape as ``x`` (bit-identical, fewer passes)."""
    kw = dict(unsigned=unsigned, scale_dtype=scale_dtype, tensor_scale=tensor_scale, check=check)
    rows = x.reshape(-1, x.shape[-1]) if x.ndim else x
    if x.device.type == "cpu" and x.numel() > 2 * _CPU_CHUNK and rows.shape[0] > 1:
        # On the CPU each large temporary costs fresh pages from the OS; row chunks that stay
        # in cache make this ~5x faster. Rows are independent except for NVFP4's tensor scale.
        if fmt == "nvfp4" and tensor_scale is None:
            kw["tensor_scale"] = _nvfp4_tensor_scale(x)
        out = torch.empty(rows.shape, dtype=torch.float32)
        step = max(1, _CPU_CHUNK // x.shape[-1])
        for src, dst in zip(rows.split(step), out.split(step)):
            dst.copy_(_fake_quantize(src, fmt, group_size, **kw))
        return out.reshape(x.shape)
    return _fake_quantize(x, fmt, group_size, **kw)


_CPU_CHUNK = 1 << 18


def _fake_quantize(x, fmt, group_size, *, unsigned, scale_dtype, tensor_scale, check):
    if fmt == "int4":
        return fake_quantize_int4(x, 64 if group_size is None else group_size, unsigned=unsigned,
                                  scale_dtype=scale_dtype, check=check)
    if fmt == "nvfp4":
        return fake_quantize_nvfp4(x, 16 if group_size is None else group_size, tensor_scale=tensor_scale,
                                   check=check)
    if fmt == "int8":
        return fake_quantize_int8(x, check=check)
    return dequantize(quantize(x, fmt, group_size, unsigned=unsigned, scale_dtype=scale_dtype,
                               tensor_scale=tensor_scale, check=check))


__all__ = [
    "QTensor", "quantize", "dequantize", "fake_quantize", "check_finite", "pad_to_group",
    "quantize_int4", "dequantize_int4", "quantize_nvfp4", "dequantize_nvfp4",
    "quantize_int8", "dequantize_int8", "quantize_fp8", "dequantize_fp8",
    "quantize_nf4", "dequantize_nf4", "pack_4bit", "unpack_4bit", "pack_4bit_halves", "unpack_4bit_halves",
    "E2M1_VALUES", "NF4_LEVELS", "WEIGHT_FORMATS", "ACTIVATION_FORMATS", "FOUR_BIT",
]
