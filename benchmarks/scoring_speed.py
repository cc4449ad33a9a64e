"""The quantizer's scoring products at FLUX shapes: fp32 cuBLAS (``SCORING_TF32 = False``), TF32 cuBLAS (what torch's
process-wide flag would give), and svdquant's TF32 kernel (``svdquant.kernels.scoring_product``), per batch of
candidates, with the kernel's error against fp32.

    python benchmarks/scoring_speed.py --out $OUT       # GPU
    python benchmarks/scoring_speed.py --quick          # CPU smoke: the kernel in Triton's interpreter, small shapes

Each smoothing candidate and each refinement step of a group scores ``X̂ · Ŵᵀ`` over the 512 scoring tokens
(``QuantConfig.eval_tokens``); a batch is as many candidates as memory allows (at most 8).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# (candidates, N, K): a batch of each FLUX.1-dev group's shape (q/k/v, out, fc1, fc2, single stack, proj_out)
SHAPES = [(8, 9216, 3072), (8, 3072, 3072), (8, 12288, 3072), (8, 3072, 12288), (4, 21504, 3072), (4, 3072, 15360),
          (1, 9216, 3072), (1, 3072, 15360)]
TOKENS = 512


def bench(fn, device) -> float:
    """Median ms: triton's do_bench on a GPU, a few wall-clock runs on the CPU."""
    if device == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=10, rep=50, return_mode="median")
    fn()
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    from svdquant import kernels as K

    device = "cpu" if args.quick else "cuda"
    shapes, tokens = ([(2, 96, 64), (1, 64, 160)], 40) if args.quick else (SHAPES, TOKENS)
    rows = []
    for b, n, k in shapes:
        g = torch.Generator(device).manual_seed(0)
        a = torch.randn(b, tokens, k, device=device, generator=g)
        w = torch.randn(b, n, k, device=device, generator=g) * 0.02
        want = a @ w.mT
        got = K.scoring_product(a, w)
        row = dict(candidates=b, n=n, k=k, tokens=tokens, rel_error=float((got - want).norm() / want.norm()))
        row["fp32_ms"] = bench(lambda: a @ w.mT, device)
        if device == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            row["tf32_cublas_ms"] = bench(lambda: a @ w.mT, device)
            torch.backends.cuda.matmul.allow_tf32 = False
        row["kernel_ms"] = bench(lambda: K.scoring_product(a, w), device)
        flop = 2 * b * tokens * n * k
        row["kernel_tflops"] = flop / row["kernel_ms"] / 1e9
        row["speedup_vs_fp32"] = row["fp32_ms"] / row["kernel_ms"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        dev = torch.cuda.get_device_name() if device == "cuda" else "cpu (quick)"
        (args.out / "scoring_speed.json").write_text(json.dumps(dict(device=dev, torch=torch.__version__,
                                                                     rows=rows), indent=1))
    return rows


if __name__ == "__main__":
    main()
