"""Where one group's quantization spends its time, at FLUX.1-dev layer shapes (the profile of issue 16).

    python benchmarks/quantize_search.py --out $OUT          # on a GPU
    python benchmarks/quantize_search.py --smoke             # CPU, small shapes: checks the script runs

For each FLUX.1-dev group shape (double-block q/k/v, fc1, fc2 post-GELU; single-block q/k/v+mlp and
proj_out) it quantizes random 16-bit weights with 512 random calibration tokens through
``svdquant.algorithm.quantize_linears`` and reports the stage times (setup, smoothing search,
refinement, assemble), then times the parts one smoothing candidate costs (the rank-32 SVD, the
residual's rounding, the activations' rounding, the scored output error) and a ``torch.profiler``
table of the q/k/v group's top operators by device time. Medians of ``--repeats`` runs after a warm-up.
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

# (name, out_features per member, in_features, post_gelu): FLUX.1-dev, hidden 3072, MLP 12288
SHAPES = [
    ("double qkv", [3072, 3072, 3072], 3072, False),
    ("double fc1", [12288], 3072, False),
    ("double fc2", [3072], 12288, True),
    ("single qkv+mlp", [3072, 3072, 3072, 12288], 3072, False),
    ("single proj_out", [3072], 15360, 3072),
]


def timed(fn, repeats, sync):
    fn()
    sync()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="int4")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args(argv)

    from svdquant.algorithm import quantize_linears
    from svdquant.algorithm.layer import _Problem, candidate_smoothing
    from svdquant.recipes import get_recipe

    dev = "cpu" if args.smoke else "cuda"
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    recipe = get_recipe(args.recipe)
    scale = 16 if args.smoke else 1
    g = torch.Generator(device="cpu").manual_seed(0)
    res = dict(device=torch.cuda.get_device_name() if dev == "cuda" else "cpu (smoke)", torch=torch.__version__,
               recipe=recipe.name, candidates=len(recipe.smooth_grid), groups={})
    for name, outs, k, post_gelu in SHAPES:
        outs = [max(64, o // scale) for o in outs]
        k = max(64, k // scale)
        pg = post_gelu if isinstance(post_gelu, bool) else max(64, post_gelu // scale)
        ws = [(torch.randn(o, k, generator=g) * 0.02).to(dev, torch.bfloat16) for o in outs]
        x = torch.randn(512, k, generator=g)
        x[:, :: 97] *= 20  # outlier channels, as in diffusion transformers
        if pg is not False:
            x = torch.nn.functional.gelu(x, approximate="tanh")
        x = x.to(dev, torch.bfloat16)
        bs = [None] * len(ws)

        def whole():
            return quantize_linears(ws, bs, x, recipe, post_gelu=pg)

        _, rep = whole()
        sync()
        stages = []
        for _ in range(args.repeats):
            _, rep = whole()
            sync()
            stages.append(dict(rep.stages, seconds=rep.seconds))
        med = {s: statistics.median(d[s] for d in stages) for s in stages[0]}

        p = _Problem(ws, x, recipe, pg)
        lam = candidate_smoothing(p.act_max, p.w_max, recipe.smooth_grid)[10][2]
        inv = 1.0 / lam
        w_hat = p.w * lam
        up, downs, _ = p.branch(w_hat, True)
        resid = w_hat - p.product(up, downs)
        wq = p.fq_weight(resid)
        xq = p.fq_act(inv)
        parts = dict(
            svd=timed(lambda: p.branch(w_hat, True), args.repeats, sync),
            round_weight=timed(lambda: p.fq_weight(resid), args.repeats, sync),
            round_acts=timed(lambda: p.fq_act(inv), args.repeats, sync),
            error=timed(lambda: p.error(xq, wq, inv, up, downs), args.repeats, sync),
        )
        res["groups"][name] = dict(shape=[sum(outs), k], stages=med, iterations=rep.iterations,
                                   per_candidate=parts)
        print(f"{name:16s} {sum(outs):6d}x{k:<6d} " + " ".join(f"{s} {v * 1e3:7.1f}ms" for s, v in med.items())
              + f" | it {rep.iterations} | per candidate: "
              + " ".join(f"{s} {v * 1e3:6.2f}ms" for s, v in parts.items()), flush=True)
        if name == "double qkv" and dev == "cuda":
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                whole()
                sync()
            table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25)
            cpu_table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
            print(table)
            print(cpu_table)
            res["profile"] = table
            res["profile_cpu"] = cpu_table
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "quantize_search.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
