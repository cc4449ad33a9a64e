"""Whole pipelines end to end, side by side in one run: what a user gets per image (issue 22).

    python benchmarks/e2e.py --models flux --batch 1 4 --out $OUT          # bf16, bf16-compiled, int4 (default path)
    python benchmarks/e2e.py --models sdxl qwenimage --batch 1 --out $OUT
    python benchmarks/e2e.py --models sd3 sana pixart --batch 1 --out $OUT
    python benchmarks/e2e.py --models kontext --batch 1 --out $OUT              # FLUX.1 Kontext, a 1024² picture in
    python benchmarks/e2e.py --models qwenimage-edit --batch 1 --out $OUT       # Qwen-Image-Edit, the same
    python benchmarks/e2e.py --models flux2 --batch 1 --steps 28 --repeats 2 --out $OUT   # FLUX.2 [dev] 32B
    python benchmarks/e2e.py --models flux --variants int4 fp8-torchao --out $OUT   # beside torchao FP8 row-wise
    python benchmarks/e2e.py --quick                                         # CPU smoke: tiny configs

Each model is its diffusers pipeline with the real architecture and random weights, built on the GPU as
``benchmarks/pipeline_memory.py`` builds it (its docstring has the details), all at 1024² and ``--steps`` (default
28) steps: FLUX.1-dev guidance 3.5; SDXL CFG 5; Qwen-Image true CFG 4; SD3.5 Large CFG 3.5, T5 256 tokens;
SANA 1600M CFG 4.5, Gemma 300 tokens (SANA's usual is 20 steps: pass ``--steps 20``); PixArt-Σ XL CFG 4.5,
T5 300 tokens (usually 20 steps too); FLUX.1 Kontext [dev] guidance 2.5 and Qwen-Image-Edit true CFG 4, each
editing a fixed random 1024² picture given as ``image=`` (its latent tokens join the denoised ones: 8192 image
tokens per transformer call; Qwen2.5-VL reads the picture too); FLUX.2 [dev] guidance 4.0 (guidance-distilled),
Mistral Small 3.1 512 tokens. SDXL, SD3.5, SANA and PixArt-Σ run CFG as batch 2 per step, Qwen-Image's and
Qwen-Image-Edit's true CFG as two calls.

FLUX.2 [dev] (``flux2``) is too tight on one H200 with its text encoder resident: its transformer is 64.45 GB in
BF16 and Mistral Small 3.1 24B 48.0 GB, 112.6 GB with the VAE before activations, compiled graphs and the int4
variant's new layers. Both are built on the GPU (random init there: no copy in CPU memory), the prompt is encoded once
(``pipe.encode_prompt``, timed: a first call and a second), then the text encoder is dropped
(``pipe.text_encoder = None``, its 48 GB freed) before any variant, and every timed call of every variant gives the
pipeline ``prompt_embeds=`` instead of the prompt (batch b: the pipeline repeats them b times). Its s / image
excludes the text encoding; the result's ``text_encoding`` records that and the encoding's own seconds and memory.

Variants, on one pipeline per model (``fp8-torchao`` after ``int4``: on a second one):

* ``bf16``: diffusers as loaded, eager;
* ``bf16-compiled``: the denoiser's repeated blocks through ``torch.compile`` (what diffusers recommends,
  ``compile_repeated_blocks``; here the same blocks svdquant compiles), default inductor mode and options (ours
  add inductor's coordinate-descent tuning, ``svdquant.pipelines.compiling.COMPILE_OPTIONS``);
* ``fp8-torchao``: torchao's ``Float8DynamicActivationFloat8WeightConfig(PerRow())`` on every linear of the
  denoiser, compiled the same way (its compile is slow: first calls take minutes). It comes last; after an
  ``int4`` variant it runs on a new pipeline, built as the first was;
* ``int4``: the denoiser's layers as svdquant ``int4`` (random valid contents), then ``svdquant.optimize(pipe)``:
  what ``load_pipeline`` gives on CUDA by default (fused, attention backend, compiled blocks, CUDA graphs);
* ``int4-int8attn``: the same with ``svdquant.optimize(pipe, attention="int8")``: INT8 Q·Kᵀ attention (opt-in);
* ``int4-model``: the same with ``svdquant.optimize(pipe, compile="model")``: the whole forward as one graph
  (opt-in);
* ``int4-no-normrope``: the same with q/k RMSNorm + RoPE left to diffusers' processors in every attention
  (``svdquant.modules.norm_rope.OPTIMIZED`` emptied for the call): the A/B of the op ``optimize`` fuses.

Each ``int4`` variant after the first starts from the quantized layers unfused (``deoptimize``, ``unfuse``).

Per variant and batch size: the first call's seconds (compilation, capture) and the steady seconds per image
(median of ``--repeats`` calls), peak GPU memory of a steady call and what stays resident. Results go to
``--out``/e2e.json after every measurement; a measurement that would start after ``--budget-s`` is skipped and
listed, so one device call always returns what it measured.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
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

VARIANTS = ("bf16", "bf16-compiled", "fp8-torchao", "int4", "int4-int8attn", "int4-model", "int4-no-normrope")
OPTIMIZE = {"int4": {}, "int4-int8attn": dict(attention="int8"), "int4-model": dict(compile="model"),
            "int4-no-normrope": {}}
# Models whose prompt is encoded once, before the variants, then their text encoder dropped from the GPU: every
# timed call reads the precomputed prompt_embeds (FLUX.2 [dev]: 64.45 + 48.0 GB of BF16 weights)
PRECOMPUTED_TEXT = ("flux2",)


def optimize_as(pipe, variant: str):
    """``svdquant.optimize`` with the variant's arguments; ``int4-no-normrope`` with q/k norm + RoPE left to diffusers
    in every attention (the module's switch, put back after)."""
    import svdquant
    from svdquant.modules import norm_rope

    optimized = norm_rope.OPTIMIZED
    norm_rope.OPTIMIZED = () if variant == "int4-no-normrope" else optimized
    try:
        return svdquant.optimize(pipe, **OPTIMIZE[variant])
    finally:
        norm_rope.OPTIMIZED = optimized


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


def precompute_text(pipe, call: dict, device: str) -> tuple[dict, dict]:
    """Encode ``call``'s prompt once with the pipeline's text encoder (twice, timed: the first call pays the
    kernels' first launches), then drop the text encoder (``pipe.text_encoder = None``, freed from the GPU).
    Returns (the call with ``prompt_embeds=`` in place of the prompt and the text encoder's arguments, what to
    record). FLUX.2's pipelines: ``encode_prompt(prompt, device, max_sequence_length, text_encoder_out_layers)``
    -> (prompt_embeds, text_ids); given ``prompt_embeds`` (and no prompt) a call never touches the text encoder."""
    cuda = device == "cuda"
    text_kw = {k: call[k] for k in ("max_sequence_length", "text_encoder_out_layers") if k in call}
    weights = components_gb(pipe)["text_encoder"]
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    resident = torch.cuda.memory_allocated() / 1e9 if cuda else None
    times = []
    with torch.no_grad():
        for _ in range(2):
            t0 = time.perf_counter()
            embeds = pipe.encode_prompt(call["prompt"], device=pipe._execution_device, **text_kw)[0]
            _sync(device)
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 1e9 if cuda else None
    encoder = pipe.text_encoder
    pipe.text_encoder = None  # a registered component may be None: the pipeline's config follows
    del encoder
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    timed = {k: v for k, v in call.items() if k != "prompt" and k not in text_kw}
    timed["prompt_embeds"] = embeds
    facts = dict(excluded_from_seconds_per_image=True, first_call_s=round(times[0], 3), seconds=round(times[1], 3),
                 text_encoder_weights_gb=weights, resident_gb_with_text_encoder=resident and round(resident, 2),
                 peak_gb=peak and round(peak, 2),
                 resident_gb_after_drop=round(torch.cuda.memory_allocated() / 1e9, 2) if cuda else None,
                 prompt_embeds_shape=list(embeds.shape), text_encoder="dropped before the variants "
                 "(pipe.text_encoder = None); every timed call reads prompt_embeds")
    return timed, facts


def compile_denoiser(den) -> int:
    """The blocks svdquant compiles, at inductor's defaults (diffusers' users' compile; ``svdquant.optimize`` adds
    its ``COMPILE_OPTIONS`` for ours)."""
    from svdquant.pipelines.compiling import compile_blocks

    return compile_blocks(den, options={})


def uncompile(den) -> None:
    for m in den.modules():
        if getattr(m, "_compiled_call_impl", None) is not None:
            m._compiled_call_impl = None
    torch._dynamo.reset()


def run_model(model: str, args, device: str, results: dict, t_start: float, log) -> None:
    import svdquant

    res = results.setdefault(model, {})

    def left() -> bool:
        return time.perf_counter() - t_start < args.budget_s

    def fresh():
        t = time.perf_counter()
        pipe, call = build(model, args.quick, device)
        pipe.to(device)
        res.setdefault("build_s", round(time.perf_counter() - t, 1))
        res["call"] = call_facts(call) | {"steps": args.steps}
        if model in PRECOMPUTED_TEXT:
            call, facts = precompute_text(pipe, call, device)
            res.setdefault("text_encoding", facts)  # the first pipeline's: the one its memory figures came from
            res["call"]["prompt_embeds"] = (f"precomputed {res['text_encoding']['prompt_embeds_shape']} from the "
                                            "prompt (the text encoder dropped)")
            log(f"{model:10s} text encoding (excluded from s / image) {json.dumps(res['text_encoding'])}")
            args.save(results)
        return pipe, call, denoiser(pipe)

    pipe, call, den = fresh()
    quantized = False
    for variant in args.variants:
        row = res.setdefault(variant, {})
        if variant == "bf16-compiled":
            row["compiled_blocks"] = compile_denoiser(den)
        elif variant == "fp8-torchao":
            from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

            uncompile(den)
            if not left():  # no pipeline built, quantized and compiled for measurements that would be skipped
                row.update({f"b{b}": {"skipped": f"past --budget-s {args.budget_s}"} for b in args.batch})
                break
            if quantized:  # svdquant's layers replaced the linears torchao quantizes: a new pipeline, as built
                svdquant.deoptimize(pipe)
                del pipe, den
                free(device)
                pipe, call, den = fresh()
                row["fresh_pipeline"] = True
            # quantize_ also sets inductor's config process-wide (coordinate-descent tuning, ...): torchao's users
            # get that, the next model's variants must not (restored below)
            inductor_config = torch._inductor.config.get_config_copy()
            quantize_(den, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))
            row["compiled_blocks"] = compile_denoiser(den)
        elif variant in OPTIMIZE:
            if quantized:  # after the int4 variant: the same layers, fused and optimized again
                svdquant.deoptimize(pipe)
                svdquant.unfuse(pipe)
            else:
                uncompile(den)
                row["quantized_layers"] = random_quantize(den, "speed")
                quantized = True
            report = optimize_as(pipe, variant)
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
            r.update(graph_counts(pipe))
            log(f"{model:10s} {variant:14s} b{b} {json.dumps(r)}")
            args.save(results)
        row["weights_gb"] = components_gb(pipe)
        if variant in OPTIMIZE:
            row["optimize"] = report.to_dict()  # after the calls: the layer choice is made at the first
        if variant == "fp8-torchao":
            torch._inductor.config.load_config(inductor_config)
            break  # the pipeline now holds torchao's tensors; the int4 variant needs a fresh one
    del pipe, den
    free(device)


def graph_counts(pipe) -> dict:
    """The pipeline's CUDA-graph captures and replays so far (none without graphs). No reference to its graphs
    outlives the call: they hold the denoiser, which a new pipeline's memory must not count."""
    from svdquant.pipelines.optimize import graphs_of  # svdquant loads its pipelines package lazily

    graphs = graphs_of(pipe)
    return {} if graphs is None else {"graph_captures": graphs.captures, "graph_replays": graphs.replays}


def free(device) -> None:
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
    for model in MODELS:
        te = (results.get(model) or {}).get("text_encoding") if isinstance(results.get(model), dict) else None
        if te:
            peak = "" if te["peak_gb"] is None else (f", peak {te['peak_gb']} GB with the text encoder "
                                                     f"({te['text_encoder_weights_gb']:.2f} GB) resident")
            lines.append(f"\n{model}: s / image excludes the text encoding, run once before the variants: "
                         f"{te['seconds']} s ({te['first_call_s']} s the first call){peak}")
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
    if "fp8-torchao" in args.variants and importlib.util.find_spec("torchao") is None:
        ap.error("fp8-torchao needs torchao: pip install torchao, or leave fp8-torchao out")
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
