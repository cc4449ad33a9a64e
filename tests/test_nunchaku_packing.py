"""Nunchaku's INT4 tensor layouts (svdquant/convert/nunchaku_packing.py): known answers worked out by hand
from the fragment coordinates (see the module doc), Nunchaku's own documented lane table, and exact
round trips."""

from __future__ import annotations

import pytest
import torch

from svdquant.convert.nunchaku_packing import (pack_lanes, pack_lowrank, pack_qweight, unpack_lanes, unpack_lowrank,
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
