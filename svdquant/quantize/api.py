"""The public entry points: :func:`quantize` (a pipeline's transformer, or any model, calibrated and quantized
block by block) and :func:`quantize_text_encoders` (a pipeline's text encoders, weight-only)."""

from __future__ import annotations

import contextlib
import dataclasses
import time

import torch

from .._state import state
from .. import _checks
from .._cpu import single_thread_if_contended
from .._timing import StageClock
from ..calibration import Calibration, memory_cap
from ..integrations.diffusers import compat
from ..models.base import QUANTIZABLE
from ..models.text_encoders import check_text_encoders, quantize_encoder, text_encoders as encoders_of
from ..recipes import QuantConfig, get_recipe
from .blocks import quantize_model
from .plan import QuantPlan, make_plan
from .report import LayerRow, QuantReport


@torch.no_grad()
def quantize(
    target,
    recipe: str | QuantConfig = "int4",
    calibration: Calibration | None = None,
    *,
    include=None,
    exclude=None,
    text_encoders: bool = False,
    progress: bool = True,
    device=None,
    max_gpu_memory=None,
    keep_on_device: bool = False,
    workers: int | None = None,
) -> QuantReport:
    """Quantize a diffusers pipeline's transformer (or any ``nn.Module``) in place; both experts of a two-expert
    pipeline (Wan 2.2 A14B: ``transformer`` and ``transformer_2``), each calibrated on the calls the pipeline makes
    to it, the report's rows of the second named ``transformer_2.<layer>``.

    recipe: a name (``"int4"``, ``"nvfp4"``, ``"w8a8"``, ``"fp8"``, ``"nf4"``) or a
        :class:`~svdquant.recipes.QuantConfig`.
    calibration: what to run; default :class:`Calibration()` (the default prompts, on a
        pipeline). A bare model needs ``Calibration(inputs=[...])``.
    include / exclude: shell-style patterns of layer names; given, they replace the
        architecture's adapter by the generic one (every matching ``nn.Linear``).
    text_encoders: also quantize the pipeline's text encoders (T5, CLIP, Qwen2.5-VL...) weight-only
        as W4A16 (INT4, a 16-bit scale per group of 64), after the transformer, which is calibrated on
        what the 16-bit encoders produce; see :func:`quantize_text_encoders`. Save with
        ``save_quantized(pipe, ...)`` to keep them.
    progress: report the steps: bars on a terminal, a plain line at most every 20 s elsewhere (a log file;
        ``SVDQUANT_PROGRESS_SECONDS``), nothing when False.
    device: where to compute (default: where the model is). With a model (pipeline) on the CPU and
        ``device="cuda"``, the 16-bit weights stay in CPU memory and stream: each block and text encoder is
        on the GPU only while it is used, so the GPU holds about one block at a time, and the snapshots
        (the blocks' inputs) stay on the GPU when they fit the cap (or the free memory) with room to spare,
        else each is there only while it is used. The weights are pinned first only when calibrating
        through a pipeline (many forwards); on ``Calibration(inputs=)`` each block crosses about twice.
    max_gpu_memory: cap the GPU memory torch may use, e.g. ``"16GB"`` / ``"22GiB"`` (or bytes), for the
        duration of the call (``torch.cuda.set_per_process_memory_fraction``).
    keep_on_device: with streaming, leave the quantized model on ``device`` (default: back on the CPU).
    workers: how many groups of a block (q/k/v, the MLP...) are quantized at once, each in a thread with its own
        CUDA stream: one group's search leaves the GPU idle between its launches and host syncs, so several keep
        it busier. Default: 3 on a GPU, 1 on the CPU. A stack's first block, and models without stacks of blocks
        (the SDXL UNet, include=/exclude=), run one group at a time. Each group's result is its own; only when
        memory is short (a cap, a small GPU) do groups at once score fewer smoothing candidates per batch, which
        can move the last bits of the result.
    Returns a :class:`QuantReport` (print it for a table).

    Every argument is checked before calibration starts (ValueError / TypeError, one line).
    """
    plan = make_plan(target, recipe, calibration, include=include, exclude=exclude, text_encoders=text_encoders,
                     progress=progress, device=device, max_gpu_memory=max_gpu_memory, keep_on_device=keep_on_device,
                     workers=workers, started=time.perf_counter())
    return _run(plan)


def _run(plan: QuantPlan) -> QuantReport:
    """The checked call: the model (each expert of a two-expert pipeline in turn) quantized under the plan's cap
    (and, on the CPU, thread setting), then its text encoders; the report is made from what the quantize phases
    returned."""
    device = plan.device
    # on the CPU, one torch thread while other jobs hold the cores (svdquant/_cpu.py: their OpenMP barriers
    # would spin through every small op of the search and the replays)
    threads = single_thread_if_contended() if device.type == "cpu" else contextlib.nullcontext()
    with memory_cap(plan.cap, device), threads:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        report = QuantReport(recipe=plan.recipe.to_dict(), model=type(plan.model).__name__)
        stages: dict[str, float] = {}
        for i, part in enumerate(plan.experts or [plan]):
            # each expert's calibration time counts from its own start
            _quantize_part(part if i == 0 else dataclasses.replace(part, started=time.perf_counter()), report,
                           stages)
        if plan.text_encoders:
            t1 = time.perf_counter()
            quantize_text_encoders(plan.pipe, plan.te_recipe, report=report, progress=plan.progress,
                                   device=device if plan.stream else None)
            stages["text encoders"] = time.perf_counter() - t1
        report.stages = stages
        report.seconds_total = time.perf_counter() - plan.started
        if device.type == "cuda":
            report.peak_memory_gb = torch.cuda.max_memory_allocated(device) / 1e9
    return report


def _quantize_part(plan: QuantPlan, report: QuantReport, stages: dict[str, float]) -> None:
    """``plan.model`` quantized in place, its rows, kept layers, snapshots and stages added to ``report`` and
    ``stages``; a second expert's layers are named as the pipeline holds them (``transformer_2.blocks.0...``)."""
    model = plan.model
    prefix = f"{plan.expert}." if plan.expert and plan.expert != "transformer" else ""
    was_training = model.training
    model.eval()
    clock = StageClock(plan.device)
    done = quantize_model(plan, clock)
    for row in done.rows:
        row.names = [prefix + n for n in row.names]
    report.rows += done.rows
    report.skipped += [(prefix + n, type(m).__name__) for n, m in model.named_modules()
                       if isinstance(m, QUANTIZABLE) and n]
    report.snapshots += done.snapshots
    if done.snapshots_on_device is not None:  # two experts: held only if both held theirs
        held = report.snapshots_on_device
        report.snapshots_on_device = done.snapshots_on_device if held is None else held and done.snapshots_on_device
    report.seconds_calibration += done.seconds_calibration
    for stage, seconds in clock.flush().items():
        stages[stage] = stages.get(stage, 0.0) + seconds
    state(model).recipe = plan.recipe.to_dict()
    compat.quantized(model)  # save_pretrained then writes its quantization_config
    model.train(was_training)


@torch.no_grad()
def quantize_text_encoders(pipe, recipe: str | QuantConfig = "w4a16", *, report: QuantReport | None = None,
                           progress: bool = True, device=None) -> QuantReport:
    """Quantize the linears of every text encoder of ``pipe`` weight-only, in place (no calibration).

    Which layers and why: :mod:`svdquant.models.text_encoders`. ``recipe``: a weight-only recipe,
    ``"w4a16"`` (INT4, 16-bit scale per group of 64; the default) or ``"nf4"``. Works on any pipeline
    with ``text_encoder*`` attributes (an SDXL pipeline too). Adds the rows to ``report`` (a new one if
    None) and returns it. ``device``: round each weight there (a GPU) and bring the layer back to where
    the encoder is (default: where the encoder is).
    """
    if not isinstance(recipe, (str, QuantConfig)):
        raise TypeError(f"recipe= takes a name such as 'w4a16' or a QuantConfig, got {type(recipe).__name__}")
    recipe = get_recipe(recipe)
    if device is not None:
        device = _checks.device("device", device)
    plan = check_text_encoders(pipe, recipe)
    t0 = time.perf_counter()
    if report is None:
        report = QuantReport(recipe=recipe.to_dict(), model=type(pipe).__name__)
    encoders = encoders_of(pipe)
    for name, layers in plan.items():
        done, summary = quantize_encoder(name, encoders[name], layers, recipe, device=device, progress=progress)
        report.text_encoder_rows += [LayerRow.of_weight(layer, recipe, rep) for layer, rep in done]
        report.text_encoders[name] = summary
    if isinstance(getattr(pipe, "transformer", None), torch.nn.Module):
        state(pipe.transformer).text_encoders = list(plan)  # so that saving the transformer alone can warn
    report.seconds_total += time.perf_counter() - t0
    return report
