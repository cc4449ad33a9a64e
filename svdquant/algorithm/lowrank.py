"""Rank-r factorizations ``A ≈ up @ down`` for the 16-bit branch."""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

# Randomized SVD (Halko, Martinsson & Tropp, arXiv 0909.4061, algorithm 4.4): q = rank + OVERSAMPLE
# columns, NITER power iterations. Measured on FLUX-width layers (benchmarks/svd_kind.py): the SVDQuant
# output error with these settings matches the float64 full SVD's (see BENCHMARKS.md).
OVERSAMPLE = 16
NITER = 2


class LowRank(NamedTuple):
    up: torch.Tensor      # [N, r] = U·√S
    down: torch.Tensor    # [r, K] = √S·Vᵀ
    basis: torch.Tensor | None  # [K, q] right singular subspace, to warm-start the next fit


def _orth(y: torch.Tensor, passes: int = 2) -> torch.Tensor:
    """An orthonormal basis of the columns of the tall ``y`` ``[n, q]``, in float64.

    Cholesky QR, twice (CholeskyQR2; Fukaya et al., arXiv 1406.5913): a Gram matrix, a ``q × q``
    Cholesky factor and a triangular solve, instead of Householder QR, which on a GPU runs as hundreds of
    small kernels (the quantizer's profile: 20 % of the search's device time in ``geqr2``). The tiny
    diagonal shift keeps a rank-deficient ``y`` (a zero or low-rank weight) factorable: its null directions
    come out as finite noise columns rather than NaN, which the second pass makes orthonormal too (they then
    carry singular values ~0, which :func:`_svd_in_basis` zeroes). The power
    iterations' intermediate bases take one pass: only their span matters, which one pass keeps exactly.
    """
    q = y.double()
    eye = torch.eye(q.shape[-1], dtype=q.dtype, device=q.device)
    for _ in range(passes):
        g = q.mT @ q
        shift = g.diagonal(dim1=-2, dim2=-1).sum(-1) * 1e-15 + torch.finfo(q.dtype).tiny
        l = torch.linalg.cholesky_ex(g + shift[..., None, None] * eye).L
        # Q·L⁻ᵀ through the q × q inverse and one product: a triangular solve against the tall Q runs as
        # LAPACK's trsm, twice as slow on a CPU for these shapes (~11 % of the tiny model's search)
        q = q @ torch.linalg.solve_triangular(l, eye, upper=False).mT
    return q


@functools.lru_cache(maxsize=64)
def _start(n: int, q: int, device: torch.device) -> torch.Tensor:
    """The random start ``[n, q]``: fixed-seed Gaussian columns, drawn once per shape and device (the search
    fits the same shapes hundreds of times; forking the generator each time cost as much as the draw). Read only;
    on a GPU complete before it is returned, since groups quantized at once read it from other CUDA streams."""
    g = torch.Generator(device=device).manual_seed(0)
    start = torch.randn(n, q, device=device, generator=g)
    if start.device.type == "cuda":
        torch.cuda.current_stream(start.device).synchronize()
    return start


def _svd_in_basis(c: torch.Tensor, p: torch.Tensor):
    """SVD of ``A`` restricted to an orthonormal basis ``p`` ``[K, q]`` of its row space, from ``c = A p``:
    the eigendecomposition of the ``q × q`` Gram matrix ``cᵀc`` gives ``c = U S Wᵀ``, so
    ``A p pᵀ = U S (p W)ᵀ``. Float64, singular values descending; a null direction (S ~ 0 relative to the
    largest) gets S = 0 and a zero column in U rather than a division by zero."""
    cd = c.double()
    # q × q on the host: on a GPU, eigh is ~50 small kernel launches, more than the search's products
    lam, w = (t.to(c.device) for t in torch.linalg.eigh((cd.mT @ cd).cpu()))
    lam, w = lam.flip(-1).clamp_min(0), w.flip(-1)
    s = lam.sqrt()
    keep = s > s[..., :1] * 1e-12
    s = torch.where(keep, s, torch.zeros_like(s))
    u = (cd @ w) * torch.where(keep, 1.0 / torch.where(keep, s, torch.ones_like(s)), torch.zeros_like(s))[..., None, :]
    return u, s, p @ w


def low_rank(a: torch.Tensor, rank: int, kind: str = "randomized", basis: torch.Tensor | None = None) -> LowRank:
    """Best rank-``rank`` approximation of ``a`` (``[N, K]``, or a batch ``[B, N, K]``: each matrix on its own)
    as ``up [N, r] @ down [r, K]`` in fp32.

    The singular values are split evenly so both factors have moderate magnitudes in
    16 bits. ``kind="randomized"`` is deterministic (fixed seed) and works on the right singular
    subspace (``[K, q]``), as ``torch.svd_lowrank`` does for these shapes; its products with ``a`` run in
    fp32 and everything ``q × q`` in float64. Passing the ``basis`` of a previous fit of a nearby matrix
    (the refinement loop does) replaces the random start and the power iterations by one subspace
    iteration from it: two products with ``a`` instead of six.
    """
    *batch, n, k = a.shape
    r = min(rank, n, k)
    if r <= 0:
        return LowRank(a.new_zeros(*batch, n, 0, dtype=torch.float32), a.new_zeros(*batch, 0, k, dtype=torch.float32),
                       None)
    if kind == "full":
        u, s, vh = torch.linalg.svd(a.double(), full_matrices=False)
        u, s, v = u[..., :r], s[..., :r], vh[..., :r, :].mT
        sq = s.sqrt()[..., None, :]
        return LowRank((u * sq).float(), (v * sq).mT.float().contiguous(), None)
    if kind != "randomized":
        raise ValueError(f"unknown SVD kind {kind!r}; use 'randomized' or 'full'")
    a = a.float()
    q = min(r + OVERSAMPLE, n, k)
    if basis is None:
        p = _orth(a.mT @ _start(n, q, a.device), passes=1)
        for i in range(NITER):
            p = _orth(a.mT @ _orth(a @ p.float(), passes=1).float(), passes=2 if i == NITER - 1 else 1)
        u, s, v = _svd_in_basis(a @ p.float(), p)
    else:  # one subspace iteration, ending on the column side: Aᵀ restricted to the basis Q of A·basis
        cols = _orth(a @ basis[..., :q].float())
        v, s, u = _svd_in_basis(a.mT @ cols.float(), cols)
    sq = s[..., None, :r].sqrt()
    return LowRank((u[..., :r] * sq).float(), (v[..., :r] * sq).mT.float().contiguous(), v.float())
