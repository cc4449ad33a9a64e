"""A runner's low-rank branch (with its LoRAs): padded for the kernels, stacked for q/k/v, rewritten in place."""

from __future__ import annotations

import torch


def _pow2_rank(r: int) -> int:
    p = 16
    while p < r:
        p *= 2
    return p


def padded_branch(m):
    """The branch (with LoRAs) padded to a power-of-two rank >= 16 for ``tl.dot`` (zero rows add nothing)."""
    down, up = m.branch()
    if down is None:
        return None, None
    r = down.shape[0]
    rp = _pow2_rank(r)
    if rp == r:  # the usual rank 32: the layer's own tensors (a padded copy would add ~0.26 GB to FLUX)
        return down.contiguous(), up.contiguous()
    down_p = torch.zeros(rp, m.in_features, dtype=down.dtype, device=down.device)
    down_p[:r] = down
    up_p = torch.zeros(m.out_features, rp, dtype=up.dtype, device=up.device)
    up_p[:, :r] = up
    return down_p, up_p


def assign_branch(runner, down, up, sources=()) -> bool:
    """Give ``runner`` the branch ``(down, up)``. Where it holds tensors of its own of the same shapes (a LoRA
    strength change), they are rewritten in place, so a CUDA graph or compiled code that reads them stays valid;
    ``sources`` are tensors that belong to others (the layer's buffers, stacked members' branches) and are never
    written. Returns True if the runner now holds other tensors than before."""
    replaced = False
    for name, new in (("down", down), ("up", up)):
        cur = getattr(runner, name, None)
        if cur is new and hasattr(runner, name):
            continue
        if cur is not None and new is not None and cur.shape == new.shape and cur.dtype == new.dtype and \
                cur.device == new.device and not any(cur is s for s in sources):
            with torch.no_grad():
                cur.copy_(new)
            continue
        setattr(runner, name, new)
        replaced = True
    return replaced


def branch_sources(m) -> tuple:
    """The layer's own branch buffers: a runner holding them must never write them."""
    return tuple(t for t in (getattr(m, "lora_down", None), getattr(m, "lora_up", None)) if t is not None)


def stacked_branch(branches, out_features):
    """One branch for layers that read the same input, stacked by output rows: exact.

    ``branches``: each layer's padded ``(down [R_i, K], up [N_i, R_i])`` or ``(None, None)``; ``out_features``:
    each layer's N_i. Layers of one shared-input group share their down projection (one λ, one branch): then it is
    kept once and the ups are stacked. With per-layer LoRAs the downs differ after the rows they share (the group's
    branch, then each layer's LoRAs): the shared rows are kept once, each layer's own rows (its LoRAs, without the
    zero rows of its padding) follow, and the up is block diagonal over the own rows, padded to a power-of-two
    rank. A rank-32 group with a rank-8 LoRA on four members stacks to rank 64, not 4 · 64: what the Hopper GEMM
    takes at its faster tiles (ranks up to 64; 128 at 128 × 128 tiles only), and a smaller ``X·L1ᵀ`` in the
    activation pass either way."""
    live = [(d, u) for d, u in branches if d is not None]
    if not live:
        return None, None
    if len(live) == len(branches) and all(torch.equal(d, live[0][0]) for d, _ in live):
        ups = [u for _, u in live]
        same = all(u.dtype == ups[0].dtype for u in ups)
        return live[0][0], torch.cat(ups if same else [u.float() for u in ups], 0)
    shared = _shared_rows([d for d, _ in live])  # a member without a branch gets zeros in those columns too
    first = live[0][0]
    own = [(d[shared:_used_rows(d)], u) for d, u in live]  # each layer's rows after the shared ones
    rp = _pow2_rank(shared + sum(d.shape[0] for d, _ in own))
    down = torch.zeros(rp, first.shape[1], dtype=first.dtype, device=first.device)
    down[:shared] = first[:shared]
    up = torch.zeros(sum(out_features), rp, dtype=torch.float32, device=first.device)
    r0, n0, i = shared, 0, 0
    for (d, _), n in zip(branches, out_features):
        if d is not None:
            rows, u = own[i]
            up[n0:n0 + n, :shared] = u[:, :shared].float()
            down[r0:r0 + rows.shape[0]] = rows
            up[n0:n0 + n, r0:r0 + rows.shape[0]] = u[:, shared:shared + rows.shape[0]].float()
            r0 += rows.shape[0]
            i += 1
        n0 += n
    return down, up


def _shared_rows(downs) -> int:
    """How many leading rows every down projection has in common (bit for bit)."""
    n = min(d.shape[0] for d in downs)
    same = torch.ones(n, dtype=torch.bool, device=downs[0].device)
    for d in downs[1:]:
        same &= (d[:n] == downs[0][:n]).all(1)
    differ = (~same).nonzero()
    return int(differ[0]) if len(differ) else n


def _used_rows(down) -> int:
    """The rows of ``down`` before its trailing zero rows (the padding of :func:`padded_branch`)."""
    nonzero = down.ne(0).any(1).nonzero()
    return int(nonzero[-1]) + 1 if len(nonzero) else 0
