"""What to run to calibrate (:class:`Calibration`), checked when it is made, and what a calibration through a
pipeline asks of that pipeline (:func:`check_pipeline_call`), checked before it runs."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Sequence

from ..models.pipeline_needs import makes_video, needs_images, pads_batched_prompts, with_area
from .inputs import check_images
from .prompts import DEFAULT_PROMPTS


# Prompts per calibration call when ``batch_size`` is unset and the calibration streams the model to a GPU (the
# pipeline in CPU memory: every call moves the blocks that do not stay on the GPU, once for all of its prompts). A
# FLUX.1-dev block's forward at 1024² in BF16 holds 0.43-0.52 GB of transient activations for one prompt and
# 1.3-1.8 GB for four (double / single block, benchmarks/calibration_memory.py on the CPU), within the margin
# ``memory.resident_blocks`` keeps for a forward (4 GB + 4 blocks). A pipeline resident on the GPU runs one prompt a
# call: there batching saves only launches, and its activations have no margin kept for them.
GPU_BATCH = 4
MAX_BATCH = 64


def per_prompt_kwargs(kwargs: dict) -> list[str]:
    """The keys of ``kwargs`` that describe one prompt's call, which a batch of prompts would not match: given
    ``latents`` or ``*_embeds``, an IP-Adapter's image, ``num_images_per_prompt`` other than 1."""
    return sorted(k for k, v in kwargs.items()
                  if k == "latents" or k.endswith("_embeds") or k.startswith("ip_adapter_")
                  or (k == "num_images_per_prompt" and v != 1))


@dataclass
class Calibration:
    """What to run to calibrate.

    prompts: captions (default: the 128 of :data:`DEFAULT_PROMPTS`); ``num_prompts``
        takes the first N.
    steps: denoising steps per prompt (the pipeline's ``num_inference_steps``; ``None``: 8, or the pipeline's
        ``calibration_defaults``: the tiny model's 10 class names take 4).
    snapshots: (prompt, step) pairs drawn at random as samples, each the step's first call of the model
        (``None``: 128, the paper's; the tiny model 16).
    tokens_per_layer: tokens kept per layer input over all snapshots (``None``: the
        recipe's ``eval_tokens``); ``max |X_j|`` always covers every token.
    pipeline_kwargs: extra arguments for every pipeline call (height, width, guidance...).
    inputs: instead of a pipeline, a list of keyword-argument dicts for the model's
        forward, one snapshot each (for bare models, and for tests).
    images: input images for an edit pipeline (FLUX.1 Kontext, Qwen-Image-Edit, Wan image-to-video), PIL
        images or file paths: prompt ``i`` edits image ``i mod n`` (:mod:`svdquant.calibration.inputs`).
    batch_size: prompts per pipeline call, at most. Prompts drawn at the same steps go through the pipeline
        together, so a batch runs no step its prompts would not run alone, and each prompt keeps its own seeded
        noise (``None``: up to :data:`GPU_BATCH` when the calibration streams the model from CPU memory to a GPU,
        where one call moves the weights once for all of its prompts; else one, and always one for videos, edits,
        pipelines that pad a batch's prompts to the longest (Qwen-Image, Z-Image: the padding would reach the
        recorded tokens) and calls given per-prompt arguments such as ``latents``).
    """

    prompts: Sequence[str] | None = None
    num_prompts: int | None = None
    steps: int | None = None
    snapshots: int | None = None
    tokens_per_layer: int | None = None
    seed: int = 0
    pipeline_kwargs: dict[str, Any] = field(default_factory=dict)
    inputs: list[dict[str, Any]] | None = None
    images: Sequence[Any] | None = None
    batch_size: int | None = None

    # set by the calibration itself; in pipeline_kwargs they would collide with it
    _RESERVED = ("prompt", "num_inference_steps", "generator", "output_type")

    def __post_init__(self):
        # Checked here so a bad value fails when the Calibration is made, not minutes into a run.
        from .. import _checks

        if self.prompts is not None:
            if isinstance(self.prompts, str):  # iterating it would calibrate on single characters
                raise ValueError("prompts= takes a list of prompts, got one string; use prompts=[...]")
            if not all(isinstance(p, str) and p.strip() for p in self.prompts):
                raise ValueError("prompts= must be non-empty strings")
            if not self.prompts:
                raise ValueError("prompts=[] is empty; give at least one prompt, or None for the built-in 128")
        if self.num_prompts is not None:
            _checks.count("num_prompts", self.num_prompts)
        if self.batch_size is not None:
            _checks.count("batch_size", self.batch_size, hi=MAX_BATCH)
        if self.steps is not None:
            _checks.steps("steps", self.steps)
        if self.snapshots is not None:
            _checks.count("snapshots", self.snapshots)
        if self.tokens_per_layer is not None:
            _checks.count("tokens_per_layer", self.tokens_per_layer, why=" (None: the recipe's eval_tokens)")
        _checks.seed("seed", self.seed)
        if not isinstance(self.pipeline_kwargs, dict):
            raise ValueError(f"pipeline_kwargs= must be a dict, got {type(self.pipeline_kwargs).__name__}")
        clash = sorted(set(self.pipeline_kwargs) & set(self._RESERVED))
        if clash:
            raise ValueError(f"pipeline_kwargs sets {clash}, which calibration sets itself; use prompts=, steps=, "
                             "seed=")
        if self.inputs is not None:
            if not self.inputs or not all(isinstance(kw, dict) for kw in self.inputs):
                raise ValueError("inputs= must be a non-empty list of forward keyword-argument dicts")
        if self.images is not None:
            if "image" in self.pipeline_kwargs:
                raise ValueError("pipeline_kwargs sets 'image' and images= is given; give the images as images=")
            self.images = check_images(self.images)
        if self.batch_size not in (None, 1):
            one_prompt = per_prompt_kwargs(self.pipeline_kwargs)
            why = ("input images: an edit calibration runs one prompt and its image per call"
                   if self.images is not None or "image" in self.pipeline_kwargs else
                   "inputs=: those are the model's calls as given" if self.inputs is not None else
                   f"pipeline_kwargs {one_prompt}, which describe one prompt's call" if one_prompt else None)
            if why:
                raise ValueError(f"batch_size={self.batch_size} with {why}; leave batch_size unset or 1")

    DEFAULTS = {"steps": 8, "snapshots": 128}

    def for_pipeline(self, pipe) -> "Calibration":
        """This calibration as run through ``pipe`` (or ``None``): without prompts of its own, the pipeline's
        calibration prompts where it has some (the tiny model draws only its class names); steps and snapshots
        left ``None``, the pipeline's ``calibration_defaults`` or :attr:`DEFAULTS`."""
        calib = self
        if calib.prompts is None and calib.inputs is None and hasattr(pipe, "calibration_prompts"):
            calib = dataclasses.replace(calib, prompts=pipe.calibration_prompts)
        defaults = {**self.DEFAULTS, **getattr(pipe, "calibration_defaults", {})}
        unset = {k: v for k, v in defaults.items() if getattr(calib, k) is None}
        if pipe is not None and calib.inputs is None:  # FLUX.1 Kontext: calibrate at the size asked for
            sized = with_area(pipe, calib.pipeline_kwargs)
            if sized is not calib.pipeline_kwargs:
                unset["pipeline_kwargs"] = sized
        return dataclasses.replace(calib, **unset) if unset else calib

    def batch_for(self, pipe, streaming: bool) -> int:
        """Prompts per pipeline call at most: ``batch_size``, or when unset :data:`GPU_BATCH` where the calibration
        streams the model to a GPU (``streaming``) and nothing asks for one prompt a call (see ``batch_size``)."""
        if self.batch_size is not None:
            return self.batch_size
        if not streaming or self.images is not None or "image" in self.pipeline_kwargs or makes_video(pipe) \
                or needs_images(pipe) or pads_batched_prompts(pipe) or per_prompt_kwargs(self.pipeline_kwargs):
            return 1
        return GPU_BATCH

    def prompt_list(self) -> list[str]:
        prompts = list(self.prompts if self.prompts is not None else DEFAULT_PROMPTS)
        if self.num_prompts is not None:
            if self.num_prompts > len(prompts):  # taking fewer than asked would pass unnoticed
                raise ValueError(f"num_prompts={self.num_prompts}, but there are only {len(prompts)} prompts; "
                                 f"use at most {len(prompts)}")
            prompts = prompts[: self.num_prompts]
        if not prompts:
            raise ValueError("calibration needs at least one prompt")
        return prompts


def check_pipeline_call(pipe, calib: Calibration) -> None:
    """What the calibration will ask of the pipeline, checked before it runs (minutes, on a big model)."""
    from .. import _checks
    from ..models.sizes import check_size

    prompts = calib.prompt_list()
    if hasattr(pipe, "labels_for"):  # the tiny model draws only its class names
        pipe.labels_for(prompts)
    kw = calib.pipeline_kwargs
    check_size(pipe, kw.get("height"), kw.get("width"))
    if kw.get("guidance_scale") is not None:
        _checks.real("guidance_scale", kw["guidance_scale"], lo=0)
