"""Whole pipelines end to end, side by side in one run: what a user gets per image (issue 22).

    python benchmarks/e2e.py --models flux --batch 1 4 --out $OUT          # bf16, bf16-compiled, int4 (default path)
    python benchmarks/e2e.py --models sdxl qwenimage --batch 1 --out $OUT
    python benchmarks/e2e.py --models sd3 sana pixart --batch 1 --out $OUT
    python benchmarks/e2e.py --models kontext --batch 1 --out $OUT              # FLUX.1 Kontext, a 1024² picture in
    python benchmarks/e2e.py --models qwenimage-edit --batch 1 --out $OUT       # Qwen-Image-Edit, the same
    python benchmarks/e2e.py --models flux --variants fp8-torchao --out $OUT   # torchao FP8 row-wise (its own call)
    python benchmarks/e2e.py --quick                                         # CPU smoke: tiny configs

Each model is its diffusers pipeline with the real architecture and random weights, built on the GPU as
``benchmarks/pipeline_memory.py`` builds it (its docstring has the details), all at 1024² and ``--steps`` (default
28) steps: FLUX.1-dev guidance 3.5; SDXL CFG 5; Qwen-Image true CFG 4; SD3.5 Large CFG 3.5, T5 256 tokens;
SANA 1600M CFG 4.5, Gemma 300 tokens (SANA's usual is 20 steps: pass ``--steps 20``); PixArt-Σ XL CFG 4.5,
T5 300 tokens (usually 20 steps too); FLUX.1 Kontext [dev] guidance 2.5 and Qwen-Image-Edit true CFG 4, each
editing a fixed random 1024² picture given as ``image=`` (its latent tokens join the denoised ones: 8192 image
tokens per transformer call; Qwen2.5-VL reads the picture too). SDXL, SD3.5, SANA and PixArt-Σ run CFG as batch
2 per step, Qwen-Image's and Qwen-Image-Edit's true CFG as two calls. Variants, on one pipeline per model:

* ``bf16``: diffusers as loaded, eager;
* ``bf16-compiled``: the denoiser's repeated blocks through ``torch.compile`` (what diffusers recommends,
  ``compile_repeated_blocks``; here the same blocks svdquant compiles), default inductor mode;
* ``fp8-torchao``: torchao's ``Float8DynamicActivationFloat8WeightConfig(PerRow())`` on every linear of the
  denoiser, compiled the same way (its compile is slow: give it its own device call);
* ``int4``: the denoiser's layers as svdquant ``int4`` (random valid contents), then ``svdquant.optimize(pipe)``:
  what ``load_pipeline`` gives on CUDA by default (fused, attention backend, compiled blocks, CUDA graphs).

Per variant and batch size: the first call's seconds (compilation, capture) and the steady seconds per image
(median of ``--repeats`` calls), peak GPU memory of a steady call and what stays resident. Results go to
``--out``/e2e.json after every measurement; a measurement that would start after ``--budget-s`` is skipped and
listed, so one device call always returns what it measured.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from pipeline_memory import (  # noqa: E402
    MODELS, _quiet, build, call_facts, components_gb, denoiser, random_quantize, run_device, run_facts,
)

VARIANTS = ("bf16", "bf16-compiled", "fp8-torchao", "int4")


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def measure(pipe, call: dict, steps: int, batch: int, repeats: int, device: str) -> dict:
    gen = torch.Generator("cpu")
    kw = dict(call, num_inference_steps=steps, num_images_per_prompt=batch)
    with torch.no_grad():
        t0 = time.perf_counter()
        pipe(**kw, generator=gen.manual_seed(0))
        _sync(device)
        first = time.perf_counter() - t0
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        resident = torch.cuda.memory_allocated() / 1e9 if device == "cuda" else None
        times = []
        for i in range(repeats):
            t0 = time.perf_counter()
            out = pipe(**kw, generator=gen.manual_seed(i)).images
            _sync(device)
            times.append(time.perf_counter() - t0)
    s = statistics.median(times)
    return dict(batch=batch, first_call_s=round(first, 2), seconds_per_call=round(s, 3),
                seconds_per_image=round(s / batch, 3), runs=[round(t, 3) for t in times],
                resident_gb=resident and round(resident, 2),
                peak_gb=round(torch.cuda.max_memory_allocated() / 1e9, 2) if device == "cuda" else None,
                finite=bool(torch.isfinite(out).all()), shape=list(out.shape))


def compile_denoiser(den) -> int:
    from svdquant.pipelines.optimize import compile_blocks

    return compile_blocks(den)


def uncompile(den) -> None:
    for m in den.modules():
        if getattr(m, "_compiled_call_impl", None) is not None:
            m._compiled_call_impl = None
    torch._dynamo.reset()


def run_model(model: str, args, device: str, results: dict, t_start: float, log) -> None:
    import svdquant
    from svdquant.pipelines.optimize import graphs_of  # svdquant loads its pipelines package lazily

    res = results.setdefault(model, {})

    def left() -> bool:
        return time.perf_counter() - t_start < args.budget_s

    t = time.perf_counter()
    pipe, call = build(model, args.quick, device)
    pipe.to(device)
    res["build_s"] = round(time.perf_counter() - t, 1)
    res["call"] = call_facts(call) | {"steps": args.steps}
    den = denoiser(pipe)
    for variant in args.variants:
        row = res.setdefault(variant, {})
        if variant == "bf16-compiled":
            row["compiled_blocks"] = compile_denoiser(den)
        elif variant == "fp8-torchao":
            from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

            uncompile(den)
            quantize_(den, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))
            row["compiled_blocks"] = compile_denoiser(den)
        elif variant == "int4":
            uncompile(den)
            row["quantized_layers"] = random_quantize(den, "speed")
            report = svdquant.optimize(pipe)
        for b in args.batch:
            if not left():
                row[f"b{b}"] = {"skipped": f"past --budget-s {args.budget_s}"}
                continue
            try:
                r = measure(pipe, call, args.steps, b, args.repeats, device)
            except Exception as e:  # one failed measurement must not cost the others
                r = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
                import traceback

                traceback.print_exc()
            row[f"b{b}"] = r
            graphs = graphs_of(pipe)
            if graphs is not None:
                r["graph_captures"], r["graph_replays"] = graphs.captures, graphs.replays
            log(f"{model:10s} {variant:14s} b{b} {json.dumps(r)}")
            args.save(results)
        row["weights_gb"] = components_gb(pipe)
        if variant == "int4":
            row["optimize"] = report.to_dict()  # after the calls: the layer choice is made at the first
        if variant == "fp8-torchao":
            break  # the pipeline now holds torchao's tensors; the int4 variant needs a fresh one
    del pipe, den
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def table(results: dict) -> str:
    lines = ["| model | variant | batch | s / image | first call (s) | peak GPU (GB) | resident (GB) | vs bf16 | "
             "vs bf16-compiled |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for model in MODELS:
        res = results.get(model)
        if not isinstance(res, dict):
            continue
        for v in VARIANTS:
            for key, r in sorted((res.get(v) or {}).items()):
                if not key.startswith("b") or not isinstance(r, dict):
                    continue
                if "seconds_per_image" not in r:
                    lines.append(f"| {model} | {v} | {key[1:]} | | | | | | {r.get('error') or r.get('skipped')} |")
                    continue
                ratios = []
                for base in ("bf16", "bf16-compiled"):
                    ref = (res.get(base) or {}).get(key, {}).get("seconds_per_image")
                    ratios.append(f"{ref / r['seconds_per_image']:.2f}x" if ref else "-")
                lines.append(f"| {model} | {v} | {r['batch']} | {r['seconds_per_image']:.3f} | {r['first_call_s']:.1f} | "
                             f"{r['peak_gb']} | {r['resident_gb']} | {ratios[0]} | {ratios[1]} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", choices=MODELS, default=["flux"])
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=["bf16", "bf16-compiled", "int4"])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--repeats", type=int, default=2, help="steady calls per measurement (median)")
    ap.add_argument("--budget-s", type=float, default=480.0, help="start no measurement after this many seconds")
    ap.add_argument("--quick", action="store_true",
                    help="CPU, tiny configs, 16x16 (SANA, Z-Image 32x32; Qwen-Image-Edit 64x64), 2 steps: checks the "
                         "script runs")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    if args.steps < 1 or args.repeats < 1 or any(b < 1 for b in args.batch):
        ap.error("--steps, --repeats and --batch must be at least 1")
    if "fp8-torchao" in args.variants and args.variants.index("fp8-torchao") != len(args.variants) - 1:
        ap.error("fp8-torchao must come last (it quantizes the pipeline in place)")
    if args.quick:
        args.steps, args.repeats = min(args.steps, 2), 1
    device = run_device(ap, args.quick)
    _quiet()
    import diffusers
    import svdquant

    t_start = time.perf_counter()
    results = {**run_facts(device, args.steps, args.quick), "diffusers": diffusers.__version__,
               "svdquant": svdquant.__version__, "command": " ".join(sys.argv)}

    def save(r):
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "e2e.json").write_text(json.dumps(r, indent=1))

    args.save = save
    for model in args.models:
        run_model(model, args, device, results, t_start, lambda s: print(s, flush=True))
    results["total_s"] = round(time.perf_counter() - t_start, 1)
    save(results)
    print(table(results))
    return results


if __name__ == "__main__":
    main()
