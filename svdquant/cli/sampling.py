"""``svdquant generate`` and ``svdquant compare``: sampling a quantized checkpoint (and, for compare, its 16-bit
base from the same seed) into image or video files written whole or not at all (:mod:`.media`)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from .. import _checks
from .._state import peek
from . import media
from .common import (UsageError, check_optimize_flags, compile_arg, parse_loras, pipeline_kwargs, resolve_device,
                     resolve_dtype, validate_sizes)


MAX_FRAMES = 1025  # Wan 2.1 makes 81; a batch of frames is sampled as one tensor


def _validate_sampling(args, command: str) -> None:
    """What generate and compare share: the checkpoint, its base, the prompt, sampling numbers, the input image, the
    output; then what the base's pipeline class asks (:func:`_validate_kind`), all before anything loads."""
    from ..checkpoint import base_of, read_metadata

    args.device = resolve_device(args.device)
    check_optimize_flags(args)
    if not args.prompt.strip():
        raise UsageError("the prompt is empty; give what to draw, e.g. \"a photo of a cat\"")
    if args.steps is not None:
        _checks.steps("--steps", args.steps)
    _checks.seed("--seed", args.seed)
    _checks.count("--num-images", args.num_images, hi=_checks.MAX_IMAGES, why=" (they are sampled as one batch)")
    validate_sizes(args)
    if getattr(args, "num_frames", None) is not None:
        _checks.count("--num-frames", args.num_frames, hi=MAX_FRAMES)
    if getattr(args, "fps", None) is not None:
        _checks.count("--fps", args.fps, hi=240)
    args.n_files = 1 if command == "compare" else args.num_images  # compare writes one side-by-side picture
    # without -o, the name depends on what the pipeline makes: decided in _validate_kind
    args.targets = None if args.output is None else media.targets("-o", args.output, args.n_files, args.overwrite)
    args.input_image = None if args.image is None else media.input_image(args.image)
    meta = read_metadata(args.checkpoint)  # missing or not a checkpoint: fails before anything loads
    args.base = base_of(args.checkpoint, meta, args.base)
    from ..pipelines import pipeline_class_of
    from ..pipelines.load import check_base  # imports diffusers: after the cheap checks

    check_base(args.checkpoint, meta, args.base)  # a missing or mismatched base fails here, not after loading
    args.experts = sorted(meta.get("experts") or {})
    _validate_kind(args, command, pipeline_class_of(args.base))


def _validate_kind(args, command: str, cls: str | None) -> None:
    """What the pipeline class ``cls`` (from the base's model_index.json; None: it names none) asks of the command:
    an edit pipeline its ``--image`` and no other pipeline one, a video pipeline a video file name and a frame
    count its VAE takes, and compare an image pipeline."""
    from ..models.pipeline_needs import EDIT_PIPELINES, VIDEO_PIPELINES, makes_video, missing_package, needs_images
    from ..pipelines import TinyFluxPipeline, frame_step_of

    args.video = cls is not None and makes_video(cls)
    args.tiny = cls == TinyFluxPipeline.__name__
    what = "the tiny model" if args.tiny else cls
    if args.video and command == "compare":
        raise UsageError(f"compare draws images side by side, and {cls} makes videos: for a video pipeline use "
                         "svdquant generate")
    if cls is not None and needs_images(cls) and args.image is None:
        raise UsageError(f"{cls} edits an input image: give it with --image FILE")
    if args.image is not None and cls is not None and not needs_images(cls):
        raise UsageError(f"--image is for edit pipelines ({', '.join(sorted(EDIT_PIPELINES))}); {what} takes no "
                         "input image: leave --image out")
    for option, value in (("--num-frames", getattr(args, "num_frames", None)), ("--fps", getattr(args, "fps", None))):
        if value is not None and not args.video:
            raise UsageError(f"{option} is for video pipelines ({', '.join(sorted(VIDEO_PIPELINES))}); "
                             f"{what or 'this pipeline'} draws images: leave {option} out")
    package = missing_package(cls) if cls is not None else None
    if package is not None:  # diffusers' Wan image-to-video calls it unguarded: a NameError after loading
        raise UsageError(f"{cls} runs every prompt through the {package} package, which is not installed: "
                         f"pip install {package}")
    if args.output is None:
        args.output = media.DEFAULT_VIDEO if args.video else args.default_output
        args.targets = media.targets("-o", args.output, args.n_files, args.overwrite)
    media.check_output_kind("-o", Path(args.output), what or "the pipeline", args.video, getattr(args, "fps", None))
    if args.video and args.num_frames is not None:
        media.check_frames(args.num_frames, frame_step_of(args.base), cls)


def validate_generate(args) -> None:
    _validate_sampling(args, "generate")
    if args.offload and args.tiny:
        raise UsageError("--offload: the tiny model fits any GPU and its pipeline has no model offload; leave "
                         "--offload out")
    if args.offload and torch.device(args.device).type == "cpu":
        raise UsageError("--offload moves the models between CPU memory and a GPU; on --device cpu they are all in "
                         "CPU memory already: leave --offload out")
    args.loras = parse_loras(args.lora)
    if args.loras and args.experts:
        # Wan 2.2's LoRAs come one file per expert, and --lora cannot say which: the high-noise one alone would be
        # half a LoRA without a word
        raise UsageError(f"--lora: {args.checkpoint} holds two experts (transformer and {args.experts[0]}), whose "
                         "LoRAs come one file each; load them in Python: svdquant.load_lora(pipe, HIGH) and "
                         f"svdquant.load_lora(pipe.{args.experts[0]}, LOW)")


def validate_compare(args) -> None:
    _validate_sampling(args, "compare")


def _load(args):
    from .. import load_pipeline
    from ..pipelines import check_size

    dtype = resolve_dtype(args.dtype, args.device)
    pipe = load_pipeline(args.base, args.checkpoint, device=args.device, torch_dtype=dtype,
                         optimize=None if getattr(args, "optimize", True) else False,
                         offload=getattr(args, "offload", False), attention=getattr(args, "attention", "auto"),
                         compile=compile_arg(args))
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
    """One call: a list of images, or of videos (each a list of frames) for a video pipeline."""
    gen = torch.Generator("cpu").manual_seed(args.seed)
    kw = dict(prompt=prompt, generator=gen, output_type=output_type, **pipeline_kwargs(args))
    # diffusers' video pipelines count videos, not images
    kw["num_videos_per_prompt" if args.video else "num_images_per_prompt"] = args.num_images
    if args.input_image is not None:
        kw["image"] = args.input_image
    if getattr(args, "num_frames", None) is not None:
        kw["num_frames"] = args.num_frames
    from ..models.pipeline_needs import with_area

    kw = with_area(pipe, kw)  # FLUX.1 Kontext: the size asked for is the size drawn
    if args.steps is not None:  # 0 was refused up front; never "the pipeline's default"
        kw["num_inference_steps"] = args.steps
    from ..pipelines import TinyFluxPipeline

    if isinstance(pipe, TinyFluxPipeline):
        kw["progress"] = True  # a bar on a terminal, a line now and then in a log (svdquant/_progress.py)
    out = pipe(**kw)
    return out.frames if args.video else out.images


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
    outputs = _sample(pipe, args.prompt, args)
    write = media.video_writer(args.fps or media.DEFAULT_FPS) if args.video else media.save_image
    media.write_whole(list(zip(outputs, args.targets)), write)
    for target in args.targets:
        print(f"wrote {target}")


def _say_compiling(pipe, command: str) -> None:
    """svdquant.optimize compiles the blocks at the first call of each size: say so before the wait."""
    from ..pipelines.optimize import denoiser

    report = peek(denoiser(pipe)).optimized
    if report is not None and (report.compiled_blocks or report.compiled_model):
        graph = " and capturing a CUDA graph" if report.cuda_graphs else ""
        what = f"{report.compiled_blocks} blocks" if report.compiled_blocks else "the whole model"
        took = "about 3 minutes" if report.compiled_model else "about a minute"
        print(f"svdquant {command}: compiling {what} for this size{graph} "
              f"(the first call only: {took} for FLUX.1-dev; --no-optimize skips it)", file=sys.stderr,
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
    media.write_whole([(canvas, args.targets[0])], media.save_image)
    print("| image | PSNR (dB) | SSIM |\n| --- | --- | --- |")
    for i in range(len(p)):
        print(f"| {i} | {p[i]:.2f} | {s[i]:.4f} |")
    print(f"wrote {args.output}")
