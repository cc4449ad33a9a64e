"""``svdquant quantize``: its checks (every value before any work) and the command."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .. import _checks
from .common import UsageError, pipeline_kwargs, resolve_device, resolve_dtype, show_bars, validate_sizes


def _recipe(args):
    from ..recipes import get_recipe

    over = {}
    if args.rank is not None:
        over["rank"] = _checks.count("--rank", args.rank, lo=0, hi=4096)
    if getattr(args, "method", None):
        over["method"] = args.method
        if args.method != "svdquant":  # the ablations are the paper's baselines: rounded to nearest
            over["gptq"] = False
    if getattr(args, "no_gptq", False):
        over["gptq"] = False
    return get_recipe(args.recipe, **over)


def validate_quantize(args) -> None:
    from ..calibration import DEFAULT_PROMPTS
    from ..calibration.config import MAX_BATCH
    from ..checkpoint import check_output_folder
    from .._tiny_facts import CIFAR10_CLASSES, IMAGE_SIZE, TINY_BASE, check_tiny_size  # not pipelines: no diffusers

    args.device = resolve_device(args.device)
    _validate_gpu_memory(args)
    args.recipe_obj = _recipe(args)
    tiny = args.model == TINY_BASE
    model = Path(args.model).expanduser()
    if not tiny and model.exists():
        if not (model / "model_index.json").is_file() and not (model / "pipeline.json").is_file():
            raise UsageError(f"MODEL {args.model} is not a diffusers pipeline folder (no model_index.json); pass "
                             "the folder that holds model_index.json, a hub id, or 'tiny'")
    elif not tiny and args.model.startswith(("/", ".", "~")):
        raise UsageError(f"MODEL {args.model} does not exist; pass a diffusers pipeline folder (with "
                         "model_index.json), a hub id, or 'tiny'")
    check_output_folder(args.output, args.overwrite, name="-o")
    if not tiny and model.exists() and Path(args.output).resolve().is_relative_to(model.resolve()):
        raise UsageError(f"-o {args.output} is inside the model folder {args.model}; write the checkpoint elsewhere")
    args.prompt_list = None
    if args.prompts is not None:
        f = Path(args.prompts)
        if not f.is_file():
            what = "is a folder" if f.is_dir() else "no such file"
            raise UsageError(f"--prompts {f}: {what}; give a text file with one prompt per line")
        try:
            lines = f.read_text(encoding="utf-8").splitlines()
        except (UnicodeDecodeError, OSError) as e:
            raise UsageError(f"--prompts {f} cannot be read as UTF-8 text ({e})") from None
        args.prompt_list = [ln.strip() for ln in lines if ln.strip()]
        if not args.prompt_list:
            raise UsageError(f"--prompts {f} holds no prompts; write one prompt per line")
    if args.num_prompts is not None:
        _checks.count("--num-prompts", args.num_prompts)
    if args.steps is not None:
        _checks.steps("--steps", args.steps)
    if args.snapshots is not None:
        _checks.count("--snapshots", args.snapshots, hi=100_000)
    if args.tokens is not None:
        _checks.count("--tokens", args.tokens, hi=10_000_000, why=" (leave it out for the recipe's eval_tokens)")
    if args.calibration_batch is not None:
        _checks.count("--calibration-batch", args.calibration_batch, hi=MAX_BATCH)
        if args.calibration_batch > 1 and args.images:
            raise UsageError(f"--calibration-batch {args.calibration_batch} with --images: an edit calibration runs "
                             "one prompt and its image per call; leave --calibration-batch out")
    _checks.seed("--seed", args.seed)
    validate_sizes(args)
    if tiny:
        for k in ("height", "width"):
            check_tiny_size(IMAGE_SIZE, f"--{k}", getattr(args, k))
    if args.text_encoders and (tiny or (model / "pipeline.json").is_file()):
        raise UsageError("--text-encoders: the tiny model has no text encoder (a class label is its prompt); "
                         "leave --text-encoders out")
    if args.text_encoders and (model / "model_index.json").is_file():
        try:
            index = json.loads((model / "model_index.json").read_text())
        except (OSError, ValueError):
            index = None  # loading the pipeline reports it
        if isinstance(index, dict) and not any(k.startswith("text_encoder") and isinstance(v, list) and v and v[0]
                                               for k, v in index.items()):
            raise UsageError(f"--text-encoders: the pipeline in {args.model} has no text encoder; leave "
                             "--text-encoders out")
    if args.private and not args.push_to_hub:
        raise UsageError("--private applies to the repo --push-to-hub creates; add --push-to-hub REPO or drop "
                         "--private")
    if args.push_to_hub is not None:  # before hours of work: the repo id, the network, a token
        from ..hub import check_push_target

        try:
            check_push_target(args.push_to_hub, name="--push-to-hub")
        except ValueError as e:
            raise UsageError(str(e)) from None
    _validate_images(args, tiny, model)
    # the tiny model calibrates on its class names unless --prompts is given
    available = args.prompt_list or (CIFAR10_CLASSES if tiny else DEFAULT_PROMPTS)
    if args.num_prompts is not None and args.num_prompts > len(available):
        raise UsageError(f"--num-prompts {args.num_prompts}: there are only {len(available)} prompts; "
                         f"use at most {len(available)}")


def _validate_images(args, tiny: bool, model: Path) -> None:
    """--images: readable pictures, given exactly when the pipeline edits an input image (from its
    model_index.json, before loading it)."""
    from ..calibration.inputs import check_images
    from ..models.pipeline_needs import EDIT_PIPELINES, missing_package, needs_images

    args.image_list = None
    if args.images is not None:
        try:
            args.image_list = check_images(args.images, name="--images")
        except ValueError as e:
            raise UsageError(str(e)) from None
    index = model / "model_index.json"
    try:
        cls = None if tiny or not index.is_file() else json.loads(index.read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError):
        cls = None  # loading the pipeline reports it
    package = missing_package(cls) if cls is not None else None
    if package is not None:  # before the pipeline loads (two 14B experts for Wan 2.2), not after
        raise UsageError(f"{args.model} is a {cls}, which runs every prompt through the {package} package: "
                         f"pip install {package}")
    if cls is not None and needs_images(cls) and args.images is None:
        raise UsageError(f"{args.model} is a {cls}, which edits an input image: calibrate it with --images FILE... "
                         "(pictures like those it will edit)")
    if args.images is not None and (tiny or (cls is not None and not needs_images(cls))):
        raise UsageError(f"--images is for edit pipelines ({', '.join(sorted(EDIT_PIPELINES))}); "
                         f"{'the tiny model' if tiny else cls} takes no input image: leave --images out")


def _validate_gpu_memory(args) -> None:
    """``--max-gpu-memory``: an amount with a unit that a CUDA ``--device`` has; it implies ``--stream``."""
    args.max_gpu_bytes = None
    if args.max_gpu_memory is None:
        return
    args.max_gpu_bytes = _checks.memory_size("--max-gpu-memory", args.max_gpu_memory)
    if not args.device.startswith("cuda"):
        why = "" if torch.cuda.is_available() else " (torch sees no CUDA GPU)"
        fix = " or use --device cuda" if torch.cuda.is_available() else ""
        raise UsageError(f"--max-gpu-memory {args.max_gpu_memory} caps GPU memory, but the quantization runs on "
                         f"{args.device}{why}; leave --max-gpu-memory out{fix}")
    total = torch.cuda.get_device_properties(torch.device(args.device)).total_memory
    if args.max_gpu_bytes > total:
        raise UsageError(f"--max-gpu-memory {args.max_gpu_memory} is more than {args.device} has "
                         f"({total / 1e9:.1f} GB); give at most that")
    args.stream = True


def cmd_quantize(args) -> None:
    from ..calibration import Calibration
    from ..checkpoint import save_quantized
    from ..pipelines import TINY_BASE, TinyFluxPipeline, check_size, load_base_pipeline
    from ..quantize import quantize

    dtype = resolve_dtype(args.dtype, args.device)
    if args.model == TINY_BASE:
        # the checkpoint records the base by name: the shipped model, nothing saved beside the checkpoint
        pipe, base = TinyFluxPipeline.default(dtype), TINY_BASE
    else:
        pipe, base = load_base_pipeline(args.model, torch_dtype=dtype), args.model
        _quiet(pipe)
    if not args.stream:  # streaming keeps the 16-bit pipeline in CPU memory, blocks visit the device
        pipe = pipe.to(args.device)
    check_size(pipe, args.height, args.width, names=("--height", "--width"))  # needs the loaded pipeline's VAE
    calib = Calibration(prompts=args.prompt_list, num_prompts=args.num_prompts, steps=args.steps,
                        snapshots=args.snapshots, tokens_per_layer=args.tokens, seed=args.seed,
                        pipeline_kwargs=pipeline_kwargs(args), images=args.image_list,
                        batch_size=args.calibration_batch)
    report = quantize(pipe, args.recipe_obj, calib, include=args.include, exclude=args.exclude,
                      text_encoders=args.text_encoders, progress=True,
                      device=args.device if args.stream else None, max_gpu_memory=args.max_gpu_bytes)
    # the pipeline: its quantized text encoders (--text-encoders) are saved with the transformer
    save_quantized(pipe, args.output, base=str(base), report=report, overwrite=args.overwrite,
                   model_card=args.push_to_hub is not None)
    print(report)
    print(f"saved {args.output}")
    if args.push_to_hub is not None:
        from ..hub import push_to_hub

        print(f"pushed to {push_to_hub(args.output, args.push_to_hub, private=args.private)}")


def _quiet(pipe) -> None:
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=None if show_bars() else True)
