"""The CPU path (issue 27): quantized layers through ``CpuRunner``, exact INT8 sums in float32, the faster
rounding rules, the coarse-to-fine smoothing search and the allocator setting of the command line.

Every speed-up here keeps the numbers: each test compares against the rule or the reference it replaces, on
known answers or fresh random inputs. Wall time is not tested (BENCHMARKS.md, "The demo on a 2-core CPU");
how much work the search does is (candidates scored per group)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from svdquant.algorithm import layer as layer_mod
from svdquant.algorithm.search import COARSE_STRIDE, families, search
from svdquant.formats import get_format
from svdquant.formats.nvfp4 import round_to_e2m1_values
from svdquant.modules import SVDQLinear
from svdquant.ops import reference
from svdquant.ops.runners import CpuRunner, ReferenceRunner
from svdquant.recipes import default_smooth_grid, get_recipe


# ------------------------------------------------------------------------------------------------ INT8 sums
@pytest.mark.parametrize("m, k, n", [(33, 3072, 40), (5, 1024, 7), (64, 1100, 24), (1, 1, 1), (3, 0, 4)])
def test_int8_dot_is_exact_on_the_cpu(m, k, n):
    g = torch.Generator().manual_seed(k)
    a = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=g)
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    exact = (a.long() @ w.long().T).int()
    assert torch.equal(reference.int8_dot(a, w), exact)
    assert torch.equal(reference.int8_dot_float(a, w), exact.float())
    assert torch.equal(reference.int8_dot_float(a.float(), w), exact.float())  # codes held as floats


def test_int8_dot_worst_case_magnitudes():
    """All products at ±127·127 (±128 too): a chunk's sum reaches 2^24 exactly and must not round."""
    for k in (reference.EXACT_FLOAT_K, 3 * reference.EXACT_FLOAT_K + 5):
        for v in (127, -128):
            a = torch.full((2, k), v, dtype=torch.int8)
            w = torch.full((3, k), -128, dtype=torch.int8)
            assert torch.equal(reference.int8_dot(a, w), (a.long() @ w.long().T).int())


# ------------------------------------------------------------------------------------------------ the runner
RECIPES = ["int4", "w4a4", "nvfp4", "w8a8"]


def _layer(recipe, k, n, post_gelu, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(k, n).to(dtype)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=g) * k ** -0.5)
    x = torch.randn(200, k, generator=g).to(dtype)
    if post_gelu:
        x = F.gelu(x, approximate="tanh")
    return SVDQLinear.from_linear(lin, x[:96], get_recipe(recipe, iterations=2), post_gelu=post_gelu), x


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("k, n", [(128, 48), (100, 40), (1100, 32)])
@pytest.mark.parametrize("post_gelu", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_runner_computes_the_reference(recipe, k, n, post_gelu, dtype):
    """Same numbers as the torch reference: the quantization and the product are exact; only the BLAS's order of
    adding the branch into the product may move the last bit of fp32 (bound: a few ulps of the output)."""
    if recipe == "nvfp4" and k % 16:
        pytest.skip("NVFP4 groups of 16")
    m, x = _layer(recipe, k, n, post_gelu, dtype)
    assert isinstance(m._runner, CpuRunner)
    y, ref = m(x), ReferenceRunner(m)(x)
    assert y.dtype == ref.dtype == dtype
    scale = ref.float().abs().amax().item()
    torch.testing.assert_close(y.float(), ref.float(), rtol=0, atol=4 * scale * 2.0 ** -23 if dtype == torch.float32
                               else scale * 2.0 ** -7)


def test_runners_by_format_on_the_cpu():
    assert isinstance(_layer("int4", 64, 16, False, torch.float32)[0]._runner, CpuRunner)
    assert isinstance(_layer("w4a4-float", 64, 16, False, torch.float32)[0]._runner, ReferenceRunner)
    assert not isinstance(_layer("w4a4-float", 64, 16, False, torch.float32)[0]._runner, CpuRunner)


def test_cpu_layer_reads_buffers_written_by_hand():
    """The unpacked weight is kept between calls, but a buffer written since (by hand, without refresh()) is read."""
    m, x = _layer("int4", 128, 32, False, torch.float32)
    before = m(x)
    with torch.no_grad():
        m.wscales.mul_(2.0)
    after = m(x)
    assert not torch.equal(before, after)
    torch.testing.assert_close(after, ReferenceRunner(m)(x), rtol=1e-6, atol=1e-5)


def test_memory_mode_keeps_no_weight_on_the_cpu():
    m, x = _layer("int4", 128, 32, False, torch.float32)
    m(x)
    assert m._runner._weight is not None
    m.set_weight_mode("memory")
    m(x)
    assert m._runner._weight is None


def test_format_operand_equals_codes_read_back():
    """Format.operand: the values quantize() + integer_operand / grouped values give, without building codes."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 192, generator=g)
    x[0] = 0
    for name, group, kw in (("int8", 0, {}), ("int4m", 64, {}), ("int4m", 64, {"unsigned": 64}),
                            ("nvfp4", 16, {"tensor_scale": torch.tensor(0.01)})):
        f = get_format(name)
        vals, row, ts = f.operand(x, group, **kw)
        q = f.quantize(x, group, **kw, check=False)
        if f.integer:
            ref_vals, ref_row = f.integer_operand(q)
            assert torch.equal(vals, ref_vals.float()) and torch.equal(row.squeeze(-1), ref_row)
        else:
            assert torch.equal(vals, reference._grouped_values(q)) and torch.equal(ts, q.tensor_scale)
    assert get_format("int4").operand(x, 64) is None and not get_format("int4").has_operand


# ------------------------------------------------------------------------------------------------ rounding rules
def _e2m1_by_comparisons(v):
    mag = v.abs()
    step = torch.where(mag < 2, 0.5, torch.where(mag < 4, 1.0, 2.0))
    return (mag / step).round_().mul_(step).clamp_(max=6.0).copysign_(v)


def test_e2m1_rounding_equals_the_comparison_rule():
    """The step from log2 equals the stretch rule on every float near the stretch boundaries, on a dense sweep of
    [0, 8] and on random values of every magnitude."""
    edges = torch.tensor([0.25, 0.5, 0.75, 1.0, 1.25, 1.75, 2.0, 2.5, 3.5, 4.0, 5.0, 6.0, 7.0, 8.0])
    near = torch.stack([edges.nextafter(torch.tensor(0.0)), edges, edges.nextafter(torch.tensor(9.0))]).flatten()
    sweep = torch.arange(0, 0x41000000, 997, dtype=torch.int32).view(torch.float32)  # every 997th float in [0, 8)
    g = torch.Generator().manual_seed(0)
    rand = torch.cat([torch.randn(4096, generator=g) * s for s in (1e-30, 1e-3, 1.0, 3.0, 1e3, 1e30)])
    v = torch.cat([near, -near, sweep, rand, torch.tensor([0.0, -0.0, math.inf, -math.inf])])
    got, want = round_to_e2m1_values(v.clone()), _e2m1_by_comparisons(v.clone())
    assert torch.equal(got, want) and torch.equal(got.signbit(), want.signbit())


def test_int4m_fast_paths_match_quantize_dequantize():
    """fake_quantize_int4m (the search's rounding) is dequantize(quantize()) exactly, signed and unsigned, best and
    nearest multipliers, zero groups and rows."""
    from svdquant.formats.int4m import dequantize_int4m, fake_quantize_int4m, quantize_int4m

    g = torch.Generator().manual_seed(2)
    for unsigned in (False, True, 64):
        for best in (False, True):
            x = torch.randn(9, 200, generator=g) * 3
            x[0], x[1, :64] = 0, 0
            if unsigned is not False:
                x = x - 0.1
            q = quantize_int4m(x, 64, unsigned=unsigned, best=best)
            assert torch.equal(fake_quantize_int4m(x, 64, unsigned=unsigned, best=best), dequantize_int4m(q))


# ------------------------------------------------------------------------------------------------ the search
def test_default_grid_is_two_families():
    fams = families([a for a, _ in default_smooth_grid()])
    assert [len(f) for f in fams] == [20, 19]  # identity + (α, 0), then (α, 1 − α)
    assert families([0.0, 0.3, 0.2, 0.5, 0.5]) == [[0, 1], [2, 3], [4]]


def _scored(alphas, f, how):
    calls = []

    def score(idx):
        calls.append(list(idx))
        return [f(i) for i in idx]

    return search(alphas, score, how), calls


@pytest.mark.parametrize("minimum", range(20))
def test_coarse_to_fine_finds_the_minimum_of_a_unimodal_family(minimum):
    alphas = [0.05 * i for i in range(20)]
    errs, calls = _scored(alphas, lambda i: (i - minimum) ** 2 + 1.0, "coarse-to-fine")
    assert min(errs, key=lambda i: (errs[i], i)) == minimum
    assert len(errs) <= 10 and len(calls) == 3  # three rounds: coarse, distance 2, distance 1


def test_full_search_scores_every_candidate_once_in_one_round():
    errs, calls = _scored([0.0, 0.5, 0.25, 0.75], lambda i: 1.0, "full")
    assert calls == [[0, 1, 2, 3]] and set(errs) == {0, 1, 2, 3}


def test_short_families_are_scored_whole():
    alphas = [0.1 * i for i in range(2 * COARSE_STRIDE + 1)]
    errs, _ = _scored(alphas, lambda i: float(i), "coarse-to-fine")
    assert set(errs) == set(range(len(alphas)))


def test_unknown_search_is_refused():
    with pytest.raises(ValueError, match="smooth_search='grid' is unknown"):
        get_recipe("int4", smooth_search="grid")


def test_layer_search_scores_about_half_the_grid(monkeypatch):
    """The guard on the search's work: with the default 39-candidate grid a layer scores at most 21 (both
    families: 6 coarse + 2 + 2 each, the identity included), and "full" scores all 39."""
    counted = []
    real = layer_mod.candidate_smoothing

    def spy(*a, **kw):
        out = real(*a, **kw)
        counted.append(len(out))
        return out

    fits = []
    real_errors = layer_mod._Problem.errors

    def count_errors(self, *a):
        e = real_errors(self, *a)
        fits.append(e.numel())
        return e

    monkeypatch.setattr(layer_mod, "candidate_smoothing", spy)
    monkeypatch.setattr(layer_mod._Problem, "errors", count_errors)
    m, x = _layer("int4", 128, 32, False, torch.float32)
    w = torch.randn(32, 128)
    fits.clear()
    layer_mod.quantize_linears([w], [None], x, get_recipe("int4", iterations=0, gptq=False))
    assert counted[-1] == 39 and len(fits) - 1 <= 21  # - 1: the naive error of the setup
    fits.clear()
    layer_mod.quantize_linears([w], [None], x, get_recipe("int4", iterations=0, smooth_search="full", gptq=False))
    assert len(fits) - 1 == 39


# ------------------------------------------------------------------------------------------------ allocator
def test_keep_freed_memory_on_glibc():
    import platform

    from svdquant._cpu import keep_freed_memory

    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert keep_freed_memory() is True
    else:
        assert keep_freed_memory() is False


def test_contention_probe_and_thread_guard():
    """One thread needs no probe; the guard restores the thread count whatever the probe said."""
    from svdquant._cpu import contended, single_thread_if_contended

    assert contended(1) is False
    before = torch.get_num_threads()
    with single_thread_if_contended() as g:
        assert torch.get_num_threads() == (1 if g.single else before)
    assert torch.get_num_threads() == before


def test_calibration_defaults_come_from_the_pipeline():
    """steps / snapshots left None: the tiny model's own (4, 16), else 8 and 128; given values are kept."""
    from svdquant.calibration import Calibration
    from svdquant.pipelines import TinyFluxPipeline

    tiny = TinyFluxPipeline.random()
    c = Calibration().for_pipeline(tiny)
    assert (c.steps, c.snapshots) == (4, 16) and c.prompts == list(tiny.classes)
    assert (Calibration().for_pipeline(None).steps, Calibration().for_pipeline(None).snapshots) == (8, 128)
    assert Calibration(steps=2, snapshots=5).for_pipeline(tiny).snapshots == 5
