"""Nunchaku's INT4 tensor layouts (svdquant/convert/nunchaku/packing.py): known answers worked out by hand
from the fragment coordinates (see the module doc), Nunchaku's own documented lane table, and exact
round trips."""

from __future__ import annotations

import pytest
import torch

from svdquant.convert.nunchaku.packing import (deinterleave_rows, interleave_rows, pack_awq, pack_lanes, pack_lowrank,
                                               pack_qweight, scale_chunks, unpack_awq, unpack_lanes, unpack_lowrank,
                                               unpack_qweight)


def one_code(n, k, value, shape=(128, 128)):
    codes = torch.zeros(shape, dtype=torch.int8)
    codes[n, k] = value
    return codes


# (n, k, code) -> (row, column of the [N, K/2] qweight, byte value). By hand, e.g. for (9, 0):
# n = 9 -> np 0, ns 1, nl 1; k = 0 -> kt 0, ks 0, kl 0, r 0; word index over (nt, kt, np, nl, kl, ns, ks)
# = ((((0·8 + 0)·8 + 1)·4 + 0)·2 + 1)·2 + 0 = 18 -> byte 18·4 + r//2 = 72 -> row 1, column 8, low nibble.
QWEIGHT_CASES = [
    ((9, 0, 1), (1, 8, 0x01)),
    ((0, 9, -1), (0, 16, -16)),       # k 9: kl 1, r 1 -> word 4, byte 16, high nibble: 0xF0 = -16 as int8
    ((16, 64, 3), (72, 0, 0x03)),     # np 1, kt 1 -> word ((1·8 + 1)·8)·16 = 1152 -> byte 4608
    ((127, 127, 7), (127, 63, 0x70)),  # the last code of the tile is the last word's top nibble
    ((1, 2, 5), (1, 1, 0x05)),        # nl 1 -> word ((1·4)·2)·2 = 16 (byte 64); r 2 -> byte 65, low nibble
]


@pytest.mark.parametrize("where, expect", QWEIGHT_CASES)
def test_qweight_known_answers(where, expect):
    n, k, code = where
    row, col, byte = expect
    packed = pack_qweight(one_code(n, k, code))
    assert packed.dtype == torch.int8 and packed.shape == (128, 64)
    nonzero = packed.nonzero().tolist()
    assert nonzero == [[row, col]] and int(packed[row, col]) == byte


def test_qweight_second_row_tile():
    """Row tiles are outermost: row 128 starts the second half of the packed bytes."""
    packed = pack_qweight(one_code(128, 0, 1, shape=(256, 128)))
    assert packed.nonzero().tolist() == [[128, 0]]


@pytest.mark.parametrize("shape", [(128, 128), (256, 384), (384, 256)])
def test_qweight_round_trip(shape):
    codes = torch.randint(-8, 8, shape, generator=torch.Generator().manual_seed(0), dtype=torch.int8)
    assert torch.equal(unpack_qweight(pack_qweight(codes)), codes)


@pytest.mark.parametrize("shape", [(64, 128), (128, 64), (128, 192)])
def test_qweight_needs_whole_tiles(shape):
    with pytest.raises(ValueError, match="pad the layer"):
        pack_qweight(torch.zeros(shape, dtype=torch.int8))


def test_lane_order_matches_nunchakus_table():
    """The store order Nunchaku documents for warp_n = 128: lane 0 loads channels 0 1 8 9, lane 1 2 3 10 11,
    lane 4 16 17 24 25, lane 7 22 23 30 31, lane 28 112 113 120 121, lane 31 118 119 126 127."""
    order = pack_lanes(torch.arange(128)).reshape(32, 4)
    assert order[0].tolist() == [0, 1, 8, 9] and order[1].tolist() == [2, 3, 10, 11]
    assert order[4].tolist() == [16, 17, 24, 25] and order[7].tolist() == [22, 23, 30, 31]
    assert order[28].tolist() == [112, 113, 120, 121] and order[31].tolist() == [118, 119, 126, 127]


def test_group_scales_are_tile_major():
    """[N, G] scales: per 128-channel tile, each group's channels in lane order; tiles outermost."""
    n, g = 256, 2
    scales = torch.arange(n * g, dtype=torch.float32).reshape(n, g)  # value = channel·2 + group
    packed = pack_lanes(scales)
    assert packed.shape == (g, n)
    flat = packed.reshape(-1)
    assert flat[:4].tolist() == [0, 2, 16, 18]            # tile 0, group 0: channels 0, 1, 8, 9
    assert flat[128:132].tolist() == [1, 3, 17, 19]       # tile 0, group 1
    assert flat[256:260].tolist() == [256, 258, 272, 274]  # tile 1 (channel 128...), group 0


@pytest.mark.parametrize("shape", [(128,), (256,), (128, 3), (384, 2)])
def test_lanes_round_trip(shape):
    v = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    assert torch.equal(unpack_lanes(pack_lanes(v)), v)


def test_lanes_need_whole_tiles():
    with pytest.raises(ValueError, match="tiles of 128"):
        pack_lanes(torch.zeros(96))


# Low-rank known answers, by hand. down [R=32, K=16] -> [16, 32]: (r 9, k 3): block (k 0, r 0); i = 9 -> ns 1,
# nl 1; j = 3 -> ks 0, kl 1, e 1; in-block index over (nl, kl, ns, ks, e) = (((1·4 + 1)·2 + 1)·2 + 0)·2 + 1 = 45
# -> row 1, column 13. (r 16, k 0): the second block -> index 256 -> row 8, column 0.
# up [N=16, R=32] -> [16, 32]: (n 2, r 17): block (n 0, r 1) -> 256; i = 2 -> nl 2; j = 1 -> e 1;
# (((2·4 + 0)·2 + 0)·2 + 0)·2 + 1 = 65 -> index 321 -> row 10, column 1.
LOWRANK_CASES = [
    (True, (32, 16), (9, 3), (1, 13)),
    (True, (32, 16), (16, 0), (8, 0)),
    (False, (16, 32), (2, 17), (10, 1)),
    (False, (32, 16), (16, 0), (16, 0)),  # up: row blocks outermost -> the second block starts at index 256
]


@pytest.mark.parametrize("down, shape, where, expect", LOWRANK_CASES)
def test_lowrank_known_answers(down, shape, where, expect):
    w = torch.zeros(shape, dtype=torch.bfloat16)
    w[where] = 1.5
    packed = pack_lowrank(w, down)
    assert packed.shape == ((shape[1], shape[0]) if down else shape)
    assert packed.nonzero().tolist() == [list(expect)] and float(packed[expect]) == 1.5


@pytest.mark.parametrize("down", [True, False])
@pytest.mark.parametrize("shape", [(16, 16), (32, 64), (64, 128)])
def test_lowrank_round_trip(down, shape):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    assert torch.equal(unpack_lowrank(pack_lowrank(w, down), down), w)


def test_lowrank_needs_whole_blocks():
    with pytest.raises(ValueError, match="multiples of 16"):
        pack_lowrank(torch.zeros(24, 64), down=True)


# AWQ known answers, by hand (N = 4 or 8, K = 64 or 128). For code (n, k): b = n // 4, r = n % 4; c = k // 64,
# h = (k % 64) // 32, i = (k % 32) // 8, j = k % 8; 16-bit word index in row block b = c·64 + r·16 + h·8 + j,
# nibble i. (1, 9): r 1, i 1, j 1 -> word 17, bits 4-7 -> int32 8 (words 16, 17), value 5 << (16 + 4).
# (0, 40): h 1, i 1, j 0 -> word 8 = int32 4, low half, bits 4-7. (6, 127): b 1, r 2, c 1, h 1, i 3, j 7
# -> word 64 + 32 + 8 + 7 = 111 -> int32 55, high half, bits 12-15 (value 0xF at bit 28).
# (3, 64): r 3, c 1 -> word 64 + 48 = 112 -> int32 56, low half, bits 0-3.
AWQ_CASES = [
    ((4, 64), (1, 9, 5), (0, 8, 5 << 20)),
    ((4, 64), (0, 40, 3), (0, 4, 3 << 4)),
    ((8, 128), (6, 127, 15), (1, 55, -(1 << 28))),   # 0xF << 28 is negative as int32
    ((8, 128), (3, 64, 1), (0, 56, 1)),
]


@pytest.mark.parametrize("shape, where, expect", AWQ_CASES)
def test_awq_known_answers(shape, where, expect):
    codes = torch.zeros(shape, dtype=torch.uint8)
    n, k, v = where
    codes[n, k] = v
    packed = pack_awq(codes)
    assert packed.dtype == torch.int32 and packed.shape == (shape[0] // 4, shape[1] // 2)
    row, col, value = expect
    assert packed.nonzero().tolist() == [[row, col]] and int(packed[row, col]) == value


def test_awq_word_holds_every_eighth_column():
    """Word j of a run of 32 columns holds columns j, j+8, j+16, j+24 (the GEMV's shuffle order)."""
    codes = torch.zeros(4, 64, dtype=torch.uint8)
    codes[0, [0, 8, 16, 24]] = torch.tensor([1, 2, 3, 4], dtype=torch.uint8)
    words = pack_awq(codes).view(torch.int16)
    assert words.nonzero().tolist() == [[0, 0]] and int(words[0, 0]) == 0x4321


@pytest.mark.parametrize("shape", [(4, 64), (8, 128), (24, 192)])
def test_awq_round_trip(shape):
    codes = torch.randint(0, 16, shape, generator=torch.Generator().manual_seed(3), dtype=torch.uint8)
    assert torch.equal(unpack_awq(pack_awq(codes)), codes)


def test_awq_checks_shapes_and_codes():
    with pytest.raises(ValueError, match="out_features % 4"):
        pack_awq(torch.zeros(6, 64, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        pack_awq(torch.full((4, 64), -1, dtype=torch.int8))
    with pytest.raises(ValueError, match="int32"):
        unpack_awq(torch.zeros(1, 32, dtype=torch.int16))


def test_modulation_interleave_known_answer():
    """D = 2, 6 chunks: diffusers rows [shift_msa 0 1 | scale_msa 2 3 | gate_msa 4 5 | shift_mlp 6 7 | ...];
    Nunchaku's view(B, D, 6) puts channel 0's six chunks first."""
    rows = torch.arange(12)
    assert interleave_rows(rows, 6).tolist() == [0, 2, 4, 6, 8, 10, 1, 3, 5, 7, 9, 11]
    assert interleave_rows(torch.arange(6), 3).tolist() == [0, 2, 4, 1, 3, 5]
    m = torch.arange(24).reshape(12, 2)
    assert torch.equal(deinterleave_rows(interleave_rows(m, 6), 6), m)
    with pytest.raises(ValueError, match="modulation chunks"):
        interleave_rows(torch.arange(10), 6)


def test_scale_chunks():
    assert scale_chunks(6) == (1, 4) and scale_chunks(3) == (1,)  # scale_msa, scale_mlp; the single block's scale
