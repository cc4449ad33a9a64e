"""End-to-end quality ablation on the shipped tiny FLUX model (CIFAR-10, 32×32).

    python benchmarks/quality.py --out quality.md        # the table in BENCHMARKS.md (H100: 2.6 min; CPU: hours)
    python benchmarks/quality.py --per-class 2 --variants int4@32 int4-naive --device cpu   # quick look

Samples ``--per-class`` images of every class from fixed noise with the 16-bit model, then
with each quantized variant from the same noise, and reports per variant:

* PSNR / SSIM against the 16-bit images (mean over images);
* the shipped CIFAR-10 classifier's accuracy on the samples (is the class still drawn?) and its
  agreement with its own predictions on the 16-bit samples;
* the Fréchet distance of the classifier's features to the CIFAR-10 test set (``FD test``, the
  offline stand-in for FID) and to the 16-bit samples (``FD 16-bit``).

It also measures how strong the outliers of the model's linear inputs are: per layer, the
ratio of the largest per-channel |x| max to the median channel's, over the 16-bit sampling run.

Variants are recipe names with an optional ablation method and ``@rank``:
``int4-naive``, ``int4-smooth``, ``int4-lowrank@32``, ``int4-lorc@32``, ``int4@32``, ...
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from svdquant import Calibration, quantize  # noqa: E402
from svdquant.metrics import psnr, ssim  # noqa: E402
from svdquant.pipelines import TinyFluxPipeline  # noqa: E402
from svdquant.quality import (  # noqa: E402
    class_accuracy, feature_stats, features, frechet_distance, load_classifier, reference_stats,
)
from svdquant.recipes import get_recipe  # noqa: E402

RANKS = (8, 32, 128)
DEFAULT_VARIANTS = (
    ["int4-naive", "int4-smooth"]
    + [f"int4-{m}@{r}" for m in ("lowrank", "lorc") for r in RANKS]
    + [f"int4@{r}" for r in RANKS]
    + ["nvfp4-naive", "nvfp4@32", "w8a8-naive", "w8a8@32", "nf4"]
)


def _field_value(text: str):
    """A recipe field's value as written after ``/key=``: true / false, a number, else the text."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_variant(v: str):
    """``recipe[:activations][@rank][+gptq|-gptq]``: e.g. ``int4@32``, ``w4a4-float:int8@32`` (float weight scales,
    A8), ``w4a4@32+gptq`` (GPTQ on the residual), ``int4-gptq`` (the recipe with GPTQ turned off); any recipe field
    after a slash: ``int4@32/iterations=0``."""
    over = {}
    v, *fields = v.split("/")
    for f in fields:
        key, _, val = f.partition("=")
        over[key] = _field_value(val)
    for tag, on in (("+gptq", True), ("-gptq", False)):
        if v.endswith(tag):
            v, over["gptq"] = v[: -len(tag)], on
    name, _, rank = v.partition("@")
    name, _, acts = name.partition(":")
    if rank:
        over["rank"] = int(rank)
    if acts:
        over.update(activations=acts, name=f"{name}:{acts}")
    return get_recipe(name, **over)


@torch.no_grad()
def outlier_ratios(pipe: TinyFluxPipeline, labels, noise, steps: int) -> dict[str, float]:
    """Per linear: max over channels of max|x| divided by the median channel's max|x| (16-bit run)."""
    amax: dict[str, torch.Tensor] = {}
    hooks = []
    for name, m in pipe.transformer.named_modules():
        if isinstance(m, torch.nn.Linear):
            def hook(_m, args, name=name):
                a = args[0].detach().abs().flatten(0, -2).amax(0).float()
                amax[name] = torch.maximum(amax[name], a) if name in amax else a
            hooks.append(m.register_forward_pre_hook(hook))
    try:
        pipe(class_labels=labels, latents=noise, num_inference_steps=steps, output_type="pt")
    finally:
        for h in hooks:
            h.remove()
    return {k: float(v.max() / v.median().clamp_min(1e-12)) for k, v in amax.items()}


def use_pow2_int4_scales() -> None:
    """Round INT4 group scales up to powers of two everywhere (quantizer and runtime reference).

    An experiment, not a recipe: the fused kernels compute their own scales, so the reference runs.
    Rounding up keeps every code in range; each group loses up to one bit of its range.
    """
    from svdquant.formats import int4

    os.environ["SVDQUANT_REFERENCE"] = "1"
    grid = int4._int4_grid

    def pow2_grid(x, group_size, unsigned, scale_dtype, check):
        xg, scale, s, inv, lo, hi = grid(x, group_size, unsigned, scale_dtype, check)
        p = torch.where(s > 0, torch.exp2(torch.ceil(torch.log2(s.clamp_min(1e-30)))), torch.zeros_like(s))
        scale = p.to(scale.dtype)  # powers of two are exact in bf16 / fp16 / fp32
        s = scale.float()
        return xg, scale, s, torch.where(s > 0, 1.0 / s, torch.zeros_like(s)), lo, hi

    int4._int4_grid = pow2_grid


def sample(pipe, labels, noise, steps, batch):
    return torch.cat([
        pipe(class_labels=labels[i:i + batch], latents=noise[i:i + batch], num_inference_steps=steps,
             output_type="pt").images.float().cpu()
        for i in range(0, len(labels), batch)
    ])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS)
    ap.add_argument("--per-class", type=int, default=50, help="samples per class (default 50: 500 images)")
    ap.add_argument("--steps", type=int, default=10, help="Euler steps (default 10)")
    ap.add_argument("--calib-steps", type=int, default=10)
    ap.add_argument("--snapshots", type=int, default=32)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["fp32", "bf16", "fp16"],
                    help="16-bit model dtype (default: bf16 on CUDA, where the fused kernels run; fp32 on CPU)")
    ap.add_argument("--out", type=Path, help="also write the markdown here")
    ap.add_argument("--pow2-scales", action="store_true",
                    help="what-if: round every INT4 group scale (weights and activations) up to a power of two, "
                         "as an FP8-folded GEMM would need (runs the torch reference)")
    ap.add_argument("--gemm", choices=["default", "triton"], default="default",
                    help="triton: Triton's INT8 GEMM where an H100 / H200 would run the CUTLASS one (its bf16 "
                         "branch against the Triton kernel's tf32: the quality gate's A/B)")
    ap.add_argument("--scoring", choices=("fp32", "tf32"),
                    help="the quantizer's error products on a GPU: fp32 or the TF32 kernel (gpu_kernels.SCORING_TF32; "
                         "the A/B that decides its default); default: the library's")
    args = ap.parse_args(argv)
    if args.scoring is not None:
        from svdquant.algorithm import gpu_kernels

        gpu_kernels.SCORING_TF32 = args.scoring == "tf32"
    if args.gemm == "triton":
        from svdquant.kernels import cutlass_launch

        cutlass_launch.ENABLED = False
    if args.pow2_scales:
        use_pow2_int4_scales()
    torch.manual_seed(args.seed)
    dev = torch.device(args.device)
    t_start = time.perf_counter()

    dtype_name = args.dtype or ("bf16" if dev.type == "cuda" else "fp32")
    args.dtype = dtype_name
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
    base = TinyFluxPipeline.default(dtype).to(dev)
    judge = load_classifier(device=dev)
    mu_test, sigma_test = reference_stats()
    n_cls = len(base.classes)
    labels = torch.arange(n_cls).repeat_interleave(args.per_class)
    noise = base.noise(len(labels), torch.Generator().manual_seed(args.seed))

    ratios = outlier_ratios(base, labels[:: args.per_class], noise[:: args.per_class], args.steps)
    ref = sample(base, labels, noise, args.steps, args.batch)
    ref_pred = torch.cat([judge(ref[i:i + 500].to(dev)).argmax(1).cpu() for i in range(0, len(ref), 500)])
    f_ref = features(judge, ref)
    mu_ref, sigma_ref = feature_stats(f_ref)
    acc_ref, per_ref = class_accuracy(judge, ref, labels)
    rows = [dict(variant="16-bit", psnr=float("inf"), ssim=1.0, acc=acc_ref, agree=1.0,
                 fd_test=frechet_distance(mu_ref, sigma_ref, mu_test, sigma_test), fd_ref=0.0, secs=0.0)]
    print(f"16-bit: accuracy {acc_ref:.3f}, FD test {rows[0]['fd_test']:.2f} "
          f"({time.perf_counter() - t_start:.0f} s)", flush=True)

    for v in args.variants:
        recipe = parse_variant(v)
        pipe = copy.deepcopy(base)
        t0 = time.perf_counter()
        quantize(pipe, recipe, Calibration(steps=args.calib_steps, snapshots=args.snapshots, seed=args.seed),
                 progress=False)
        secs = time.perf_counter() - t0
        imgs = sample(pipe, labels, noise, args.steps, args.batch)
        pred = torch.cat([judge(imgs[i:i + 500].to(dev)).argmax(1).cpu() for i in range(0, len(imgs), 500)])
        mu, sigma = feature_stats(features(judge, imgs))
        acc, _ = class_accuracy(judge, imgs, labels)
        rows.append(dict(variant=v, psnr=float(psnr(imgs, ref).mean()), ssim=float(ssim(imgs, ref).mean()), acc=acc,
                         agree=float((pred == ref_pred).float().mean()),
                         fd_test=frechet_distance(mu, sigma, mu_test, sigma_test),
                         fd_ref=frechet_distance(mu, sigma, mu_ref, sigma_ref), secs=secs))
        r = rows[-1]
        print(f"{v}: PSNR {r['psnr']:.2f} dB, SSIM {r['ssim']:.4f}, acc {r['acc']:.3f}, agree {r['agree']:.3f}, "
              f"FD test {r['fd_test']:.2f}, FD 16-bit {r['fd_ref']:.2f}, quantize {secs:.1f} s", flush=True)
        del pipe

    md = report(rows, ratios, args, time.perf_counter() - t_start)
    print(md)
    if args.out:
        args.out.write_text(md + "\n")


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU ({platform.machine()})"


def report(rows, ratios, args, seconds) -> str:
    # The device copy of the tree may carry a stale .git: let the caller say which commit ran.
    commit = os.environ.get("SVDQUANT_COMMIT")
    try:
        commit = commit or subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        commit = "?"
    n = args.per_class * 10
    lines = [
        f"Tiny FLUX (CIFAR-10, 32×32), {n} samples ({args.per_class} per class), {args.steps} Euler steps, "
        f"guidance 2, seed {args.seed}; calibration {args.snapshots} snapshots of {args.calib_steps}-step runs"
        f"{'; INT4 group scales rounded up to powers of two (torch reference)' if args.pow2_scales else ''}"
        f"{'; Triton INT8 GEMM (CUTLASS off)' if args.gemm == 'triton' else ''}"
        f"{'; scoring products in ' + args.scoring if args.scoring else ''}. "
        f"Model in {args.dtype} on {_device_name(args.device)}, torch {torch.__version__}, "
        f"commit {commit}, {seconds / 60:.1f} min.",
        "",
        "| variant | PSNR (dB) | SSIM | class accuracy | agreement with 16-bit | FD test | FD 16-bit | quantize (s) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['psnr']:.2f} | {r['ssim']:.4f} | {100 * r['acc']:.1f} % | "
                     f"{100 * r['agree']:.1f} % | {r['fd_test']:.2f} | {r['fd_ref']:.3f} | {r['secs']:.1f} |")
    vals = sorted(ratios.values())
    groups: dict[str, list[float]] = {}
    for k, v in ratios.items():
        parts = k.split(".")
        if parts[0] == "transformer_blocks":
            key = "double block " + ".".join(parts[2:])
        elif parts[0] == "single_transformer_blocks":
            key = "single block " + ".".join(parts[2:])
        else:
            key = "embedders / output"
        groups.setdefault(key, []).append(v)
    lines += ["", f"Outliers of the linear inputs (16-bit run): per layer, max channel |x| max / median channel's; "
              f"over {len(vals)} linears: median {statistics.median(vals):.1f}, max {vals[-1]:.1f}.", "",
              "| linear | layers | median ratio | max ratio |", "| --- | --- | --- | --- |"]
    for k in sorted(groups):
        g = groups[k]
        lines.append(f"| {k} | {len(g)} | {statistics.median(g):.1f} | {max(g):.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
