"""Wall time and peak memory of quantizing FLUX.1-dev-shaped blocks, extrapolated to the 12B transformer.

    python benchmarks/quantize_flux.py --double 1 --single 2 --snapshots 128 --out $OUT
    # the whole 57-block transformer kept on the CPU, streamed to the GPU one block at a time under a cap:
    python benchmarks/quantize_flux.py --double 19 --single 38 --max-gpu-memory 24GB --out $OUT

Builds ``FluxTransformer2DModel`` with the real FLUX.1-dev config (hidden 3072, 24 heads,
MLP 12288, 4096 image + 512 text tokens at 1024²) but only a few blocks and random
weights, calibrates through its real forward on random inputs of the real shapes, and
quantizes with ``svdquant.quantize`` (block by block, as for the full model). The
per-block times, the 16-bit forward time and the 19 + 38 block count give the estimate
for the whole transformer; the calibration estimate counts the pipeline calls a real run
makes (``--prompts`` × ``--steps``, stopping each prompt after its last drawn step).

``--stream`` (implied by ``--max-gpu-memory``) moves the model and its snapshots to the CPU before
quantizing and passes ``device="cuda"``: calibration and quantization then stream one block at a time
(``svdquant.quantize(..., device=, max_gpu_memory=)``). The result has the run's stage profile
(``QuantReport.stages``: calibration and its transfers, transfers, replays, smoothing search,
refinement...) and the peak GPU memory allocated and reserved. ``--smoke --stream`` runs the same
streaming code on the CPU (every move a no-op), as ``tests/test_stream.py`` does. ``--profile`` runs the quantize
call under ``torch.profiler``: the GPU's milliseconds per kernel class (matrix products, QR / Cholesky, svdquant's
Triton kernels, copies...), the kernel launches and host op calls, and the top kernels and host ops in
``OUT/quantize_profile.txt``: which kernels fill the GPU while the groups and the replays run.

The benchmark calibrates on forward inputs (``Calibration(inputs=)``), so ``seconds_calibration_pass`` is
one whole forward (the check that the double and single stacks chain) and, for every other snapshot, a
forward stopped at the first double block; the single blocks' inputs come from the replays. Streaming,
the model is not pinned (no ``pin memory`` stage: a pipeline's calibration pins it), and the snapshots
stay on the GPU for the whole quantize phase when they fit the cap with room to spare
(``snapshots_fit`` in ``svdquant/calibration/memory.py``): ``transfers`` is then the blocks' weights alone.
``est_calibration_s`` still estimates a pipeline's calibration (every step's forward whole).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

FLUX_DEV = dict(patch_size=1, in_channels=64, out_channels=None, num_attention_heads=24, attention_head_dim=128,
                joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))


def inputs(n, img=4096, txt=512, device="cuda", dtype=torch.bfloat16, seed=0, width=4096, pooled=768, batch=1):
    """``n`` images' forward inputs, ``batch`` images a call (the last call takes what is left): what a pipeline's
    batched calibration calls record (``Calibration(batch_size=)``)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    out = []
    for start in range(0, n, batch):
        b = min(batch, n - start)
        out.append(dict(
            hidden_states=torch.randn(b, img, 64, generator=g).to(device, dtype),
            encoder_hidden_states=torch.randn(b, txt, width, generator=g).to(device, dtype),
            pooled_projections=torch.randn(b, pooled, generator=g).to(device, dtype),
            timestep=torch.rand(b, generator=g).to(device, dtype),
            guidance=torch.full((b,), 3.5, device=device, dtype=dtype),
            img_ids=torch.zeros(img, 3, device=device), txt_ids=torch.zeros(txt, 3, device=device),
            return_dict=False,
        ))
    return out


# GPU kernels by what they do, first match wins (cuBLAS / cuSOLVER / Triton kernel names as the profiler gives them)
KERNEL_CLASSES = (
    ("matrix products (cuBLAS)", ("gemm", "gemv", "cutlass", "xmma", "nvjet", "dot_kernel")),
    ("QR / Cholesky / triangular (cuSOLVER, cuBLAS)", ("geqrf", "orgqr", "ormqr", "potrf", "potri", "trsm", "trsv",
                                                       "trtri", "syevd", "gesvd", "larf", "cusolver")),
    ("svdquant Triton kernels", ("round_", "gptq", "expand_int4", "quantize_", "int8_gemm", "w4a16")),
    ("attention", ("flash", "fmha", "attention", "sdpa")),
    ("copies", ("memcpy", "memset", "copy")),
    ("reductions", ("reduce", "norm_kernel", "argmax", "max_kernel", "sum_kernel")),
)


def profiler(dev: str):
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev == "cuda" else [])
    return profile(activities=acts)


def kernel_class(name: str) -> str:
    low = name.lower()
    for cls, keys in KERNEL_CLASSES:
        if any(k in low for k in keys):
            return cls
    return "elementwise / other"


def profile_summary(prof) -> tuple[dict, str]:
    """GPU milliseconds per kernel class and in all (kernels, as the device ran them), per quantizer stage (the
    ``svdquant::<stage>`` ranges: the kernels each launched, on whichever thread; "replays" and "transfers" run
    beside the groups' stages), the host's milliseconds per stage and in torch ops; and the tables of the top 40
    kernels and host ops."""
    from torch.autograd import DeviceType

    events = prof.key_averages()
    # not the device-side copies of the svdquant::<stage> ranges (Kineto's user annotations): they span kernels
    kernels = [e for e in events if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)]
    dev_ms = {}
    for e in kernels:
        cls = kernel_class(e.key)
        dev_ms[cls] = dev_ms.get(cls, 0.0) + e.self_device_time_total / 1e3
    host = [e for e in events if e.device_type == DeviceType.CPU]
    out = dict(gpu_ms_by_class={k: round(v, 1) for k, v in sorted(dev_ms.items(), key=lambda kv: -kv[1])},
               gpu_ms_total=round(sum(dev_ms.values()), 1), kernel_launches=sum(e.count for e in kernels),
               host_op_calls=sum(e.count for e in host if e.key.startswith("aten::")))
    stages = sorted((e for e in host if e.key.startswith("svdquant::")), key=lambda e: -e.device_time_total)
    out["gpu_ms_by_stage"] = {e.key.split("::", 1)[1]: round(e.device_time_total / 1e3, 1) for e in stages}
    out["host_ms_by_stage"] = {e.key.split("::", 1)[1]: round(e.cpu_time_total / 1e3, 1) for e in stages}
    tables = ""
    if kernels:
        tables += events.table(sort_by="self_device_time_total", row_limit=40) + "\n"
    tables += events.table(sort_by="self_cpu_time_total", row_limit=40)
    return out, tables


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--double", type=int, default=1)
    ap.add_argument("--single", type=int, default=2)
    ap.add_argument("--snapshots", type=int, default=128, help="images calibrated on")
    ap.add_argument("--batch", type=int, default=1, help="images per recorded call (a batched pipeline calibration's "
                                                         "snapshots: the replays then run that many images a call)")
    ap.add_argument("--prompts", type=int, default=128, help="calibration prompts of the real run (estimate)")
    ap.add_argument("--steps", type=int, default=8, help="steps per prompt of the real run (estimate)")
    ap.add_argument("--recipe", default="int4")
    ap.add_argument("--gptq", choices=("on", "off"), help="GPTQ on the residual (recipe option gptq); default: the "
                    "recipe's own (on for int4)")
    ap.add_argument("--iterations", type=int, help="low-rank refinement steps at most (recipe option iterations; "
                    "default: the recipe's own, 10)")
    ap.add_argument("--workers", type=int, help="groups of a block quantized at once (quantize(workers=); default: "
                                                "the library's, 3 on a GPU)")
    ap.add_argument("--scoring", choices=("fp32", "tf32"),
                    help="the candidates' error products on a GPU: fp32 or the TF32 kernel "
                         "(svdquant.algorithm.gpu_kernels.SCORING_TF32); default: the library's")
    ap.add_argument("--replay-images", type=int, help="images a replayed call joins at most from one-image records "
                    "(svdquant.calibration.merge.REPLAY_IMAGES; 1: replayed as recorded); default: the library's")
    ap.add_argument("--replay-priority", type=int, help="the replays' side stream's CUDA priority "
                    "(svdquant.calibration.replay.REPLAY_PRIORITY; lower goes first, e.g. -1); default: the library's")
    ap.add_argument("--replay-graphs", choices=("on", "off"), help="each block's replayed calls launched as one "
                    "captured CUDA graph (svdquant.calibration.replay.REPLAY_GRAPHS); default: the library's")
    ap.add_argument("--overlap-blocks", choices=("on", "off"), help="a block's groups queued before the previous "
                    "block's are landed (svdquant.quantize.blocks.OVERLAP_BLOCKS); default: the library's")
    ap.add_argument("--switch-interval", type=float, help="the interpreter's thread switch interval in ms "
                    "(sys.setswitchinterval; Python's default 5): the search workers and the replay thread share "
                    "the GIL; default: left as it is")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny widths and token counts: checks the script runs")
    ap.add_argument("--stream", action="store_true",
                    help="keep the model and snapshots on the CPU and stream blocks to the device")
    ap.add_argument("--max-gpu-memory", help="cap the GPU memory torch may use, e.g. 24GB (implies --stream)")
    ap.add_argument("--profile", action="store_true",
                    help="torch.profiler over the quantize call: GPU time per kernel class and the top kernels and "
                         "host ops, in the result and OUT/quantize_profile.txt (a few blocks: the trace grows with "
                         "the run)")
    args = ap.parse_args(argv)
    if args.switch_interval is not None:
        if args.switch_interval <= 0:
            ap.error(f"--switch-interval {args.switch_interval}: use a positive number of milliseconds")
        sys.setswitchinterval(args.switch_interval / 1e3)
    from svdquant.algorithm import gpu_kernels

    if args.scoring is not None:
        gpu_kernels.SCORING_TF32 = args.scoring == "tf32"
    from svdquant.calibration import merge

    if args.replay_images is not None:
        if args.replay_images < 1:
            ap.error(f"--replay-images {args.replay_images}: use 1 or more")
        merge.REPLAY_IMAGES = args.replay_images
    from svdquant.calibration import replay

    if args.replay_priority is not None:
        replay.REPLAY_PRIORITY = args.replay_priority
    if args.replay_graphs is not None:
        replay.REPLAY_GRAPHS = args.replay_graphs == "on"
    from svdquant.calibration import replay_graph
    from svdquant.quantize import blocks as quantize_blocks

    if args.overlap_blocks is not None:
        quantize_blocks.OVERLAP_BLOCKS = args.overlap_blocks == "on"
    dev = "cpu" if args.smoke else "cuda"
    stream = args.stream or args.max_gpu_memory is not None
    cfg = dict(FLUX_DEV, num_attention_heads=2, attention_head_dim=32, joint_attention_dim=64,
               pooled_projection_dim=32, axes_dims_rope=(8, 12, 12)) if args.smoke else FLUX_DEV

    from diffusers import FluxTransformer2DModel

    import svdquant
    from svdquant.calibration import Calibration, draw_plan
    from svdquant.quantize.concurrent import default_workers

    torch.manual_seed(0)
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    with torch.device(dev):
        model = FluxTransformer2DModel(num_layers=args.double, num_single_layers=args.single, **cfg)
    model = model.to(torch.bfloat16).eval()
    snaps = inputs(args.snapshots, *((64, 8) if args.smoke else (4096, 512)), device=dev,
                   width=cfg["joint_attention_dim"], pooled=cfg["pooled_projection_dim"], batch=args.batch)
    sync()
    with torch.no_grad():
        model(**snaps[0])
        sync()
        t0 = time.perf_counter()
        for s in snaps[:8]:
            model(**s)
        sync()
    fwd = (time.perf_counter() - t0) / sum(s["hidden_states"].shape[0] for s in snaps[:8])  # per image
    if stream:  # the model as a user's is: in CPU memory, the GPU empty
        model = model.to("cpu")
        snaps = [{k: v.to("cpu") if torch.is_tensor(v) else v for k, v in s.items()} for s in snaps]
        if dev == "cuda":
            torch.cuda.empty_cache()
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    overrides = {} if args.gptq is None else {"gptq": args.gptq == "on"}
    if args.iterations is not None:
        overrides["iterations"] = args.iterations
    recipe = svdquant.get_recipe(args.recipe, **overrides)
    prof = profiler(dev) if args.profile else contextlib.nullcontext()
    with prof:
        report = svdquant.quantize(model, recipe, Calibration(inputs=snaps), progress=False,
                                   device=dev if stream else None, max_gpu_memory=args.max_gpu_memory,
                                   workers=args.workers)
        sync()
    total = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 1e9 if dev == "cuda" else float("nan")
    peak_reserved = torch.cuda.max_memory_reserved() / 1e9 if dev == "cuda" else float("nan")
    on = {str(p.device) for p in model.parameters()} | {str(b.device) for b in model.buffers()}

    per_block: dict[str, float] = {}
    for r in report.rows:
        blk = r.names[0].split(".")[0] + "." + r.names[0].split(".")[1]
        per_block[blk] = per_block.get(blk, 0.0) + r.seconds
    dbl = [v for k, v in per_block.items() if k.startswith("transformer_blocks")]
    sgl = [v for k, v in per_block.items() if k.startswith("single_transformer_blocks")]
    n_blocks = args.double + args.single
    workers = args.workers if args.workers is not None else default_workers(torch.device(dev))
    if workers == 1:
        overhead = total - report.seconds_calibration - sum(per_block.values())  # block replays, hooks
        est_quant = 19 * sum(dbl) / len(dbl) + 38 * sum(sgl) / len(sgl) + overhead * 57 / n_blocks
    else:  # the groups' own seconds overlap: the quantize phase's wall time, scaled by the block count (a stack's
        # first block runs one group at a time, so a run of few blocks overstates the 57-block time)
        overhead = float("nan")
        est_quant = (total - report.seconds_calibration) * 57 / n_blocks
    # forward of the 57-block model ~ forward of this one scaled by block count (embedders are negligible)
    fwd_full = fwd * 57 / n_blocks
    plan = draw_plan(args.prompts, args.steps, args.snapshots, 0)
    calls = sum(max(s) + 1 for s in plan.values())
    est_calib = calls * fwd_full
    commit = os.environ.get("SVDQUANT_COMMIT")  # the device's copy of .git may be stale
    if not commit:
        try:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                    cwd=Path(__file__).parent).stdout.strip()
        except OSError:
            commit = ""
    res = dict(
        device=torch.cuda.get_device_name() if dev == "cuda" else "cpu (smoke)", commit=commit, torch=torch.__version__,
        recipe=args.recipe, workers=workers, gptq=recipe.gptq, scoring_tf32=gpu_kernels.SCORING_TF32,
        replay_images=merge.REPLAY_IMAGES, replay_priority=replay.REPLAY_PRIORITY,
        replay_graphs=dict(on=replay.REPLAY_GRAPHS, **dataclasses.asdict(replay_graph.TOTALS)),
        overlap_blocks=quantize_blocks.OVERLAP_BLOCKS, switch_interval_ms=sys.getswitchinterval() * 1e3,
        iterations_max=recipe.iterations, blocks=dict(double=args.double, single=args.single),
        stream=stream, max_gpu_memory=args.max_gpu_memory, model_ends_on=sorted(on),
        snapshots=args.snapshots, batch=args.batch, recorded_calls=len(snaps), seconds_total=total,
        seconds_calibration_pass=report.seconds_calibration,
        seconds_per_double_block=sum(dbl) / len(dbl), seconds_per_single_block=sum(sgl) / len(sgl),
        seconds_replay_overhead=overhead,  # NaN with workers > 1: the per-block seconds then add up overlapping groups
        peak_gb=peak, peak_reserved_gb=peak_reserved, snapshots_on_device=report.snapshots_on_device,
        stages=report.stages, forward_ms_this_model=fwd * 1e3,
        forward_ms_57_blocks_est=fwd_full * 1e3, pipeline_calls_est=calls, est_calibration_s=est_calib,
        est_quantization_s=est_quant, est_total_min=(est_calib + est_quant) / 60,
        iterations=[r.iterations for r in report.rows], rows=[(r.names, r.rel_error, r.seconds) for r in report.rows],
    )
    if args.profile:
        res["profile"], tables = profile_summary(prof)
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "quantize_profile.txt").write_text(tables)
    print(json.dumps({k: v for k, v in res.items() if k not in ("rows", "iterations")}, indent=1))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "quantize_flux.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
