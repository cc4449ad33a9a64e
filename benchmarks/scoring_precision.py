"""Would faster products for scoring the smoothing candidates change what the quantizer picks? The demo's table
(tiny FLUX, CIFAR-10; PSNR against 16-bit) with the candidates' error products (``xq @ wq.mT`` in
``svdquant.algorithm.layer._Problem.errors``: the search, the refinement's stopping test, GPTQ's keep-or-not) read
from operands rounded as a GPU's faster modes read them, against fp32:

* ``tf32``: 10-bit mantissas, round to nearest even (cuBLAS's TF32 tensor-core mode: 8x fp32's rate on Hopper);
* ``bf16``: bf16 operands, fp32 accumulation and output.

Only those products change; the SVD fits and GPTQ's Hessian stay fp32. On the CPU (the rounding is emulated):

    python benchmarks/scoring_precision.py --out OUT                 # int4, w4a4, nvfp4; fp32, tf32, bf16
    python benchmarks/scoring_precision.py --quick                   # the plumbing: w8a8, 2 steps
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MODES = ("fp32", "tf32", "bf16")


def tf32(t: torch.Tensor) -> torch.Tensor:
    """``t`` in fp32 with its mantissa rounded to TF32's 10 bits (to nearest, ties to even)."""
    i = t.float().contiguous().view(torch.int32)
    lsb = (i >> 13) & 1
    return ((i + 0x0FFF + lsb) & ~0x1FFF).view(torch.float32)


def bf16(t: torch.Tensor) -> torch.Tensor:
    return t.bfloat16().float()


def run(mode: str, recipes, out: Path, steps: int) -> list[dict]:
    from svdquant.algorithm import layer
    from svdquant.pipelines.demo import run_demo

    real = layer._Problem.errors
    rounding = {"tf32": tf32, "bf16": bf16}.get(mode)
    if rounding is not None:
        def errors(self, xq, wq, inv_smooth, up, downs):
            return real(self, rounding(xq), rounding(wq), inv_smooth, up, downs)

        layer._Problem.errors = errors
    try:
        rows = run_demo(out / mode, recipes, steps=steps, progress=False, overwrite=True)
    finally:
        layer._Problem.errors = real
    return [dict(mode=mode, recipe=r["recipe"], psnr=round(r["psnr"], 2)) for r in rows if r["recipe"] != "16-bit"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    ap.add_argument("--quick", action="store_true", help="w8a8 alone, 2 sampling steps: checks the script runs")
    ap.add_argument("--out", type=Path, default=Path("scoring-precision"))
    args = ap.parse_args(argv)
    recipes, steps = (["w8a8"], 2) if args.quick else (["int4", "w4a4", "nvfp4"], 6)
    rows = []
    for mode in args.modes:
        rows += run(mode, recipes, args.out, steps)
        print(json.dumps(rows[-len(recipes):]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scoring_precision.json").write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
