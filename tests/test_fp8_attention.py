"""The torch reference of FP8 attention (:mod:`svdquant.ops.fp8_attention`): known E4M3 roundings, its error
against fp32 attention on fresh random inputs (a token count that is no multiple of the block), and what K
smoothing buys. (Finer Q / K / V scales barely move the error on such inputs: E4M3 is a float, and the
probabilities and the output, one scale each, set most of it.)"""

from __future__ import annotations

import pytest
import torch

from svdquant.ops.fp8_attention import BLOCK, e4m3, fp8_sdpa_reference


def sdpa(q, k, v):
    return torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float())


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def inputs(seed, b=1, h=4, s=300, d=64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, s, d, generator=g) for _ in range(3)]


def test_e4m3_known_roundings():
    # scale 1 (amax 448): E4M3 steps are 0.25 in [2, 4), 32 in [256, 448]; ties to even
    x = torch.tensor([448.0, 1.0, 0.5, -2.0, 3.3, 3.375, 300.0, 0.0])
    assert e4m3(x, (0,)).tolist() == [448.0, 1.0, 0.5, -2.0, 3.25, 3.5, 288.0, 0.0]
    # one scale per row: the second row's amax 4.48 makes its scale 0.01
    y = torch.tensor([[448.0, 1.0], [4.48, 0.033]])
    out = e4m3(y, (1,))
    assert out[0].tolist() == [448.0, 1.0] and out[1, 0].item() == pytest.approx(4.48)
    assert out[1, 1].item() == pytest.approx(3.25 * 0.01)


@pytest.mark.parametrize("granularity,bound", [("tensor", 0.08), ("head", 0.08), ("block", 0.08)])
@pytest.mark.parametrize("seed", [0, 1])
def test_close_to_fp32_attention_on_random_inputs(granularity, bound, seed):
    q, k, v = inputs(seed)
    out = fp8_sdpa_reference(q, k, v, granularity=granularity)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert 0 < rel(out, sdpa(q, k, v)) < bound


def test_smoothing_k_removes_a_shared_offset():
    """Keys with a large offset common to all tokens (a bias in the K projection): the scores move by a constant
    per query, which softmax ignores; unsmoothed, the offset sets K's scale and the rest rounds away."""
    q, k, v = inputs(2)
    k = k + 40.0 * torch.randn(1, 4, 1, 64, generator=torch.Generator().manual_seed(3))
    ref = sdpa(q, k, v)
    smooth = rel(fp8_sdpa_reference(q, k, v, granularity="head", smooth_k=True), ref)
    raw = rel(fp8_sdpa_reference(q, k, v, granularity="head", smooth_k=False), ref)
    assert smooth < 0.08 and raw > 2 * smooth, (smooth, raw)


def test_errors():
    q, k, v = inputs(0)
    with pytest.raises(ValueError, match=r"^granularity='row' is unknown; choose one of \('tensor', 'head', 'block'\)$"):
        fp8_sdpa_reference(q, k, v, granularity="row")
    with pytest.raises(ValueError, match=r"^q, k, v must be \[batch, heads, tokens, head_dim\], got \(300, 64\)"):
        fp8_sdpa_reference(q[0, 0], k, v)


def test_quality_benchmark_quick(tmp_path):
    """benchmarks/fp8_attention_quality.py on the shipped tiny FLUX: the exact row reproduces the 16-bit images,
    the FP8 row differs from them, and the JSON is written."""
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import fp8_attention_quality

    original = torch.nn.functional.scaled_dot_product_attention
    res = fp8_attention_quality.main(["--quick", "--models", "16-bit", "--out", str(tmp_path)])
    rows = {r["attention"]: r["psnr_db"] for r in res["rows"]}
    assert rows["exact"] == 100.0 and 20.0 < rows["fp8 tensor"] < 100.0, rows
    assert json.loads((tmp_path / "fp8_attention_quality.json").read_text())["rows"] == res["rows"]
    assert torch.nn.functional.scaled_dot_product_attention is original  # restored


def test_int8_qk_known_roundings_and_finer_scores():
    """INT8 Q / K (SageAttention2's split): 127 steps per scale; with P, V and the output unrounded, its scores
    are far closer than E4M3's 3-bit mantissa gives."""
    from svdquant.ops.fp8_attention import int8

    assert int8(torch.tensor([127.0, 1.4, -0.5, 63.5]), (0,)).tolist() == [127.0, 1.0, -0.0, 64.0]
    q, k, v = inputs(6)
    ref = sdpa(q, k, v)
    kw = dict(granularity="block", fp8_probabilities=False, fp8_output=False, fp8_v=False)
    err_int8 = rel(fp8_sdpa_reference(q, k, v, int8_qk=True, **kw), ref)
    err_e4m3 = rel(fp8_sdpa_reference(q, k, v, int8_qk=False, **kw), ref)
    assert err_int8 < 0.5 * err_e4m3 and err_int8 < 0.02, (err_int8, err_e4m3)  # measured 0.013 vs 0.039
