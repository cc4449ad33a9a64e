"""What calibrating through (and sampling) a diffusers pipeline asks of the pipeline, per model: whether it edits an
input image, whether it makes a video, and whether it runs a second expert and on which steps (the size its images must be a multiple of: :mod:`.sizes`).

Read from the pipeline object (its class, components, config and scheduler) without running it, so that
``quantize`` can refuse a call that would fail or calibrate the wrong thing before minutes of work.
"""

from __future__ import annotations

import copy
import importlib
import inspect

import torch.nn as nn


# Pipelines that edit (or animate) an input image: calibrating them without one calibrates the model on inputs
# it never sees in use (no reference-image tokens in FLUX.1 Kontext's and Qwen-Image-Edit's sequences, no
# first frame in image-to-video), so they need ``Calibration(images=)``.
EDIT_PIPELINES = frozenset({
    "FluxKontextPipeline", "QwenImageEditPipeline", "QwenImageEditPlusPipeline", "WanImageToVideoPipeline",
})


# Pipelines that pad a batch's prompts to its longest (Qwen-Image's tokenizer, ``padding=True``; Z-Image's transformer,
# ``pad_sequence`` over its prompts' captions): the padding then runs through the linears, tokens a one-prompt call
# never has
PADDING_PIPELINES = frozenset({"QwenImagePipeline", "ZImagePipeline"})


# Pipelines that make a video: their output is ``.frames`` and they take ``num_frames``, which their VAE needs to be
# k x its temporal compression + 1 (diffusers rounds any other count down, with a warning only).
VIDEO_PIPELINES = frozenset({"WanPipeline", "WanImageToVideoPipeline"})


def _class_names(pipe) -> list[str]:
    """``pipe`` (a pipeline, its class, or a class name from a model_index.json) as the names of its classes."""
    if isinstance(pipe, str):
        return [pipe]
    return [c.__name__ for c in (pipe if isinstance(pipe, type) else type(pipe)).__mro__]


def needs_images(pipe) -> bool:
    """Whether ``pipe`` (a pipeline, its class or its class name) edits an input image (:data:`EDIT_PIPELINES`, or
    a subclass of one)."""
    return any(name in EDIT_PIPELINES for name in _class_names(pipe))


def makes_video(pipe) -> bool:
    """Whether ``pipe`` (a pipeline, its class or its class name) makes a video (:data:`VIDEO_PIPELINES`, or a
    subclass of one)."""
    return any(name in VIDEO_PIPELINES for name in _class_names(pipe))


# The pipeline attribute of the second expert (Wan 2.2 A14B: ``transformer`` runs the high-noise steps,
# ``transformer_2`` the low-noise ones); a checkpoint stores it as ``<name>.safetensors``.
SECOND_EXPERT = "transformer_2"


def pads_batched_prompts(pipe) -> bool:
    """Whether ``pipe`` pads a batch of prompts to the longest (:data:`PADDING_PIPELINES`, or a subclass of one)."""
    return any(name in PADDING_PIPELINES for name in _class_names(pipe))


def second_expert(pipe) -> nn.Module | None:
    """The low-noise expert of a two-expert pipeline (Wan 2.2 A14B's ``transformer_2``), else None."""
    m = getattr(pipe, SECOND_EXPERT, None)
    return m if isinstance(m, nn.Module) else None


def expert_steps(pipe, steps: int) -> tuple[int, int] | None:
    """How many of ``steps`` denoising steps a two-expert pipeline gives each expert, (high-noise ``transformer``,
    low-noise ``transformer_2``), by the rule its docstring states: timesteps at or above ``boundary_ratio`` ×
    ``num_train_timesteps`` go to ``transformer``. None when its scheduler cannot list the timesteps from the step
    count alone (dynamic shifting needs the image size)."""
    ratio = _boundary_ratio(pipe)
    if ratio is None:
        return steps, 0
    scheduler = copy.deepcopy(pipe.scheduler)  # set_timesteps changes the scheduler; the pipeline's stays as it is
    try:
        scheduler.set_timesteps(steps)
    except (TypeError, ValueError):
        return None
    boundary = ratio * scheduler.config.num_train_timesteps
    high = sum(float(t) >= boundary for t in scheduler.timesteps)
    return high, len(scheduler.timesteps) - high


def steps_of(pipe, model: nn.Module, steps: int) -> int:
    """How many of ``steps`` denoising steps ``pipe`` runs ``model`` on: all of them, or one expert's share in a
    two-expert pipeline (``steps`` where the split cannot be worked out from the step count alone)."""
    second = second_expert(pipe)
    split = expert_steps(pipe, steps) if second is not None else None
    if split is None:
        return steps
    return split[1] if model is second else split[0]


def _boundary_ratio(pipe) -> float | None:
    return (getattr(pipe, "config", None) or {}).get("boundary_ratio")


def check_experts(pipe, steps: int) -> None:
    """Refuse, before any work, a calibration of a two-expert pipeline in which one expert runs on no step: it
    would record no call to quantize it from."""
    if second_expert(pipe) is None:
        return
    name = type(pipe).__name__
    if _boundary_ratio(pipe) is None:
        raise ValueError(f"{name} has a {SECOND_EXPERT} but no boundary_ratio, so it never runs it: load the "
                         f"pipeline with its boundary_ratio (Wan 2.2 A14B's model_index.json has one), or drop the "
                         f"unused expert (pipe.{SECOND_EXPERT} = None)")
    split = expert_steps(pipe, steps)
    if split is None or min(split) > 0:
        return
    enough = next((n for n in range(steps + 1, steps + 65) if min(expert_steps(pipe, n)) > 0), None)
    idle = "transformer" if split[0] == 0 else SECOND_EXPERT
    raise ValueError(f"{name} runs {idle} on none of {steps} calibration steps (boundary_ratio "
                     f"{_boundary_ratio(pipe)} splits them {split[0]} + {split[1]}): calibrate with more "
                     f"steps{f', e.g. Calibration(steps={enough}) (CLI: --steps {enough})' if enough else ''}")


# Packages a pipeline calls without checking they are installed: diffusers 0.42's WanImageToVideoPipeline runs
# ftfy.fix_text on every prompt (pipeline_wan_i2v.py imports it only if available; WanPipeline checks first), so
# without it the first calibration call fails with a NameError deep inside the pipeline.
PIPELINE_PACKAGES = {"WanImageToVideoPipeline": "ftfy"}


def _installed(package: str) -> bool:
    try:
        importlib.import_module(package)
    except ImportError:
        return False
    return True


# Wan 2.1 image-to-video puts the CLIP image tokens before the text and its cross-attention splits them off as
# "all but the last 512" (diffusers' transformer_wan.py: "512 is the context length of the text encoder, hardcoded"):
# with another text length the image projections read the wrong tokens, or none.
WAN_TEXT_TOKENS = 512


def missing_package(pipe) -> str | None:
    """The package ``pipe`` (a pipeline, its class or its class name) runs its prompts through that is not
    installed (:data:`PIPELINE_PACKAGES`), or None."""
    package = next((PIPELINE_PACKAGES[n] for n in _class_names(pipe) if n in PIPELINE_PACKAGES), None)
    return package if package is not None and not _installed(package) else None


def _check_image_context(pipe, pipeline_kwargs: dict) -> None:
    model = getattr(pipe, "transformer", None)
    if getattr(getattr(model, "config", None), "image_dim", None) is None:
        return
    length = pipeline_kwargs.get("max_sequence_length", WAN_TEXT_TOKENS)
    if length != WAN_TEXT_TOKENS:
        raise ValueError(f"{type(pipe).__name__} with image tokens needs max_sequence_length={WAN_TEXT_TOKENS} (its "
                         f"cross-attention takes all but the last {WAN_TEXT_TOKENS} context tokens as the image's), "
                         f"got {length}: leave max_sequence_length out of pipeline_kwargs")


def with_area(pipe, kwargs: dict) -> dict:
    """``kwargs`` of a call of ``pipe`` with the size asked for as its area too, where the pipeline takes one: FLUX.1
    Kontext reads ``height`` and ``width`` as an aspect ratio only and draws ``max_area`` pixels (1024² unless told),
    so without it a size asked for is not the size drawn (or calibrated on)."""
    if "max_area" in kwargs or not {"height", "width"} & kwargs.keys() or \
            "max_area" not in inspect.signature(pipe.__call__).parameters:
        return kwargs
    side = pipe.default_sample_size * pipe.vae_scale_factor  # the pipeline's own default height and width
    return {**kwargs, "max_area": kwargs.get("height", side) * kwargs.get("width", side)}


def check_pipeline_inputs(pipe, images, pipeline_kwargs=None) -> None:
    """Refuse, before any work, a calibration through ``pipe`` that cannot be right: an edit pipeline without
    input images (``images``, or an ``image`` in ``pipeline_kwargs``), images for a pipeline that takes none, or
    a pipeline whose prompts need a package that is not installed."""
    name = type(pipe).__name__
    package = missing_package(pipe)
    if package is not None:
        raise ValueError(f"{name} runs every prompt through the {package} package, which is not installed: "
                         f"pip install {package}")
    _check_image_context(pipe, pipeline_kwargs or {})
    if images is None and "image" in (pipeline_kwargs or {}):
        images = [pipeline_kwargs["image"]]
    if needs_images(pipe) and images is None:
        raise ValueError(f"{name} edits an input image: calibrate it with Calibration(images=[...]) "
                         "(CLI: --images FILE...), one or more pictures like those it will edit")
    if images is not None and not needs_images(pipe):
        raise ValueError(f"Calibration(images=) is for edit pipelines ({', '.join(sorted(EDIT_PIPELINES))}); "
                         f"{name} takes no input image: leave images out")
