"""``svdquant generate`` and ``svdquant compare``: sampling a quantized checkpoint (and, for compare, its 16-bit
base from the same seed) into image files written whole or not at all."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from .. import _checks
from .._state import peek
from .common import UsageError, parse_loras, pipeline_kwargs, resolve_device, resolve_dtype, validate_sizes


def _image_targets(name: str, output, n: int, overwrite: bool) -> list[Path]:
    """The files an image-writing command will write, checked before it samples anything."""
    from PIL import Image

    out = Path(output)
    fmt = Image.registered_extensions().get(out.suffix.lower())
    if fmt is None or fmt not in Image.SAVE:
        raise UsageError(f"{name} {out}: give an image file name ending in .png, .jpg or .webp")
    if out.is_dir():
        raise UsageError(f"{name} {out} is a folder; give an image file name such as {out / 'image.png'}")
    _checks.output_parent(name, out)
    targets = [out] if n == 1 else [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(n)]
    for t in targets:
        if t.is_dir():
            raise UsageError(f"{name} {out}: {t} is a folder")
        if t.exists() and not overwrite:
            raise UsageError(f"{t} already exists; choose another {name} or pass --overwrite")
    return targets


def _validate_sampling(args, n_files: int) -> None:
    """What generate and compare share: the checkpoint, its base, the prompt, sampling numbers, the output."""
    from ..checkpoint import base_of, read_metadata

    args.device = resolve_device(args.device)
    if not args.prompt.strip():
        raise UsageError("the prompt is empty; give what to draw, e.g. \"a photo of a cat\"")
    if args.steps is not None:
        _checks.steps("--steps", args.steps)
    _checks.seed("--seed", args.seed)
    _checks.count("--num-images", args.num_images, hi=_checks.MAX_IMAGES, why=" (they are sampled as one batch)")
    validate_sizes(args)
    args.targets = _image_targets("-o", args.output, n_files if n_files else args.num_images, args.overwrite)
    meta = read_metadata(args.checkpoint)  # missing or not a checkpoint: fails before anything loads
    args.base = base_of(args.checkpoint, meta, args.base)
    from ..pipelines.load import check_base  # imports diffusers: after the cheap checks

    check_base(args.checkpoint, meta, args.base)  # a missing or mismatched base fails here, not after loading


def validate_generate(args) -> None:
    _validate_sampling(args, 0)
    args.loras = parse_loras(args.lora)


def validate_compare(args) -> None:
    _validate_sampling(args, 1)


def _load(args):
    from .. import load_pipeline
    from ..pipelines import check_size

    dtype = resolve_dtype(args.dtype, args.device)
    pipe = load_pipeline(args.base, args.checkpoint, device=args.device, torch_dtype=dtype,
                         optimize=None if getattr(args, "optimize", True) else False)
    _sampling_progress(pipe)
    check_size(pipe, args.height, args.width, names=("--height", "--width"))  # before any sampling
    return pipe, args.device, dtype


def _sampling_progress(pipe) -> None:
    """generate / compare: the denoising steps report themselves, as a bar on a terminal and as a plain line
    now and then in a log (a FLUX image on a slow machine takes minutes)."""
    from .._progress import progress
    from ..pipelines import TinyFluxPipeline

    if isinstance(pipe, TinyFluxPipeline):
        return  # its __call__ takes progress=True (_sample)
    # diffusers' DiffusionPipeline.progress_bar(iterable=None, total=None) makes the bar of its denoising loop
    pipe.progress_bar = lambda iterable=None, total=None: progress(iterable, total=total, desc="sampling",
                                                                   unit="step")


def _sample(pipe, prompt, args, output_type="pil"):
    gen = torch.Generator("cpu").manual_seed(args.seed)
    kw = dict(prompt=prompt, num_images_per_prompt=args.num_images, generator=gen, output_type=output_type,
              **pipeline_kwargs(args))
    if args.steps is not None:  # 0 was refused up front; never "the pipeline's default"
        kw["num_inference_steps"] = args.steps
    from ..pipelines import TinyFluxPipeline

    if isinstance(pipe, TinyFluxPipeline):
        kw["progress"] = True  # a bar on a terminal, a line now and then in a log (svdquant/_progress.py)
    return pipe(**kw).images


def _save_images(pairs) -> None:
    """Write each image under a temporary name beside its target, then rename them all: an error or
    Ctrl-C part way leaves no partial or half-set of files."""
    tmps = []
    try:
        for im, target in pairs:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmps.append(target.with_name(f".{target.stem}.tmp-{os.getpid()}{target.suffix}"))
            im.save(tmps[-1])
        for tmp, (_, target) in zip(tmps, pairs):
            os.replace(tmp, target)
    finally:
        for tmp in tmps:
            tmp.unlink(missing_ok=True)


def cmd_generate(args) -> None:
    pipe, _, _ = _load(args)
    if args.loras:
        from ..lora import LoRAError, load_lora

        for i, (path, strength) in enumerate(args.loras):
            try:
                load_lora(pipe, path, name=f"lora{i}", strength=strength)
            except LoRAError as e:  # some messages name the layer only: say which file it is
                raise LoRAError(str(e) if path in str(e) else f"{path}: {e}") from None
    _say_compiling(pipe, "generate")
    images = _sample(pipe, args.prompt, args)
    _save_images(list(zip(images, args.targets)))
    for target in args.targets:
        print(f"wrote {target}")


def _say_compiling(pipe, command: str) -> None:
    """svdquant.optimize compiles the blocks at the first call of each size: say so before the wait."""
    from ..pipelines.optimize import denoiser

    report = peek(denoiser(pipe)).optimized
    if report is not None and report.compiled_blocks:
        print(f"svdquant {command}: compiling {report.compiled_blocks} blocks for this size and capturing a CUDA graph "
              "(the first call only: about a minute for FLUX.1-dev; --no-optimize skips it)", file=sys.stderr,
              flush=True)


def cmd_compare(args) -> None:
    from ..images import grid, to_pil
    from ..metrics import psnr, ssim
    from ..pipelines import load_base_pipeline

    qpipe, device, dtype = _load(args)
    fpipe = load_base_pipeline(args.base, torch_dtype=dtype).to(device)
    _sampling_progress(fpipe)
    ref = _sample(fpipe, args.prompt, args, "pt")
    del fpipe
    img = _sample(qpipe, args.prompt, args, "pt")
    p, s = psnr(img, ref), ssim(img, ref)
    recipe = (peek(qpipe.transformer).recipe or {}).get("name", "quantized")
    scale = max(1, 256 // ref.shape[-1])
    canvas = grid([("16-bit", to_pil(ref)), (f"{recipe}", to_pil(img))], scale=scale,
                  row_notes=["reference", "PSNR " + ", ".join(f"{v:.2f}" for v in p.tolist()) + " dB"])
    _save_images([(canvas, args.targets[0])])
    print("| image | PSNR (dB) | SSIM |\n| --- | --- | --- |")
    for i in range(len(p)):
        print(f"| {i} | {p[i]:.2f} | {s[i]:.4f} |")
    print(f"wrote {args.output}")
