"""One record per number format: everything the rest of the library asks about a format.

Recipes validate against it, :class:`~svdquant.SVDQLinear` lays out its buffers from it,
the algorithm simulates with it, the torch reference multiplies with it, and ``ops``
picks a kernel from its fields (``integer``, ``grouped``, ``fp4``, ``scaled_mm``, ``w4a16``;
:mod:`svdquant.ops.routes`). Adding a format is one module with its quantize /
dequantize functions plus one record here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from .common import QTensor
from .fp8 import dequantize_fp8, quantize_fp8
from .int4 import dequantize_int4, fake_quantize_int4, int4_weight_grid, quantize_int4
from .int4z import dequantize_int4z, quantize_int4z
from .int4m import (dequantize_int4m, fake_quantize_int4m, int4m_integer_values, int4m_operand, int4m_weight_grid,
                    quantize_int4m)
from .int8 import dequantize_int8, fake_quantize_int8, int8_code_values, quantize_int8
from .nf4 import dequantize_nf4, nf4_weight_grid, quantize_nf4
from .nvfp4 import (dequantize_nvfp4, e2m1_table, fake_quantize_nvfp4, nvfp4_operand, nvfp4_weight_grid,
                    quantize_nvfp4)
from .packing import pack_4bit_halves, unpack_4bit_halves


@dataclass(frozen=True)
class Format:
    """A number format and how a layer stores it.

    default_group / group_sizes: channels per scale along K (0: one scale per row);
        ``group_sizes=None`` accepts any positive even size.
    packed: a layer stores two 4-bit codes per byte (:func:`pack_4bit_halves`).
    signed: 4-bit codes are two's complement (unpacking sign-extends them).
    weight / activation: where the format may be used.
    pairs_with: for a weight format, the activation formats it has a product with.
    integer: an operand is an exact INT8 matrix times one float per row, so any two
        such operands multiply as a plain INT8 GEMM with the scales in the epilogue.
    unsigned_groups: as activations, post-GELU inputs may be shifted by +0.171875 and
        quantized unsigned (the shift is compensated in the bias).
    static_input_scale: as activations, a per-tensor scale is calibrated (NVFP4).
    weight_only: the weight format this recipe uses for its 16-bit-activation layers.
    best_weights: weights pick each group's scale for the smaller error (``int4m``).
    has_weight_grid: a weight in this format can be re-rounded column by column under its fixed scales
        (:meth:`weight_grid`; what GPTQ needs).
    weight_rounding_kernel: the :mod:`svdquant.kernels` function that computes ``fake_quantize(w, weight=True)``
        on a GPU, row by row, bit-identical (the quantizer's search runs it for every candidate).

    Which GPU kernel multiplies a layer (:mod:`svdquant.ops.routes` reads these, never the name):
    grouped: a code times its float group scale is exact in fp32; as weights and activations of the same
        format, the float-group-scale kernels run it (the paper's W4A4, NVFP4).
    fp4: the codes are E2M1 floats (FP4) with E4M3 group scales: those kernels convert through FP8
        (compute capability 8.9+).
    scaled_mm: FP8 codes with a row scale: ``torch._scaled_mm`` multiplies two such operands.
    w4a16: as weights with 16-bit activations, the W4A16 kernel runs it (4-bit codes with 16-bit group scales
        and, where the format has them, zero points).
    """

    name: str
    summary: str
    default_group: int
    group_sizes: tuple[int, ...] | None
    packed: bool
    signed: bool
    weight: bool
    activation: bool
    pairs_with: tuple[str, ...]
    integer: bool
    unsigned_groups: bool
    static_input_scale: bool
    weight_only: str
    grouped: bool = field(default=False, kw_only=True)
    fp4: bool = field(default=False, kw_only=True)
    scaled_mm: bool = field(default=False, kw_only=True)
    w4a16: bool = field(default=False, kw_only=True)
    _quantize: Callable = field(repr=False)
    _dequantize: Callable = field(repr=False)
    _layout: Callable = field(repr=False)
    _fake: Callable | None = field(default=None, repr=False)
    _code_values: Callable | None = field(default=None, repr=False)
    _operand: Callable | None = field(default=None, repr=False)
    _weight_grid: Callable | None = field(default=None, repr=False)
    best_weights: bool = False
    weight_rounding_kernel: str | None = None
    # the stored codes (as :meth:`dequantize` reads them) that reach the smallest and largest values, for
    # :meth:`magnitude_bound`; the int4 ones include -8, which a file can hold though the quantizer never writes it
    extreme_codes: tuple[float, ...] = ()

    # -- numbers -----------------------------------------------------------------
    def group(self, group_size: int | None) -> int:
        return self.default_group if group_size is None else group_size

    def quantize(self, x, group_size=None, *, unsigned=False, scale_dtype=None, tensor_scale=None, weight=False,
                 check=True) -> QTensor:
        """``weight=True``: the static weight rule (``best_weights``), else the dynamic activation rule."""
        return self._quantize(x, self.group(group_size), unsigned=unsigned, scale_dtype=scale_dtype,
                              tensor_scale=tensor_scale, best=weight and self.best_weights, check=check)

    def fake_quantize(self, x, group_size=None, *, unsigned=False, scale_dtype=None, tensor_scale=None, weight=False,
                      check=True) -> torch.Tensor:
        """``dequantize(quantize(x))`` in fp32, bit-identical, in fewer passes where the format has a fast path."""
        kw = dict(unsigned=unsigned, scale_dtype=scale_dtype, tensor_scale=tensor_scale,
                  best=weight and self.best_weights, check=check)
        if self._fake is not None:
            return self._fake(x, self.group(group_size), **kw)
        return self.dequantize(self._quantize(x, self.group(group_size), **kw))

    def dequantize(self, q: QTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self._dequantize(q, dtype)

    @property
    def has_operand(self) -> bool:
        return self._operand is not None

    def operand(self, x, group_size=None, *, unsigned=False, tensor_scale=None):
        """Activations quantized straight into what :func:`svdquant.ops.reference.qgemm` multiplies, as fp32
        ``(values [.., K_pad], row scale [.., 1] or None, tensor scale or None)``: an integer format's exact
        ``integer_operand`` values, a grouped format's code values × group scales. The same numbers as quantizing
        and reading the codes back, in fewer passes (the CPU's quantized layers); None for formats without it."""
        if self._operand is None:
            return None
        return self._operand(x, self.group(group_size), unsigned=unsigned, tensor_scale=tensor_scale)

    @property
    def has_weight_grid(self) -> bool:
        return self._weight_grid is not None

    def weight_grid(self, q: QTensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The values a weight ``q`` could hold under its own (fixed) scales, for rounding it again element by
        element (GPTQ): ``(factors [.., K_pad] fp32, values [m] fp32 ascending, codes [m])``, where the element
        at ``[n, k]`` may be ``factors[n, k] · values[i]``, stored as ``codes[i]``."""
        if self._weight_grid is None:
            raise ValueError(f"{self.name} weights have no rounding grid (GPTQ takes int4, int4m, nvfp4 or nf4)")
        return self._weight_grid(q)

    def code_values(self, q: QTensor) -> torch.Tensor:
        """The codes as fp32 values before any scale (E2M1 codes -> their values)."""
        return self._code_values(q.codes) if self._code_values is not None else q.codes.float()

    def integer_operand(self, q: QTensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(int8 values [.., K], fp32 row scale [..])`` with ``values · scale = dequantize(q)``."""
        if not self.integer:
            raise ValueError(f"{self.name} is not an integer format")
        vals = int4m_integer_values(q) if q.multipliers is not None else q.codes
        return vals, q.scales.float()

    def magnitude_bound(self, buffers: dict[str, torch.Tensor]) -> torch.Tensor:
        """The largest ``|dequantized value|`` each row of a layer's weight can hold, ``[N]`` fp32, from its scales
        (and multipliers, zeros, tensor scale) alone: the extreme codes dequantized under every group's factors.
        Reads ``N × groups`` numbers, never the ``N × K`` codes (a checkpoint's range check runs it per layer)."""
        s = buffers["wscales"]
        per = buffers.get("wmult", s)  # int4m: one fp32 scale per row, the groups are in the multipliers
        n, g = per.shape[0], (per.shape[1] if per.ndim == 2 else 1)
        out = torch.zeros(n, device=s.device)
        for c in self.extreme_codes:  # one code per group (group size 1) under the group's real factors
            q = QTensor(torch.full((n, g), float(c), device=s.device), s, self.name, 1, g,
                        tensor_scale=buffers.get("wtensor_scale"), multipliers=buffers.get("wmult"),
                        zeros=buffers.get("wzeros"))
            out = torch.maximum(out, self.dequantize(q).abs().reshape(n, -1).amax(-1))
        return out

    # -- a layer's storage ---------------------------------------------------------
    def weight_buffers(self, n: int, k: int, group_size: int, dtype: torch.dtype) -> dict[str, tuple]:
        """Buffer name -> (shape, dtype) of an [n, k] weight in this format (model dtype ``dtype``)."""
        kp = k + (-k) % group_size if group_size else k
        groups = kp // group_size if group_size else 0
        return self._layout(n, kp, groups, dtype)

    def to_buffers(self, q: QTensor) -> dict[str, torch.Tensor]:
        codes = pack_4bit_halves(q.codes, q.group_size) if self.packed else q.codes
        out = {"qweight": codes, "wscales": q.scales}
        if q.multipliers is not None:
            out["wmult"] = q.multipliers
        if q.tensor_scale is not None:
            out["wtensor_scale"] = q.tensor_scale
        if q.zeros is not None:
            out["wzeros"] = q.zeros
        return out

    def from_buffers(self, buffers: dict[str, torch.Tensor], group_size: int, in_features: int) -> QTensor:
        codes = buffers["qweight"]
        if self.packed:
            codes = unpack_4bit_halves(codes, group_size, signed=self.signed)
        return QTensor(codes, buffers["wscales"], self.name, group_size, in_features,
                       tensor_scale=buffers.get("wtensor_scale"), multipliers=buffers.get("wmult"),
                       zeros=buffers.get("wzeros"))


def _q_int4(x, g, *, unsigned, scale_dtype, tensor_scale, best, check):
    return quantize_int4(x, g, unsigned=unsigned, scale_dtype=scale_dtype, check=check)


def _fq_int4(x, g, *, unsigned, scale_dtype, tensor_scale, best, check):
    return fake_quantize_int4(x, g, unsigned=unsigned, scale_dtype=scale_dtype, check=check)


def _q_int4m(x, g, *, unsigned, scale_dtype, tensor_scale, best, check):
    return quantize_int4m(x, g, unsigned=unsigned, best=best, check=check)


def _fq_int4m(x, g, *, unsigned, scale_dtype, tensor_scale, best, check):
    return fake_quantize_int4m(x, g, unsigned=unsigned, best=best, check=check)


def _q_int4z(x, g, *, unsigned, scale_dtype, tensor_scale, best, check):
    return quantize_int4z(x, g, scale_dtype=scale_dtype, check=check)


def _q_nvfp4(x, g, *, unsigned, scale_dtype, tensor_scale, best, check):
    return quantize_nvfp4(x, g, tensor_scale=tensor_scale, check=check)


def _fq_nvfp4(x, g, *, unsigned, scale_dtype, tensor_scale, best, check):
    return fake_quantize_nvfp4(x, g, tensor_scale=tensor_scale, check=check)


def _q_int8(x, g, *, unsigned, scale_dtype, tensor_scale, best, check):
    return quantize_int8(x, check=check)


def _fq_int8(x, g, *, unsigned, scale_dtype, tensor_scale, best, check):
    return fake_quantize_int8(x, check=check)


def _q_fp8(x, g, *, unsigned, scale_dtype, tensor_scale, best, check):
    return quantize_fp8(x, check=check)


def _q_nf4(x, g, *, unsigned, scale_dtype, tensor_scale, best, check):
    return quantize_nf4(x, g, check=check)


U8, I8, F32 = torch.uint8, torch.int8, torch.float32


def _pair(values_and_tensor_scale):
    """A grouped format's operand: (values, no row scale, tensor scale)."""
    values, ts = values_and_tensor_scale
    return values, None, ts

FORMATS: dict[str, Format] = {f.name: f for f in (
    Format("int4", "INT4 [-7, 7], a 16-bit scale per group of 64 (the paper's W4A4; uint4 [0, 15] when shifted)",
           64, None, packed=True, signed=True, weight=True, activation=True, pairs_with=("int4", "int8"),
           integer=False, unsigned_groups=True, static_input_scale=False, weight_only="int4", grouped=True,
           w4a16=True, _quantize=_q_int4, _dequantize=dequantize_int4,
           _layout=lambda n, kp, g, dt: {"qweight": ((n, kp // 2), U8), "wscales": ((n, g), dt)}, _fake=_fq_int4,
           extreme_codes=(-8, 7), _weight_grid=int4_weight_grid),
    Format("int4m", "INT4 [-7, 7] × integer multiplier [1, 18] per group of 64 × fp32 per row (two-level)",
           64, None, packed=True, signed=True, weight=True, activation=True, pairs_with=("int8", "int4m"),
           integer=True, unsigned_groups=True, static_input_scale=False, weight_only="int4",
           _quantize=_q_int4m, _dequantize=dequantize_int4m,
           _layout=lambda n, kp, g, dt: {"qweight": ((n, kp // 2), U8), "wmult": ((n, g), U8),
                                         "wscales": ((n,), F32)},
           _fake=_fq_int4m, best_weights=True, weight_rounding_kernel="round_int4m_weights", extreme_codes=(-8, 7),
           _weight_grid=int4m_weight_grid,
           _operand=lambda x, g, *, unsigned, tensor_scale: (*int4m_operand(x, g, unsigned=unsigned), None)),
    # AWQ's W4A16 (Nunchaku's adaLN layers): kept so imported layers hold their exact values; never a recipe default.
    Format("int4z", "uint4 [0, 15], a 16-bit scale and a 16-bit zero per group of 64 (AWQ W4A16); weights only",
           64, None, packed=True, signed=False, weight=True, activation=False, pairs_with=(),
           integer=False, unsigned_groups=False, static_input_scale=False, weight_only="int4z", w4a16=True,
           _quantize=_q_int4z, _dequantize=dequantize_int4z,
           _layout=lambda n, kp, g, dt: {"qweight": ((n, kp // 2), U8), "wscales": ((n, g), dt),
                                         "wzeros": ((n, g), dt)}, extreme_codes=(0, 15)),
    Format("nvfp4", "FP4 E2M1, an E4M3 scale per group of 16 × fp32 per tensor",
           16, (16, 32), packed=True, signed=False, weight=True, activation=True, pairs_with=("nvfp4",),
           integer=False, unsigned_groups=False, static_input_scale=True, weight_only="nvfp4", grouped=True,
           fp4=True, _quantize=_q_nvfp4, _dequantize=dequantize_nvfp4,
           _layout=lambda n, kp, g, dt: {"qweight": ((n, kp // 2), U8), "wscales": ((n, g), torch.float8_e4m3fn),
                   "wtensor_scale": ((), F32)}, _fake=_fq_nvfp4,
           _code_values=lambda c: e2m1_table(c.device)[c.long()], extreme_codes=(7, 15),  # E2M1 ±6
           _weight_grid=nvfp4_weight_grid,
           _operand=lambda x, g, *, unsigned, tensor_scale: _pair(nvfp4_operand(x, g, tensor_scale=tensor_scale))),
    Format("int8", "INT8 [-127, 127], an fp32 scale per row (per channel / per token)",
           0, (0,), packed=False, signed=True, weight=True, activation=True, pairs_with=("int8",),
           integer=True, unsigned_groups=False, static_input_scale=False, weight_only="int8",
           _quantize=_q_int8, _dequantize=dequantize_int8,
           _layout=lambda n, kp, g, dt: {"qweight": ((n, kp), I8), "wscales": ((n,), F32)}, _fake=_fq_int8,
           extreme_codes=(-128, 127),
           _operand=lambda x, g, *, unsigned, tensor_scale: (*int8_code_values(x), None)),
    Format("fp8", "FP8 E4M3, an fp32 scale per row (torch._scaled_mm row-wise)",
           0, (0,), packed=False, signed=True, weight=True, activation=True, pairs_with=("fp8",),
           integer=False, unsigned_groups=False, static_input_scale=False, weight_only="fp8", scaled_mm=True,
           _quantize=_q_fp8, _dequantize=dequantize_fp8,
           _layout=lambda n, kp, g, dt: {"qweight": ((n, kp), torch.float8_e4m3fn), "wscales": ((n,), F32)},
           extreme_codes=(-448.0, 448.0)),
    Format("nf4", "NF4 (bitsandbytes), an fp32 absmax per block of 64; weights only",
           64, None, packed=True, signed=False, weight=True, activation=False, pairs_with=(),
           integer=False, unsigned_groups=False, static_input_scale=False, weight_only="nf4",
           _quantize=_q_nf4, _dequantize=dequantize_nf4,
           _layout=lambda n, kp, g, dt: {"qweight": ((n, kp // 2), U8), "wscales": ((n, g), F32)},
           extreme_codes=(0, 15), _weight_grid=nf4_weight_grid),  # the NF4 table's -1 and 1
)}

# A QTensor of all-unsigned INT4 codes says "uint4"; it dequantizes like int4.
_ALIASES = {"uint4": "int4"}


def get_format(name: str) -> Format:
    """The record of a format by name, with an error that lists the known ones."""
    f = FORMATS.get(_ALIASES.get(name, name))
    if f is None:
        raise ValueError(f"unknown format {name!r}; choose one of {tuple(FORMATS)}")
    return f


def product_kind(weights: str, activations: str) -> str:
    """How the reference multiplies two formats: "integer" (exact int32 sums, row scales), "grouped"
    (per-group float scales folded into fp32 operands) or "dense" (dequantize both, float64)."""
    w, a = get_format(weights), get_format(activations)
    if w.integer and a.integer:
        return "integer"
    if w.name == a.name and w.grouped:
        return "grouped"
    return "dense"
