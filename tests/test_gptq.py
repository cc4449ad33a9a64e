"""GPTQ on the residual (svdquant/algorithm/gptq.py): the formats' rounding grids, a hand-computed answer, the blocked
update against the textbook loop, the gain over rounding to nearest, and the recipe option end to end."""

import weakref

import pytest
import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from svdquant.algorithm import gptq as G
from svdquant.algorithm.layer import quantize_linears
from svdquant.formats import get_format, quantize
from svdquant.recipes import get_recipe

FORMATS = [("int4", 64), ("int4m", 64), ("nvfp4", 16), ("nf4", 64)]


def _rtn_on_grid(q, w):
    f, values, codes = get_format(q.fmt).weight_grid(q)
    u = torch.nn.functional.pad(w, (0, f.shape[1] - w.shape[1])) / f
    idx = torch.bucketize(u, (values[1:] + values[:-1]) / 2)
    return codes[idx], (f * values[idx])[:, : w.shape[1]]


@pytest.mark.parametrize("fmt,group", FORMATS)
def test_grid_rounds_to_nearest_as_the_format_does(fmt, group):
    w = torch.randn(16, 100, generator=torch.Generator().manual_seed(1))
    q = quantize(w, fmt, group, weight=True)
    codes, values = _rtn_on_grid(q, w)
    assert torch.equal(codes, q.codes)
    assert torch.allclose(values, q.dequantize(), rtol=0, atol=1e-6)


def test_formats_without_a_grid_say_so():
    q = quantize(torch.randn(4, 8), "int8", 0, weight=True)
    with pytest.raises(ValueError, match="no rounding grid"):
        get_format("int8").weight_grid(q)


def test_hand_computed_answer():
    # columns 1 and 2 are 0.99 correlated. Column 1 rounds 3.6 -> 4 (error -0.04 in units of the 0.1 scale); GPTQ
    # moves column 2 by -0.04 · H⁻¹₁₂ / H⁻¹₁₁ = -0.04 · 0.99 / 1.01 (damping adds 0.01 · mean diag), 0.56 -> 0.5208,
    # which rounds to 5 where round to nearest gives 6.
    w = torch.tensor([[0.7, 0.36, 0.56, 0.0]])
    h = torch.eye(4)
    h[1, 2] = h[2, 1] = 0.99
    q0 = quantize(w, "int4", 4, weight=True)
    assert q0.codes.tolist() == [[7, 4, 6, 0]]
    assert G.gptq(w, h, q0).codes.tolist() == [[7, 4, 5, 0]]


def test_diagonal_hessian_is_round_to_nearest():
    w = torch.randn(32, 192)
    q0 = quantize(w, "int4m", 64, weight=True)
    assert torch.equal(G.gptq(w, torch.diag(torch.rand(192) + 0.5), q0).codes, q0.codes)


def _textbook(w, h, q0, damp=0.01):
    """GPTQ as the paper's algorithm 1 without lazy batches: every column's error reaches all later columns at once."""
    f, values, codes = get_format(q0.fmt).weight_grid(q0)
    k = w.shape[1]
    order = torch.argsort(h.diagonal(), descending=True, stable=True)
    w, f, h = w[:, order].clone(), f[:, :k][:, order], h[order][:, order]
    h = h + damp * h.diagonal().mean() * torch.eye(k)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    mids = (values[1:] + values[:-1]) / 2
    out = q0.codes.clone()
    for j in range(k):
        i = torch.bucketize(w[:, j] / f[:, j], mids)
        e = (w[:, j] - f[:, j] * values[i]) / u[j, j]
        w[:, j:] -= e[:, None] * u[j, j:][None]
        out[:, order[j]] = codes[i]
    return out


def test_blocked_update_matches_the_textbook_loop(monkeypatch):
    monkeypatch.setattr(G, "BLOCK", 5)  # several blocks and a ragged last one
    g = torch.Generator().manual_seed(2)
    x = torch.randn(300, 64, generator=g) @ (torch.eye(64) + 0.4 * torch.randn(64, 64, generator=g))
    w = torch.randn(24, 64, generator=g)
    h = G.hessian(x.double()).float()
    q0 = quantize(w, "int4", 16, weight=True)
    got = G.gptq(w, h, q0).codes
    assert (got == _textbook(w, h, q0)).float().mean() > 0.99  # fp32 summation order may flip a rare tie


@pytest.mark.parametrize("fmt,group", FORMATS)
def test_gptq_lowers_the_output_error(fmt, group):
    g = torch.Generator().manual_seed(3)
    k = 128
    x = torch.randn(512, k, generator=g) @ (torch.eye(k) + 0.3 * torch.randn(k, k, generator=g))
    w = torch.randn(48, k, generator=g)
    q0 = quantize(w, fmt, group, weight=True)
    q = G.gptq(w, G.hessian(x), q0)
    assert q.scales is q0.scales  # static scales: only the codes move
    err = [float((x @ (w - t.dequantize()).T).norm()) for t in (q0, q)]
    assert err[1] < err[0] * 10 ** (-1 / 20), err  # at least 1 dB better on the inputs it saw


def test_recipe_option_end_to_end():
    g = torch.Generator().manual_seed(4)
    k = 128
    x = torch.randn(1024, k, generator=g) @ (torch.eye(k) + 0.3 * torch.randn(k, k, generator=g))
    x[:, 3] *= 20  # an outlier channel for the smoothing
    w = [torch.randn(64, k, generator=g) / k**0.5, torch.randn(32, k, generator=g) / k**0.5]
    base = get_recipe("w4a4", iterations=2, gptq=False)
    (a, _), rep_rtn = quantize_linears(w, [None, None], x, base)
    (b, _), rep = quantize_linears(w, [None, None], x, base.replace(gptq=True))
    assert rep_rtn.rel_error == rep_rtn.rel_error_rtn
    assert rep.rel_error_rtn == pytest.approx(rep_rtn.rel_error)  # the same λ and branch before the rounding
    assert rep.rel_error < rep.rel_error_rtn
    assert "gptq" in rep.stages
    assert torch.equal(a.weight.scales, b.weight.scales) and torch.equal(a.lora_up, b.lora_up)
    assert not torch.equal(a.weight.codes, b.weight.codes)


def test_recipe_checks():
    with pytest.raises(ValueError, match="gptq=True needs weights GPTQ can round"):
        get_recipe("w8a8", gptq=True)
    with pytest.raises(ValueError, match="gptq_damp must be in"):
        get_recipe("int4", gptq_damp=0.0)
    from svdquant.algorithm.weight_only import quantize_weight_only

    with pytest.raises(ValueError, match="needs calibration inputs"):
        quantize_weight_only(torch.randn(8, 64), None, get_recipe("nf4", gptq=True))


# ------------------------------------------------------------------------------ the Triton block kernel
CUDA = torch.cuda.is_available()


def _block_inputs(n, b, fmt, group, seed, device):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, b, generator=g)
    x = torch.randn(4 * b, b, generator=g) @ (torch.eye(b) + 0.3 * torch.randn(b, b, generator=g))
    q0 = quantize(w, fmt, group, weight=True)
    f, values, _ = get_format(fmt).weight_grid(q0)
    h = G.hessian(x) + 0.01 * torch.eye(b) * G.hessian(x).diagonal().mean()
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    mids = (values[1:] + values[:-1]) / 2
    return [t.to(device) for t in (w, f[:, :b].contiguous(), u, values, mids)]


def _check_block(n, b, fmt, group, device):
    import os

    seed = int.from_bytes(os.urandom(2), "little")
    K = pytest.importorskip("svdquant.kernels")
    args = _block_inputs(n, b, fmt, group, seed, device)
    idx, err = K.gptq_round_block(*args)
    want_idx, want_err = G._round_block(*args)
    # every product rounded on its own, IEEE divisions: the same numbers as torch
    assert idx.dtype == torch.int32 and torch.equal(idx.long(), want_idx), f"seed {seed}: {(idx != want_idx).sum()} of {idx.numel()} differ"
    torch.testing.assert_close(err, want_err, rtol=0, atol=0, msg=f"seed {seed}")


@pytest.mark.skipif(CUDA or __import__("os").environ.get("TRITON_INTERPRET") != "1",
                    reason="interpreter tests run on CPU machines")
@pytest.mark.parametrize("n,b,fmt,group", [(20, 16, "int4m", 16), (9, 24, "nvfp4", 16), (33, 7, "nf4", 64)])
def test_block_kernel_is_the_reference(n, b, fmt, group):
    _check_block(n, b, fmt, group, "cpu")


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.gpu
@pytest.mark.parametrize("n,fmt,group", [(3072, "int4m", 64), (9216, "int4m", 64), (3072, "nvfp4", 16)])
def test_gpu_block_kernel_at_flux_shapes(n, fmt, group):
    _check_block(n, 128, fmt, group, "cuda")


def test_a_recipe_written_before_gptq_reads_as_rounded_to_nearest():
    from svdquant.recipes import QuantConfig

    d = get_recipe("int4").to_dict()
    assert d["gptq"] is True and QuantConfig.from_dict(d).gptq is True
    del d["gptq"]
    assert QuantConfig.from_dict(d).gptq is False


def test_a_channel_without_input_is_zeroed():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(256, 64, generator=g)
    x[:, 5] = 0
    w = torch.randn(16, 64, generator=g)
    q = G.gptq(w, G.hessian(x), quantize(w, "int4", 16, weight=True))
    assert (q.codes[:, 5] == 0).all() and (q.codes[:, 4] != 0).any()


@pytest.mark.parametrize("fmt,group", [("int4m", 64), ("nvfp4", 16)])
def test_a_groups_members_rounded_together_are_each_rounded_alone(fmt, group):
    """q / k / v share one Hessian: one pass over their stacked rows gives each member's own GPTQ codes (NVFP4:
    each member keeps its own tensor scale)."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(640, 320, generator=g) * (torch.rand(320, generator=g) * 3 + 0.2)
    ws = [torch.randn(n, 320, generator=g) * s for n, s in ((24, 1.0), (16, 5.0), (40, 0.3))]
    q0s = [quantize(w, fmt, group, weight=True) for w in ws]
    h = G.hessian(x)
    together = G.gptq_members(ws, h, q0s)
    for w, q0, got in zip(ws, q0s, together):
        alone = G.gptq(w, h, q0)
        assert torch.equal(got.codes, alone.codes) and got.scales is q0.scales
        assert got.tensor_scale is q0.tensor_scale


def test_the_triangular_inverse_by_halves_is_the_solves(monkeypatch):
    """Past INVERSE_BASE rows the inverse factor's triangular inverse is built from products of halves (odd sizes
    too): the same matrix as one triangular solve, to fp32 rounding, lower triangular."""
    monkeypatch.setattr(G, "INVERSE_BASE", 16)
    g = torch.Generator().manual_seed(3)
    for n in (16, 17, 75):
        x = torch.randn(2 * n, n, generator=g) * (torch.rand(n, generator=g) * 3 + 0.1)
        l = torch.linalg.cholesky(x.T @ x + 0.1 * torch.eye(n))
        got = G._lower_inverse(l)
        want = torch.linalg.solve_triangular(l.double(), torch.eye(n, dtype=torch.float64), upper=False)
        assert float((got.double() - want).norm() / want.norm()) < 1e-5
        assert torch.equal(got, got.tril())


class _LiveBytes(TorchDispatchMode):
    """The peak bytes of the tensors that operators made inside the mode and that were still referenced (each
    storage once, let go when the tensor that made it is)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.owned: set[int] = set()

    def _free(self, key, n):
        if key in self.owned:
            self.owned.discard(key)
            self.live -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in pytree.tree_leaves(out):
            if torch.is_tensor(t):
                key, n = t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()
                if key not in self.owned and n:
                    self.owned.add(key)
                    self.live += n
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(t, self._free, key, n)
        return out


def test_gptq_holds_about_three_hessian_sized_matrices_at_its_peak(monkeypatch):
    """The scaled, permuted Hessian, its flipped copy, the Cholesky factor and the inverse by halves are each let go
    once the next is made, and the inputs' scaling is applied in the permuted copy: ~3 K × K fp32 matrices at the
    peak beside the caller's XᵀX (6 when every one was held to the end: a 16 GB cap ran out of memory at FLUX's
    K = 15,360 with three groups at once). The result is the scaled Hessian's, bit for bit."""
    monkeypatch.setattr(G, "INVERSE_BASE", 256)  # the inverse by halves, as at FLUX's sizes
    k, n = 1024, 32
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2 * k, k, generator=g) * (torch.rand(k, generator=g) + 0.2)
    xtx, w, inv = x.T @ x, torch.randn(n, k, generator=g), 1 / (torch.rand(k, generator=g) + 0.5)
    q0 = quantize(w, "int4", 64, scale_dtype=torch.bfloat16, weight=True, check=False)
    with _LiveBytes() as live:
        got = G.gptq_members([w], xtx, [q0], scale=inv)[0]
    assert live.peak < 3.5 * 4 * k * k, live.peak / (4 * k * k)
    want = G.gptq(w, xtx * inv[:, None] * inv[None, :], q0)
    assert torch.equal(got.codes, want.codes)
