"""GPTQ's cost at FLUX shapes, stage by stage: the inverse factor, the block loop (Triton kernel or torch), and the
whole ``gptq()`` call, per block width.

    python benchmarks/gptq_speed.py --out $OUT          # GPU
    python benchmarks/gptq_speed.py --quick             # CPU smoke, small shapes

A FLUX.1-dev transformer rounds, per double block, q/k/v (9216 × 3072) twice, the two outputs (3072 × 3072), the two
MLP inputs (12288 × 3072) and outputs (3072 × 12288); per single block q/k/v + MLP input (21504 × 3072) and the
output (3072 × 15360). The stage takes the sum over 19 + 38 blocks (the estimate printed at the end).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from svdquant.algorithm import gptq as G  # noqa: E402
from svdquant.formats import get_format, quantize  # noqa: E402

SHAPES = {(9216, 3072): 2 * 19, (3072, 3072): 2 * 19, (12288, 3072): 2 * 19, (3072, 12288): 2 * 19,
          (21504, 3072): 38, (3072, 15360): 38}


def timed(fn, device, repeats=3):
    out = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--blocks", type=int, nargs="+", default=[32, 64, 128])
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    device = "cpu" if args.quick else "cuda"
    shapes = {(96, 64): 1, (64, 192): 1} if args.quick else SHAPES
    rows = []
    for (n, k), count in shapes.items():
        g = torch.Generator(device).manual_seed(0)
        w = torch.randn(n, k, device=device, generator=g)
        x = torch.randn(2048, k, device=device, generator=g)
        h = G.hessian(x)
        q0 = quantize(w, "int4m", 64, weight=True)
        f, values, _ = get_format("int4m").weight_grid(q0)
        u = G._inverse_factor([h], 0.01)
        mids = (values[1:] + values[:-1]) / 2
        row = dict(n=n, k=k, count=count, inverse_s=timed(lambda: G._inverse_factor([h], 0.01), device))
        kernel = G._block_kernel(torch.device(device))
        for b in args.blocks:
            def loop(fn, b=b):
                ww = w.clone()
                for b0 in range(0, k, b):
                    b1 = min(b0 + b, k)
                    _, err = fn(ww[:, b0:b1], f[:, b0:b1], u[b0:b1, b0:b1], values, mids)
                    if b1 < k:
                        ww[:, b1:] -= err @ u[b0:b1, b1:]
            if kernel is not None:
                row[f"kernel_loop_b{b}_s"] = timed(lambda: loop(kernel), device)
            if b == 128 and (args.quick or k <= 3072):
                row["torch_loop_b128_s"] = timed(lambda: loop(G._round_block), device, repeats=1)
        row["gptq_s"] = timed(lambda: G.gptq(w, h, q0), device)
        rows.append(row)
        print(json.dumps(row), flush=True)
    est = sum(r["gptq_s"] * r["count"] for r in rows)
    summary = dict(device=torch.cuda.get_device_name() if device == "cuda" else "cpu", rows=rows,
                   flux_estimate_s=est)
    print(f"whole FLUX.1-dev transformer, gptq() calls alone: {est:.1f} s")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gptq_speed.json").write_text(json.dumps(summary, indent=1))
    return rows


if __name__ == "__main__":
    main()
