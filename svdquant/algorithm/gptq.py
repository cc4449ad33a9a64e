"""GPTQ on the residual: round a weight column by column, each column's rounding error spread onto the columns not
yet rounded, weighted by the inverse Hessian of the layer's inputs (Frantar et al., arXiv 2210.17323).

SVDQuant rounds its residual ``R`` to nearest; the low-rank branch has already taken the outliers, so what is left is
the plain rounding problem GPTQ solves: minimize ``‖X̂ (R − Q(R))ᵀ‖²`` over the calibration inputs ``X̂`` (the
smoothed inputs ``X / λ``, which is what the residual multiplies). The SVDQuant authors report that GPTQ on the
residual lifts FLUX.1-dev W4A4 from 20.1 to 21.0 dB PSNR (arXiv 2411.05007, appendix; NVFP4: 21.5 dB).

The choices, as in the reference implementation and AutoGPTQ:

* damping: ``H + d · mean(diag H) · I`` with ``d`` = ``QuantConfig.gptq_damp`` (0.01), so a rank-deficient ``H``
  (fewer tokens than channels) is still invertible; a channel that never carries input (``H_jj = 0``) is zeroed;
* act-order: columns in descending ``H_jj``, the ones that matter most rounded first, while most columns are still
  free to absorb their error;
* static scales: the group scales are the round-to-nearest ones of ``R``, fixed before the first column (with
  act-order a group's columns are not contiguous in rounding order; the format's scales stay per contiguous
  group, which is what the kernels read). Each element is then rounded to the nearest value the format can hold
  under its group's scale (:meth:`svdquant.formats.Format.weight_grid`), so the codes stay valid.
* the lazy-batch update: columns in blocks of ``BLOCK``; inside a block one column at a time, and the block's errors
  reach the later columns in one matrix product.
"""

from __future__ import annotations

import torch

from .._env import use_reference
from ..formats import QTensor, get_format

BLOCK = 128
# The GPU kernel keeps its block in registers and pays O(block) work per element to walk it: 64 columns measured
# fastest at FLUX shapes (benchmarks/gptq_speed.py; 32 and 128 take 1.1-1.5x as long).
KERNEL_BLOCK = 64
# the inverse factor's triangular inverse below this size is one triangular solve (FLUX's K = 3,072 a split in two)
INVERSE_BASE = 2048


def hessian(x: torch.Tensor) -> torch.Tensor:
    """``Xᵀ X`` ``[K, K]`` fp32 of inputs ``[T, K]`` (the factor 2 of the squared error does not change the solution)."""
    x = x.float()
    return x.mT @ x


def _inverse_factor(hs: list[torch.Tensor], damp: float) -> torch.Tensor:
    """The upper Cholesky factor ``U`` of ``(H + damping)⁻¹`` (``UᵀU = H⁻¹``): its row ``j`` is what column ``j``'s
    error is spread with. From one Cholesky factorization and one triangular inverse, instead of the reference
    implementation's three cubic steps (factor, invert, factor again): with ``J`` the reversal permutation and
    ``J H J = L Lᵀ``, ``H⁻¹ = (J L⁻¹ J)ᵀ (J L⁻¹ J)`` and ``J L⁻¹ J`` is upper triangular with a positive diagonal.

    ``hs``: ``[H]``, taken out of the list so that each K × K matrix is let go as soon as the next is made: about
    three are held at the peak besides the caller's XᵀX (a FLUX.1-dev K = 15,360 group: 0.94 GB each). Holding
    every one to the end, six were, which ran a 16 GB cap out of memory with three groups at once (NOTES-GPU.md,
    session 26)."""
    h = hs.pop()
    mean = h.diagonal().mean().clamp_min(1e-12)
    hr = h.flip(0, 1)  # a copy, damped in place
    del h
    added = 0.0
    for extra in (0.0, 1e-4, 1e-2, 1.0):  # an ill-conditioned H: more damping until the factor exists
        hr.diagonal().add_((damp + extra - added) * mean)
        added = damp + extra
        l, info = torch.linalg.cholesky_ex(hr)
        if int(info) == 0:
            break
    else:
        raise ValueError("GPTQ: the calibration inputs' Hessian is not positive definite even with damping; "
                         "raise QuantConfig.gptq_damp or turn gptq off")
    del hr
    inv = _lower_inverse(l)
    del l
    return inv.flip(0, 1)


def _lower_inverse(l: torch.Tensor) -> torch.Tensor:
    """``L⁻¹`` of a lower-triangular ``l``, by halves: ``[[A, 0], [B, C]]⁻¹ = [[A⁻¹, 0], [−C⁻¹·B·A⁻¹, C⁻¹]]``, so
    beyond :data:`INVERSE_BASE` rows the work is matrix products (2n³/3 flops) where a triangular solve against
    the identity takes n³ and ignores that its right-hand side is triangular. The relative error matches the
    solve's (fp32 against a float64 inverse, K = 3,000 and 6,144: 1.2e-7 / 1.3e-7 against 1.1e-7)."""
    n = l.shape[0]
    if n <= INVERSE_BASE:
        return torch.linalg.solve_triangular(l, torch.eye(n, dtype=l.dtype, device=l.device), upper=False)
    h = n // 2
    out = torch.zeros_like(l)
    a_inv, c_inv = _lower_inverse(l[:h, :h]), _lower_inverse(l[h:, h:])
    out[:h, :h], out[h:, h:] = a_inv, c_inv
    out[h:, :h] = (c_inv @ (l[h:, :h] @ a_inv)).neg_()
    return out


def _round_block(w: torch.Tensor, f: torch.Tensor, u: torch.Tensor, values: torch.Tensor, mids: torch.Tensor):
    """Round the columns of one block in order: ``w``, ``f`` ``[N, B]`` (weights, grid factors), ``u`` ``[B, B]`` the
    block of the inverse factor. Returns (grid indices ``[N, B]``, errors ``[N, B]`` scaled by ``1/u_jj``).

    The block is walked transposed, so each column is a contiguous row, and the nearest grid value is found by
    counting the midpoints below (what ``torch.bucketize`` returns, 10x faster at these sizes on a CPU)."""
    wt, ft = w.T.contiguous(), f.T.contiguous()
    idx = torch.empty(wt.shape, dtype=torch.long, device=w.device)
    err = torch.empty_like(wt)
    for j in range(wt.shape[0]):
        col, fj = wt[j], ft[j]
        x = torch.where(fj > 0, col / fj.clamp_min(1e-30), torch.zeros_like(col))
        i = (x[:, None] > mids).sum(-1)
        e = (col - fj * values[i]) / u[j, j]
        wt[j:] -= u[j, j:, None] * e[None, :]
        idx[j], err[j] = i, e
    return idx.T, err.T


def _block_kernel(device: torch.device):
    """The Triton block kernel on a GPU (one launch per block instead of ~8 per column), else None (the CPU, or
    ``SVDQUANT_REFERENCE=1``, which asks for the torch reference everywhere)."""
    if device.type != "cuda" or use_reference():
        return None
    from .. import kernels

    return kernels.gptq_round_block


def gptq(r: torch.Tensor, h: torch.Tensor, q0: QTensor, *, damp: float = 0.01) -> QTensor:
    """Round ``r`` ``[N, K]`` with GPTQ under the scales of ``q0`` (its round-to-nearest quantization, weight rule),
    for inputs with Hessian ``h`` ``[K, K]``. Returns a :class:`QTensor` like ``q0`` with new codes."""
    return gptq_members([r], h, [q0], damp=damp)[0]


def _rows(ts: list[torch.Tensor]) -> torch.Tensor:
    """The members' rows as one matrix: a lone member's as it is (the column permutation copies it anyway)."""
    return ts[0] if len(ts) == 1 else torch.cat(ts, 0)


def gptq_members(rs: list[torch.Tensor], h: torch.Tensor, q0s: list[QTensor], *,
                 damp: float = 0.01, scale: torch.Tensor | None = None) -> list[QTensor]:
    """:func:`gptq` for the members of a group that read the same inputs (q / k / v): one Hessian, so one
    ordering and one inverse factor, and their rows rounded in one pass. GPTQ spreads a column's error along its
    own row only, so stacking the rows changes nothing but the number of launches and factorizations (bit for bit
    on the CPU; a GPU's BLAS may round the update product differently with more rows). ``scale`` ``[K]``: the
    Hessian is ``h * scale[:, None] * scale[None, :]`` (the inputs divided by λ), made in the permuted copy,
    element by element as that expression makes it, so that no scaled K × K copy is held beside ``h``."""
    fmt = get_format(q0s[0].fmt)
    grids = [fmt.weight_grid(q0) for q0 in q0s]
    values, codes = grids[0][1], grids[0][2]  # the format's grid: the same for every member
    k = rs[0].shape[1]
    diag = h.diagonal() if scale is None else h.diagonal() * scale * scale
    dead = diag <= 0  # a channel that never carries input: its weight is zeroed and its H_jj set to 1
    order = torch.argsort(torch.where(dead, torch.ones_like(diag), diag), descending=True, stable=True)  # act-order
    # the permuted copies are the working ones
    hp, dead = h.detach().float()[order][:, order], dead[order]
    if scale is not None:
        s = scale.float()[order]
        hp.mul_(s[:, None]).mul_(s[None, :])
    w = _rows([r.detach().float() for r in rs])[:, order]
    f = _rows([g[0][:, :k] for g in grids])[:, order]
    hp[dead, dead] = 1.0
    w[:, dead] = 0.0
    hs = [hp]
    del hp  # the inverse factor lets it go once its flipped copy is made
    u = _inverse_factor(hs, damp)
    kernel = _block_kernel(w.device)
    round_block, block = (kernel, KERNEL_BLOCK) if kernel is not None else (_round_block, BLOCK)
    mids = (values[1:] + values[:-1]) / 2
    idx = torch.empty(w.shape, dtype=torch.int32, device=w.device)  # grid indices (< 16 values)
    for b0 in range(0, k, block):
        b1 = min(b0 + block, k)
        idx[:, b0:b1], err = round_block(w[:, b0:b1], f[:, b0:b1], u[b0:b1, b0:b1], values, mids)
        if b1 < k:
            w[:, b1:] -= err @ u[b0:b1, b1:]
    out = []
    for q0, rows in zip(q0s, codes[idx].split([r.shape[0] for r in rs], 0)):
        c = q0.codes.clone()  # the padding columns keep their codes (the format's zero)
        c[:, order] = rows
        out.append(QTensor(c, q0.scales, q0.fmt, q0.group_size, q0.in_features, tensor_scale=q0.tensor_scale,
                           multipliers=q0.multipliers, zeros=q0.zeros))
    return out
