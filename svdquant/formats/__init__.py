"""Number formats: quantize -> codes + scales, dequantize, 4-bit packing.

| format  | values                     | scale                                           | module    |
| ------- | -------------------------- | ----------------------------------------------- | --------- |
| int4    | [-7, 7]                    | absmax/7 per group of 64 (model dtype)          | int4.py   |
| uint4   | [0, 15]                    | max/15 per group (shifted post-GELU)            | int4.py   |
| int4m   | [-7, 7] × m ∈ [1, 18]      | fp32 per row × integer multiplier per group     | int4m.py  |
| int4z   | [0, 15], + zero            | (max−min)/15 and min per group of 64 (16-bit)   | int4z.py  |
| nvfp4   | E2M1 ±{0,.5,1,1.5,2,3,4,6} | E4M3 per 16 × fp32 per tensor                   | nvfp4.py  |
| int8    | [-127, 127]                | absmax/127 per row (fp32)                       | int8.py   |
| fp8     | E4M3                       | absmax/448 per row (fp32)                       | fp8.py    |
| nf4     | 16 NormalFloat levels      | absmax per block of 64 (fp32)                   | nf4.py    |

Each format is one :class:`Format` record (``records.py``, looked up with
:func:`get_format`) that the rest of the library asks: what it stores, what it pairs
with, how to quantize and simulate it. :func:`quantize`, :func:`dequantize` and
:func:`fake_quantize` are the by-name shortcuts.
"""

from __future__ import annotations

import torch

from .common import QTensor, check_finite, pad_to_group
from .fp8 import dequantize_fp8, quantize_fp8
from .int4 import dequantize_int4, fake_quantize_int4, quantize_int4
from .int4m import MULT_MAX, MULT_MAX_UNSIGNED, dequantize_int4m, fake_quantize_int4m, quantize_int4m
from .int8 import dequantize_int8, fake_quantize_int8, quantize_int8
from .nf4 import NF4_LEVELS, dequantize_nf4, quantize_nf4
from .nvfp4 import E2M1_VALUES, dequantize_nvfp4, fake_quantize_nvfp4, nvfp4_tensor_scale as _nvfp4_tensor_scale, quantize_nvfp4
from .packing import pack_4bit, pack_4bit_halves, unpack_4bit, unpack_4bit_halves
from .records import FORMATS, Format, get_format, product_kind

WEIGHT_FORMATS = tuple(n for n, f in FORMATS.items() if f.weight)
ACTIVATION_FORMATS = tuple(n for n, f in FORMATS.items() if f.activation)


def dequantize(q: QTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return get_format(q.fmt).dequantize(q, dtype)


def quantize(
    x: torch.Tensor,
    fmt: str,
    group_size: int | None = None,
    *,
    unsigned: bool | int = False,
    scale_dtype: torch.dtype | None = None,
    tensor_scale=None,
    weight: bool = False,
    check: bool = True,
) -> QTensor:
    """Quantize with any format by name; ``group_size=None`` takes the format's default.
    ``weight=True`` applies the format's static weight rule where it has one (``int4m``)."""
    return get_format(fmt).quantize(x, group_size, unsigned=unsigned, scale_dtype=scale_dtype,
                                    tensor_scale=tensor_scale, weight=weight, check=check)


def fake_quantize(
    x: torch.Tensor,
    fmt: str,
    group_size: int | None = None,
    *,
    unsigned: bool | int = False,
    scale_dtype: torch.dtype | None = None,
    tensor_scale=None,
    weight: bool = False,
    check: bool = True,
) -> torch.Tensor:
    """``dequantize(quantize(x))`` in fp32, same shape as ``x`` (bit-identical, fewer passes)."""
    f = get_format(fmt)
    kw = dict(unsigned=unsigned, scale_dtype=scale_dtype, tensor_scale=tensor_scale, weight=weight, check=check)
    rows = x.reshape(-1, x.shape[-1]) if x.ndim else x
    if x.device.type == "cpu" and x.numel() > 2 * _CPU_CHUNK and rows.shape[0] > 1:
        # On the CPU each large temporary costs fresh pages from the OS; row chunks that stay
        # in cache make this ~5x faster. Rows are independent except for NVFP4's tensor scale.
        if f.static_input_scale and tensor_scale is None:
            kw["tensor_scale"] = _nvfp4_tensor_scale(x)
        out = torch.empty(rows.shape, dtype=torch.float32)
        step = max(1, _CPU_CHUNK // x.shape[-1])
        for src, dst in zip(rows.split(step), out.split(step)):
            dst.copy_(f.fake_quantize(src, group_size, **kw))
        return out.reshape(x.shape)
    return f.fake_quantize(x, group_size, **kw)


_CPU_CHUNK = 1 << 18


__all__ = [
    "QTensor", "Format", "FORMATS", "get_format", "product_kind", "quantize", "dequantize", "fake_quantize",
    "check_finite", "pad_to_group",
    "quantize_int4", "dequantize_int4", "quantize_int4m", "dequantize_int4m", "quantize_nvfp4", "dequantize_nvfp4",
    "quantize_int8", "dequantize_int8", "quantize_fp8", "dequantize_fp8",
    "quantize_nf4", "dequantize_nf4", "pack_4bit", "unpack_4bit", "pack_4bit_halves", "unpack_4bit_halves",
    "E2M1_VALUES", "NF4_LEVELS", "WEIGHT_FORMATS", "ACTIVATION_FORMATS", "MULT_MAX", "MULT_MAX_UNSIGNED",
]
