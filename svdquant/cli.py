"""The ``svdquant`` command.

    svdquant demo                                   # offline: tiny model, 16-bit vs 4-bit, compare.png
    svdquant quantize MODEL -o OUT --recipe int4    # MODEL: diffusers pipeline folder or hub id
    svdquant generate OUT "a photo of a cat" -o cat.png
    svdquant compare OUT "a photo of a cat" -o compare.png
    svdquant info OUT
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class UsageError(Exception):
    """A mistake on the command line: ``main`` prints ``svdquant CMD: error: ...`` and returns 2."""


def _device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        torch.device(name)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {name!r} is not a device; use cpu, cuda or cuda:N") from None
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for, but torch sees no CUDA GPU; use --device cpu")
    return name


def _dtype(name: str | None, device: str) -> torch.dtype:
    if name is None:
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return DTYPES[name]


def _recipe(args):
    from .recipes import get_recipe

    over = {}
    if args.rank is not None:
        over["rank"] = args.rank
    if getattr(args, "method", None):
        over["method"] = args.method
    return get_recipe(args.recipe, **over)


def _pipeline_kwargs(args) -> dict:
    kw = {}
    for k in ("height", "width", "guidance_scale"):
        v = getattr(args, k, None)
        if v is not None:
            kw[k] = v
    return kw


def cmd_quantize(args) -> None:
    from .calibration import Calibration
    from .checkpoint import save_quantized
    from .pipelines import TinyFluxPipeline, load_base_pipeline
    from .quantize import quantize

    device = _device(args.device)
    dtype = _dtype(args.dtype, device)
    recipe = _recipe(args)
    out = Path(args.output)
    if out.exists() and not args.overwrite:
        raise UsageError(f"{out} already exists; choose another -o or pass --overwrite")
    if args.model != "tiny" and args.model.startswith(("/", ".", "~")) and not Path(args.model).expanduser().exists():
        raise UsageError(f"MODEL {args.model} does not exist; pass a diffusers pipeline folder (with "
                         "model_index.json), a hub id, or 'tiny'")
    if args.model == "tiny":
        pipe = TinyFluxPipeline.default(dtype)
        base = out.parent / f"{out.name}-base"
        pipe.save_pretrained(base)
    else:
        base = args.model
        pipe = load_base_pipeline(args.model, torch_dtype=dtype)
    pipe = pipe.to(device)
    prompts = None
    if args.prompts:
        prompts = [ln.strip() for ln in Path(args.prompts).read_text().splitlines() if ln.strip()]
    calib = Calibration(prompts=prompts, num_prompts=args.num_prompts, steps=args.steps, snapshots=args.snapshots,
                        tokens_per_layer=args.tokens, seed=args.seed, pipeline_kwargs=_pipeline_kwargs(args))
    report = quantize(pipe, recipe, calib, include=args.include, exclude=args.exclude)
    save_quantized(pipe.transformer, out, base=str(base), report=report, overwrite=args.overwrite)
    print(report)
    print(f"saved {out}")


def _load(args):
    from .checkpoint import load_pipeline

    device = _device(args.device)
    dtype = _dtype(args.dtype, device)
    return load_pipeline(args.base, args.checkpoint, device=device, torch_dtype=dtype), device, dtype


def _sample(pipe, prompt, args, output_type="pil"):
    gen = torch.Generator("cpu").manual_seed(args.seed)
    kw = dict(prompt=prompt, num_images_per_prompt=args.num_images, generator=gen, output_type=output_type,
              **_pipeline_kwargs(args))
    if args.steps:
        kw["num_inference_steps"] = args.steps
    return pipe(**kw).images


def cmd_generate(args) -> None:
    pipe, _, _ = _load(args)
    if args.lora:
        from .lora import LoRAError, load_lora

        for i, spec in enumerate(args.lora):
            path, sep, strength = spec.rpartition(":")
            if not sep or not _is_number(strength):  # no ":STRENGTH" suffix
                path, strength = spec, "1"
            try:
                load_lora(pipe, path, name=f"lora{i}", strength=float(strength))
            except LoRAError as e:  # some messages name the layer only: say which file it is
                raise LoRAError(str(e) if path in str(e) else f"{path}: {e}") from None
    images = _sample(pipe, args.prompt, args)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(images):
        target = out if len(images) == 1 else out.with_name(f"{out.stem}-{i}{out.suffix}")
        im.save(target)
        print(f"wrote {target}")


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def cmd_compare(args) -> None:
    from .checkpoint import read_metadata, recorded_base
    from .images import grid, to_pil
    from .metrics import psnr, ssim
    from .pipelines import load_base_pipeline

    qpipe, device, dtype = _load(args)
    base = args.base or recorded_base(args.checkpoint, read_metadata(args.checkpoint))
    fpipe = load_base_pipeline(base, torch_dtype=dtype).to(device)
    ref = _sample(fpipe, args.prompt, args, "pt")
    del fpipe
    img = _sample(qpipe, args.prompt, args, "pt")
    p, s = psnr(img, ref), ssim(img, ref)
    recipe = (qpipe.transformer._svdquant_recipe or {}).get("name", "quantized")
    scale = max(1, 256 // ref.shape[-1])
    canvas = grid([("16-bit", to_pil(ref)), (f"{recipe}", to_pil(img))], scale=scale)
    canvas.save(args.output)
    print("| image | PSNR (dB) | SSIM |\n| --- | --- | --- |")
    for i in range(len(p)):
        print(f"| {i} | {p[i]:.2f} | {s[i]:.4f} |")
    print(f"wrote {args.output}")


def cmd_info(args) -> None:
    from .checkpoint import TENSOR_FILE, read_metadata, recorded_base

    meta = read_metadata(args.checkpoint)
    if args.json:  # machine-readable: the JSON alone, so it can be piped
        print(json.dumps(meta, indent=1))
        return
    layers = meta["layers"]
    kinds: dict[str, int] = {}
    for cfg in layers.values():
        key = f"W{cfg['weights']}A{cfg['activations'] or '16'} rank {cfg['rank']}"
        kinds[key] = kinds.get(key, 0) + 1
    size = Path(args.checkpoint, TENSOR_FILE)
    recipe = meta.get("recipe") or {}
    print(f"checkpoint   {args.checkpoint}")
    print(f"model        {meta['model_class']}")
    print(f"base         {recorded_base(args.checkpoint, meta)}")
    print(f"recipe       {recipe.get('name')} ({recipe.get('method')}, group {recipe.get('group_size')}, "
          f"rank {recipe.get('rank')}, svd {recipe.get('svd')})")
    print(f"format       version {meta['format_version']}, written by svdquant {meta['svdquant_version']}")
    if size.exists():
        print(f"size         {size.stat().st_size / 1e9:.3f} GB")
    print(f"layers       {len(layers)} quantized")
    for k, v in sorted(kinds.items()):
        print(f"  {v:5d} × {k}")
    rep = meta.get("report")
    if rep:
        print(f"quantized in {rep['seconds_total']:.1f} s from {rep['snapshots']} snapshots; "
              f"kept 16-bit: {len(rep['skipped'])} layers")


def cmd_demo(args) -> None:
    from .pipelines.demo import run_demo

    out = Path(args.output)
    rows = run_demo(out, args.recipes, steps=args.steps, seed=args.seed)
    print((out / "quality.md").read_text())
    print(f"wrote {out / 'compare.png'} and {out / 'quality.md'}; checkpoints in {out}/<recipe>/")
    del rows


def build_parser() -> argparse.ArgumentParser:
    from .recipes import DEMO_VARIANTS, METHODS, RECIPES

    ap = argparse.ArgumentParser(prog="svdquant", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)

    def common_device(p):
        p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda if present)")
        p.add_argument("--dtype", choices=list(DTYPES), help="16-bit compute dtype (default: bf16 on GPU, fp32 on CPU)")

    def checkpoint_prompt(p, output):
        p.add_argument("checkpoint")
        p.add_argument("prompt")
        p.add_argument("-o", "--output", default=output)
        p.add_argument("--base", help="base pipeline folder or hub id (default: the one the checkpoint records)")

    def sampling(p):
        p.add_argument("--steps", type=int, help="denoising steps (default: the pipeline's)")
        p.add_argument("--seed", type=int, default=0, help="seed of the initial noise")
        p.add_argument("--num-images", type=int, default=1)
        p.add_argument("--height", type=int)
        p.add_argument("--width", type=int)
        p.add_argument("--guidance-scale", dest="guidance_scale", type=float)

    p = sub.add_parser("demo", help="offline default job: tiny model, 16-bit vs 4-bit images, compare.png",
                       description="Build the tiny model (no download), quantize it with each recipe, sample one "
                                   "image per class from the same noise and write compare.png and quality.md.")
    p.add_argument("-o", "--output", default="svdquant-demo", help="output folder (default: svdquant-demo)")
    p.add_argument("--recipes", nargs="+", default=list(DEMO_VARIANTS), metavar="VARIANT",
                   help=f"recipes to compare, optionally with an ablation method: {' '.join(DEMO_VARIANTS)} "
                        "(default), int4-lorc, int4-smooth, ...")
    p.add_argument("--steps", type=int, default=6, help="Euler sampling steps (default 6; the model card uses 20)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("quantize", help="quantize a pipeline's transformer and save a checkpoint",
                       description="Calibrate on prompts, quantize the transformer block by block, save OUT/.")
    p.add_argument("model", help="diffusers pipeline folder or hub id (FLUX.1, SD3, PixArt-Σ, SANA), or 'tiny'")
    p.add_argument("-o", "--output", required=True, help="checkpoint folder to write")
    p.add_argument("--recipe", default="int4", help=f"quantization scheme: {', '.join(sorted(RECIPES))} (default int4)")
    p.add_argument("--method", choices=METHODS, help="ablation baseline instead of svdquant")
    p.add_argument("--rank", type=int, help="low-rank branch rank (default: the recipe's)")
    p.add_argument("--prompts", help="text file, one calibration prompt per line (default: the built-in 128)")
    p.add_argument("--num-prompts", type=int, help="use only the first N prompts")
    p.add_argument("--steps", type=int, default=8, help="denoising steps per calibration prompt (default 8)")
    p.add_argument("--snapshots", type=int, default=128, help="(prompt, step) samples drawn (default 128)")
    p.add_argument("--tokens", type=int, help="tokens kept per layer (default: the recipe's eval_tokens)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--guidance-scale", dest="guidance_scale", type=float)
    p.add_argument("--include", nargs="+", help="quantize only layers matching these patterns (generic adapter)")
    p.add_argument("--exclude", nargs="+", help="never quantize layers matching these patterns")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    common_device(p)
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("generate", help="sample images with a quantized checkpoint",
                       description="Load the base pipeline the checkpoint records (or --base) with the quantized "
                                   "transformer and sample.")
    checkpoint_prompt(p, "image.png")
    p.add_argument("--lora", action="append", metavar="PATH[:STRENGTH]",
                   help="apply a LoRA .safetensors file at a strength (default 1); repeatable")
    sampling(p)
    common_device(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("compare", help="16-bit and quantized images side by side, with PSNR/SSIM",
                       description="Sample the base pipeline and the quantized one from the same seed; write both "
                                   "side by side in one PNG and print PSNR and SSIM.")
    checkpoint_prompt(p, "compare.png")
    sampling(p)
    common_device(p)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("info", help="what a checkpoint holds", description="Print a checkpoint's metadata.")
    p.add_argument("checkpoint")
    p.add_argument("--json", action="store_true", help="print the full metadata as JSON instead")
    p.set_defaults(func=cmd_info)
    return ap


def main(argv=None) -> int:
    from .checkpoint import CheckpointError

    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (CheckpointError, UsageError, OSError, ValueError) as e:  # LoRAError is a ValueError
        print(f"svdquant {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
