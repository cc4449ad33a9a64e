"""Nunchaku's tensor layouts for INT4 W4A4 layers and AWQ W4A16 layers, and their inverses (facts from
the public nunchaku repository, ``nunchaku/lora/flux/packer.py``, ``nunchaku/models/text_encoders/
tinychat_utils.py`` and ``src/kernels/awq/gemv_awq.cu``, and deepcompressor's
``backend/nunchaku/utils.py``, which writes the published checkpoints; the code here is ours).

Nunchaku's GEMM reads each warp's operands straight from memory in the order the ``mma`` instruction's
fragments want, so its checkpoints store them that way:

``qweight`` (int8 ``[N, K/2]``): signed 4-bit codes in tiles of 128 rows × 64 columns. With
    ``n = ((nt·8 + np)·2 + ns)·8 + nl`` (row tile, pack, pack half, lane row) and
    ``k = kt·64 + ks·32 + kl·8 + r`` (column tile, pack half, lane column, register slot), the codes
    are ordered ``(nt, kt, np, nl, kl, ns, ks, r)``; eight consecutive ``r`` fill one little-endian
    32-bit word, ``r`` at bits ``4r`` (so byte ``r // 2``, low nibble for even ``r``).
    ``N`` must be a multiple of 128 and ``K`` of 128 (the kernel unrolls two 64-column tiles).

``wscales`` (16-bit ``[K/G, N]``) and the per-channel vectors ``bias`` / ``smooth`` (``[N]``): per
    128 output channels, lane ``4a + c`` of the warp holds channels ``((a·2 + b)·4 + c)·2 + d`` for
    ``b, d`` in ``{0, 1}``: lane 0 holds 0, 1, 8, 9; lane 1 holds 2, 3, 10, 11; lane 4 holds 16, 17, 24, 25.
    Stored ``(n tile, group, a, c, b, d)``: one tile's 128 channels of group 0, of group 1..., then the next
    tile; scales are viewed as ``[G, N]`` but are not a plain transpose once ``N > 128``.

``proj_down`` (16-bit ``[K, R]``, from our ``lora_down`` ``[R, K]``) and ``proj_up`` (``[N, R]``, from our
    ``lora_up`` ``[N, R]``): 16 × 16 blocks of the MMA operand whose "rows" are the rank for the down
    projection and the output channels for the up one, "columns" the other index. In a block, row
    ``i = ns·8 + nl`` and column ``j = ks·8 + kl·2 + e`` are ordered ``(nl, kl, ns, ks, e)``; blocks are
    ordered column block outer for ``proj_down`` (K block, then R block) and row block outer for ``proj_up``
    (N block, then R block). R must be a multiple of 16 (K and N already are).

AWQ W4A16 (FLUX's adaLN modulation linears): ``w = code · wscales + wzeros`` with unsigned codes
    ``[0, 15]``. ``qweight`` (int32 ``[N/4, K/2]``) interleaves four output rows: for row ``n = 4·b + r``
    and column ``k = 64·c + 32·h + 8·i + j`` the code is nibble ``i`` (bits ``4i``) of the 16-bit word
    ``(b, c, r, h, j)`` (so word ``j`` of each run of 32 columns holds columns ``j, j+8, j+16, j+24``, what
    the GEMV's shuffle after its ``lop3`` extraction expects); two little-endian 16-bit words make one
    int32. ``wscales`` / ``wzeros`` are ``[K/64, N]``, a plain transpose. The output rows are interleaved
    by modulation chunk (see :func:`interleave_rows`).
"""

from __future__ import annotations

import torch

from ...formats.packing import pack_4bit, unpack_4bit

WARP_N = 128      # output channels per warp tile
TILE_K = 64       # input channels per MMA tile for 4-bit codes (256 bits / 4)
UNROLL_K = 2      # the kernel reads two k tiles per step: K must be a multiple of 128

# qweight: the row index n and column index k split into the fragment coordinates listed above
_W_SPLIT = (8, 2, 8)          # np, ns, nl  (per 128-row tile)
_K_SPLIT = (2, 4, 8)          # ks, kl, r   (per 64-column tile)


def _check_qweight_shape(n: int, k: int) -> None:
    if n % WARP_N or k % (TILE_K * UNROLL_K):
        raise ValueError(f"Nunchaku INT4 layers need out_features % {WARP_N} == 0 and in_features % "
                         f"{TILE_K * UNROLL_K} == 0, got {n} x {k}; pad the layer first")


def pack_qweight(codes: torch.Tensor) -> torch.Tensor:
    """Signed codes ``[N, K]`` in ``[-8, 7]`` -> Nunchaku's ``qweight``: int8 ``[N, K/2]``."""
    n, k = codes.shape
    _check_qweight_shape(n, k)
    t = codes.reshape(n // WARP_N, *_W_SPLIT, k // TILE_K, *_K_SPLIT)
    # (nt, np, ns, nl, kt, ks, kl, r) -> (nt, kt, np, nl, kl, ns, ks, r)
    t = t.permute(0, 4, 1, 3, 6, 2, 5, 7).reshape(-1)
    return pack_4bit(t).view(torch.int8).reshape(n, k // 2)


def unpack_qweight(qweight: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_qweight`: int8 ``[N, K/2]`` -> int8 codes ``[N, K]``."""
    if qweight.dtype != torch.int8 or qweight.dim() != 2:
        raise ValueError(f"a Nunchaku qweight is a 2-D int8 tensor, got {tuple(qweight.shape)} {qweight.dtype}")
    n, k = qweight.shape[0], qweight.shape[1] * 2
    _check_qweight_shape(n, k)
    t = unpack_4bit(qweight.reshape(-1).view(torch.uint8), signed=True)
    t = t.reshape(n // WARP_N, k // TILE_K, _W_SPLIT[0], _W_SPLIT[2], _K_SPLIT[1], _W_SPLIT[1], _K_SPLIT[0],
                  _K_SPLIT[2])
    # (nt, kt, np, nl, kl, ns, ks, r) -> (nt, np, ns, nl, kt, ks, kl, r)
    return t.permute(0, 2, 5, 3, 1, 6, 4, 7).reshape(n, k)


def pack_lanes(values: torch.Tensor) -> torch.Tensor:
    """Per-channel values ``[N]`` (bias, smooth) or group scales ``[N, G]`` -> Nunchaku's lane order:
    ``[N]`` or ``[G, N]``."""
    vector = values.dim() == 1
    v = values.reshape(values.shape[0], -1)
    n, g = v.shape
    if n % WARP_N:
        raise ValueError(f"Nunchaku lays out channels in tiles of {WARP_N}; got {n}: pad the layer first")
    # n = nt·128 + ((a·2 + b)·4 + c)·2 + d  ->  (nt, g, a, c, b, d)
    t = v.reshape(n // WARP_N, 8, 2, 4, 2, g).permute(0, 5, 1, 3, 2, 4).contiguous()
    # Memory order stays (n tile, group, lane order): the [G, N] shape is only a view, so for N > 128 a
    # "row" of it is not one group (Nunchaku's own packer says the shape is "just used for validation").
    return t.reshape(n) if vector else t.reshape(g, n)


def unpack_lanes(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_lanes`: ``[N]`` -> ``[N]``, ``[G, N]`` -> ``[N, G]``."""
    vector = packed.dim() == 1
    p = packed.reshape(1, -1) if vector else packed
    g, n = p.shape
    if n % WARP_N:
        raise ValueError(f"Nunchaku lays out channels in tiles of {WARP_N}; got {n}")
    t = p.reshape(n // WARP_N, g, 8, 4, 2, 2)
    # (nt, g, a, c, b, d) -> (nt, a, b, c, d, g)
    t = t.permute(0, 2, 4, 3, 5, 1).reshape(n, g)
    return t.reshape(n) if vector else t


BLOCK = 16  # low-rank operands: 16 x 16 blocks (8 lane rows x 2, 4 lane columns x 2 x 2 halves)


def _check_lowrank(rows: int, cols: int, what: str) -> None:
    if rows % BLOCK or cols % BLOCK:
        raise ValueError(f"Nunchaku's low-rank {what} needs both sizes to be multiples of {BLOCK}, got {rows} x {cols}")


def pack_lowrank(weight: torch.Tensor, down: bool) -> torch.Tensor:
    """Our ``lora_down`` ``[R, K]`` (``down=True``) -> ``proj_down`` ``[K, R]``; our ``lora_up`` ``[N, R]`` ->
    ``proj_up`` ``[N, R]``; both in fragment order (see the module doc). Values are not changed."""
    rows, cols = weight.shape  # rows: the MMA "n" side (R for down, N for up); cols: the "k" side
    _check_lowrank(rows, cols, "down projection" if down else "up projection")
    t = weight.reshape(rows // BLOCK, BLOCK, cols // BLOCK, BLOCK)
    t = t.permute(2, 0, 1, 3) if down else t.permute(0, 2, 1, 3)  # blocks: (col, row) for down, (row, col) up
    t = t.reshape(*t.shape[:2], 2, 8, 2, 4, 2)                    # i -> (ns, nl); j -> (ks, kl, e)
    t = t.permute(0, 1, 3, 5, 2, 4, 6).contiguous()                # -> (nl, kl, ns, ks, e)
    return t.reshape(cols, rows) if down else t.reshape(rows, cols)


def unpack_lowrank(packed: torch.Tensor, down: bool) -> torch.Tensor:
    """Inverse of :func:`pack_lowrank`: ``proj_down`` ``[K, R]`` -> ``[R, K]``; ``proj_up`` ``[N, R]`` -> ``[N, R]``."""
    if down:
        cols, rows = packed.shape
    else:
        rows, cols = packed.shape
    _check_lowrank(rows, cols, "down projection" if down else "up projection")
    outer = (cols // BLOCK, rows // BLOCK) if down else (rows // BLOCK, cols // BLOCK)
    t = packed.reshape(*outer, 8, 4, 2, 2, 2).permute(0, 1, 4, 2, 5, 3, 6)  # -> (ns, nl, ks, kl, e)
    t = t.reshape(*outer, BLOCK, BLOCK)
    t = t.permute(1, 2, 0, 3) if down else t.permute(0, 2, 1, 3)           # -> (row block, i, col block, j)
    return t.reshape(rows, cols)


# ------------------------------------------------------------------------------------------------ AWQ W4A16
AWQ_ROWS = 4      # output rows interleaved per packed row
AWQ_CHUNK = 64    # columns per run of the four rows (one group of 64)


def _check_awq_shape(n: int, k: int) -> None:
    if n % AWQ_ROWS or k % AWQ_CHUNK:
        raise ValueError(f"Nunchaku's AWQ layers need out_features % {AWQ_ROWS} == 0 and in_features % {AWQ_CHUNK} "
                         f"== 0, got {n} x {k}")


def pack_awq(codes: torch.Tensor) -> torch.Tensor:
    """Unsigned codes ``[N, K]`` in ``[0, 15]`` -> AWQ's ``qweight``: int32 ``[N/4, K/2]``."""
    n, k = codes.shape
    _check_awq_shape(n, k)
    if bool(((codes < 0) | (codes > 15)).any()):
        raise ValueError("AWQ codes are unsigned 4-bit: [0, 15]")
    # (b, r, c, h, i, j) -> (b, c, r, h, j, i): nibble i of word (b, c, r, h, j)
    t = codes.to(torch.int32).reshape(n // AWQ_ROWS, AWQ_ROWS, k // AWQ_CHUNK, 2, 4, 8).permute(0, 2, 1, 3, 5, 4)
    words = (t << (4 * torch.arange(4, dtype=torch.int32))).sum(-1, dtype=torch.int32)  # each word < 2^16
    words = torch.where(words >= 1 << 15, words - (1 << 16), words)  # the same 16 bits as a signed int16
    return words.to(torch.int16).reshape(n // AWQ_ROWS, k).view(torch.int32)


def unpack_awq(qweight: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_awq`: int32 ``[N/4, K/2]`` -> uint8 codes ``[N, K]``."""
    if qweight.dtype != torch.int32 or qweight.dim() != 2:
        raise ValueError(f"an AWQ qweight is a 2-D int32 tensor, got {tuple(qweight.shape)} {qweight.dtype}")
    n, k = qweight.shape[0] * AWQ_ROWS, qweight.shape[1] * 2
    _check_awq_shape(n, k)
    words = qweight.contiguous().view(torch.int16).to(torch.int32) & 0xFFFF
    nibbles = (words.unsqueeze(-1) >> (4 * torch.arange(4, dtype=torch.int32))) & 0xF
    t = nibbles.reshape(n // AWQ_ROWS, k // AWQ_CHUNK, AWQ_ROWS, 2, 8, 4)  # (b, c, r, h, j, i)
    return t.permute(0, 2, 1, 3, 5, 4).reshape(n, k).to(torch.uint8)


def interleave_rows(t: torch.Tensor, chunks: int) -> torch.Tensor:
    """diffusers' modulation rows ``[chunk·D + d]`` -> Nunchaku's ``[d·chunks + chunk]`` (along dim 0).

    diffusers' ``AdaLayerNormZero`` splits the linear's output with ``chunk(6)`` (shift, scale, gate of the
    attention, then of the MLP; ``AdaLayerNormZeroSingle``: 3); Nunchaku reads it as ``view(B, D, 6)``, so
    each channel's chunks sit side by side."""
    n = t.shape[0]
    if n % chunks:
        raise ValueError(f"{n} rows do not split into {chunks} modulation chunks")
    return t.reshape(chunks, n // chunks, *t.shape[1:]).transpose(0, 1).reshape(t.shape)


def deinterleave_rows(t: torch.Tensor, chunks: int) -> torch.Tensor:
    """Inverse of :func:`interleave_rows`."""
    n = t.shape[0]
    if n % chunks:
        raise ValueError(f"{n} rows do not split into {chunks} modulation chunks")
    return t.reshape(n // chunks, chunks, *t.shape[1:]).transpose(0, 1).reshape(t.shape)


def scale_chunks(chunks: int) -> tuple[int, ...]:
    """The modulation chunks that are scales (``x · (1 + scale) + shift``): Nunchaku folds their ``+ 1`` into
    the bias (deepcompressor adds 1 at chunk indices 1 and ``chunks - 2``: scale_msa, scale_mlp)."""
    return tuple(sorted({1, chunks - 2}))
