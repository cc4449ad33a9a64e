"""Every quantized layer of a real pipeline at the shapes it runs: svdquant's runner against a 16-bit cuBLAS linear.

    python benchmarks/layer_costs.py --models flux sdxl qwenimage --out $OUT

The pipelines are ``benchmarks/pipeline_memory.py``'s (real architectures, random weights, 1024², the CFG batch
each uses); the denoiser's layers become ``int4`` ``SVDQLinear`` (speed mode). One pipeline step records, per
quantized layer, the rows it reads (tokens × batch), its K and N; each distinct (M, K, N) is then timed alone,
GPU time from CUDA-graph replays (what a compiled, graph-captured step pays) and eager wall time (launch overhead
included): the quantized runner (activation kernel + INT8 GEMM) against ``F.linear`` in bf16 with a weight of the
same shape. The table says, per model, how many layers and how much time per step
sit in shapes where the quantized layer is slower: what a per-layer choice (``svdquant.optimize``'s layer
costs) would recover, and what the layers add up to against the whole step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from pipeline_memory import MODELS, _quiet, build, denoiser, random_quantize  # noqa: E402

from svdquant.pipelines.layer_choice import graph_ms  # noqa: E402  (what the layer choice measures with)


def eager_ms(fn, reps: int) -> float:
    """Wall time of one eager call, launch overhead included (what an uncompiled step pays per layer)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps * 1e3


def record_shapes(pipe, call: dict) -> dict:
    """{(M, K, N): [layer names]} over one pipeline step."""
    from svdquant.modules import SVDQLinear

    seen: dict = {}
    handles = []
    for name, m in denoiser(pipe).named_modules():
        if isinstance(m, SVDQLinear) and m.activations is not None:
            def pre(mod, args, name=name):
                x = args[0]
                key = (x.numel() // x.shape[-1], mod.in_features, mod.out_features)
                seen.setdefault(key, []).append(name)
            handles.append(m.register_forward_pre_hook(pre))
    with torch.no_grad():
        pipe(**call, num_inference_steps=1)
    for h in handles:
        h.remove()
    return seen


def run(model: str, args, results: dict) -> None:
    from svdquant.modules import SVDQLinear

    pipe, call = build(model, False, "cuda")
    pipe.to("cuda")
    den = denoiser(pipe)
    random_quantize(den, "speed")
    t = time.perf_counter()
    shapes = record_shapes(pipe, call)
    rows = []
    layers = {n: m for n, m in den.named_modules() if isinstance(m, SVDQLinear)}
    for (m_rows, k, n), names in sorted(shapes.items()):
        layer = layers[names[0]]
        x = torch.randn(m_rows, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
        bias = torch.zeros(n, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            q_ms = graph_ms(lambda: layer(x), args.reps)
            b_ms = graph_ms(lambda: F.linear(x, w, bias), args.reps)
            q_eager = eager_ms(lambda: layer(x), args.reps)
            b_eager = eager_ms(lambda: F.linear(x, w, bias), args.reps)
        rows.append(dict(M=m_rows, K=k, N=n, calls_per_step=len(names), example=names[0], int4_ms=round(q_ms, 4),
                         bf16_ms=round(b_ms, 4), speedup=round(b_ms / q_ms, 3), int4_eager_ms=round(q_eager, 4),
                         bf16_eager_ms=round(b_eager, 4)))
    slower = [r for r in rows if r["speedup"] < 1]
    step_q = sum(r["int4_ms"] * r["calls_per_step"] for r in rows)
    step_b = sum(r["bf16_ms"] * r["calls_per_step"] for r in rows)
    best = sum(min(r["int4_ms"], r["bf16_ms"]) * r["calls_per_step"] for r in rows)
    results[model] = dict(shapes=rows, layer_calls_per_step=sum(r["calls_per_step"] for r in rows),
                          int4_ms_per_step=round(step_q, 2), bf16_ms_per_step=round(step_b, 2),
                          best_of_both_ms_per_step=round(best, 2),
                          slower_shapes=len(slower), slower_calls=sum(r["calls_per_step"] for r in slower),
                          seconds=round(time.perf_counter() - t, 1))
    print(model, json.dumps({k: v for k, v in results[model].items() if k != "shapes"}), flush=True)
    for r in rows:
        print(f"  M {r['M']:6d} K {r['K']:5d} N {r['N']:5d} x{r['calls_per_step']:3d}  int4 {r['int4_ms']:.4f} "
              f"bf16 {r['bf16_ms']:.4f}  {r['speedup']:.2f}x  eager {r['int4_eager_ms']:.3f} / {r['bf16_eager_ms']:.3f}"
              f"  {r['example']}", flush=True)
    del pipe, den
    torch.cuda.empty_cache()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        ap.error("needs a CUDA GPU")
    _quiet()
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "command": " ".join(sys.argv)}
    for model in args.models:
        run(model, args, results)
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "layer_costs.json").write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
