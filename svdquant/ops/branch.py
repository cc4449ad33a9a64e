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
    each layer's N_i. Layers of one shared-input group share their down projection (one λ, one branch): then it is kept once and the ups
    are stacked. With per-layer LoRAs the downs differ: they are stacked too and the up is block diagonal
    (each layer's rows see only its own ranks), padded to a power-of-two rank."""
    live = [(d, u) for d, u in branches if d is not None]
    if not live:
        return None, None
    if len(live) == len(branches) and all(torch.equal(d, live[0][0]) for d, _ in live):
        ups = [u for _, u in live]
        same = all(u.dtype == ups[0].dtype for u in ups)
        return live[0][0], torch.cat(ups if same else [u.float() for u in ups], 0)
    rank = sum(d.shape[0] for d, _ in live)
    rp = _pow2_rank(rank)
    first = live[0][0]
    down = torch.zeros(rp, first.shape[1], dtype=first.dtype, device=first.device)
    up = torch.zeros(sum(out_features), rp, dtype=torch.float32, device=first.device)
    r0 = n0 = 0
    for (d, u), n in zip(branches, out_features):
        if d is not None:
            down[r0:r0 + d.shape[0]] = d
            up[n0:n0 + n, r0:r0 + d.shape[0]] = u.float()
            r0 += d.shape[0]
        n0 += n
    return down, up
