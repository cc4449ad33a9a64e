"""The ``svdquant`` command.

    svdquant demo                                   # offline: tiny model, 16-bit vs 4-bit, compare.png
    svdquant quantize MODEL -o OUT --recipe int4    # MODEL: diffusers pipeline folder or hub id
    svdquant generate OUT "a photo of a cat" -o cat.png
    svdquant compare OUT "a photo of a cat" -o compare.png
    svdquant info OUT
    svdquant serve [MODEL] --port 8000                # HTTP service + web page (default MODEL: tiny)
    svdquant convert nunchaku FILE.safetensors -o OUT # a Nunchaku INT4 FLUX checkpoint -> svdquant
    svdquant convert OUT --to nunchaku -o FILE.safetensors   # a w4a4-float FLUX checkpoint -> Nunchaku
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import os
import sys
from pathlib import Path

import torch

from . import _checks
from ._cpu import keep_freed_memory

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class UsageError(Exception):
    """A mistake on the command line: ``main`` prints ``svdquant CMD: error: ...`` and returns 2."""


class _Parser(argparse.ArgumentParser):
    """argparse's own errors (a missing argument, ``--rank abc``) as the one line every other mistake gets,
    instead of the usage block above it; exit status 2 as argparse's."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


# ------------------------------------------------------------------------------------------------ checks
# One ``_validate_<verb>`` per subcommand runs before the command does anything: every value the
# user gave is checked (and normalized onto ``args``), so a mistake costs no time and leaves no files.

def _device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return _checks.device("--device", name)


def _dtype(name: str | None, device: str) -> torch.dtype:
    if name is None:
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return DTYPES[name]


def _recipe(args):
    from .recipes import get_recipe

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


def _pipeline_kwargs(args) -> dict:
    kw = {}
    for k in ("height", "width", "guidance_scale"):
        v = getattr(args, k, None)
        if v is not None:
            kw[k] = v
    return kw


def _validate_sizes(args) -> None:
    for k in ("height", "width"):
        if getattr(args, k) is not None:
            _checks.size(f"--{k}", getattr(args, k))
    if args.guidance_scale is not None:
        _checks.real("--guidance-scale", args.guidance_scale, lo=0)


def _validate_quantize(args) -> None:
    from .calibration import DEFAULT_PROMPTS
    from .checkpoint import check_output_folder
    from ._tiny_facts import CIFAR10_CLASSES, IMAGE_SIZE, TINY_BASE, check_tiny_size  # not pipelines: no diffusers

    args.device = _device(args.device)
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
    _checks.seed("--seed", args.seed)
    _validate_sizes(args)
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
        from .hub import check_push_target

        try:
            check_push_target(args.push_to_hub, name="--push-to-hub")
        except ValueError as e:
            raise UsageError(str(e)) from None
    _validate_images(args, tiny, model)  # h-models
    # the tiny model calibrates on its class names unless --prompts is given
    available = args.prompt_list or (CIFAR10_CLASSES if tiny else DEFAULT_PROMPTS)
    if args.num_prompts is not None and args.num_prompts > len(available):
        raise UsageError(f"--num-prompts {args.num_prompts}: there are only {len(available)} prompts; "
                         f"use at most {len(available)}")


def _validate_images(args, tiny: bool, model: Path) -> None:
    """--images: readable pictures, given exactly when the pipeline edits an input image (from its
    model_index.json, before loading it)."""
    from .calibration.inputs import check_images
    from .models.pipeline_needs import EDIT_PIPELINES

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
    if cls in EDIT_PIPELINES and args.images is None:
        raise UsageError(f"{args.model} is a {cls}, which edits an input image: calibrate it with --images FILE... "
                         "(pictures like those it will edit)")
    if args.images is not None and (tiny or (cls is not None and cls not in EDIT_PIPELINES)):
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
    from .checkpoint import base_of, check_base, read_metadata

    args.device = _device(args.device)
    if not args.prompt.strip():
        raise UsageError("the prompt is empty; give what to draw, e.g. \"a photo of a cat\"")
    if args.steps is not None:
        _checks.steps("--steps", args.steps)
    _checks.seed("--seed", args.seed)
    _checks.count("--num-images", args.num_images, hi=_checks.MAX_IMAGES, why=" (they are sampled as one batch)")
    _validate_sizes(args)
    args.targets = _image_targets("-o", args.output, n_files if n_files else args.num_images, args.overwrite)
    meta = read_metadata(args.checkpoint)  # missing or not a checkpoint: fails before anything loads
    args.base = base_of(args.checkpoint, meta, args.base)
    check_base(args.checkpoint, meta, args.base)  # a missing or mismatched base fails here, not after loading


def _loras(specs) -> list[tuple[str, float]]:
    """``--lora PATH[:STRENGTH]`` options as (path, strength) pairs."""
    loras = []
    for spec in specs or ():
        path, sep, strength = spec.rpartition(":")
        if not sep or not _is_number(strength):  # no ":STRENGTH" suffix
            path, strength = spec, "1"
        if not math.isfinite(float(strength)):
            raise UsageError(f"--lora {spec}: the strength must be a finite number, e.g. {path}:0.8")
        if not Path(path).is_file():
            raise UsageError(f"no LoRA file at {path}")
        loras.append((path, float(strength)))
    return loras


def _validate_generate(args) -> None:
    _validate_sampling(args, 0)
    args.loras = _loras(args.lora)


def _validate_compare(args) -> None:
    _validate_sampling(args, 1)


def _validate_info(args) -> None:
    pass  # cmd_info reads and checks the checkpoint before printing anything


def _validate_serve(args) -> None:
    import socket

    from .checkpoint import META_FILE, base_of, check_base, read_metadata
    from .pipelines import TINY_BASE

    try:  # dependencies of the package, but a hand-made environment may lack them: say which, not a traceback
        import fastapi, prometheus_client, uvicorn  # noqa: F401,E401
    except ImportError as e:
        raise UsageError(f"serving needs {e.name}: pip install fastapi uvicorn prometheus-client") from None
    args.device = _device(args.device)
    if args.model != TINY_BASE:
        model = Path(args.model).expanduser()
        if (model / META_FILE).is_file():
            meta = read_metadata(model)
            # a missing base, or one outside the checkpoint's folder and here, fails now, not after loading
            check_base(model, meta, base_of(model, meta, None, allow_outside=args.allow_base_outside))
        elif not ((model / "model_index.json").is_file() or (model / "pipeline.json").is_file()):
            what = "does not exist" if not model.exists() else "is neither an svdquant checkpoint nor a pipeline folder"
            raise UsageError(f"MODEL {args.model} {what}; pass 'tiny', a checkpoint folder (with {META_FILE}) or a "
                             "16-bit diffusers pipeline folder (with model_index.json)")
        args.model = str(model)
    args.loras = _loras(args.lora)
    _checks.count("--port", args.port, lo=1, hi=65535)
    _checks.count("--max-queue", args.max_queue, hi=100_000)
    _checks.count("--max-batch", args.max_batch, hi=_checks.MAX_IMAGES)
    _checks.count("--batch-wait-ms", args.batch_wait_ms, lo=0, hi=60_000)
    _checks.count("--max-body-bytes", args.max_body_bytes, lo=1024, hi=64 << 20)
    _checks.count("--max-connections", args.max_connections, hi=100_000)
    for name, value, hi in (("--read-timeout", args.read_timeout, 600), ("--drain-timeout", args.drain_timeout, 3600)):
        _checks.real(name, value, lo=0)
        if (name == "--read-timeout" and value < 0.1) or value > hi:
            raise UsageError(f"{name} {value:g}: must be between {0.1 if name == '--read-timeout' else 0:g} and "
                             f"{hi} seconds")
    if args.api_key is None:
        args.api_key = os.environ.get("SVDQUANT_API_KEY") or None
    if args.api_key is not None and (len(args.api_key) < 8 or any(c.isspace() for c in args.api_key)):
        raise UsageError("--api-key (or SVDQUANT_API_KEY): use at least 8 characters and no spaces, e.g. the output "
                         "of: python -c 'import secrets; print(secrets.token_urlsafe(32))'")
    for origin in args.cors_origin or ():
        if not re.fullmatch(r"https?://[^/\s?#]+", origin):
            raise UsageError(f"--cors-origin {origin}: give a web origin, scheme://host[:port] with nothing after it, "
                             "e.g. https://app.example.com")
    for name in args.allowed_host or ():
        if name != "*" and not re.fullmatch(r"[A-Za-z0-9.\-:\[\]]{1,253}", name):
            raise UsageError(f"--allowed-host {name}: give a host name or address (no scheme, port or path), or '*' "
                             "for any")
    if args.replicas is not None:
        _checks.count("--replicas", args.replicas, hi=1024)
        try:
            import ray.serve  # noqa: F401 - large and optional: only --replicas needs it
        except ImportError:
            raise UsageError("--replicas runs on Ray Serve, which is not installed: pip install 'ray[serve]' (or svdquant[replicas])") from None
        if args.device.startswith("cuda") and args.replicas > torch.cuda.device_count():
            raise UsageError(f"--replicas {args.replicas}: one replica per GPU, and torch sees "
                             f"{torch.cuda.device_count()}")
    # bind once now: a taken port or an unknown host fails here, before minutes of model loading
    try:
        infos = socket.getaddrinfo(args.host, args.port, type=socket.SOCK_STREAM)
        with socket.socket(infos[0][0], socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            sock.bind(infos[0][4])
    except OSError as e:
        raise UsageError(f"cannot listen on {args.host}:{args.port} ({e.strerror or e}); choose another "
                         "--host or --port") from None


CONVERT_FORMS = ("give 'nunchaku FILE.safetensors -o DIR' to import a Nunchaku checkpoint, or "
                 "'DIR --to nunchaku -o FILE.safetensors' to write one")


def _validate_convert(args) -> None:
    from .checkpoint import check_base, check_output_folder, read_metadata
    from .convert.nunchaku import check_exportable, check_output_file, nunchaku_plan

    src = args.source
    if args.to is None:
        if len(src) != 2 or src[0] != "nunchaku":
            raise UsageError(f"convert {' '.join(src)[:100]}: {CONVERT_FORMS}")
        check_output_folder(args.output, args.overwrite, name="-o")  # cheap, and a typo here is the common one
        f = Path(src[1])
        if not f.exists():
            raise UsageError(f"no file at {f}; give the Nunchaku checkpoint (.safetensors)")
        if not f.is_file():
            raise UsageError(f"{f} is not a file; a Nunchaku checkpoint is one .safetensors file (python -m "
                             "nunchaku.merge_safetensors makes one from a folder)")
        args.plan = nunchaku_plan(f)  # the whole file checked (header, shapes, forms) before any conversion
        if args.base is not None:
            base = Path(args.base).expanduser()
            if args.base.startswith(("/", ".", "~")) and not base.exists():
                raise UsageError(f"--base {args.base} does not exist; pass the FLUX pipeline's folder or hub id")
            if base.exists():
                check_base(f, args.plan.meta, str(base))
        return
    if args.to != "nunchaku":
        raise UsageError(f"--to {args.to}: svdquant writes 'nunchaku' (Nunchaku's single-file INT4 FLUX format)")
    if len(src) != 1:
        raise UsageError(f"convert {' '.join(src)[:100]} --to nunchaku: {CONVERT_FORMS}")
    for flag, given in (("--two-level", args.two_level), ("--base", args.base is not None)):
        if given:
            raise UsageError(f"{flag} applies to imports (svdquant convert nunchaku FILE -o DIR), not to --to nunchaku")
    check_output_file(args.output, args.overwrite, "-o")
    meta = read_metadata(src[0])
    check_exportable(meta["layers"], meta["model_class"], meta["model_config"], src[0])


def _validate_demo(args) -> None:
    from ._tiny_facts import check_demo_args  # not pipelines.demo: no diffusers yet

    args.recipes = check_demo_args(args.output, args.recipes, args.steps, args.seed, args.overwrite,
                                   names=("-o", "--recipes", "--steps", "--seed"))


# ------------------------------------------------------------------------------------------------ commands
def _bars() -> bool:
    """Progress bars only on a terminal: a redirected log gets no bar redraws (svdquant's own steps print a
    plain line now and then there instead: svdquant/_progress.py)."""
    return sys.stderr.isatty()


def cmd_quantize(args) -> None:
    from .calibration import Calibration
    from .checkpoint import save_quantized
    from .pipelines import TINY_BASE, TinyFluxPipeline, check_size, load_base_pipeline
    from .quantize import quantize

    dtype = _dtype(args.dtype, args.device)
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
                        pipeline_kwargs=_pipeline_kwargs(args), images=args.image_list)  # h-models: images
    report = quantize(pipe, args.recipe_obj, calib, include=args.include, exclude=args.exclude,
                      text_encoders=args.text_encoders, progress=True,
                      device=args.device if args.stream else None, max_gpu_memory=args.max_gpu_bytes)
    # the pipeline: its quantized text encoders (--text-encoders) are saved with the transformer
    save_quantized(pipe, args.output, base=str(base), report=report, overwrite=args.overwrite,
                   model_card=args.push_to_hub is not None)
    print(report)
    print(f"saved {args.output}")
    if args.push_to_hub is not None:
        from .hub import push_to_hub

        print(f"pushed to {push_to_hub(args.output, args.push_to_hub, private=args.private)}")


def _quiet(pipe) -> None:
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=None if _bars() else True)


def _sampling_progress(pipe) -> None:
    """generate / compare: the denoising steps report themselves, as a bar on a terminal and as a plain line
    now and then in a log (a FLUX image on a slow machine takes minutes)."""
    from ._progress import progress
    from .pipelines import TinyFluxPipeline

    if isinstance(pipe, TinyFluxPipeline):
        return  # its __call__ takes progress=True (_sample)
    # diffusers' DiffusionPipeline.progress_bar(iterable=None, total=None) makes the bar of its denoising loop
    pipe.progress_bar = lambda iterable=None, total=None: progress(iterable, total=total, desc="sampling",
                                                                   unit="step")


def _load(args):
    from .checkpoint import load_pipeline
    from .pipelines import check_size

    dtype = _dtype(args.dtype, args.device)
    pipe = load_pipeline(args.base, args.checkpoint, device=args.device, torch_dtype=dtype,
                         optimize=None if getattr(args, "optimize", True) else False)
    _sampling_progress(pipe)
    check_size(pipe, args.height, args.width, names=("--height", "--width"))  # before any sampling
    return pipe, args.device, dtype


def _sample(pipe, prompt, args, output_type="pil"):
    gen = torch.Generator("cpu").manual_seed(args.seed)
    kw = dict(prompt=prompt, num_images_per_prompt=args.num_images, generator=gen, output_type=output_type,
              **_pipeline_kwargs(args))
    if args.steps is not None:  # 0 was refused up front; never "the pipeline's default"
        kw["num_inference_steps"] = args.steps
    from .pipelines import TinyFluxPipeline

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
        from .lora import LoRAError, load_lora

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
    from .pipelines.optimize import denoiser

    report = denoiser(pipe).__dict__.get("_svdquant_optimized")
    if report is not None and report.compiled_blocks:
        print(f"svdquant {command}: compiling {report.compiled_blocks} blocks for this size and capturing a CUDA graph "
              "(the first call only: about a minute for FLUX.1-dev; --no-optimize skips it)", file=sys.stderr,
              flush=True)


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def cmd_compare(args) -> None:
    from .images import grid, to_pil
    from .metrics import psnr, ssim
    from .pipelines import load_base_pipeline

    qpipe, device, dtype = _load(args)
    fpipe = load_base_pipeline(args.base, torch_dtype=dtype).to(device)
    _sampling_progress(fpipe)
    ref = _sample(fpipe, args.prompt, args, "pt")
    del fpipe
    img = _sample(qpipe, args.prompt, args, "pt")
    p, s = psnr(img, ref), ssim(img, ref)
    recipe = (qpipe.transformer._svdquant_recipe or {}).get("name", "quantized")
    scale = max(1, 256 // ref.shape[-1])
    canvas = grid([("16-bit", to_pil(ref)), (f"{recipe}", to_pil(img))], scale=scale,
                  row_notes=["reference", "PSNR " + ", ".join(f"{v:.2f}" for v in p.tolist()) + " dB"])
    _save_images([(canvas, args.targets[0])])
    print("| image | PSNR (dB) | SSIM |\n| --- | --- | --- |")
    for i in range(len(p)):
        print(f"| {i} | {p[i]:.2f} | {s[i]:.4f} |")
    print(f"wrote {args.output}")


def cmd_info(args) -> None:
    from .checkpoint import check_tensor_file, read_metadata, recorded_base, tensor_file_of

    meta = read_metadata(args.checkpoint)
    tensor_file = tensor_file_of(args.checkpoint)
    check_tensor_file(tensor_file)  # a truncated or damaged file is reported, not described as healthy
    if args.json:  # machine-readable: the JSON alone, so it can be piped
        print(json.dumps(meta, indent=1))
        return
    layers = meta["layers"]
    kinds: dict[str, int] = {}
    for cfg in layers.values():
        key = f"W{cfg['weights']}A{cfg['activations'] or '16'} rank {cfg['rank']}"
        kinds[key] = kinds.get(key, 0) + 1
    recipe = meta.get("recipe") or {}
    base = recorded_base(args.checkpoint, meta)
    missing = " (missing: pass --base to generate / compare)" if meta.get("base_is_local") and not Path(base).exists() else ""
    print(f"checkpoint   {args.checkpoint}")
    print(f"model        {meta['model_class']}")
    print(f"base         {base}{missing}")
    print(f"recipe       {recipe.get('name')} ({recipe.get('method')}, group {recipe.get('group_size')}, "
          f"rank {recipe.get('rank')}, svd {recipe.get('svd')})")
    if meta.get("source") == "nunchaku":
        print("format       Nunchaku single-file INT4 (imported on load; svdquant convert nunchaku writes a checkpoint)")
    else:
        print(f"format       version {meta['format_version']}, written by svdquant {meta['svdquant_version']}")
    print(f"size         {tensor_file.stat().st_size / 1e9:.3f} GB")
    print(f"layers       {len(layers)} quantized")
    for k, v in sorted(kinds.items()):
        print(f"  {v:5d} × {k}")
    for name, te in (meta.get("text_encoders") or {}).items():
        f = Path(tensor_file).with_name(f"{name}.safetensors")
        check_tensor_file(f)
        w = {cfg["weights"] for cfg in te["layers"].values()}
        print(f"{name:12s} {te['model_class']}: {len(te['layers'])} layers {'/'.join(sorted(w))} weight-only, "
              f"{f.stat().st_size / 1e9:.3f} GB")
    rep = meta.get("report")
    if rep:
        print(f"quantized in {rep['seconds_total']:.1f} s from {rep['snapshots']} snapshots; "
              f"kept 16-bit: {len(rep['skipped'])} layers")
    _print_layer_choice(layers)


def _print_layer_choice(layers: dict) -> None:
    """What svdquant.optimize's measured table (kept per GPU on this machine) says about these layers' shapes."""
    from .pipelines.layer_choice import cost_file, decision, load_costs

    # by input width and formats: a stacked q/k/v's rows are the sum of its layers'
    inputs = {(c["in_features"], c["weights"], c["activations"]) for c in layers.values() if c.get("activations")}
    rows = []
    for k, entry in sorted(load_costs().items()):
        gpu, m, kk, n, w, a, mode, dtype = k.split("|")
        if (int(kk), w, a) in inputs:
            rows.append(f"  {gpu}: {m} rows × {kk} → {n} ({mode}, {dtype}): INT8 path {entry[0]:.4f} ms, 16-bit "
                        f"{entry[1]:.4f} ms → {'16-bit' if decision(entry) else 'INT8 path'}")
    if rows:
        print(f"on CUDA      svdquant.optimize runs a layer as a 16-bit GEMM where the table measured on this machine "
              f"says so ({cost_file()}):")
        print("\n".join(rows))
    else:
        print("on CUDA      svdquant.optimize times each layer shape at the first call on the GPU at hand and runs it "
              "as a 16-bit GEMM where cuBLAS is faster (nothing measured on this machine yet)")


def cmd_demo(args) -> None:
    from .pipelines.demo import run_demo

    out = Path(args.output)
    run_demo(out, [r.name for r in args.recipes], steps=args.steps, seed=args.seed, progress=True,
             overwrite=args.overwrite, log=print)
    print((out / "quality.md").read_text())
    print(f"wrote {out / 'compare.png'} and {out / 'quality.md'}; checkpoints in {out}/<recipe>/")


def cmd_convert(args) -> None:
    if args.to is None:
        from .checkpoint import save_quantized
        from .convert import from_nunchaku, to_two_level

        model = from_nunchaku(args.plan.path)
        if args.two_level:
            print(to_two_level(model))
        save_quantized(model, args.output, base=args.base, overwrite=args.overwrite)
        base = "" if args.base else " (no base pipeline recorded: pass --base to generate / compare)"
        print(f"wrote {args.output}{base}")
        return
    from .convert import to_nunchaku

    to_nunchaku(args.source[0], args.output, overwrite=args.overwrite)
    print(f"wrote {args.output}")


def cmd_serve(args) -> None:
    if args.replicas is not None:
        from .serve.replicas import run_replicas

        run_replicas(args.model, host=args.host, port=args.port, replicas=args.replicas, device=args.device,
                     dtype=_dtype(args.dtype, args.device), loras=args.loras, max_queue=args.max_queue,
                     max_batch=args.max_batch, batch_wait_ms=args.batch_wait_ms,
                     # what the app itself enforces; Ray's proxy, not uvicorn, holds the connections
                     app_options=dict(api_key=args.api_key, cors_origins=tuple(args.cors_origin or ()),
                                      max_body_bytes=args.max_body_bytes, read_timeout=args.read_timeout,
                                      allowed_hosts=None if "*" in (args.allowed_host or ()) else
                                      ("localhost", "127.0.0.1", "::1", args.host, *(args.allowed_host or ()))))
        return
    from .serve import run_server

    run_server(args.model, host=args.host, port=args.port, device=args.device, dtype=_dtype(args.dtype, args.device),
               loras=args.loras, max_queue=args.max_queue, max_batch=args.max_batch, batch_wait_ms=args.batch_wait_ms,
               api_key=args.api_key, allowed_hosts=args.allowed_host or (), cors_origins=args.cors_origin or (),
               max_body_bytes=args.max_body_bytes, read_timeout=args.read_timeout, drain_timeout=args.drain_timeout,
               max_connections=args.max_connections, allow_base_outside=args.allow_base_outside,
               optimize=args.optimize)


def build_parser() -> argparse.ArgumentParser:
    from .recipes import DEMO_VARIANTS, METHODS, RECIPES

    from . import __version__

    ap = _Parser(prog="svdquant", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--version", action="version", version=f"svdquant {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)
    ap.verbs = sub.choices  # name -> subcommand parser, for errors that argparse reports at the top (main)

    def common_device(p):
        p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda if present)")
        p.add_argument("--dtype", choices=list(DTYPES), help="16-bit compute dtype (default: bf16 on GPU, fp32 on CPU)")

    def optimize_flag(p):
        p.add_argument("--no-optimize", dest="optimize", action="store_false",
                       help="on CUDA, skip svdquant.optimize (fused layers, the fastest attention backend, compiled "
                            "blocks, CUDA graphs): no compilation at the first call, slower steps")

    def checkpoint_prompt(p, output):
        p.add_argument("checkpoint")
        p.add_argument("prompt")
        stem, suffix = output.rsplit(".", 1)
        many = f"; with --num-images 2: {stem}-0.{suffix} and {stem}-1.{suffix}" if output == "image.png" else ""
        p.add_argument("-o", "--output", default=output, help=f"image file to write (default {output}{many})")
        p.add_argument("--base", help="base pipeline folder or hub id (default: the one the checkpoint records)")
        p.add_argument("--overwrite", action="store_true", help="replace the output file(s) if they exist")

    def sampling(p):
        p.add_argument("--steps", type=int, help="denoising steps (default: the pipeline's)")
        p.add_argument("--seed", type=int, default=0, help="seed of the initial noise (default 0; image i of a call "
                                                            "uses the same generator, so a seed gives the same images)")
        p.add_argument("--num-images", type=int, default=1, help=f"images per call (1 to {_checks.MAX_IMAGES})")
        size_options(p, "image")
        p.add_argument("--guidance-scale", dest="guidance_scale", type=float,
                       help="classifier-free / distilled guidance (default: the pipeline's)")

    def size_options(p, what):
        p.add_argument("--height", type=int, help=f"{what} height in pixels (default: the pipeline's; the tiny "
                                                  "model draws 32 only)")
        p.add_argument("--width", type=int, help=f"{what} width in pixels (default: the pipeline's; the tiny model "
                                                 "draws 32 only)")

    p = sub.add_parser("demo", help="offline default job: tiny model, 16-bit vs 4-bit images, compare.png",
                       description="Build the tiny model (no download), quantize it with each recipe, sample one "
                                   "image per class from the same noise and write compare.png and quality.md.")
    p.add_argument("-o", "--output", default="svdquant-demo", help="output folder (default: svdquant-demo)")
    p.add_argument("--recipes", nargs="+", default=list(DEMO_VARIANTS), metavar="VARIANT",
                   help=f"recipes to compare, optionally with an ablation method: {' '.join(DEMO_VARIANTS)} "
                        "(default), int4-lorc, int4-smooth, ...")
    p.add_argument("--steps", type=int, default=6, help="Euler sampling steps (default 6; the model card uses 20)")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise all variants sample from (default 0)")
    p.add_argument("--overwrite", action="store_true", help="replace earlier demo outputs in the folder")
    p.set_defaults(func=cmd_demo, validate=_validate_demo)

    p = sub.add_parser("quantize", help="quantize a pipeline's transformer and save a checkpoint",
                       description="Calibrate on prompts, quantize the transformer block by block, save OUT/.")
    p.add_argument("model", help="diffusers pipeline folder or hub id (FLUX.1, SD3, PixArt-Σ, SANA), or 'tiny' "
                                 "(the shipped 32x32 CIFAR-10 model)")
    p.add_argument("-o", "--output", required=True, help="checkpoint folder to write")
    p.add_argument("--recipe", default="int4", help=f"quantization scheme: {', '.join(sorted(RECIPES))} (default int4)")
    p.add_argument("--method", choices=METHODS, help="ablation baseline instead of svdquant")
    p.add_argument("--rank", type=int, help="low-rank branch rank (default: the recipe's)")
    p.add_argument("--no-gptq", action="store_true",
                   help="round the residual to nearest instead of with GPTQ (the 4-bit recipes' default)")
    p.add_argument("--prompts", help="text file, one calibration prompt per line (default: the built-in 128)")
    p.add_argument("--num-prompts", type=int, help="use only the first N prompts")
    p.add_argument("--images", nargs="+", metavar="FILE",
                   help="input images for an edit pipeline (FLUX.1 Kontext, Qwen-Image-Edit, Wan image-to-video): "
                        "prompt i edits image i mod N; required for those, refused for the others")
    p.add_argument("--steps", type=int, help="denoising steps per calibration prompt (default 8; tiny: 4)")
    p.add_argument("--snapshots", type=int,
                   help="(prompt, step) samples drawn (default 128, tiny: 16; at most prompts x steps are)")
    p.add_argument("--tokens", type=int, help="tokens kept per layer (default: the recipe's eval_tokens)")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration: which (prompt, step) samples "
                                                        "are drawn and each prompt's noise (default 0)")
    size_options(p, "calibration image")
    p.add_argument("--guidance-scale", dest="guidance_scale", type=float,
                   help="guidance of the calibration runs (default: the pipeline's)")
    p.add_argument("--include", nargs="+", help="quantize only layers matching these patterns (generic adapter)")
    p.add_argument("--exclude", nargs="+", help="never quantize layers matching these patterns")
    p.add_argument("--text-encoders", action="store_true",
                   help="also quantize the text encoders (T5, CLIP, Qwen2.5-VL) weight-only: INT4, group 64 (W4A16)")
    p.add_argument("--push-to-hub", metavar="REPO", help="after saving, upload OUT with its model card to this "
                   "Hugging Face Hub repo (created if needed; needs a token: `hf auth login`)")
    p.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")
    p.add_argument("--stream", action="store_true",
                   help="keep the 16-bit pipeline in CPU memory and move each block, text encoder and snapshot to "
                        "--device only while it is used: the GPU needs about one block's memory")
    p.add_argument("--max-gpu-memory", metavar="SIZE",
                   help="cap the GPU memory torch may use, e.g. 24GB, 22GiB, 16000MB (implies --stream)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    common_device(p)
    p.set_defaults(func=cmd_quantize, validate=_validate_quantize)

    p = sub.add_parser("generate", help="sample images with a quantized checkpoint",
                       description="Load the base pipeline the checkpoint records (or --base) with the quantized "
                                   "transformer and sample.")
    checkpoint_prompt(p, "image.png")
    p.add_argument("--lora", action="append", metavar="PATH[:STRENGTH]",
                   help="apply a LoRA .safetensors file at a strength (default 1); repeatable")
    sampling(p)
    common_device(p)
    optimize_flag(p)
    p.set_defaults(func=cmd_generate, validate=_validate_generate)

    p = sub.add_parser("compare", help="16-bit and quantized images side by side, with PSNR/SSIM",
                       description="Sample the base pipeline and the quantized one from the same seed; write both "
                                   "side by side in one PNG and print PSNR and SSIM.")
    checkpoint_prompt(p, "compare.png")
    sampling(p)
    common_device(p)
    optimize_flag(p)
    p.set_defaults(func=cmd_compare, validate=_validate_compare)

    p = sub.add_parser("serve", help="an OpenAI-compatible text-to-image HTTP service and web page",
                       description="Serve MODEL over HTTP: POST /v1/images/generations (OpenAI's images API), "
                                   "GET /v1/models, /health, /metrics (Prometheus) and a web page at /.")
    p.add_argument("model", nargs="?", default="tiny",
                   help="'tiny' (default: the shipped CIFAR-10 model, offline, CPU), an svdquant checkpoint folder, "
                        "or a 16-bit diffusers pipeline folder")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port to listen on (default 8000)")
    p.add_argument("--lora", action="append", metavar="PATH[:STRENGTH]",
                   help="load a LoRA .safetensors file at a default strength (1); clients and the page can change "
                        "it per request; repeatable")
    p.add_argument("--max-queue", dest="max_queue", type=int, default=16,
                   help="requests waiting at most; more get 429 with Retry-After (default 16)")
    p.add_argument("--max-batch", dest="max_batch", type=int, default=4,
                   help="images sampled together from compatible requests (default 4)")
    p.add_argument("--batch-wait-ms", dest="batch_wait_ms", type=int, default=10,
                   help="how long the worker waits for compatible requests to fill a batch (default 10)")
    p.add_argument("--replicas", type=int,
                   help="deploy N copies with Ray Serve, one per GPU, behind Ray's HTTP proxy (needs ray[serve])")
    p.add_argument("--api-key", dest="api_key", metavar="KEY",
                   help="require Authorization: Bearer KEY on the API and /metrics (default: $SVDQUANT_API_KEY; "
                        "prefer it: a command line is visible to other users)")
    p.add_argument("--allowed-host", dest="allowed_host", action="append", metavar="NAME",
                   help="a name clients reach the server by, besides the loopback names and --host (Host header; "
                        "anything else gets 403, which stops DNS rebinding); '*' for any; repeatable")
    p.add_argument("--cors-origin", dest="cors_origin", action="append", metavar="ORIGIN",
                   help="a web origin (https://app.example.com) whose pages may call the API; repeatable (default: "
                        "none, only the server's own page)")
    p.add_argument("--max-body-bytes", dest="max_body_bytes", type=int, default=1 << 20,
                   help="larger request bodies get 413, unread (default 1048576)")
    p.add_argument("--read-timeout", dest="read_timeout", type=float, default=10.0,
                   help="seconds a client has to send a request's headers, then its body (default 10)")
    p.add_argument("--drain-timeout", dest="drain_timeout", type=float, default=30.0,
                   help="on SIGTERM, seconds to finish queued and running work; then the rest gets 503 and the "
                        "process exits (default 30)")
    p.add_argument("--max-connections", dest="max_connections", type=int, default=128,
                   help="open connections at most; more are closed as they open (default 128)")
    p.add_argument("--allow-base-outside", dest="allow_base_outside", action="store_true",
                   help="load a checkpoint's recorded base pipeline even outside the checkpoint's folder and the "
                        "current directory (trust the checkpoint)")
    common_device(p)
    optimize_flag(p)
    p.set_defaults(func=cmd_serve, validate=_validate_serve)

    p = sub.add_parser("convert", help="Nunchaku checkpoints in and out",
                       description="svdquant convert nunchaku FILE.safetensors -o DIR: import a Nunchaku single-file "
                                   "INT4 FLUX checkpoint as an svdquant checkpoint (exact). svdquant convert DIR --to "
                                   "nunchaku -o FILE.safetensors: write a w4a4-float FLUX checkpoint in Nunchaku's "
                                   "format (its 16-bit smoothing and scale biases rounded).")
    p.add_argument("source", nargs="+", metavar="SOURCE",
                   help="'nunchaku FILE.safetensors' to import, or a checkpoint folder with --to nunchaku")
    p.add_argument("--to", metavar="FORMAT", help="write SOURCE in this format: nunchaku")
    p.add_argument("-o", "--output", required=True, help="checkpoint folder (import) or .safetensors file (--to)")
    p.add_argument("--base", help="import: the base pipeline to record, e.g. black-forest-labs/FLUX.1-dev "
                                  "(Nunchaku files do not say which)")
    p.add_argument("--two-level", dest="two_level", action="store_true",
                   help="import: convert the W4A4 layers to two-level scales (the INT8 GEMM path, fast on Hopper) "
                        "and print the error it adds")
    p.add_argument("--overwrite", action="store_true", help="replace the output if it exists")
    p.set_defaults(func=cmd_convert, validate=_validate_convert)

    p = sub.add_parser("info", help="what a checkpoint holds", description="Print a checkpoint's metadata.")
    p.add_argument("checkpoint")
    p.add_argument("--json", action="store_true", help="print the full metadata as JSON instead")
    p.set_defaults(func=cmd_info, validate=_validate_info)
    return ap


def _quiet_libraries() -> None:
    """diffusers' and transformers' logging and loading bars, set once they are imported."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    if not _bars():  # diffusers / transformers loading bars: none in a redirected log
        dlog.disable_progress_bar()
        tlog.disable_progress_bar()
    # diffusers' warnings (offline mode, deprecations) would surround the one error line; svdquant's own
    # checks now catch what they warned about (sizes it would have resized quietly)
    dlog.set_verbosity_error()


def main(argv=None) -> int:
    from .checkpoint import CheckpointError

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # said by the subcommand's parser, whose options they were meant to be
        parser.verbs[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    keep_freed_memory()  # large CPU temporaries reused instead of page-faulted in anew (svdquant/_cpu.py)
    # transformers notes on every diffusers pipeline load that its image processors lack torchvision;
    # svdquant uses none of them, and the note would bury the one line a command prints.
    logging.getLogger("transformers.utils.import_utils").addFilter(
        lambda r: "requires torchvision" not in r.getMessage())
    if "diffusers" not in sys.modules:  # its level is read when it is imported, which a check may do
        os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    try:
        # The whole request, before any work, and before diffusers is imported where the checks need it not
        # (importing it takes seconds, which a mistyped option should not wait for).
        args.validate(args)
        _quiet_libraries()
        args.func(args)
        sys.stdout.flush()  # a closed pipe must fail here, inside the handler, not at interpreter exit
    except (CheckpointError, UsageError, OSError, ValueError) as e:  # LoRAError is a ValueError
        if isinstance(e, BrokenPipeError):
            return _broken_pipe()
        msg = " ".join(str(e).split())  # one line, even for libraries' multi-line messages
        print(f"svdquant {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # every writer cleans up after itself (temporary names, then renames)
        print(f"svdquant {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


def _broken_pipe() -> int:
    """The reader went away (``svdquant info CK | head``): stop quietly, as other Unix tools do.
    stdout is pointed at /dev/null so Python's final flush does not print a second error."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # not a real file (e.g. captured in tests)
        pass
    return 141  # 128 + SIGPIPE, what a shell reports for a command killed by a closed pipe


if __name__ == "__main__":
    sys.exit(main())
