"""The Triton kernels against the torch reference.

On a CPU machine the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, set in
conftest.py) at small shapes; on a GPU the tests marked ``gpu`` run them compiled at FLUX
shapes, through the real module. Inputs are fresh random draws (the seed is in the message).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from svdquant import SVDQLinear, get_recipe  # noqa: E402
from svdquant.formats import get_format, pack_4bit_halves, quantize  # noqa: E402
from svdquant.ops import reference as R  # noqa: E402
from svdquant.ops.branch import padded_branch  # noqa: E402
from svdquant.ops.runners import ReferenceRunner  # noqa: E402

triton = pytest.importorskip("triton")
from svdquant import kernels as K  # noqa: E402

CUDA = torch.cuda.is_available()
cpu_only = pytest.mark.skipif(CUDA or os.environ.get("TRITON_INTERPRET") != "1",
                              reason="interpreter tests run on CPU machines")
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
SMALL_GEMM = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=64, GROUP_M=2, num_warps=4, num_stages=1)
SMALL_OLD = dict(BLOCK_N=32, BLOCK_M=32, GROUP_N=2, num_warps=4, num_stages=1)


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def seed_now() -> int:
    return int.from_bytes(os.urandom(2), "little")


def layer(recipe, k, n, dtype, seed, post_gelu=False, rank=32):
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(k, n, dtype=dtype)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=g) / k**0.5)
    x = torch.randn(64, k, generator=g)
    x[:, :3] *= 20
    if post_gelu:
        x = torch.nn.functional.gelu(x)
    rc = get_recipe(recipe)
    if rc.activations is None:  # weight-only: no smoothing, no branch
        rc = rc.replace(eval_tokens=64)
    else:
        rc = rc.replace(rank=rank, method="svdquant" if rank else "smooth", iterations=1, eval_tokens=64)
    return SVDQLinear.from_linear(lin, x.to(dtype), rc, post_gelu=post_gelu)


def inputs(k, rows, seed, dtype):
    g = torch.Generator().manual_seed(seed + 1000)
    x = torch.randn(rows, k, generator=g) * 2
    x[:, :3] *= 20
    return x.to(dtype)


# ---------------------------------------------------------------------------- activation kernel (interpreter)
@cpu_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("a4,shift,unsigned_from", [(False, 0.0, 0), (True, 0.0, 0), (True, 0.171875, 0),
                                                    (True, 0.171875, 128)])
def test_activation_kernel_equals_reference_bit_for_bit(dtype, a4, shift, unsigned_from):
    seed = seed_now()
    g = torch.Generator().manual_seed(seed)
    m_tokens, k = 45, 200  # neither a multiple of the blocks: masks and K padding
    x = (torch.randn(m_tokens, k, generator=g) * torch.exp(torch.randn(k, generator=g))).to(dtype)
    if shift:
        x = torch.nn.functional.gelu(x.float()).to(dtype)
    sinv = torch.rand(k, generator=g) + 0.5
    down = (torch.randn(16, k, generator=g) * 0.1).to(dtype)
    q, s, la = K.quantize_activations(x, sinv, down, a4=a4, shift=shift, unsigned_from=unsigned_from, block_m=16)
    fmt = "int4m" if a4 else "int8"
    ref = R.quantize_input(x, sinv, down, fmt, 64 if a4 else 0, shift, None, unsigned_from)
    vals, scale = get_format(fmt).integer_operand(ref.q)
    assert q.shape == (m_tokens, 256) and torch.all(q[:, k:] == 0), f"seed {seed}"
    assert torch.equal(q[:, :k], vals[:, :k]), f"seed {seed}"
    assert torch.equal(s, scale), f"seed {seed}"
    assert rel(la, ref.lora_act) < 1e-5, f"seed {seed}"


@cpu_only
@pytest.mark.parametrize("a4", [False, True])
@pytest.mark.parametrize("kh", [256, 72])
def test_activation_kernel_reads_an_input_in_two_parts_where_they_are(a4, kh):
    """``[head | tail]``: the codes, scales and ``X·L1ᵀ`` of their concatenation, bit for bit. The tail is a column
    slice of a wider tensor (a stacked GEMM's output: row stride 300, not its width). A head of 256 columns is a
    whole number of both passes' K blocks: read from both tensors where they are; one of 72 ends inside a block:
    concatenated first (the same numbers)."""
    seed = seed_now()
    g = torch.Generator().manual_seed(seed)
    m_tokens, kt = 45, 128
    assert K.reads_in_place(kh, kh + kt, a4=a4) == (kh == 256)
    head = torch.randn(m_tokens, kh, generator=g).to(torch.bfloat16) * 3
    wide = torch.randn(m_tokens, 300, generator=g).to(torch.bfloat16)
    tail = wide[:, 100:100 + kt]
    assert tail.stride(0) == 300 and not tail.is_contiguous()
    sinv = torch.rand(kh + kt, generator=g) + 0.5
    down = (torch.randn(16, kh + kt, generator=g) * 0.1).to(torch.bfloat16)
    whole = torch.cat([head, tail], 1)
    got = K.quantize_activations(head, sinv, down, tail=tail, a4=a4, block_m=16)
    want = K.quantize_activations(whole, sinv, down, a4=a4, block_m=16)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), f"seed {seed}"
    assert rel(got[2], want[2]) < 1e-6, f"seed {seed}"
    ref = R.quantize_input(whole, sinv, down, "int4m" if a4 else "int8", 64 if a4 else 0, 0.0, None, 0)
    vals, scale = get_format("int4m" if a4 else "int8").integer_operand(ref.q)
    assert torch.equal(got[0][:, :kh + kt], vals[:, :kh + kt]) and torch.equal(got[1], scale), f"seed {seed}"


@cpu_only
@pytest.mark.parametrize("a4,two_parts", [(False, False), (False, True), (True, False)])
def test_activation_passes_in_row_chunks_are_the_same(a4, two_parts):
    """``chunk_bytes``: both passes one chunk of rows at a time (the last chunk partial; an input GELU, two parts,
    A4 with its shift): the same codes, scales and ``X·L1ᵀ`` bit for bit, each row's computation being its own."""
    seed = seed_now()
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(150, 256, generator=g) * 2).to(torch.bfloat16)
    sinv = torch.rand(256, generator=g) + 0.5
    down = (torch.randn(16, 256, generator=g) * 0.1).to(torch.bfloat16)
    kw = dict(tail=x[:, 128:]) if two_parts else dict(input_gelu_from=128)
    kw.update(a4=a4, shift=0.5 if a4 else 0.0, unsigned_from=128 if a4 else 0, block_k=64, stats_block_k=64,
              block_m=16, stats_block_m=32)
    head = x[:, :128] if two_parts else x
    want = K.quantize_activations(head, sinv, down, chunk_bytes=0, **kw)
    got = K.quantize_activations(head, sinv, down, chunk_bytes=64 * 256 * 2, **kw)  # 64-row chunks: 3 of them
    for a, b in zip(got, want):
        assert torch.equal(a, b), f"seed {seed}"


@cpu_only
@pytest.mark.parametrize("two_parts", [False, True])
def test_activation_kernel_applies_an_input_gelu_from_a_block(two_parts):
    """``input_gelu_from=128`` (a FLUX single block's proj_out: the MLP's channels after the attention's) against
    the kernel on the input GELU'd in torch first. fp32: Triton's tanh-GELU and torch's differ by ~1e-7, which can
    move a code across its rounding boundary: at most 0.2 % of the codes, by one step."""
    from svdquant.ops.reference import gelu_columns

    seed = seed_now()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(45, 256, generator=g) * 2
    sinv = torch.rand(256, generator=g) + 0.5
    down = torch.randn(16, 256, generator=g) * 0.1
    blocks = dict(block_k=64, stats_block_k=64, block_m=16)
    parts = dict(tail=x[:, 128:]) if two_parts else {}
    got = K.quantize_activations(x[:, :128] if two_parts else x, sinv, down, input_gelu_from=128, **parts, **blocks)
    want = K.quantize_activations(gelu_columns(x, None, 128), sinv, down, **blocks)
    moved = (got[0].int() - want[0].int()).abs()
    assert int(moved.max()) <= 1 and float((moved > 0).float().mean()) < 2e-3, f"seed {seed}"
    assert rel(got[1], want[1]) < 1e-6 and rel(got[2], want[2]) < 1e-5, f"seed {seed}"
    plain = K.quantize_activations(x, sinv, down, **blocks)
    assert float((plain[0] != got[0]).float().mean()) > 0.2  # without the GELU: most codes differ
    with pytest.raises(ValueError, match="not a whole number of K blocks"):
        K.quantize_activations(x, sinv, down, input_gelu_from=100, **blocks)


def test_two_part_inputs_are_read_in_place_at_flux_shapes():
    """A FLUX single block's proj_out (3,072 + 12,288) takes the in-place path with the shipped block sizes."""
    assert K.reads_in_place(3072, 15360) and K.reads_in_place(3072, 15360, a4=True)
    assert not K.reads_in_place(3000, 15360)


@cpu_only
@pytest.mark.parametrize("a4", [False, True])
def test_one_pass_with_a_producers_row_maxima_gives_the_two_passes_result(a4):
    """The rows' partial maxima given (as a producer's epilogue would write them, here per 96-column slice, the last
    partial): one pass writes the two passes' codes and scales bit for bit, ``X·L1ᵀ`` within fp32 rounding."""
    seed = seed_now()
    g = torch.Generator().manual_seed(seed)
    m, k, shift, uf = 45, 256, (0.171875 if a4 else 0.0), (128 if a4 else 0)
    x = (torch.randn(m, k, generator=g) * torch.exp(torch.randn(k, generator=g))).to(torch.bfloat16)
    sinv = torch.rand(k, generator=g) + 0.5
    down = (torch.randn(16, k, generator=g) * 0.1).to(torch.bfloat16)
    kw = dict(a4=a4, shift=shift, unsigned_from=uf, block_m=16, block_k=64)
    want = K.quantize_activations(x, sinv, down, **kw)
    uns = (torch.arange(k) >= uf) & bool(shift)
    u = torch.where(uns, ((x.float() + shift) * sinv).clamp_min(0), x.float() * sinv)
    maxima = torch.stack([torch.stack([torch.where(uns, 0.0, u.abs())[:, c].amax(1), torch.where(uns, u, 0.0)[:, c]
                                       .amax(1)]) for c in torch.arange(k).split(96)], 1)
    got = K.quantize_activations(x, sinv, down, row_maxima=maxima, **kw)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), f"seed {seed}"
    assert rel(got[2], want[2]) < 1e-5, f"seed {seed}"
    with pytest.raises(ValueError, match=r"row_maxima must be \[2, slices, 45\] float32"):
        K.quantize_activations(x, sinv, down, row_maxima=maxima[0], **kw)


def test_reads_in_place_asks_the_blocks_the_launch_takes(monkeypatch):
    """Unset, pass 1's K block is the width's default (:func:`default_blocks`), as in the launch: a head of 128
    columns is whole with 128-column blocks, not with 256-column ones."""
    from svdquant.kernels import activations as A

    assert K.reads_in_place(128, 5120, block_k=128)
    monkeypatch.setattr(A, "WIDE_BLOCKS", dict(A.WIDE_BLOCKS, stats_block_k=256))
    assert not K.reads_in_place(128, 5120, block_k=128) and K.reads_in_place(256, 5120, block_k=128)
    assert K.reads_in_place(128, 5120, block_k=128, stats_block_k=128)


@cpu_only
def test_activation_kernel_k_splits_give_the_same_result():
    x = inputs(512, 40, 3, torch.float32)
    sinv = torch.rand(512) + 0.5
    down = torch.randn(32, 512) * 0.1
    base = K.quantize_activations(x, sinv, down, target_programs=1)
    for tp in (8, 64):
        other = K.quantize_activations(x, sinv, down, target_programs=tp)
        assert torch.equal(base[0], other[0]) and torch.equal(base[1], other[1])
        assert rel(other[2], base[2]) < 1e-6


@cpu_only
@pytest.mark.parametrize("width,narrow", [(200, True), (4096, True), (4100, False), (12288, False)])
def test_activation_passes_take_their_blocks_by_width_unless_given(monkeypatch, width, narrow):
    """Known answer: a padded width up to 4,096 gets the narrow blocks (few K slices), a wider one the wide blocks
    (short row blocks, 4 warps); an explicit block choice wins over either."""
    from svdquant.kernels import activations as A

    want = A.NARROW_BLOCKS if narrow else A.WIDE_BLOCKS
    assert A.default_blocks(width + (-width) % 64) == want
    launched = []
    real = A._passes
    monkeypatch.setattr(A, "_passes", lambda *a: launched.append((a[-5], a[-3])) or real(*a))  # rows, warps
    x, sinv = inputs(width, 3, 4, torch.float32), torch.rand(width) + 0.5
    K.quantize_activations(x, sinv, None)
    K.quantize_activations(x, sinv, None, stats_block_m=16, num_warps=2)
    assert launched == [(want["stats_block_m"], want["num_warps"]), (16, 2)]


def test_the_one_pass_given_row_maxima_takes_its_own_blocks():
    """Known answer at FLUX's proj_out (4,608 × 15,360): the one pass given row maxima launches 32-row, 128-column
    blocks in 4 warps, 12 K slices (120 blocks over 144 row blocks, within 2,048 programs); the two passes keep
    16-row, 256-column blocks in pass 2; explicit blocks win."""
    from svdquant.kernels import activations as A

    given = A.launch_plan(4608, 15360, given_maxima=True)
    assert (given["block_m"], given["bq"], given["num_warps"], given["splits"][1]) == (32, 128, 4, 12)
    two = A.launch_plan(4608, 15360)
    assert (two["block_m"], two["bq"], two["splits"]) == (16, 256, (12, 6))
    explicit = A.launch_plan(4608, 15360, given_maxima=True, block_m=16, num_warps=8)
    assert (explicit["block_m"], explicit["num_warps"], explicit["splits"][1]) == (16, 8, 6)


# ---------------------------------------------------------------------------- INT8 GEMM (interpreter)
@cpu_only
@pytest.mark.parametrize("tma, ws", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("gelu", [False, True])
def test_int8_gemm_matches_reference(tma, ws, gelu):
    """Pointer loads, TMA descriptors, and TMA with the warp-specialized persistent loop (a sweep option)."""
    seed = seed_now()
    g = torch.Generator().manual_seed(seed)
    m_tokens, k, n = 37, 192, 40
    a = torch.randint(-127, 128, (m_tokens, k), generator=g, dtype=torch.int8)
    w = torch.randint(-126, 127, (n, k), generator=g, dtype=torch.int8)
    a_s, w_s = torch.rand(m_tokens, generator=g), torch.rand(n, generator=g) * 1e-3
    la, lu = torch.randn(m_tokens, 16, generator=g), torch.randn(n, 16, generator=g)
    bias = torch.randn(n, generator=g)
    y = K.int8_gemm(a, a_s, w, w_s, la, lu, bias, torch.float32, gelu=gelu, tma=tma,
                    num_programs=3 if tma else None, config=dict(SMALL_GEMM, WARP_SPECIALIZE=ws) if ws else SMALL_GEMM)
    want = (a.long() @ w.long().T).float() * a_s[:, None] * w_s[None, :] + la @ lu.T + bias
    if gelu:
        want = torch.nn.functional.gelu(want, approximate="tanh")
    assert rel(y, want) < 1e-6, f"seed {seed}"


@cpu_only
def test_int8_gemm_sums_exactly_in_int32_at_the_largest_values():
    # |q·m| <= 126 on both sides and K = 1024: the worst-case sum is exact in int32 (and fp32 here).
    k = 1024
    a = torch.full((16, k), 126, dtype=torch.int8)
    w = torch.full((16, k), -126, dtype=torch.int8)
    one = torch.ones(16)
    y = K.int8_gemm(a, one, w, one, None, None, None, torch.float32, config=SMALL_GEMM)
    assert torch.all(y == -126 * 126 * k)


# ---------------------------------------------------------------------------- the quantizer's weight rounding
def _weights_to_round(g, n, k, device="cpu"):
    """Rows of different magnitudes, a zero group, a zero row and an outlier: every branch of the rule."""
    w = torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g) * 3
    w[0, :64] = 0
    w[1] = 0
    w[2, 5] = 40
    return w.to(device)


@cpu_only
@pytest.mark.parametrize("k", [64, 200, 1100])
def test_round_int4m_weights_is_the_reference_bit_for_bit(k):
    seed = seed_now()
    w = _weights_to_round(torch.Generator().manual_seed(seed), 9, k)
    want = get_format("int4m").fake_quantize(w, 64, weight=True)
    assert torch.equal(K.round_int4m_weights(w), want), f"seed {seed}"


def test_the_search_rounds_in_torch_where_the_kernel_cannot(monkeypatch):
    """The kernel's group is a power of two; a recipe's other even group sizes keep the torch rounding."""
    from svdquant.algorithm.gpu_kernels import weight_rounding_kernel

    cuda = torch.device("cuda")
    assert weight_rounding_kernel(get_recipe("int4"), cuda) is not None
    assert weight_rounding_kernel(get_recipe("int4").replace(group_size=96), cuda) is None
    assert weight_rounding_kernel(get_recipe("int4"), torch.device("cpu")) is None
    monkeypatch.setenv("SVDQUANT_REFERENCE", "1")
    assert weight_rounding_kernel(get_recipe("int4"), cuda) is None


def test_round_int4m_weights_refuses_what_it_cannot_round():
    with pytest.raises(ValueError, match="fp32"):
        K.round_int4m_weights(torch.zeros(4, 64, dtype=torch.bfloat16))


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("n, k", [(9216, 3072), (3072, 12288), (21504, 3072), (3072, 15360)])
def test_gpu_round_int4m_weights_at_flux_shapes(n, k):
    seed = seed_now()
    w = _weights_to_round(torch.Generator().manual_seed(seed), n, k, "cuda")
    want = get_format("int4m").fake_quantize(w, 64, weight=True)
    assert torch.equal(K.round_int4m_weights(w), want), f"seed {seed}"


# ---------------------------------------------------------------------------- the quantizer's scoring products
@cpu_only
@pytest.mark.parametrize("a_shape, b_shape", [((3, 37, 70), (3, 50, 70)), ((37, 70), (2, 130, 70)),
                                              ((2, 140, 33), (45, 33)), ((20, 64), (16, 64))])
def test_scoring_product_is_the_fp32_product(a_shape, b_shape):
    """Batched, one operand shared by the batch, or neither; ragged tiles along T, N and K (the interpreter reads
    fp32, as the reference)."""
    seed = seed_now()
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(a_shape, generator=g), torch.randn(b_shape, generator=g)
    got = K.scoring_product(a, b)
    want = a @ b.mT
    assert got.shape == want.shape and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4, msg=f"seed {seed}")


def test_scoring_product_refuses_what_it_cannot_multiply():
    with pytest.raises(ValueError, match="fp32"):
        K.scoring_product(torch.zeros(4, 8, dtype=torch.bfloat16), torch.zeros(4, 8))
    with pytest.raises(ValueError, match="fp32"):
        K.scoring_product(torch.zeros(4, 8), torch.zeros(4, 9))
    with pytest.raises(ValueError, match="batch sizes differ"):
        K.scoring_product(torch.zeros(2, 4, 8), torch.zeros(3, 4, 8))


def test_the_search_scores_in_tf32_only_where_asked(monkeypatch):
    from svdquant.algorithm import gpu_kernels

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.setattr(gpu_kernels, "SCORING_TF32", False)
    assert gpu_kernels.scoring_product(cuda) is gpu_kernels._fp32_product
    monkeypatch.setattr(gpu_kernels, "SCORING_TF32", True)
    assert gpu_kernels.scoring_product(cuda) is K.scoring_product
    assert gpu_kernels.scoring_product(cpu) is gpu_kernels._fp32_product
    monkeypatch.setenv("SVDQUANT_REFERENCE", "1")
    assert gpu_kernels.scoring_product(cuda) is gpu_kernels._fp32_product


@cpu_only
def test_scoring_speed_quick(tmp_path):
    """benchmarks/scoring_speed.py --quick: the kernel (interpreter) and the fp32 product timed, its error recorded."""
    import json

    import scoring_speed

    rows = scoring_speed.main(["--quick", "--out", str(tmp_path)])
    assert len(rows) == 2 and all(r["rel_error"] < 1e-5 and r["kernel_ms"] > 0 and r["fp32_ms"] > 0 for r in rows)
    assert json.loads((tmp_path / "scoring_speed.json").read_text())["rows"] == rows


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("batch, n, k", [(8, 9216, 3072), (4, 3072, 12288), (2, 21504, 3072), (1, 3072, 15360)])
def test_gpu_scoring_product_at_flux_shapes(batch, n, k):
    """512 scoring tokens of FLUX's groups, a batch of candidates: within TF32's rounding of the fp32 product."""
    seed = seed_now()
    g = torch.Generator(device="cuda").manual_seed(seed)
    a = torch.randn(batch, 512, k, device="cuda", generator=g)
    b = torch.randn(batch, n, k, device="cuda", generator=g) * 0.02
    assert rel(K.scoring_product(a, b), a @ b.mT) < 2e-3, f"seed {seed}"


# ---------------------------------------------------------------------------- expand, W4A16 (interpreter)
@cpu_only
def test_expand_gives_code_times_multiplier():
    seed = seed_now()
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(-7, 8, (40, 256), generator=g, dtype=torch.int8)
    mult = torch.randint(1, 19, (40, 4), generator=g, dtype=torch.uint8)
    w = K.expand_int4m(pack_4bit_halves(codes, 64), mult, block_n=16)
    want = (codes.view(40, 4, 64).short() * mult.short()[..., None]).view(40, 256).to(torch.int8)
    assert torch.equal(w, want), f"seed {seed}"


@cpu_only
@pytest.mark.parametrize("m_tokens,groups_per_step,fma,split_k", [
    (1, 1, False, 1), (3, 1, False, 1), (16, 1, False, 1), (3, 2, False, 1), (5, 4, False, 1), (1, 1, True, 1),
    (3, 2, True, 1), (4, 4, True, 1), (1, 1, False, 4), (3, 1, False, 2), (16, 2, False, 2), (2, 1, True, 4),
    (3, 2, True, 2)])
def test_w4a16_matches_reference(m_tokens, groups_per_step, fma, split_k):
    """K = 200 (4 groups, the last partial) read one group per step or several, on tensor-core tiles or in the
    multiply-add GEMV, whole or in K slices summed after: the same result."""
    seed = seed_now()
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(48, 200, generator=g)
    q = quantize(w, "int4", scale_dtype=torch.float32)
    x = torch.randn(m_tokens, 200, generator=g)
    bias = torch.randn(48, generator=g)
    y = K.w4a16_linear(x, pack_4bit_halves(q.codes, 64), q.scales, bias, block_n=16, groups_per_step=groups_per_step,
                       fma=fma, split_k=split_k)
    want = R.weight_only_linear(x, get_format("int4").dequantize(q), None, None, bias)
    assert rel(y, want) < 1e-6, f"seed {seed}"


@cpu_only
@pytest.mark.parametrize("k,steps", [(256, 2), (192, 1)])
def test_w4a16_reads_two_groups_a_step_by_default_where_the_count_is_even(k, steps):
    """Known answer: unset, ``groups_per_step`` is 2 for an even group count (K = 256: 4 groups) and 1 for an odd
    one (K = 192: 3); with the defaults, the reference's result."""
    assert K.w4a16.default_groups_per_step(k // 64) == steps
    g = torch.Generator().manual_seed(seed_now())
    q = quantize(torch.randn(32, k, generator=g), "int4", scale_dtype=torch.float32)
    x = torch.randn(2, k, generator=g)
    y = K.w4a16_linear(x, pack_4bit_halves(q.codes, 64), q.scales, None)
    assert rel(y, R.weight_only_linear(x, get_format("int4").dequantize(q), None, None, None)) < 1e-6


@cpu_only
@pytest.mark.parametrize("signed", [True, False])
def test_w4a16_gemv_reads_every_nibble_exactly(signed):
    """Known answer: every code value at every nibble of a word (and in both halves of a group), each column its own
    pattern, power-of-two scales (and integer zeros) per row and group, small integer inputs: the multiply-add
    GEMV's sums are then exact in fp32, so it must give them exactly."""
    seed = seed_now()
    g = torch.Generator().manual_seed(seed)
    lo, hi = (-8, 8) if signed else (0, 16)
    offsets = torch.randint(0, 16, (128,), generator=g)
    codes = (torch.arange(64)[:, None] + offsets) % 16 + lo  # every value in every column, the columns unlike
    x = torch.randint(-5, 6, (3, 128), generator=g).float()
    scales = 2.0 ** torch.randint(-2, 3, (64, 2), generator=g).float()
    zeros = None if signed else torch.randint(-3, 4, (64, 2), generator=g).float()
    y = K.w4a16_linear(x, pack_4bit_halves(codes.to(torch.int8 if signed else torch.uint8), 64), scales, None,
                       zeros=zeros, fma=True, block_n=16)
    w = codes.double() * scales.double().repeat_interleave(64, 1)
    if zeros is not None:
        w += zeros.double().repeat_interleave(64, 1)
    assert torch.equal(y, (x.double() @ w.T).float()), f"seed {seed}"
    assert all(set(codes[:, k].tolist()) == set(range(lo, hi)) for k in range(128))


@cpu_only
def test_w4a16_gemv_in_16_bits_and_with_zero_points():
    """The multiply-add GEMV with a bf16 input (the weight rounded to bf16 first, as the reference) and with int4z's
    zero points, against the tensor-core kernel."""
    seed = seed_now()
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(48, 256, generator=g) + 0.3
    x = torch.randn(2, 256, generator=g).bfloat16()
    q = quantize(w, "int4", scale_dtype=torch.bfloat16)
    p = pack_4bit_halves(q.codes, 64)
    want = R.weight_only_linear(x.float(), get_format("int4").dequantize(q, torch.bfloat16).float(), None, None,
                                None)
    assert rel(K.w4a16_linear(x, p, q.scales, None, fma=True, block_n=16), want) < 1e-2, f"seed {seed}"
    z = quantize(w, "int4z", scale_dtype=torch.float32)
    xf, pz = x.float(), pack_4bit_halves(z.codes, 64)
    assert rel(K.w4a16_linear(xf, pz, z.scales, None, zeros=z.zeros, fma=True, block_n=16),
               K.w4a16_linear(xf, pz, z.scales, None, zeros=z.zeros, block_n=16)) < 1e-6, f"seed {seed}"


@cpu_only
@pytest.mark.parametrize("m_tokens,groups_per_step", [(1, 1), (5, 1), (5, 4)])
def test_w4a16_zero_points_match_reference(m_tokens, groups_per_step):
    """int4z (AWQ layers imported from Nunchaku): unsigned codes, w = code · scale + zero."""
    seed = seed_now()
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(48, 200, generator=g) + 0.3
    q = quantize(w, "int4z", scale_dtype=torch.float32)
    assert int(q.codes.max()) == 15 and int(q.codes.min()) == 0  # both nibble ranges are used
    x = torch.randn(m_tokens, 200, generator=g)
    y = K.w4a16_linear(x, pack_4bit_halves(q.codes, 64), q.scales, None, zeros=q.zeros, block_n=16,
                       groups_per_step=groups_per_step)
    want = R.weight_only_linear(x, get_format("int4z").dequantize(q), None, None, None)
    assert rel(y, want) < 1e-6, f"seed {seed}"


@cpu_only
@pytest.mark.parametrize("fmt", ["int4", "int4z"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dequantize_int4_kernel_equals_the_format(fmt, dtype):
    """The many-token weight-only path's kernel: code · scale [+ zero] rounded once, K trimmed (200 of 256)."""
    seed = seed_now()
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(40, 200, generator=g) + (0.3 if fmt == "int4z" else 0.0)
    q = quantize(w, fmt, scale_dtype=torch.bfloat16)
    got = K.dequantize_int4(pack_4bit_halves(q.codes, 64), q.scales, 200, dtype,
                            zeros=q.zeros if fmt == "int4z" else None, block_n=16)
    want = get_format(fmt).dequantize(q, torch.float32)
    assert got.shape == (40, 200) and got.dtype == dtype
    if dtype == torch.float32:
        assert torch.equal(got, want), f"seed {seed}"
    else:  # the interpreter's fp32 -> 16-bit cast may round differently (DEVELOPERS.md); the GPU is bit-exact
        assert torch.allclose(got.float(), want.to(dtype).float(), rtol=2**-7, atol=0), f"seed {seed}"


@cpu_only
def test_w4a16_runner_many_tokens_equals_the_reference():
    from svdquant.ops.runners import W4A16Runner

    m = layer("w4a16", 200, 48, torch.float32, 21)
    x = inputs(200, 40, 21, torch.float32)
    runner = W4A16Runner(m, K)
    assert torch.equal(runner(x), ReferenceRunner(m)(x))
    assert rel(runner(x[:3]), ReferenceRunner(m)(x[:3])) < 1e-6  # the few-token kernel


@cpu_only
def test_w4a16_runners_stack_into_one_launch(monkeypatch):
    """Weight-only layers that read one input stack (FLUX's adaLN modulations): one launch, each member's rows as
    they were (bit for bit), the members holding row views of the stack's codes; a stack too large to dequantize
    whole takes many tokens 16 at a time; a member with a branch does not stack."""
    from svdquant.ops.runners import W4A16Runner
    from svdquant.ops.runners import weight_only

    ms = [layer("w4a16", 128, n, torch.float32, 30 + n) for n in (48, 16, 32)]
    x = inputs(128, 3, 5, torch.float32)
    runners = [W4A16Runner(m, K) for m in ms]
    want = torch.cat([r(x) for r in runners], 1)
    stack = W4A16Runner.stack(runners, [48, 16, 32])
    assert torch.equal(stack(x), want) and not stack.chunked
    for r, m in zip(runners, ms):
        assert r.owns_packed_weight and torch.equal(r.packed_weight(), m.qweight)
        assert r.qweight.untyped_storage().data_ptr() == stack.qweight.untyped_storage().data_ptr()
        assert r.packed_weight().untyped_storage().data_ptr() != stack.qweight.untyped_storage().data_ptr()
    many = inputs(128, 40, 6, torch.float32)
    monkeypatch.setattr(weight_only, "DEQUANTIZE_AT_MOST", 0)
    chunked = W4A16Runner.stack([W4A16Runner(m, K) for m in ms], [48, 16, 32])
    assert chunked.chunked
    want = torch.cat([ReferenceRunner(m)(many) for m in ms], 1)
    assert rel(chunked(many), want) < 1e-6
    m = layer("w4a16", 128, 16, torch.float32, 9)
    m.add_adapter("x", torch.randn(4, 128), torch.randn(16, 4), 1.0)
    with pytest.raises(ValueError, match="branch"):
        W4A16Runner.stack([W4A16Runner(ms[0], K), W4A16Runner(m, K)], [48, 16])


@cpu_only
def test_w4a16_refuses_many_tokens():
    q = quantize(torch.randn(16, 64), "int4")
    with pytest.raises(ValueError, match="at most 16 tokens"):
        K.w4a16_linear(torch.randn(17, 64), pack_4bit_halves(q.codes, 64), q.scales, None)
    with pytest.raises(ValueError, match=r"fma=True\) takes at most 4 tokens"):
        K.w4a16_linear(torch.randn(5, 64), pack_4bit_halves(q.codes, 64), q.scales, None, fma=True)
    shifted = torch.empty(16 * 32 + 1, dtype=torch.uint8)[1:].view(16, 32).copy_(pack_4bit_halves(q.codes, 64))
    with pytest.raises(ValueError, match=r"fma=True\) reads the codes as int32 words: pass a 4-byte aligned tensor"):
        K.w4a16_linear(torch.randn(1, 64), shifted, q.scales, None, fma=True)
    x = torch.randn(1, 64)  # unasked, one token on a misaligned view gets the tiles, not the error
    assert rel(K.w4a16_linear(x, shifted, q.scales, None), K.w4a16_linear(x, shifted.clone(), q.scales, None)) < 1e-6
    q = quantize(torch.randn(16, 384), "int4")  # 6 groups a row
    for bad in (0, 3, 4):
        with pytest.raises(ValueError, match=f"groups_per_step={bad} must be a power of two dividing the 6 groups"):
            K.w4a16_linear(torch.randn(2, 384), pack_4bit_halves(q.codes, 64), q.scales, None, groups_per_step=bad)
    for bad, kw in ((4, {}), (3, {}), (0, {}), (4, dict(groups_per_step=1, fma=True))):  # 3 steps at 2 groups a step
        steps = 6 // kw.get("groups_per_step", 2)
        with pytest.raises(ValueError, match=rf"split_k={bad} must be a power of two dividing the {steps} loop steps "
                                             rf"\(6 groups, {6 // steps} a step\)"):
            K.w4a16_linear(torch.randn(2, 384), pack_4bit_halves(q.codes, 64), q.scales, None, split_k=bad, **kw)


# ---------------------------------------------------------------------------- the paper's formats (interpreter)
@cpu_only
@pytest.mark.parametrize("post_gelu", [False, True])
def test_float_scales_int4_kernels_match_reference(post_gelu):
    m = layer("w4a4-float", 128, 48, torch.float32, 7, post_gelu=post_gelu)
    x = inputs(128, 40, 7, torch.float32)
    if post_gelu:
        x = torch.nn.functional.gelu(x)
    down, up = padded_branch(m)
    codes, scales_t, lora_act = K.quantize_input_float_scales(x, m.smooth_inv, down, shift=m.act_shift,
                                                              unsigned_from=m.act_unsigned_from, block_m=16)
    y = K.w4a4_gemm(codes, scales_t, m.qweight, m.wscales.t().contiguous(), lora_act, up, m.bias, torch.float32,
                    **SMALL_OLD)
    assert rel(y, ReferenceRunner(m)(x)) < 1e-6


@cpu_only
def test_fp4_gemm_matches_reference():
    m = layer("nvfp4", 192, 40, torch.float32, 6)
    x = inputs(192, 21, 6, torch.float32)
    down, up = padded_branch(m)
    values, _, lora_act = K.quantize_input_float_scales(x, m.smooth_inv, down, fp4=True, group_size=16,
                                                        input_scale=m.input_scale, block_m=16)
    y = K.fp4_gemm(values, m.qweight, m.wscales, m.wtensor_scale, m.input_scale, lora_act, up, m.bias,
                   torch.float32, **SMALL_OLD)
    assert rel(y, ReferenceRunner(m)(x)) < 1e-6


@cpu_only
def test_padded_branch_rounds_rank_up_to_a_power_of_two_with_loras():
    m = layer("int4", 128, 32, torch.float32, 8, rank=24)
    down, up = padded_branch(m)
    assert down.shape == (32, 128) and up.shape == (32, 32)
    assert torch.equal(down[:24], m.lora_down) and torch.all(down[24:] == 0)
    m.add_adapter("a", torch.randn(16, 128) * 0.1, torch.randn(32, 16) * 0.1, 0.5)
    down, up = padded_branch(m)
    assert down.shape[0] == 64  # 24 + 16 = 40 -> 64
    m32 = layer("int4", 128, 32, torch.float32, 8, rank=32)
    down, up = padded_branch(m32)  # already a power of two: the layer's own tensors, no resident copy
    assert down.data_ptr() == m32.lora_down.data_ptr() and up.data_ptr() == m32.lora_up.data_ptr()


@cpu_only
@pytest.mark.parametrize("recipe", ["int4", "w4a4", "w8a8"])
def test_int8_path_end_to_end_through_the_kernels(recipe):
    """The INT8 path's kernels in the order the GPU runner calls them equal the module's reference."""
    post_gelu = 64 if recipe == "w4a4" else False
    m = layer(recipe, 128, 48, torch.float32, 11, post_gelu=post_gelu)
    m.add_adapter("l", torch.randn(8, 128) * 0.1, torch.randn(48, 8) * 0.1, 0.7)
    x = inputs(128, 33, 11, torch.float32)
    down, up = padded_branch(m)
    a4 = recipe == "w4a4"
    a, a_s, lora_act = K.quantize_activations(x, m.smooth_inv, down, a4=a4, shift=m.act_shift if a4 else 0.0,
                                              unsigned_from=m.act_unsigned_from, block_m=16)
    if m.weights == "int4m":
        w = K.expand_int4m(m.packed_weight(), m.wmult, block_n=16)
    else:
        w = m.qweight
    y = K.int8_gemm(a, a_s, w, m.wscales, lora_act, up, m.bias, torch.float32, config=SMALL_GEMM)
    assert rel(y, m(x)) < 1e-6


# ---------------------------------------------------------------------------- GPU, FLUX shapes
FLUX_SHAPES = [(3072, 9216), (3072, 3072), (3072, 12288), (12288, 3072), (3072, 21504), (15360, 3072)]


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("k,n", FLUX_SHAPES)
@pytest.mark.parametrize("activations", ["int8", "int4m"])
@pytest.mark.parametrize("mode", ["speed", "memory"])
def test_gpu_int8_path_matches_reference_at_flux_shapes(k, n, activations, mode):
    from kernel_speed import random_layer

    seed = seed_now()
    m = random_layer(k, n, activations=activations, seed=seed, mode=mode)
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(1000, k, generator=g) * 2).to("cuda", torch.bfloat16)
    y = m(x)
    ref = ReferenceRunner(m)(x)
    assert torch.isfinite(y).all()
    # bf16 output rounding (2^-9) and the tf32 branch epilogue
    assert rel(y, ref) < 1e-2, f"seed {seed}"


@gpu
@pytest.mark.gpu
def test_gpu_proj_out_reads_its_two_parts_at_the_flux_shape():
    """A FLUX single block's proj_out (15,360 → 3,072, 4,608 tokens) fed its attention output and a column slice
    of the stacked q/k/v + MLP output (row stride 21,504): the same codes as the concatenation, the same output."""
    from kernel_speed import random_layer

    m = random_layer(15360, 3072, seed=seed_now())
    g = torch.Generator(device="cuda").manual_seed(1)
    attn = torch.randn(4608, 3072, device="cuda", dtype=torch.bfloat16, generator=g)
    stacked = torch.randn(4608, 21504, device="cuda", dtype=torch.bfloat16, generator=g)
    mlp = stacked[:, 9216:]
    whole = torch.cat([attn, mlp], -1)
    got = K.quantize_activations(attn, m.smooth_inv, m.lora_down, tail=mlp)
    want = K.quantize_activations(whole, m.smooth_inv, m.lora_down)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert torch.equal(m(attn, tail=mlp), m(whole))
    # the MLP's GELU moved into it (svdquant.fuse): applied to the tail's blocks as they are read
    from svdquant.ops.reference import gelu_columns

    m.set_input_gelu(3072)
    want = ReferenceRunner(m)(gelu_columns(attn, mlp, 3072))
    assert rel(m(attn, tail=mlp), want) < 1e-2 and rel(m(whole), want) < 1e-2


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["speed", "memory"])
def test_gpu_fc2_applies_its_input_gelu_at_the_flux_shape(mode):
    """FLUX's MLP down projection (12,288 → 3,072, 4,608 tokens) reading fc1's pre-activation, its GELU in the
    activation pass, against the reference layer after F.gelu (bf16 rounding and the tf32 branch: 1e-2)."""
    from kernel_speed import random_layer

    from svdquant.ops.reference import gelu_columns

    m = random_layer(12288, 3072, seed=seed_now(), mode=mode)
    x = (torch.randn(4608, 12288, generator=torch.Generator().manual_seed(2)) * 2).to("cuda", torch.bfloat16)
    m.set_input_gelu(0)
    want = ReferenceRunner(m)(gelu_columns(x, None, 0))
    assert rel(m(x), want) < 1e-2
    assert rel(m(x), ReferenceRunner(m)(x)) > 0.05  # the GELU did apply


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("rows,k,gelu,head", [(4608, 3072, None, None), (512, 3072, None, None),
                                              (4608, 12288, 0, None), (4608, 15360, 3072, 3072)])
def test_gpu_blocks_by_width_equal_the_uniform_blocks_at_flux_shapes(rows, k, gelu, head):
    """The activation passes of a FLUX step (image and text streams, fc2 with its GELU, a single block's two-part
    proj_out) with the blocks chosen by width: the uniform blocks' codes and scales bit for bit (other K slices),
    ``X·L1ᵀ`` within 1e-3 (summed in another order)."""
    g = torch.Generator().manual_seed(seed_now())
    x = (torch.randn(rows, k, generator=g) * 2).to("cuda", torch.bfloat16)
    sinv = (torch.rand(k, generator=g) + 0.5).cuda()
    down = (torch.randn(32, k, generator=g) * 0.02).to("cuda", torch.bfloat16)
    kw = dict(input_gelu_from=gelu, lora_dtype=torch.bfloat16)
    first, parts = (x[:, :head], dict(tail=x[:, head:])) if head else (x, {})
    got = K.quantize_activations(first, sinv, down, **parts, **kw)
    want = K.quantize_activations(first, sinv, down, stats_block_m=64, stats_block_k=128, target_programs=8192,
                                  num_warps=8, **parts, **kw)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert rel(got[2], want[2]) < 1e-3


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("rows,k", [(4608, 12288), (4608, 3072), (512, 15360)])
def test_gpu_one_pass_with_row_maxima_equals_the_two_passes_at_flux_shapes(rows, k):
    """The rows' maxima given per 256 columns (a GEMM tile's width, as a producer's epilogue would write them): the
    one pass gives the two passes' codes and scales bit for bit, ``X·L1ᵀ`` within bf16 rounding."""
    g = torch.Generator().manual_seed(seed_now())
    x = (torch.randn(rows, k, generator=g) * 2).to("cuda", torch.bfloat16)
    sinv = (torch.rand(k, generator=g) + 0.5).cuda()
    down = (torch.randn(32, k, generator=g) * 0.02).to("cuda", torch.bfloat16)
    want = K.quantize_activations(x, sinv, down, lora_dtype=torch.bfloat16)
    u = (x.float() * sinv).abs().unflatten(1, (-1, 256)).amax(2).t()
    got = K.quantize_activations(x, sinv, down, lora_dtype=torch.bfloat16,
                                 row_maxima=torch.stack([u, torch.zeros_like(u)]).contiguous())
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert rel(got[2], want[2]) < 1e-2


@gpu
@pytest.mark.gpu
def test_gpu_approximate_gelu_moves_codes_at_most_one_step():
    """The activation pass's input GELU on the GPU is one ``tanh.approx.f32`` (relative error ~2^-11): against the
    exact form (``exp`` and a division), at FLUX's fc2 shape, no code moves more than one step and few move; the
    GEMM's GELU epilogue stays within bf16 rounding of F.gelu after the GEMM."""
    g = torch.Generator().manual_seed(seed_now())
    x = (torch.randn(4608, 12288, generator=g) * 2).to("cuda", torch.bfloat16)
    sinv = (torch.rand(12288, generator=g) + 0.5).cuda()
    down = (torch.randn(32, 12288, generator=g) * 0.01).to("cuda", torch.bfloat16)
    q, s, la = K.quantize_activations(x, sinv, down, input_gelu_from=0)
    qe, se, lae = K.quantize_activations(x, sinv, down, input_gelu_from=0, exact_gelu=True)
    moved = (q.int() - qe.int()).abs()
    assert int(moved.max()) <= 1 and float(moved.float().mean()) < 0.05, float(moved.float().mean())
    assert rel(s, se) < 1e-3 and rel(la, lae) < 1e-3
    a = torch.randint(-127, 128, (4608, 3072), dtype=torch.int8, generator=g).cuda()
    w = torch.randint(-127, 128, (12288, 3072), dtype=torch.int8, generator=g).cuda()
    a_s, w_s = (torch.rand(4608, generator=g) * 1e-3).cuda(), (torch.rand(12288, generator=g) * 1e-2).cuda()
    tma = torch.cuda.get_device_capability()[0] >= 9
    plain = K.int8_gemm(a, a_s, w, w_s, None, None, None, torch.bfloat16, tma=tma)
    fused = K.int8_gemm(a, a_s, w, w_s, None, None, None, torch.bfloat16, gelu=True, tma=tma)
    want = torch.nn.functional.gelu(plain.float(), approximate="tanh")
    assert float((fused.float() - want).norm() / want.norm()) < 5e-3


@gpu
@pytest.mark.gpu
def test_gpu_speed_mode_state_dict_is_the_packed_checkpoint():
    from kernel_speed import random_layer

    m = random_layer(3072, 3072, mode="memory", seed=1)
    packed = m.qweight.clone()
    m.set_weight_mode("speed")
    assert m._buffers["qweight"] is None  # one INT8 copy resident, not two
    assert torch.equal(m.state_dict()["qweight"], packed)
    x = torch.randn(256, 3072, device="cuda", dtype=torch.bfloat16)
    y_speed = m(x)
    m.set_weight_mode("memory")
    assert torch.equal(m.qweight, packed) and torch.equal(m(x), y_speed)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("recipe", ["int4", "w4a4", "w4a4-float", "nvfp4", "w8a8", "w4a16"])
def test_gpu_module_dispatch_matches_reference(recipe):
    m = layer(recipe, 256, 128, torch.bfloat16, 9).cuda()
    x = inputs(256, 300, 9, torch.bfloat16).cuda().reshape(3, 100, 256)
    y = m(x)
    assert y.shape == (3, 100, 128)
    assert rel(y.reshape(300, 128), ReferenceRunner(m)(x.reshape(300, 256))) < 1e-2
    if recipe == "w4a16":  # many tokens: the dequantize kernel + cuBLAS computes what the reference does
        assert torch.equal(y.reshape(300, 128), ReferenceRunner(m)(x.reshape(300, 256)))
    y1 = m(x[:1, :4])  # few tokens: the W4A16 kernel for weight-only layers
    assert rel(y1.reshape(4, 128), ReferenceRunner(m)(x[0, :4])) < 1e-2


@gpu
@pytest.mark.gpu
def test_gpu_lora_through_kernels():
    from kernel_speed import random_layer

    m = random_layer(3072, 3072, seed=5)
    x = torch.randn(512, 3072, device="cuda", dtype=torch.bfloat16)
    m.add_adapter("l", torch.randn(64, 3072, device="cuda", dtype=torch.bfloat16) * 0.01,
                  torch.randn(3072, 64, device="cuda", dtype=torch.bfloat16) * 0.01, 0.8)
    assert rel(m(x), ReferenceRunner(m)(x)) < 1e-2


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("m_tokens", [1, 4])
def test_gpu_w4a16_zero_points_at_flux_adaln_shape(m_tokens):
    w = torch.randn(18432, 3072, device="cuda")
    q = quantize(w, "int4z", scale_dtype=torch.bfloat16)
    x = torch.randn(m_tokens, 3072, device="cuda", dtype=torch.bfloat16)
    y = K.w4a16_linear(x, pack_4bit_halves(q.codes, 64), q.scales, None, zeros=q.zeros)
    want = R.weight_only_linear(x, get_format("int4z").dequantize(q, torch.bfloat16), None, None, None)
    assert rel(y, want) < 1e-2


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("m_tokens,groups_per_step,split_k,fma", [
    (1, 1, 1, False), (2, 1, 1, False), (4, 1, 1, False), (1, 4, 1, False), (4, 8, 1, False), (4, 16, 1, False),
    (1, 2, 8, False), (4, 2, 4, False), (1, 2, 1, True), (2, 4, 2, True), (3, 2, 4, True), (4, 4, 1, True)])
def test_gpu_w4a16_at_flux_adaln_shape(m_tokens, groups_per_step, split_k, fma):
    w = torch.randn(18432, 3072, device="cuda")
    q = quantize(w, "int4", scale_dtype=torch.bfloat16)
    x = torch.randn(m_tokens, 3072, device="cuda", dtype=torch.bfloat16)
    y = K.w4a16_linear(x, pack_4bit_halves(q.codes, 64), q.scales, None, groups_per_step=groups_per_step,
                       split_k=split_k, fma=fma, block_n=64 if fma else 32)
    want = R.weight_only_linear(x, get_format("int4").dequantize(q, torch.bfloat16), None, None, None)
    assert rel(y, want) < 1e-2
