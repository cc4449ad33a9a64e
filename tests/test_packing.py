"""Two 4-bit codes per byte: element 2i in the low nibble, 2i+1 in the high nibble."""

from __future__ import annotations

import pytest
import torch

from svdquant.formats import pack_4bit, pack_4bit_halves, unpack_4bit, unpack_4bit_halves


def test_known_bytes_unsigned():
    codes = torch.tensor([1, 2, 15, 0, 0, 15, 10, 11], dtype=torch.uint8)
    packed = pack_4bit(codes)
    assert packed.dtype == torch.uint8
    assert packed.tolist() == [0x21, 0x0F, 0xF0, 0xBA]


def test_known_bytes_signed_twos_complement():
    codes = torch.tensor([-1, 0, 0, -1, -8, 7, 7, -8, -7, 3], dtype=torch.int8)
    assert pack_4bit(codes).tolist() == [0x0F, 0xF0, 0x78, 0x87, 0x39]


def test_known_unpack():
    packed = torch.tensor([0x21, 0xF0, 0x9E], dtype=torch.uint8)
    assert unpack_4bit(packed).tolist() == [1, 2, 0, 15, 14, 9]
    signed = unpack_4bit(packed, signed=True)
    assert signed.dtype == torch.int8
    assert signed.tolist() == [1, 2, 0, -1, -2, -7]
    assert unpack_4bit(packed).dtype == torch.uint8


def test_unsigned_round_trip_all_pairs():
    v = torch.arange(16, dtype=torch.uint8)
    lo, hi = torch.meshgrid(v, v, indexing="ij")
    codes = torch.stack([lo.flatten(), hi.flatten()], -1).reshape(-1)  # every (lo, hi) pair once
    packed = pack_4bit(codes)
    assert packed.shape == (256,)
    assert sorted(packed.tolist()) == list(range(256))  # a bijection onto bytes
    assert torch.equal(unpack_4bit(packed), codes)


def test_signed_round_trip_all_pairs():
    v = torch.arange(-8, 8, dtype=torch.int8)
    lo, hi = torch.meshgrid(v, v, indexing="ij")
    codes = torch.stack([lo.flatten(), hi.flatten()], -1).reshape(-1)
    packed = pack_4bit(codes)
    assert sorted(packed.tolist()) == list(range(256))
    out = unpack_4bit(packed, signed=True)
    assert out.dtype == torch.int8
    assert torch.equal(out, codes)


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.int32, torch.int64])
def test_round_trip_batched_any_int_dtype(dtype):
    torch.manual_seed(0)
    codes = torch.randint(-7, 8, (3, 5, 64), dtype=dtype)
    packed = pack_4bit(codes)
    assert packed.shape == (3, 5, 32)
    assert torch.equal(unpack_4bit(packed, signed=True).to(dtype), codes)
    # the layout is per row: packing a row alone gives the same bytes
    assert torch.equal(pack_4bit(codes[1, 2]), packed[1, 2])


def test_layout_low_nibble_first():
    torch.manual_seed(0)
    codes = torch.randint(0, 16, (4, 32), dtype=torch.uint8)
    packed = pack_4bit(codes)
    assert torch.equal(packed & 0xF, codes[:, 0::2])
    assert torch.equal(packed >> 4, codes[:, 1::2])


def test_odd_length_raises():
    with pytest.raises(ValueError, match="even"):
        pack_4bit(torch.zeros(3, 7, dtype=torch.int8))


@pytest.mark.parametrize("bad", [16, -9, 100, -128])
def test_out_of_range_raises(bad):
    codes = torch.zeros(2, 4, dtype=torch.int16)
    codes[1, 2] = bad
    with pytest.raises(ValueError, match=r"\[-8, 15\]"):
        pack_4bit(codes)


def test_float_codes_raise():
    with pytest.raises(TypeError, match="integer"):
        pack_4bit(torch.zeros(2, 4))
    with pytest.raises(TypeError, match="integer"):
        pack_4bit(torch.zeros(2, 4, dtype=torch.bfloat16))


def test_unpack_needs_uint8():
    with pytest.raises(TypeError, match="uint8"):
        unpack_4bit(torch.zeros(4, dtype=torch.int8))


def test_pack_halves_known_bytes():
    # group of 4: byte j holds element j (low) and element j + 2 (high)
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 0]], dtype=torch.uint8)
    packed = pack_4bit_halves(codes, 4)
    assert packed.tolist() == [[0x31, 0x42, 0x75, 0x06]]
    assert torch.equal(unpack_4bit_halves(packed, 4), codes)


def test_pack_halves_round_trip_signed():
    torch.manual_seed(0)
    codes = torch.randint(-8, 8, (5, 128), dtype=torch.int8)
    assert torch.equal(unpack_4bit_halves(pack_4bit_halves(codes, 64), 64, signed=True), codes)
    with pytest.raises(ValueError, match="multiple"):
        pack_4bit_halves(codes[:, :96], 64)
