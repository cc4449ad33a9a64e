"""Layer-level ablation: every method × rank on FLUX-width layers, error on held-out tokens.

    python benchmarks/layer_ablation.py                 # full table (CPU, minutes)
    python benchmarks/layer_ablation.py --ranks 32 --layers "attn 3072->3072"

Each layer is quantized from 256 calibration tokens and measured on 256 other tokens
from the same distribution, through ``SVDQLinear.forward`` (the reference numerics the
GPU kernels reproduce). Prints a markdown table: relative output error ‖Ŷ−Y‖/‖Y‖ and
SQNR in dB (higher is better), and the seconds each quantization took.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from layers import FLUX_LAYERS, make_layer, rel_error, sqnr_db  # noqa: E402

from svdquant import SVDQLinear  # noqa: E402
from svdquant.recipes import Int4Config, NF4Config, NVFP4Config, W8A8Config  # noqa: E402

RANK_METHODS = [  # (label, recipe factory taking a rank)
    ("INT4 low-rank only", lambda r: Int4Config(method="lowrank", rank=r)),
    ("INT4 LoRC (smooth + SVD of error)", lambda r: Int4Config(method="lorc", rank=r)),
    ("INT4 SVDQuant", lambda r: Int4Config(rank=r)),
]
FIXED_METHODS = [  # rank-independent baselines and other formats
    ("INT4 naive (RTN)", Int4Config(method="naive")),
    ("INT4 smoothing only", Int4Config(method="smooth")),
    ("NF4 W4A16", NF4Config()),
    ("NVFP4 naive", NVFP4Config(method="naive")),
    ("NVFP4 SVDQuant r32", NVFP4Config()),
    ("W8A8 naive", W8A8Config(method="naive")),
    ("W8A8 SVDQuant r16", W8A8Config()),
]


def run(layers, ranks, tokens, fixed=True):
    rows = []
    for name in layers:
        case = make_layer(name, tokens=tokens)
        ref = case.linear(case.test)
        jobs = [(label, rc) for label, rc in FIXED_METHODS] if fixed else []
        jobs += [(f"{label}", f(r)) for r in ranks for label, f in RANK_METHODS]
        for label, rc in jobs:
            t0 = time.perf_counter()
            m = SVDQLinear.from_linear(case.linear, case.calib, rc, post_gelu=case.post_gelu)
            secs = time.perf_counter() - t0
            err = rel_error(m(case.test), ref)
            rank = rc.branch_rank
            rows.append(dict(layer=name, method=label, rank=rank, rel_error=err, sqnr_db=sqnr_db(err),
                             seconds=secs, alpha=m.quant_report.alpha, beta=m.quant_report.beta,
                             iterations=m.quant_report.iterations))
            print(f"{name:22s} {label:36s} r={rank:3d} rel={err:.4f} sqnr={sqnr_db(err):5.1f} dB "
                  f"t={secs:5.1f}s a={m.quant_report.alpha} b={m.quant_report.beta} it={m.quant_report.iterations}",
                  flush=True)
    return rows


def markdown(rows, ranks):
    out = []
    for layer in dict.fromkeys(r["layer"] for r in rows):
        out.append(f"\n**{layer}** — relative output error (SQNR dB), held-out tokens\n")
        out.append("| method | " + " | ".join(f"r={r}" for r in ranks) + " |")
        out.append("| --- |" + " --- |" * len(ranks))
        lr = [r for r in rows if r["layer"] == layer]
        for method in dict.fromkeys(r["method"] for r in lr):
            mr = [r for r in lr if r["method"] == method]
            if len(mr) == 1 and mr[0]["rank"] not in ranks:
                cell = f"{mr[0]['rel_error']:.4f} ({mr[0]['sqnr_db']:.1f})"
                rank_note = f" (r={mr[0]['rank']})" if mr[0]["rank"] else ""
                out.append(f"| {method}{rank_note} | " + " | ".join([cell] * len(ranks)) + " |")
            else:
                cells = []
                for r in ranks:
                    hit = [x for x in mr if x["rank"] == r]
                    cells.append(f"{hit[0]['rel_error']:.4f} ({hit[0]['sqnr_db']:.1f})" if hit else "–")
                out.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", nargs="+", default=list(FLUX_LAYERS), choices=list(FLUX_LAYERS))
    ap.add_argument("--ranks", nargs="+", type=int, default=[8, 16, 32, 64, 128])
    ap.add_argument("--tokens", type=int, default=256, help="calibration tokens (and as many held-out ones)")
    ap.add_argument("--json", type=Path, help="write every row here")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    rows = run(args.layers, args.ranks, args.tokens)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"\n{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"commit {commit}, {time.perf_counter() - t0:.0f} s total")
    print(markdown(rows, args.ranks))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
