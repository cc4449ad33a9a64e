"""Rank-r factorizations ``A ≈ up @ down`` for the 16-bit branch."""

from __future__ import annotations

from typing import NamedTuple

import torch

# torch.svd_lowrank: q = rank + OVERSAMPLE columns, NITER power iterations. Measured on
# FLUX-width layers (benchmarks/svd_kind.py): the SVDQuant output error with these
# settings matches the float64 full SVD's (see BENCHMARKS.md).
OVERSAMPLE = 16
NITER = 2


class LowRank(NamedTuple):
    up: torch.Tensor      # [N, r] = U·√S
    down: torch.Tensor    # [r, K] = √S·Vᵀ
    basis: torch.Tensor | None  # [K, q] right singular subspace, to warm-start the next fit


def low_rank(a: torch.Tensor, rank: int, kind: str = "randomized", basis: torch.Tensor | None = None) -> LowRank:
    """Best rank-``rank`` approximation of ``a`` (``[N, K]``) as ``up [N, r] @ down [r, K]`` in fp32.

    The singular values are split evenly so both factors have moderate magnitudes in
    16 bits. ``kind="randomized"`` is deterministic (fixed seed). Passing the ``basis``
    of a previous fit of a nearby matrix (the refinement loop does) replaces the random
    start by one subspace iteration from it: two products with ``a`` instead of six.
    """
    n, k = a.shape
    r = min(rank, n, k)
    if r <= 0:
        return LowRank(a.new_zeros(n, 0, dtype=torch.float32), a.new_zeros(0, k, dtype=torch.float32), None)
    if kind == "full":
        u, s, vh = torch.linalg.svd(a.double(), full_matrices=False)
        u, s, v, basis = u[:, :r], s[:r], vh[:r].T, None
    elif kind == "randomized":
        a = a.float()
        if basis is None:
            q = min(r + OVERSAMPLE, n, k)
            devices = [a.device] if a.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(0)
                u, s, v = torch.svd_lowrank(a, q=q, niter=NITER)
        else:
            qmat = torch.linalg.qr(a @ basis).Q
            ub, s, vh = torch.linalg.svd(qmat.T @ a, full_matrices=False)
            u, v = qmat @ ub, vh.T
        basis = v
        u, s, v = u[:, :r], s[:r], v[:, :r]
    else:
        raise ValueError(f"unknown SVD kind {kind!r}; use 'randomized' or 'full'")
    sq = s.sqrt()
    return LowRank((u * sq).float(), (v * sq).T.float().contiguous(), basis)
