"""The loaded pipeline, what it can draw, and one batched call into it.

The worker thread is the only caller of :meth:`Engine.generate`: pipelines and LoRA strengths are not
safe to use from two threads at once.
"""

from __future__ import annotations

import inspect
import io
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..pipelines import TINY_BASE, TinyFluxPipeline, size_multiple
from .schema import GenerationRequest, parse_size


class StopSampling(Exception):
    """Raised between two denoising steps when nobody waits for the batch any more (every client gone or past its
    deadline, or the drain timed out): the pipeline call ends there instead of running to the end for nobody."""


class RequestError(ValueError):
    """A well-formed request this model cannot honour: HTTP 400 with this message."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Settings:
    """What a batch shares: requests with equal settings are sampled together."""
    width: int
    height: int
    steps: int
    guidance: float
    loras: tuple[tuple[str, float], ...]


def load_engine(model: str = TINY_BASE, device: str = "cpu", dtype: torch.dtype | None = None,
                loras: list[tuple[str, float]] = (), *, allow_base_outside: bool = False,
                optimize: bool = True, attention: str | None = "auto", compile: bool | str = True) -> "Engine":
    """``model``: ``tiny`` (the shipped model), an svdquant checkpoint folder, or a 16-bit pipeline folder.
    ``allow_base_outside``: see :func:`svdquant.load_pipeline` (a checkpoint's recorded base outside its folder).
    ``optimize``: on a CUDA device, :func:`svdquant.optimize` the pipeline (a 16-bit one too); the server compiles
    and captures it before it reports ready (:meth:`Engine.warmup`); ``attention``, ``compile``: what it sets
    and how it compiles (see :func:`svdquant.load_pipeline`)."""
    from ..checkpoint import META_FILE
    from ..pipelines.load import load_pipeline
    from ..pipelines import load_base_pipeline
    from ..pipelines.compiling import BLOCKS, compile_mode
    from ..pipelines.optimize import check_attention

    cuda = torch.device(device).type == "cuda"
    check_attention(attention)
    for name, value, set_ in (("attention", attention, attention not in ("auto", None)),
                              ("compile", compile, compile_mode(compile) not in (BLOCKS, None))):
        if set_ and (model == TINY_BASE or not optimize or not cuda):
            raise ValueError(f"{name}={value!r} is set by svdquant.optimize on a CUDA device, for a checkpoint or a "
                             "16-bit pipeline (not the tiny model): leave it out here")
    if model == TINY_BASE:
        pipe = TinyFluxPipeline.default(dtype or torch.float32)
    elif (Path(model) / META_FILE).is_file():
        pipe = load_pipeline(None, model, device=device, torch_dtype=dtype, allow_base_outside=allow_base_outside,
                             optimize=None if optimize else False, attention=attention, compile=compile)
    else:
        pipe = load_base_pipeline(model, torch_dtype=dtype).to(device)
        if optimize and cuda:
            from ..pipelines.optimize import optimize as optimize_pipeline

            optimize_pipeline(pipe, attention=attention, compile=compile)
    pipe = pipe.to(device)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)  # the server log is no terminal
    names = {}
    if loras:
        from ..lora import load_lora

        for path, strength in loras:
            name = Path(path).stem
            names[load_lora(pipe, path, name=name if name not in names else f"{name}-{len(names)}",
                            strength=strength)] = strength
    model_id = TINY_BASE if model == TINY_BASE else os.path.basename(os.path.normpath(model))
    return Engine(pipe, model_id, device, names)


class Engine:
    """What a server draws with: ``pipe`` (the tiny pipeline or a diffusers one, already on ``device``), served
    under ``model_id``. :func:`load_engine` builds one from a name or folder; a pipeline built in Python (random
    weights in ``benchmarks/serve.py``, say) serves as it is: ``create_app(Engine(pipe, "my-model", "cuda"))``.
    ``loras``: name -> default strength of LoRAs already loaded into ``pipe``."""

    def __init__(self, pipe, model_id: str, device: str, loras: dict[str, float] | None = None):
        from ..models.pipeline_needs import makes_video, needs_images

        if makes_video(pipe) or needs_images(pipe):  # requests carry no input image, answers no video
            raise ValueError(f"the server draws images from a prompt alone; {type(pipe).__name__} "
                             f"{'makes videos' if makes_video(pipe) else 'edits an input image'}: sample it with "
                             "svdquant generate (or the pipeline itself)")
        self.pipe, self.model_id, self.device = pipe, model_id, device
        self.loras = dict(loras or {})      # name -> default strength, as loaded
        self.tiny = isinstance(pipe, TinyFluxPipeline)
        if self.tiny:
            self.default_size = (pipe.image_size, pipe.image_size)
            self.default_steps, self.default_guidance = pipe.num_inference_steps, pipe.guidance_scale
            self.classes = list(pipe.classes)
        else:
            side = getattr(pipe, "default_sample_size", 64) * getattr(pipe, "vae_scale_factor", 8)
            self.default_size = (side, side)
            # the pipeline's own defaults (FLUX.1-schnell and -dev differ), from its __call__ signature
            params = inspect.signature(pipe.__call__).parameters
            self.default_steps = _default(params, "num_inference_steps", 28)
            self.default_guidance = float(_default(params, "guidance_scale", 3.5))
            self.classes = None
        self.multiple = size_multiple(pipe) if not self.tiny else pipe.image_size
        # set by the worker around each call (the only caller): True once the batch should stop, checked after
        # every denoising step through the pipeline's callback_on_step_end (diffusers' and the tiny pipeline's)
        self.stop_check = None
        self._steps_callable = "callback_on_step_end" in inspect.signature(pipe.__call__).parameters

    def describe(self) -> dict:
        """What ``GET /v1/models`` and the web page show."""
        return {"id": self.model_id, "object": "model", "owned_by": "svdquant",
                "default_size": "%dx%d" % self.default_size, "default_steps": self.default_steps,
                "default_guidance_scale": self.default_guidance, "classes": self.classes,
                "loras": self.loras}

    # -- checks, in the request handler: a refused request never reaches the worker -----------------
    def settings(self, req: GenerationRequest) -> Settings:
        if req.model is not None and req.model != self.model_id:
            raise RequestError(f"model {req.model!r} is not served here; this server serves {self.model_id!r} "
                               "(GET /v1/models)", "model")
        if self.tiny:
            try:
                self.pipe.labels_for(req.prompt)
            except ValueError:
                raise RequestError("the tiny model draws CIFAR-10 classes only: the prompt must name one of "
                                   + ", ".join(self.classes), "prompt") from None
        w, h = parse_size(req.size) if req.size else self.default_size
        if self.tiny and (w, h) != self.default_size:
            raise RequestError(f"size {req.size!r}: the tiny model draws %dx%d images only" % self.default_size,
                               "size")
        if w % self.multiple or h % self.multiple:
            raise RequestError(f"size {req.size!r}: this model needs sides that are multiples of {self.multiple}",
                               "size")
        unknown = sorted(set(req.loras) - set(self.loras))
        if unknown:
            have = ", ".join(self.loras) or "none"
            raise RequestError(f"no LoRA named {unknown[0]!r} is loaded (loaded: {have})", "loras")
        strengths = {**self.loras, **req.loras}
        return Settings(w, h, req.num_inference_steps or self.default_steps,
                        self.default_guidance if req.guidance_scale is None else req.guidance_scale,
                        tuple(sorted(strengths.items())))

    # -- sampling, in the worker thread ----------------------------------------------------------------
    def warmup(self, max_batch: int, log=print) -> float:
        """Compile and capture the optimized pipeline (:func:`svdquant.optimize`) at the default size for every batch
        size up to ``max_batch``, so that no request pays it; the server is ready only after. Returns the seconds
        it took (0 when nothing compiles lazily: the CPU, an unoptimized pipeline). Another size compiles at its
        first request."""
        from ..pipelines.optimize import graphs_of

        graphs = graphs_of(self.pipe)
        self.warmup_seconds = 0.0
        if graphs is None:
            return 0.0
        # a true-CFG pipeline (Qwen-Image) calls its model with two text lengths per step: two graphs a batch size
        graphs.max_graphs = max(graphs.max_graphs, 2 * max_batch + 2)
        t0 = time.perf_counter()
        w, h = self.default_size
        prompt = self.classes[0] if self.tiny else "a photograph"
        for b in range(1, max_batch + 1):
            settings = Settings(w, h, 2, self.default_guidance, tuple(sorted(self.loras.items())))
            self.generate(settings, [prompt] * b, list(range(b)))
        self.warmup_seconds = time.perf_counter() - t0
        log(f"warmed up in {self.warmup_seconds:.1f} s: compiled and captured {w}x{h} at batch sizes 1-{max_batch} "
            f"({graphs.captures} CUDA graphs); other sizes compile at their first request", flush=True)
        return self.warmup_seconds

    def generate(self, settings: Settings, prompts: list[str], seeds: list[int]):
        """One image per (prompt, seed), as PIL images. Each image's noise comes from its own seed, so an
        image does not depend on what it was batched with (same seed, same image)."""
        if settings.loras:
            from ..lora import set_lora_strength

            for name, strength in settings.loras:
                set_lora_strength(self.pipe, name, strength)
        gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        kw = {}
        check = self.stop_check
        if check is not None and self._steps_callable:
            def stop_between_steps(pipe, step, timestep, callback_kwargs):
                if check():
                    raise StopSampling()
                return callback_kwargs  # diffusers reads its tensors back from the returned dict

            kw["callback_on_step_end"] = stop_between_steps
        if self.tiny:
            latents = torch.cat([self.pipe.noise(1, g) for g in gens])
            return self.pipe(prompt=prompts, latents=latents, num_inference_steps=settings.steps,
                             guidance_scale=settings.guidance, **kw).images
        return self.pipe(prompt=prompts, generator=gens, width=settings.width, height=settings.height,
                         num_inference_steps=settings.steps, guidance_scale=settings.guidance, **kw).images


def _default(params, name: str, fallback):
    p = params.get(name)
    return fallback if p is None or p.default in (inspect.Parameter.empty, None) else p.default


def encode(image, fmt: str) -> bytes:
    buf = io.BytesIO()
    # PIL names JPEG "JPEG"; RGB because JPEG has no alpha
    image.convert("RGB").save(buf, format=fmt.upper(), **({"quality": 95} if fmt in ("jpeg", "webp") else {}))
    return buf.getvalue()
