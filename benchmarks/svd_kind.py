"""Randomized vs full SVD for the low-rank branch: output error and time (CPU).

    python benchmarks/svd_kind.py
    python benchmarks/svd_kind.py --width 3072 --ranks 32      # slow on a CPU: float64 SVDs of 3072²

The full SVD is LAPACK float64; the randomized one is ``torch.svd_lowrank`` with
``rank + 16`` columns and 2 power iterations (``svdquant/algorithm/lowrank.py``), deterministic.
Both run the whole SVDQuant search (39 smoothing candidates, refinement) on the same
synthetic layer (``benchmarks/layers.py`` statistics) and are measured on held-out tokens.
Also times one 3072×3072 layer from 256 calibration tokens with the default recipe.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from layers import heavy_tailed_weight, outlier_activations, rel_error, sqnr_db  # noqa: E402

from svdquant import Int4Config, SVDQLinear  # noqa: E402


def layer(k, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(k, n, dtype=torch.bfloat16)
    with torch.no_grad():
        lin.weight.copy_(heavy_tailed_weight(n, k, g))
    x = outlier_activations(512, k, g).to(torch.bfloat16)
    return lin, x[:256], x[256:]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=int, nargs="+", default=[1024, 2048])
    ap.add_argument("--ranks", type=int, nargs="+", default=[16, 32, 64])
    args = ap.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| width | rank | randomized error (SQNR) | full error (SQNR) | randomized s | full s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for w in args.width:
        lin, calib, test = layer(w, w)
        ref = lin(test)
        for r in args.ranks:
            cells = []
            for kind in ("randomized", "full"):
                t0 = time.perf_counter()
                m = SVDQLinear.from_linear(lin, calib, Int4Config(rank=r, svd=kind))
                secs = time.perf_counter() - t0
                e = rel_error(m(test), ref)
                cells.append((e, secs))
            (er, tr), (ef, tf) = cells
            print(f"| {w} | {r} | {er:.4f} ({sqnr_db(er):.2f} dB) | {ef:.4f} ({sqnr_db(ef):.2f} dB) | {tr:.1f} | {tf:.1f} |",
                  flush=True)
    lin, calib, _ = layer(3072, 3072)
    SVDQLinear.from_linear(lin, calib[:64], Int4Config(iterations=1))  # warm up allocator/threads
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        m = SVDQLinear.from_linear(lin, calib, Int4Config())
        times.append(time.perf_counter() - t0)
    print(f"\none 3072x3072 layer, 256 calibration tokens, default int4 recipe: "
          f"{sorted(times)[1]:.1f} s (median of 3; {m.quant_report.iterations} refinement iterations)")


if __name__ == "__main__":
    main()
