"""Number formats: hand-computed known answers, round-trip bounds, padding, input checks.

Every known answer below is worked out by hand from the format definitions
(DESIGN.md §1 and the module docstrings), with scales chosen so that the division
by the scale is exact in fp32 and the tie cases really are ties.
"""

from __future__ import annotations

import pytest
import torch

from svdquant import formats
from svdquant.formats import (
    E2M1_VALUES, NF4_LEVELS, dequantize, dequantize_int4, fake_quantize, quantize, quantize_fp8, quantize_int4,
    quantize_int8, quantize_nf4, quantize_nvfp4,
)

ALL_FORMATS = ("int4", "uint4", "nvfp4", "int8", "fp8", "nf4")


def _q(x, fmt, **kw):
    """quantize() by name, with 'uint4' meaning int4 unsigned."""
    if fmt == "uint4":
        return quantize(x, "int4", unsigned=True, **kw)
    return quantize(x, fmt, **kw)


def _fq(x, fmt, **kw):
    if fmt == "uint4":
        return fake_quantize(x, "int4", unsigned=True, **kw)
    return fake_quantize(x, fmt, **kw)


def _group(values, size, fill=0.0):
    """A [1, size] row starting with ``values``, the rest ``fill``."""
    row = torch.full((1, size), fill, dtype=torch.float32)
    row[0, : len(values)] = torch.tensor(values, dtype=torch.float32)
    return row


# ---------------------------------------------------------------------------- INT4 (signed)
def test_int4_known_codes_absmax_7():
    # absmax 7 -> scale exactly 1: codes are round-half-even of the values themselves.
    vals = [7.0, -7.0, 0.5, 1.5, 2.5, 3.5, -0.5, -1.5, -2.5, -3.5, 6.5, 0.49, 0.51, 4.4, -6.6]
    q = quantize_int4(_group(vals, 64), 64)
    assert q.fmt == "int4" and q.codes.dtype == torch.int8
    assert q.scales.shape == (1, 1) and q.scales.item() == 1.0
    expected = [7, -7, 0, 2, 2, 4, 0, -2, -2, -4, 6, 0, 1, 4, -7] + [0] * (64 - 15)
    assert q.codes[0].tolist() == expected
    assert torch.equal(dequantize(q), torch.tensor([expected], dtype=torch.float32))


def test_int4_ties_half_to_even_at_scale_2():
    # absmax 14 -> scale 2; x = 1, 3, 5, 7 land on 0.5, 1.5, 2.5, 3.5 steps.
    vals = [14.0, 1.0, 3.0, 5.0, 7.0, 9.0, 11.0, 13.0, -1.0, -3.0, -5.0, -7.0, -9.0]
    q = quantize_int4(_group(vals, 64), 64)
    assert q.scales.item() == 2.0
    assert q.codes[0, :13].tolist() == [7, 0, 2, 2, 4, 4, 6, 6, 0, -2, -2, -4, -4]
    assert q.codes[0, 13:].eq(0).all()
    assert dequantize(q)[0, :13].tolist() == [14, 0, 4, 4, 8, 8, 12, 12, 0, -4, -4, -8, -8]


def test_int4_one_scale_per_group_along_k():
    x = torch.cat([_group([7.0, 3.0], 64), _group([-21.0, 10.5, 1.5], 64)], dim=1)  # [1, 128]
    q = quantize_int4(x, 64)
    assert q.scales.tolist() == [[1.0, 3.0]]
    assert q.codes[0, :2].tolist() == [7, 3]
    assert q.codes[0, 64:67].tolist() == [-7, 4, 0]  # 10.5/3 = 3.5 -> 4, 1.5/3 = 0.5 -> 0


def test_int4_range_and_symmetry():
    torch.manual_seed(0)
    x = torch.randn(32, 256) * 5
    q = quantize_int4(x, 64)
    assert q.codes.min() >= -7 and q.codes.max() <= 7
    # symmetric: negating the input negates the codes and keeps the scales
    qn = quantize_int4(-x, 64)
    assert torch.equal(qn.codes, -q.codes)
    assert torch.equal(qn.scales, q.scales)
    # every group's absmax element gets code +-7
    g = x.reshape(32, 4, 64)
    at_max = g.abs().argmax(-1)
    codes = q.codes.reshape(32, 4, 64).gather(-1, at_max[..., None]).squeeze(-1)
    assert torch.equal(codes.abs(), torch.full_like(codes, 7))


def test_int4_scale_dtype_follows_input_and_is_honoured():
    torch.manual_seed(0)
    xb = torch.randn(4, 128, dtype=torch.bfloat16)
    assert quantize_int4(xb, 64).scales.dtype == torch.bfloat16
    xh = torch.randn(4, 128, dtype=torch.float16)
    assert quantize_int4(xh, 64).scales.dtype == torch.float16
    xf = torch.randn(4, 128)
    assert quantize_int4(xf, 64).scales.dtype == torch.float32
    assert quantize_int4(xf, 64, scale_dtype=torch.bfloat16).scales.dtype == torch.bfloat16


def test_int4_codes_come_from_the_rounded_bf16_scale():
    # absmax 1: 1/7 = 0.142857.. in fp32, 0.142578125 in bf16.
    # x = 2.498/7 -> x/s = 2.498 with the fp32 scale (code 2) but 2.5029 with the bf16 one (code 3).
    x = _group([1.0, 2.498 / 7], 64)
    q32 = quantize_int4(x, 64)
    qbf = quantize_int4(x, 64, scale_dtype=torch.bfloat16)
    assert qbf.scales.dtype == torch.bfloat16
    assert qbf.scales.float().item() == 0.142578125
    assert q32.codes[0, 1].item() == 2
    assert qbf.codes[0, 1].item() == 3
    assert qbf.codes[0, 0].item() == 7  # 1/0.142578125 = 7.01 -> clamped to 7
    deq = dequantize(qbf)
    assert deq[0, 0].item() == 7 * 0.142578125
    assert deq[0, 1].item() == 3 * 0.142578125
    # the fake quantizer simulates the same stored scale
    assert torch.equal(fake_quantize(x, "int4", 64, scale_dtype=torch.bfloat16), deq)


# ---------------------------------------------------------------------------- UINT4 (post-GELU)
def test_uint4_known_codes_max_15():
    vals = [15.0, -3.0, -0.5, 0.5, 1.5, 2.5, 7.5, 8.5, 14.5, 0.2]
    q = quantize_int4(_group(vals, 64), 64, unsigned=True)
    assert q.fmt == "uint4" and q.codes.dtype == torch.uint8
    assert q.scales.item() == 1.0  # max/15, not absmax/7
    assert q.codes[0, :10].tolist() == [15, 0, 0, 0, 2, 2, 8, 8, 14, 0]
    deq = dequantize(q)
    assert deq[0, :10].tolist() == [15, 0, 0, 0, 2, 2, 8, 8, 14, 0]


def test_uint4_scale_is_max_over_15_and_negatives_do_not_count():
    # The largest magnitude is negative (-30) but only the positive max (3) sets the scale.
    x = _group([-30.0, 3.0, 1.0, 0.1], 64)
    q = quantize_int4(x, 64, unsigned=True)
    assert q.scales.item() == (torch.tensor(3.0) / 15).item()  # 3/15 in fp32
    assert q.codes[0, :4].tolist() == [0, 15, 5, 0]  # 0.1/0.2 = 0.5 -> 0 (half to even)


def test_uint4_all_negative_group_gives_zero_scale():
    x = torch.cat([_group([-1.0, -2.0], 64, fill=-0.5), _group([4.5, 1.0], 64)], dim=1)
    q = quantize_int4(x, 64, unsigned=True)
    assert q.scales[0, 0].item() == 0.0
    assert q.codes[0, :64].eq(0).all()
    assert q.scales[0, 1].item() == pytest.approx(0.3)
    assert dequantize(q)[0, :64].eq(0).all()


# ---------------------------------------------------------------------------- NVFP4
def test_e2m1_value_table():
    assert E2M1_VALUES == (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def test_nvfp4_exact_values_map_to_their_codes():
    # tensor scale 1 and group absmax 6 -> group scale e4m3(1) = 1: x/scale = x.
    pos = list(E2M1_VALUES)
    x = torch.tensor([pos + [-v for v in pos]])  # [1, 16]
    q = quantize_nvfp4(x, 16, tensor_scale=1.0)
    assert q.codes.dtype == torch.uint8
    assert q.scales.dtype == torch.float8_e4m3fn and q.scales.float().item() == 1.0
    # code = sign << 3 | index; -0 is stored as code 0
    assert q.codes[0].tolist() == list(range(8)) + [0] + list(range(9, 16))
    assert torch.equal(dequantize(q), x)


def test_nvfp4_rounding_ties():
    ties = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]
    expect_vals = [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]
    expect_idx = [0, 2, 2, 4, 4, 6, 6]
    others = [6.0, 0.24, 0.26, 2.49, 2.51, 4.99, 5.01]  # 6 pins the group scale to 1
    other_vals = [6.0, 0.0, 0.5, 2.0, 3.0, 4.0, 6.0]
    other_idx = [7, 0, 1, 4, 5, 6, 7]
    x = torch.tensor([ties + [0.0] + others + [0.0], [-t for t in ties] + [0.0] + [-o for o in others] + [0.0]])
    q = quantize_nvfp4(x, 16, tensor_scale=1.0)
    assert q.scales.float().flatten().tolist() == [1.0, 1.0]
    assert q.codes[0].tolist() == expect_idx + [0] + other_idx + [0]
    neg = [i | 8 if i else 0 for i in expect_idx + [0] + other_idx + [0]]
    assert q.codes[1].tolist() == neg
    deq = dequantize(q)
    assert deq[0].tolist() == expect_vals + [0.0] + other_vals + [0.0]
    assert deq[1].tolist() == [-v if v else 0.0 for v in expect_vals + [0.0] + other_vals + [0.0]]


def test_nvfp4_e4m3_group_scale_rounding():
    # absmax 6.6 -> 6.6/6 = 1.1 -> E4M3 1.125 (3 mantissa bits).
    # 2.8125 / 1.125 = 2.5 (a tie -> 2 -> code 4); 6.6 / 1.125 = 5.87 -> 6 (code 7).
    x = _group([6.6, 2.8125, 1.125, -0.5625], 16)
    q = quantize_nvfp4(x, 16, tensor_scale=1.0)
    assert q.scales.float().item() == 1.125
    assert q.codes[0, :4].tolist() == [7, 4, 2, 8 | 1]  # -0.5625/1.125 = -0.5 -> code 9
    assert dequantize(q)[0, :4].tolist() == [6 * 1.125, 2 * 1.125, 1.125, -0.5 * 1.125]
    # a group scale that is itself a tie: 6.375/6 = 1.0625, halfway 1 and 1.125 -> even -> 1
    q2 = quantize_nvfp4(_group([6.375], 16), 16, tensor_scale=1.0)
    assert q2.scales.float().item() == 1.0
    assert q2.codes[0, 0].item() == 7  # 6.375 clamps to 6


def test_nvfp4_group_scale_saturates_at_448():
    q = quantize_nvfp4(_group([6000.0, 10.0], 16), 16, tensor_scale=1.0)
    assert q.scales.float().item() == 448.0  # not NaN
    assert q.codes[0, :2].tolist() == [7, 0]
    assert dequantize(q)[0, 0].item() == 6 * 448.0


def test_nvfp4_default_tensor_scale_is_absmax_over_6_times_448():
    torch.manual_seed(0)
    x = torch.randn(8, 64) * 3
    q = quantize_nvfp4(x, 16)
    amax = x.abs().max()
    assert q.tensor_scale.dtype == torch.float32
    assert q.tensor_scale.item() == (amax / (6 * 448)).item()
    # the group that holds the maximum gets the largest E4M3 scale, 448
    row, col = divmod(int(x.abs().argmax()), 64)
    assert q.scales[row, col // 16].float().item() == 448.0
    assert q.scales.float().max().item() == 448.0
    # all-zero input: tensor scale 1, everything 0
    qz = quantize_nvfp4(torch.zeros(2, 32), 16)
    assert qz.tensor_scale.item() == 1.0
    assert qz.codes.eq(0).all() and qz.scales.float().eq(0).all()


def test_nvfp4_scale_composition():
    # dequantize = E2M1[code] * group_scale * tensor_scale
    x = _group([6.0, 3.0, -1.0], 16) * 0.25
    q = quantize_nvfp4(x, 16, tensor_scale=0.125)  # 1.5/6/0.125 = 2 -> group scale 2
    assert q.scales.float().item() == 2.0
    assert q.codes[0, :3].tolist() == [7, 5, 8 | 2]
    assert dequantize(q)[0, :3].tolist() == [1.5, 0.75, -0.25]


def test_nvfp4_never_produces_negative_zero_code():
    torch.manual_seed(0)
    x = torch.randn(16, 64)
    x[:, ::2] *= 1e-3  # many tiny values, half of them negative, that round to 0
    x[0, 1] = -0.0
    q = quantize_nvfp4(x, 16)
    assert not q.codes.eq(8).any()
    tiny_neg = (x < 0) & (dequantize(q) == 0)
    assert tiny_neg.sum() > 100  # the situation really occurs
    assert q.codes[tiny_neg].eq(0).all()
    assert q.codes.max() <= 15


def test_nvfp4_group_size_must_be_16_or_32():
    x = torch.randn(2, 64)
    quantize_nvfp4(x, 32)
    with pytest.raises(ValueError, match="group_size"):
        quantize_nvfp4(x, 64)


# ---------------------------------------------------------------------------- INT8
def test_int8_known_codes_row_scale():
    x = torch.tensor([[127.0, 63.5, 62.5, -0.5, 0.5, 1.5, -127.0, -126.5],
                      [254.0, 1.0, 3.0, -5.0, 0.0, 0.0, 0.0, 0.0]])
    q = quantize_int8(x)
    assert q.codes.dtype == torch.int8 and q.scales.dtype == torch.float32
    assert q.scales.tolist() == [1.0, 2.0]  # absmax / 127 per row
    assert q.codes[0].tolist() == [127, 64, 62, 0, 0, 2, -127, -126]
    assert q.codes[1].tolist() == [127, 0, 2, -2, 0, 0, 0, 0]


def test_int8_range_never_minus_128():
    torch.manual_seed(0)
    x = torch.randn(64, 300)
    x[:, 0] = -x.abs().amax(1) * 1.0  # the absmax of every row is negative
    q = quantize_int8(x)
    assert q.codes.min().item() == -127
    assert q.codes.max().item() <= 127
    assert torch.equal(q.codes[:, 0], torch.full((64,), -127, dtype=torch.int8))
    assert torch.allclose(q.scales, x.abs().amax(1) / 127, rtol=0, atol=0)


# ---------------------------------------------------------------------------- FP8
def test_fp8_known_codes_row_scale():
    # absmax 448 -> scale 1; E4M3 rounding is nearest-even:
    # 1.0625 is halfway 1 and 1.125 -> 1;  1.1875 halfway 1.125 and 1.25 -> 1.25;
    # 3.125 halfway 3 and 3.25 -> 3;  232 halfway 224 and 240 -> 224.
    x = torch.tensor([[448.0, 1.0625, 1.1875, 3.125, 3.3, -3.3, 232.0, -448.0]])
    q = quantize_fp8(x)
    assert q.codes.dtype == torch.float8_e4m3fn and q.scales.dtype == torch.float32
    assert q.scales.tolist() == [1.0]
    assert q.codes.float()[0].tolist() == [448.0, 1.0, 1.25, 3.0, 3.25, -3.25, 224.0, -448.0]
    q2 = quantize_fp8(x * 2)
    assert q2.scales.tolist() == [2.0]
    assert torch.equal(q2.codes.float(), q.codes.float())
    assert torch.equal(dequantize(q2), 2 * q.codes.float())


# ---------------------------------------------------------------------------- NF4
def test_nf4_codebook():
    assert len(NF4_LEVELS) == 16
    assert NF4_LEVELS[0] == -1.0 and NF4_LEVELS[7] == 0.0 and NF4_LEVELS[15] == 1.0
    assert list(NF4_LEVELS) == sorted(NF4_LEVELS)


def test_nf4_levels_map_to_their_index_and_scale_is_absmax():
    levels = torch.tensor(NF4_LEVELS)
    x = torch.cat([levels, levels.flip(0), levels, levels]).reshape(1, 64) * 2.5
    q = quantize_nf4(x, 64)
    assert q.codes.dtype == torch.uint8 and q.scales.dtype == torch.float32
    assert q.scales.item() == 2.5
    idx = torch.arange(16)
    assert q.codes[0].tolist() == torch.cat([idx, idx.flip(0), idx, idx]).tolist()
    assert torch.equal(dequantize(q), levels[q.codes.long()] * 2.5)


def test_nf4_midpoint_ties_go_to_the_lower_level():
    levels = torch.tensor(NF4_LEVELS)
    mids = (levels[1:] + levels[:-1]) / 2  # fp32 midpoints, as the quantizer computes them
    above = torch.nextafter(mids, torch.full_like(mids, 2.0))
    x = torch.zeros(1, 64)
    x[0, 0] = 1.0  # absmax 1: x/absmax is x itself, so the ties are exact
    x[0, 1:16] = mids
    x[0, 16:31] = above
    q = quantize_nf4(x, 64)
    assert q.codes[0, 1:16].tolist() == list(range(15))     # midpoint i/i+1 -> i (lower)
    assert q.codes[0, 16:31].tolist() == list(range(1, 16))  # just above -> i+1
    assert q.codes[0, 31:].eq(7).all()  # exact zero is level 7


def test_nf4_snaps_to_nearest_level():
    torch.manual_seed(0)
    x = torch.randn(16, 192)
    q = quantize_nf4(x, 64)
    levels = torch.tensor(NF4_LEVELS)
    xs = x.reshape(16, 3, 64) / x.reshape(16, 3, 64).abs().amax(-1, keepdim=True)
    nearest = (xs[..., None] - levels).abs().argmin(-1).reshape(16, 192)
    assert torch.equal(q.codes.long(), nearest)


# ---------------------------------------------------------------------------- round trips
def _bound(x, fmt, q):
    """Largest allowed |x - dequantize(q)| per element, from the format's step at that element."""
    k = x.shape[-1]
    if fmt in ("int4", "uint4", "nf4"):
        g = q.group_size
        s = q.scales.float().repeat_interleave(g, -1)[..., :k]
        if fmt == "int4":
            return s / 2
        if fmt == "uint4":
            return torch.where(x < 0, x.abs(), s / 2)
        return s * 0.305 / 2  # widest NF4 gap is 1 - 0.696 = 0.304
    if fmt == "int8":
        return q.scales[..., None] / 2
    if fmt == "fp8":
        # 3 mantissa bits: half an ulp is 2^-4 of the value; subnormal step is 2^-9 of the scale
        return torch.maximum(x.abs() * 2.0 ** -4, q.scales[..., None] * 2.0 ** -10)
    if fmt == "nvfp4":
        g = q.group_size
        full = (q.scales.float() * q.tensor_scale).repeat_interleave(g, -1)[..., :k]
        v = x.abs() / full
        half_step = torch.where(v < 2, 0.25, torch.where(v < 4, 0.5, 1.0))
        return half_step * full
    raise AssertionError(fmt)


@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_round_trip_error_bounded_by_half_step(fmt):
    torch.manual_seed(1)
    x = torch.randn(32, 256) * torch.logspace(-2, 1, 32)[:, None]
    q = _q(x, fmt)
    deq = dequantize(q)
    assert deq.shape == x.shape and deq.dtype == torch.float32
    err = (x - deq).abs()
    bound = _bound(x, fmt, q)
    assert (err <= bound * (1 + 1e-5) + 1e-12).all(), float((err - bound).max())
    # and the quantizer is not trivially exact: some error, but small on average
    assert err.max() > 0
    rel = float((x.clamp_min(0) - deq).norm() / x.clamp_min(0).norm()) if fmt == "uint4" else \
        float((x - deq).norm() / x.norm())
    assert rel < {"int4": 0.13, "uint4": 0.07, "nvfp4": 0.11, "nf4": 0.11, "int8": 0.009, "fp8": 0.035}[fmt]


@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_dequantize_dtype(fmt):
    torch.manual_seed(0)
    x = torch.randn(4, 128)
    q = _q(x, fmt)
    for dt in (torch.bfloat16, torch.float16, torch.float32):
        d = dequantize(q, dt)
        assert d.dtype == dt
        assert torch.equal(d, dequantize(q).to(dt))


@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_all_zero_group_gives_zero_scale_and_codes(fmt):
    torch.manual_seed(0)
    x = torch.randn(3, 128)
    x[1] = 0.0            # a whole row
    x[2, :64] = 0.0       # one group of a row
    q = _q(x, fmt)
    deq = dequantize(q)
    assert torch.equal(deq[1], torch.zeros(128))
    assert torch.equal(deq[2, :64], torch.zeros(64))
    assert deq[0].abs().sum() > 0
    if fmt in ("int8", "fp8"):
        assert q.scales[1].item() == 0.0
        assert q.codes[1].float().eq(0).all()
    else:
        zero_code = 7 if fmt == "nf4" else 0  # NF4's zero level is index 7
        groups_per_64 = 64 // q.group_size
        assert q.scales[1].float().eq(0).all()
        assert q.scales[2, :groups_per_64].float().eq(0).all()
        assert q.codes[1].eq(zero_code).all()
        assert q.codes[2, :64].eq(zero_code).all()
    assert torch.isfinite(deq).all()


@pytest.mark.parametrize("fmt,g", [("int4", 64), ("uint4", 64), ("nvfp4", 16), ("nvfp4", 32), ("nf4", 64),
                                   ("int4", 32)])
def test_padding_when_k_not_a_multiple_of_group(fmt, g):
    torch.manual_seed(0)
    k = 100
    x = torch.randn(5, k) + (1.0 if fmt == "uint4" else 0.0)
    q = _q(x, fmt, group_size=g)
    kp = -(-k // g) * g
    assert q.in_features == k
    assert q.codes.shape == (5, kp)
    assert q.scales.shape == (5, kp // g)
    zero_code = 7 if fmt == "nf4" else 0
    assert q.codes[:, k:].eq(zero_code).all()  # the padding is zeros
    deq = dequantize(q)
    assert deq.shape == (5, k)
    # padding changes nothing: the same values quantized inside a full-length row agree
    xfull = torch.cat([x, torch.zeros(5, kp - k)], dim=1)
    qfull = _q(xfull, fmt, group_size=g, **({"tensor_scale": q.tensor_scale} if fmt == "nvfp4" else {}))
    assert torch.equal(qfull.codes, q.codes)
    assert torch.equal(dequantize(qfull)[:, :k], deq)
    assert torch.equal(_fq(x, fmt, group_size=g), deq)


def test_leading_batch_dims_are_kept():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 128)
    for fmt in ALL_FORMATS:
        q = _q(x, fmt)
        assert q.codes.shape[:2] == (2, 3)
        d = dequantize(q)
        assert d.shape == x.shape
        if fmt != "nvfp4":  # rows are independent (NVFP4's tensor scale is not per row)
            assert torch.equal(d.reshape(6, 128), dequantize(_q(x.reshape(6, 128), fmt)))


# ---------------------------------------------------------------------------- input checks
@pytest.mark.parametrize("fmt", ALL_FORMATS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_inputs_raise(fmt, bad):
    x = torch.randn(2, 64)
    x[1, 5] = bad
    with pytest.raises(ValueError, match=r"NaN.*Inf"):
        _q(x, fmt)
    with pytest.raises(ValueError, match=r"NaN.*Inf"):
        _fq(x, fmt)


def test_non_finite_message_counts_values():
    x = torch.zeros(1, 64)
    x[0, :3] = float("nan")
    x[0, 3] = float("inf")
    with pytest.raises(ValueError, match=r"3 NaN and 1 Inf"):
        quantize(x, "int4")


def test_bad_group_size_and_format():
    x = torch.randn(2, 64)
    with pytest.raises(ValueError, match="group_size"):
        quantize(x, "int4", 63)
    with pytest.raises(ValueError, match="group_size"):
        quantize(x, "nf4", -2)
    with pytest.raises(ValueError, match="unknown format"):
        quantize(x, "int3")


# ---------------------------------------------------------------------------- fake quantization
def _fake_cases():
    return [("int4", {}), ("uint4", {}), ("int4", {"scale_dtype": torch.bfloat16}), ("nvfp4", {}),
            ("nvfp4", {"group_size": 32}), ("int8", {}), ("fp8", {}), ("nf4", {})]


@pytest.mark.parametrize("fmt,kw", _fake_cases())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fake_quantize_equals_dequantize_of_quantize(fmt, kw, dtype):
    torch.manual_seed(0)
    x = (torch.randn(16, 200) * torch.logspace(-3, 2, 200)).to(dtype)
    fq = _fq(x, fmt, **kw)
    ref = dequantize(_q(x, fmt, **kw))
    assert fq.dtype == torch.float32 and fq.shape == x.shape
    assert torch.equal(fq, ref)  # value-exact (torch.equal treats -0 == +0)


@pytest.mark.parametrize("fmt,kw", _fake_cases())
def test_fake_quantize_chunked_cpu_path_is_exact(fmt, kw, monkeypatch):
    # > 2 * 2**18 elements and more than one row takes the row-chunked CPU path.
    torch.manual_seed(0)
    x = torch.randn(520, 1024) * torch.linspace(0.1, 10, 520)[:, None]
    x[7, 3] = 60.0  # one far outlier: NVFP4's tensor scale must come from the whole tensor
    assert x.numel() > 2 * 2 ** 18
    calls = []
    inner = formats.Format.fake_quantize
    monkeypatch.setattr(formats.Format, "fake_quantize",
                        lambda self, t, *a, **k: calls.append(t.shape[0]) or inner(self, t, *a, **k))
    fq = _fq(x, fmt, **kw)
    monkeypatch.undo()
    assert len(calls) > 1 and sum(calls) == 520  # it really went chunk by chunk
    ref = dequantize(_q(x, fmt, **kw))
    assert fq.shape == x.shape
    assert torch.equal(fq, ref)


def test_fake_quantize_chunked_3d_input():
    torch.manual_seed(0)
    x = torch.randn(4, 130, 1024, dtype=torch.bfloat16)
    assert torch.equal(fake_quantize(x, "int4"), dequantize(quantize(x, "int4")))
    assert torch.equal(fake_quantize(x, "nvfp4"), dequantize(quantize(x, "nvfp4")))


@pytest.mark.parametrize("fmt", ["int4", "int8", "nvfp4", "fp8", "nf4"])
def test_fake_quantize_bit_identical_including_signed_zero(fmt):
    torch.manual_seed(0)
    x = torch.randn(8, 64)
    x[:, 1] = -1e-4  # rounds to zero
    fq = fake_quantize(x, fmt)
    ref = dequantize(quantize(x, fmt))
    assert torch.equal(fq.view(torch.int32), ref.view(torch.int32))


def test_dequantize_int4_uses_stored_group_size():
    q = quantize_int4(_group([7.0, 1.0], 32), 16)
    assert q.scales.shape == (1, 2)
    assert q.scales.tolist() == [[1.0, 0.0]]
    assert dequantize_int4(q)[0, :2].tolist() == [7.0, 1.0]


# ---------------------------------------------------------------------------- INT4, two-level scales (int4m)
def _int4m_row():
    """Four groups of 64 with hand-picked absmax: 126 (m = 18), 14 (m = 2), 9.8 (m* = 1.4), 0 (m = 1)."""
    row = torch.zeros(1, 256)
    row[0, :5] = torch.tensor([126.0, -126.0, 9.0, 27.0, -45.0])      # / 18: 7, -7, .5 -> 0, 1.5 -> 2, -2.5 -> -2
    row[0, 64:69] = torch.tensor([14.0, 3.0, 5.0, -1.0, 7.0])          # / 2: 7, 1.5 -> 2, 2.5 -> 2, -.5 -> 0, 3.5 -> 4
    row[0, 128] = 9.8
    return row


def test_int4m_known_row_scale_multipliers_and_codes():
    q = formats.quantize_int4m(_int4m_row(), 64)
    assert q.fmt == "int4m" and q.codes.dtype == torch.int8 and q.multipliers.dtype == torch.uint8
    assert q.scales.tolist() == [1.0]                       # absmax 126 / (7 * 18)
    assert q.multipliers.tolist() == [[18, 2, 1, 1]]        # nearest: rne(1.4) = 1; the zero group clamps to 1
    assert q.codes[0, :5].tolist() == [7, -7, 0, 2, -2]
    assert q.codes[0, 64:69].tolist() == [7, 2, 2, 0, 4]
    assert q.codes[0, 128].item() == 7                      # 9.8 / 1 clips at 7
    assert q.codes[0, 192:].eq(0).all()
    d = formats.dequantize(q)
    assert d[0, :5].tolist() == [126.0, -126.0, 0.0, 36.0, -36.0]
    assert d[0, 64:69].tolist() == [14.0, 4.0, 4.0, 0.0, 8.0]


def test_int4m_best_multiplier_takes_the_smaller_group_error():
    q = formats.quantize_int4m(_int4m_row(), 64, best=True)
    # group 2: m = 1 clips 9.8 to 7 (error 2.8), m = 2 gives 10 (error 0.2): best takes 2
    assert q.multipliers.tolist() == [[18, 2, 2, 1]]
    assert q.codes[0, 128].item() == 5
    # the weight rule is what the format record applies to weights
    assert torch.equal(formats.quantize(_int4m_row(), "int4m", weight=True).multipliers, q.multipliers)


def test_int4m_values_are_exact_int8_and_within_126():
    torch.manual_seed(0)
    x = torch.randn(64, 512) * torch.logspace(-3, 3, 512)
    q = formats.quantize_int4m(x, 64, best=True)
    vals, scale = formats.get_format("int4m").integer_operand(q)
    assert vals.dtype == torch.int8 and int(vals.abs().max()) <= 126
    assert q.multipliers.min() >= 1 and q.multipliers.max() <= 18
    assert torch.equal(vals.float() * scale[:, None], formats.dequantize(q))


def test_int4m_unsigned_groups():
    row = torch.zeros(1, 128)
    row[0, :3] = torch.tensor([120.0, 7.5, 0.5])      # s = 120 / (15 * 8) = 1, m = 8: 15, .9375 -> 1, .0625 -> 0
    row[0, 64:67] = torch.tensor([30.0, -3.0, 3.0])   # m = 2: 15, negative -> 0, 1.5 -> 2
    q = formats.quantize_int4m(row, 64, unsigned=True)
    assert q.scales.tolist() == [1.0] and q.multipliers.tolist() == [[8, 2]]
    assert q.codes[0, :3].tolist() == [15, 1, 0] and q.codes[0, 64:67].tolist() == [15, 0, 2]
    assert int(formats.get_format("int4m").integer_operand(q)[0].max()) == 120  # 15 * 8 fits INT8


def test_int4m_mixed_signed_then_unsigned_row_scale():
    row = torch.zeros(1, 128)
    row[0, 0] = -63.0    # signed part: 63 / 126 = 0.5
    row[0, 64] = 120.0   # unsigned part: 120 / 120 = 1 -> the row scale
    q = formats.quantize_int4m(row, 64, unsigned=64)
    assert q.scales.tolist() == [1.0] and q.multipliers.tolist() == [[9, 8]]
    assert q.codes[0, 0].item() == -7 and q.codes[0, 64].item() == 15


def test_int4m_zero_row_and_padding_and_fake_quantize():
    x = torch.randn(3, 100)
    x[1] = 0.0
    q = formats.quantize_int4m(x, 64)
    assert q.codes.shape == (3, 128) and q.multipliers.shape == (3, 2)
    assert q.scales[1].item() == 0.0 and q.codes[1].eq(0).all() and q.multipliers[1].eq(1).all()
    assert q.codes[:, 100:].eq(0).all()
    for best in (False, True):
        assert torch.equal(formats.fake_quantize_int4m(x, 64, best=best),
                           formats.dequantize(formats.quantize_int4m(x, 64, best=best)))


def test_int4m_loses_little_against_float_group_scales():
    torch.manual_seed(0)
    x = torch.randn(256, 3072)
    def err(d):
        return float((d - x).norm() / x.norm())
    e_float = err(formats.dequantize(formats.quantize(x, "int4")))
    e_two = err(formats.dequantize(formats.quantize(x, "int4m", weight=True)))
    assert e_two < e_float * 1.02  # measured: the best-multiplier rule is slightly better than float scales


def test_every_format_has_a_complete_record():
    for name, f in formats.FORMATS.items():
        assert f.name == name and f.summary
        if f.weight:
            bufs = f.weight_buffers(32, 128, f.default_group if f.default_group else 0, torch.bfloat16)
            assert "qweight" in bufs and "wscales" in bufs
            for act in f.pairs_with:
                assert formats.FORMATS[act].activation
        assert formats.get_format(f.weight_only).weight
    with pytest.raises(ValueError, match="unknown format 'int3'"):
        formats.get_format("int3")


# ------------------------------------------------------------------------------------------------ int4z (AWQ W4A16)
def test_int4z_known_scale_zero_and_codes():
    """A group [-1, 0.5, ..., 2] by hand: zero = min = -1, scale = (2 - (-1)) / 15 = 0.2 (bf16: 0.2001953125);
    code of 0.5 = round(1.5 / 0.2001953125) = round(7.49...) = 7, of 2 = round(14.98) = 15, of -1 = 0."""
    x = torch.full((1, 64), 0.5)
    x[0, 0], x[0, 1] = -1.0, 2.0
    q = formats.quantize(x, "int4z", scale_dtype=torch.bfloat16)
    assert q.codes.dtype == torch.uint8 and q.scales.dtype == q.zeros.dtype == torch.bfloat16
    assert float(q.zeros[0, 0]) == -1.0 and float(q.scales[0, 0]) == 0.2001953125
    assert q.codes[0, :3].tolist() == [0, 15, 7]
    d = formats.dequantize(q)
    assert float(d[0, 1]) == 15 * 0.2001953125 - 1 and float(d[0, 2]) == 7 * 0.2001953125 - 1


def test_int4z_constant_group_is_exact_and_padding_is_cropped():
    x = torch.full((2, 70), -0.75)
    q = formats.quantize(x, "int4z", 64)
    assert q.codes.shape == (2, 128) and q.scales.shape == (2, 2) and not bool(q.codes[:, :64].any())
    assert float(q.scales[0, 0]) == 0.0 and float(q.zeros[0, 1]) == -0.75  # the padded group's min is the value
    assert torch.equal(formats.dequantize(q), x)


def test_int4z_error_within_half_a_step():
    torch.manual_seed(1)
    x = torch.randn(8, 256)
    q = formats.quantize(x, "int4z", scale_dtype=torch.float32)
    step = q.scales.repeat_interleave(64, -1)
    assert bool(((formats.dequantize(q) - x).abs() <= step / 2 + 1e-6).all())


def test_int4z_buffers_round_trip():
    f = formats.get_format("int4z")
    q = formats.quantize(torch.randn(4, 128, generator=torch.Generator().manual_seed(2)), "int4z",
                         scale_dtype=torch.bfloat16)
    bufs = f.to_buffers(q)
    assert set(bufs) == {"qweight", "wscales", "wzeros"} and bufs["qweight"].shape == (4, 64)
    assert set(f.weight_buffers(4, 128, 64, torch.bfloat16)) == set(bufs)
    back = f.from_buffers(bufs, 64, 128)
    assert torch.equal(back.codes, q.codes) and torch.equal(formats.dequantize(back), formats.dequantize(q))
