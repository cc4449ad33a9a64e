"""Which smoothing candidates the search scores: all of them, or coarse to fine along each family of the grid.

The default grid (:func:`svdquant.recipes.default_smooth_grid`) is two one-parameter families, ``(α, 0)`` with the
identity at α = 0 and ``(α, 1 − α)``, 19–20 values of α each. Along one family the output error is a smooth
function of α with one minimum on the layers measured (the tiny FLUX: every group of every 4-bit recipe; FLUX-width
layers in BENCHMARKS.md), so a coarse pass at every 4th α, then the neighbours at distance 2 and 1 of the best so
far, lands on the minimum the full sweep finds while scoring 10 candidates of 20 instead of all of them. Where the
error has several minima it can settle on a local one; ``smooth_search="full"`` scores every candidate.
"""

from __future__ import annotations

from typing import Callable, Sequence

from ..recipes import SMOOTH_SEARCHES as SEARCHES

COARSE_STRIDE = 4
# shorter families are scored whole: coarse to fine saves nothing there
MIN_FAMILY = 2 * COARSE_STRIDE + 2


def families(alphas: Sequence[float]) -> list[list[int]]:
    """The grid's candidates (by index) as families: maximal runs in grid order along which α increases."""
    out: list[list[int]] = []
    for i, a in enumerate(alphas):
        if out and a > alphas[out[-1][-1]]:
            out[-1].append(i)
        else:
            out.append([i])
    return out


def search(alphas: Sequence[float], score: Callable[[list[int]], list[float]], how: str = "coarse-to-fine") -> dict:
    """Score candidates through ``score(indices) -> errors`` (called once per round, with every family's
    candidates of that round together, so a GPU can batch them) and return ``{index: error}`` of those scored.

    ``how="full"``: every candidate, in one round. ``"coarse-to-fine"``: per family, every ``COARSE_STRIDE``-th
    candidate and the last, then the two neighbours at half the stride of the family's best so far, halving down
    to 1; ties go to the earlier candidate."""
    if how not in SEARCHES:
        raise ValueError(f"smooth_search={how!r} is unknown; choose one of {SEARCHES}")
    errs: dict[int, float] = {}

    def run(indices):
        new = sorted({i for i in indices if i not in errs})
        if new:
            errs.update(zip(new, score(new)))

    fams = families(alphas)
    if how == "full":
        run(range(len(alphas)))
        return errs
    run([i for f in fams for i in (f if len(f) < MIN_FAMILY else f[::COARSE_STRIDE] + f[-1:])])
    step = COARSE_STRIDE // 2
    while step >= 1:
        wanted = []
        for f in fams:
            if len(f) < MIN_FAMILY:
                continue
            b = min((j for j in range(len(f)) if f[j] in errs), key=lambda j: (errs[f[j]], f[j]))
            wanted += [f[j] for j in (b - step, b + step) if 0 <= j < len(f)]
        run(wanted)
        step //= 2
    return errs
