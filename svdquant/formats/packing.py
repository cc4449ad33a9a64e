"""Two 4-bit codes per byte.

Layout: along the last dimension, element ``2i`` goes to the low nibble of byte ``i``
and element ``2i + 1`` to the high nibble (the order ``(lo | hi << 4)`` that the Triton
kernels unpack with a shift and a mask). Signed codes are stored as 4-bit two's
complement (``-1 -> 0xF``), so ``unpack_4bit(pack_4bit(c), signed=True) == c`` for
``c`` in ``[-8, 7]``; unsigned codes ``[0, 15]`` are stored as they are.
"""

from __future__ import annotations

import torch


def pack_4bit(codes: torch.Tensor) -> torch.Tensor:
    """``[..., K]`` integer codes (K even) -> ``[..., K // 2]`` uint8."""
    if codes.shape[-1] % 2:
        raise ValueError(f"pack_4bit needs an even last dimension, got {codes.shape[-1]}; pad it first")
    if codes.is_floating_point():
        raise TypeError(f"pack_4bit takes integer codes, got {codes.dtype}")
    c = codes.to(torch.int16)
    if bool(((c < -8) | (c > 15)).any()):
        raise ValueError("pack_4bit: codes must lie in [-8, 15] (signed or unsigned 4-bit)")
    c = (c & 0xF).to(torch.uint8)
    return c[..., 0::2] | (c[..., 1::2] << 4)


def unpack_4bit(packed: torch.Tensor, signed: bool = False) -> torch.Tensor:
    """Inverse of :func:`pack_4bit`: ``[..., K // 2]`` uint8 -> ``[..., K]`` int8 (signed) or uint8."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"unpack_4bit takes uint8 bytes, got {packed.dtype}")
    lo = packed & 0xF
    hi = packed >> 4
    out = torch.stack((lo, hi), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)
    if signed:
        return (out.to(torch.int8) ^ 8) - 8
    return out


def pack_4bit_halves(codes: torch.Tensor, group_size: int) -> torch.Tensor:
    """Pack so that, within each group, byte ``j`` holds element ``j`` (low nibble) and ``j + g/2`` (high).

    This is the layout of :class:`~svdquant.SVDQLinear` weights: a GPU kernel unpacks one
    byte tile into the two halves of a group with a shift and a mask, no shuffle.
    ``[..., K]`` (K a multiple of ``group_size``) -> ``[..., K // 2]`` uint8.
    """
    k = codes.shape[-1]
    if group_size % 2 or k % group_size:
        raise ValueError(f"pack_4bit_halves: K={k} must be a multiple of an even group size ({group_size})")
    g = codes.reshape(*codes.shape[:-1], k // group_size, 2, group_size // 2)
    return pack_4bit(g.transpose(-1, -2).reshape(codes.shape))


def unpack_4bit_halves(packed: torch.Tensor, group_size: int, signed: bool = False) -> torch.Tensor:
    """Inverse of :func:`pack_4bit_halves`."""
    c = unpack_4bit(packed, signed)
    k = c.shape[-1]
    g = c.reshape(*c.shape[:-1], k // group_size, group_size // 2, 2)
    return g.transpose(-1, -2).reshape(c.shape)
