"""Quantizing a whole FLUX.1-dev pipeline as a user does: held in CPU memory, calibrated through its prompts,
streamed to a capped GPU (issue 16's real-user case; ``quantize_flux.py`` times the bare transformer).

    python benchmarks/quantize_pipeline.py --max-gpu-memory 24GB --out $OUT                 # on a GPU
    python benchmarks/quantize_pipeline.py --max-gpu-memory 24GB --calibration-batch 1 --out $OUT  # one prompt a call
    python benchmarks/quantize_pipeline.py --max-gpu-memory 24GB --resident off --out $OUT  # the ablation
    python benchmarks/quantize_pipeline.py --max-gpu-memory 24GB --prefetch off --beside off --out $OUT  # the others
    python benchmarks/quantize_pipeline.py --max-gpu-memory 24GB --ahead off --out $OUT     # encoders in every call
    python benchmarks/quantize_pipeline.py --model qwenimage --max-gpu-memory 24GB --out $OUT  # Qwen-Image
    python benchmarks/quantize_pipeline.py --smoke                                          # CPU: the plumbing

The pipeline is ``benchmarks/pipeline_memory.py``'s FLUX.1-dev (``--model``: another of its text-to-image
pipelines, called as it calls them, e.g. Qwen-Image with true CFG): the real architectures and sizes of the
transformer (23.8 GB in BF16), T5-XXL (9.5 GB) and CLIP-L, random weights drawn on the GPU in BF16 and held in
CPU memory.
``svdquant.quantize(pipe, recipe, Calibration(num_prompts=, steps=, snapshots=, pipeline_kwargs=...),
device="cuda", max_gpu_memory=...)`` runs the calibration prompts through the pipeline at ``--size``²: each
denoising step is a whole transformer forward, so streamed blocks cross PCIe at every step, except the
first ones that fit the cap, which stay on the GPU from step to step (``resident_blocks`` in
``svdquant/calibration/memory.py``); ``--resident off`` streams every block at every step, for comparison;
``--prefetch off`` copies each streamed block on the compute stream when it is called instead of during the
previous block's compute; ``--beside off`` makes the resident blocks leave the GPU while a text encoder runs
(whole) instead of the encoders running layer by layer beside them; ``--ahead off`` runs the text encoders in every
calibration call instead of once, ahead of them (``svdquant/calibration/ahead.py``). Writes the time, the peak GPU
memory, the stage profile, the resident block count and what the pass ahead kept and answered to
``OUT/quantize_pipeline.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # unset: the library's defaults (128 prompts, 8 steps, 128 snapshots), what `svdquant quantize` runs
    ap.add_argument("--model", default="flux", choices=["flux", "qwenimage", "sd3", "pixart", "sana"],
                    help="the pipeline (benchmarks/pipeline_memory.py's build; default FLUX.1-dev)")
    ap.add_argument("--prompts", type=int, help="calibration prompts (of the built-in 128; default all)")
    ap.add_argument("--steps", type=int, help="denoising steps per prompt (default: the library's, 8)")
    ap.add_argument("--snapshots", type=int, help="(prompt, step) calls drawn as snapshots (default 128)")
    ap.add_argument("--calibration-batch", type=int,
                    help="prompts per calibration call (default: the library's, up to 4 when streaming)")
    ap.add_argument("--size", type=int, default=1024, help="image height and width")
    ap.add_argument("--recipe", default="int4")
    ap.add_argument("--max-gpu-memory", help="cap the GPU memory torch may use, e.g. 24GB")
    ap.add_argument("--resident", choices=["on", "off"], default="on",
                    help="off: no block stays on the GPU between steps (the ablation)")
    ap.add_argument("--prefetch", choices=["on", "off"], default="on",
                    help="off: each streamed block crosses when it is called (the ablation)")
    ap.add_argument("--beside", choices=["on", "off"], default="on",
                    help="off: the text encoders cross whole, the resident blocks making room (the ablation)")
    ap.add_argument("--ahead", choices=["on", "off"], default="on",
                    help="off: each calibration call runs its text encoders (no pass ahead; the ablation)")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny models: checks the script runs")
    args = ap.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("quantize_pipeline.py: needs a CUDA GPU; use --smoke on the CPU")

    import svdquant
    from pipeline_memory import build
    from svdquant.calibration import Calibration

    from svdquant.calibration import memory as memory_policy

    resident = {}
    choose = memory_policy.resident_blocks

    def counted(*a):
        resident["blocks"] = choose(*a) if args.resident == "on" else 0
        return resident["blocks"]

    memory_policy.resident_blocks = counted  # the ablation switch, and the count for the report
    if args.prefetch == "off":
        import functools

        memory_policy.Streamed = functools.partial(memory_policy.Streamed, prefetch=False)
    if args.beside == "off":
        memory_policy.runs_beside = lambda *a: False
    from svdquant.calibration import ahead as calib_ahead, schedule
    from svdquant.quantize import blocks as quantize_blocks

    passes = []  # the text encoders' pass ahead: what it kept and answered (the ablation runs none)

    def encode_ahead(*a, **kw):
        passes.append(calib_ahead.encode_ahead(*a, **kw) if args.ahead == "on" else None)
        return passes[-1]

    schedule.encode_ahead = quantize_blocks.encode_ahead = encode_ahead

    t0 = time.perf_counter()
    # random weights drawn on the GPU (the 16 B parameters' fill on the CPU is what a 10-minute call spent its time
    # in before, NOTES-GPU.md session 17), then held in CPU memory as a user's loaded pipeline is; the GPU's cache
    # is emptied before the capped run
    pipe, kw = build(args.model, quick=args.smoke, device="cpu" if args.smoke else "cuda")
    if not args.smoke:
        pipe.to("cpu")
        torch.cuda.empty_cache()
    build_s = time.perf_counter() - t0
    print(f"built the pipeline in CPU memory in {build_s:.1f} s", flush=True)  # a run cut short says where it was
    size = kw["height"] if args.smoke else args.size  # the tiny pipelines' own sizes (multiples of 32 for some)
    call = {k: v for k, v in kw.items() if k not in ("prompt", "output_type", "height", "width", "image")}
    calib = Calibration(num_prompts=args.prompts, steps=args.steps, snapshots=args.snapshots,
                        batch_size=args.calibration_batch,
                        pipeline_kwargs={**call, "height": size, "width": size})  # the model's call, as a user's
    dev = "cpu" if args.smoke else "cuda"
    # the transformer forwards the calibration ran whole (each streams the non-resident blocks once), and those it
    # began: a call's last drawn forward ends at the first block
    forwards, begun = [], []
    hooks = [pipe.transformer.register_forward_hook(lambda m, a, out: forwards.append(1)),
             pipe.transformer.register_forward_pre_hook(lambda m, a: begun.append(1))]
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    # progress: a line at most every 20 s in a log (bars on a terminal), so a run cut short shows its stage
    report = svdquant.quantize(pipe, args.recipe, calib, progress=not args.smoke, device=dev,
                               max_gpu_memory=None if args.smoke else args.max_gpu_memory)
    total = time.perf_counter() - t0
    for h in hooks:
        h.remove()
    ran = calib.for_pipeline(pipe)  # the prompts and steps the defaults gave
    blocks = sum(len(m) for m in pipe.transformer.children() if isinstance(m, torch.nn.ModuleList))
    res = dict(
        model=args.model, device=torch.cuda.get_device_name() if dev == "cuda" else "cpu (smoke)",
        commit=os.environ.get("SVDQUANT_COMMIT", ""), torch=torch.__version__, recipe=args.recipe,
        prompts=len(ran.prompt_list()), steps=ran.steps, snapshots=report.snapshots, size=size,
        calibration_batch=args.calibration_batch, calibration_forwards=len(forwards),
        calibration_forwards_ended_early=len(begun) - len(forwards),
        max_gpu_memory=args.max_gpu_memory, resident=args.resident, prefetch=args.prefetch, beside=args.beside,
        ahead=args.ahead, ahead_answered=sum(p.answered for p in passes if p is not None),
        ahead_kept_gb=sum(p.kept_bytes for p in passes if p is not None) / 1e9,
        ahead_dropped=any(p.dropped for p in passes if p is not None),
        resident_blocks=resident.get("blocks", 0),
        blocks=blocks, build_s=build_s, seconds_total=total, seconds_calibration=report.seconds_calibration,
        peak_gb=torch.cuda.max_memory_allocated() / 1e9 if dev == "cuda" else None,
        peak_reserved_gb=torch.cuda.max_memory_reserved() / 1e9 if dev == "cuda" else None,
        stages=report.stages, groups=len(report.rows), snapshots_on_device=report.snapshots_on_device,
    )
    print(json.dumps(res, indent=1))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "quantize_pipeline.json").write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
