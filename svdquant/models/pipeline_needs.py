"""What calibrating through a diffusers pipeline asks of the pipeline, per model: whether it edits an input image,
and whether it runs a second expert (the size its images must be a multiple of: :mod:`.sizes`).

Read from the pipeline object (its class and components) without running it, so that ``quantize`` can refuse a
call that would fail or calibrate the wrong thing before minutes of work.
"""

from __future__ import annotations

import torch.nn as nn


# Pipelines that edit (or animate) an input image: calibrating them without one calibrates the model on inputs
# it never sees in use (no reference-image tokens in FLUX.1 Kontext's and Qwen-Image-Edit's sequences, no
# first frame in image-to-video), so they need ``Calibration(images=)``.
EDIT_PIPELINES = frozenset({
    "FluxKontextPipeline", "QwenImageEditPipeline", "QwenImageEditPlusPipeline", "WanImageToVideoPipeline",
})


def needs_images(pipe) -> bool:
    """Whether ``pipe`` edits an input image (:data:`EDIT_PIPELINES`, or a subclass of one)."""
    return any(c.__name__ in EDIT_PIPELINES for c in type(pipe).__mro__)


def second_expert(pipe) -> nn.Module | None:
    """The low-noise expert of a two-expert pipeline (Wan 2.2 A14B's ``transformer_2``), else None."""
    m = getattr(pipe, "transformer_2", None)
    return m if isinstance(m, nn.Module) else None


def check_pipeline_inputs(pipe, images, pipeline_kwargs=None) -> None:
    """Refuse, before any work, a calibration through ``pipe`` that cannot be right: an edit pipeline without
    input images (``images``, or an ``image`` in ``pipeline_kwargs``), images for a pipeline that takes none,
    or a second expert quantize would leave 16-bit."""
    name = type(pipe).__name__
    if images is None and "image" in (pipeline_kwargs or {}):
        images = [pipeline_kwargs["image"]]
    if needs_images(pipe) and images is None:
        raise ValueError(f"{name} edits an input image: calibrate it with Calibration(images=[...]) "
                         "(CLI: --images FILE...), one or more pictures like those it will edit")
    if images is not None and not needs_images(pipe):
        raise ValueError(f"Calibration(images=) is for edit pipelines ({', '.join(sorted(EDIT_PIPELINES))}); "
                         f"{name} takes no input image: leave images out")
    if second_expert(pipe) is not None:
        # h-models: one checkpoint holds one transformer so far (svdquant.checkpoint); quantizing only the
        # first expert would leave half of the denoising steps 16-bit without a word.
        raise ValueError(f"{name} runs two experts (transformer and transformer_2, Wan 2.2 A14B); one checkpoint "
                         "of both is not supported yet: quantize each expert as a bare model, e.g. quantize("
                         "pipe.transformer_2, recipe, Calibration(inputs=svdquant.calibration.record_inputs(pipe, "
                         "pipe.transformer_2, calib)))")
