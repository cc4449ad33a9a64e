"""Every argument of ``quantize`` checked before calibration starts, into one :class:`QuantPlan`.

A wrong argument fails here, in one line (ValueError / TypeError), not minutes into a run; what the run then
needs (the model, its adapter, the calibration, where it computes, the cap...) is decided once.
"""

from __future__ import annotations

import dataclasses
import numbers
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .. import _checks
from ..calibration import Calibration, check_pipeline_call, gpu_cap
from ..integrations.diffusers.compat import has_offload_hooks
from ..models import Adapter, get_adapter
from ..models.pipeline_needs import SECOND_EXPERT, check_experts, check_pipeline_inputs, second_expert
from ..models.text_encoders import check_text_encoders
from ..modules import SVDQLinear
from ..recipes import QuantConfig, get_recipe
from .concurrent import default_workers


@dataclass
class QuantPlan:
    """What one ``quantize`` call runs, made once its arguments are checked."""

    pipe: object | None  # the diffusers pipeline, or None for a bare model
    model: nn.Module  # what is quantized: the pipeline's transformer, or the model given
    adapter: Adapter
    calib: Calibration  # as run through ``pipe`` (its defaults filled in)
    recipe: QuantConfig
    tokens: int  # tokens kept per layer input
    text_encoders: bool
    te_recipe: QuantConfig  # the text encoders' weight-only recipe
    progress: bool
    device: torch.device  # where the work is computed
    home: torch.device  # where the model is
    stream: bool  # the model streams to ``device`` from the CPU
    others: list[nn.Module]  # a pipeline's other models, streamed to the device one at a time
    cap: int | None  # max_gpu_memory in bytes
    keep_on_device: bool
    started: float  # time.perf_counter() when the call began: the report's times count from it
    workers: int = 1  # groups of a block quantized at once (svdquant.quantize.concurrent)
    # A two-expert pipeline (Wan 2.2 A14B): one plan per expert, in the order they are quantized, each with
    # ``expert`` (the pipeline attribute of its model) and ``label`` (what its progress bars say) set
    experts: list["QuantPlan"] = field(default_factory=list)
    expert: str = ""
    label: str = ""


def make_plan(target, recipe, calibration, *, include, exclude, text_encoders, progress, device, max_gpu_memory,
              keep_on_device, workers=None, started: float | None = None) -> QuantPlan:
    """``quantize``'s arguments checked, in the order a caller reads them, into a plan."""
    started = time.perf_counter() if started is None else started
    pipe, model = _split_target(target)
    if not isinstance(recipe, (str, QuantConfig)):
        raise TypeError(f"recipe= takes a name such as 'int4' or a QuantConfig, got {type(recipe).__name__}")
    recipe = get_recipe(recipe)
    for name, patterns in (("include", include), ("exclude", exclude)):
        # a bare string would be read as one pattern per character
        if patterns is not None and (isinstance(patterns, str) or not all(isinstance(p, str) for p in patterns)):
            raise TypeError(f"{name}= takes a list of patterns, e.g. {name}=['*attn*'], got {patterns!r}")
    adapter = get_adapter(model, include, exclude)
    second = second_expert(pipe) if pipe is not None else None
    second_adapter = get_adapter(second, include, exclude) if second is not None else None
    if not _left(model, adapter) and not (second is not None and _left(second, second_adapter)):
        # before any hook, transfer or calibration
        if any(isinstance(m, SVDQLinear) for m in model.modules()):
            raise ValueError(f"the {type(model).__name__} is already quantized (no 16-bit layer left for it): load the "
                             "16-bit model again to quantize it another way")
        if not adapter.stacks:
            raise ValueError(_no_layer_message(model, include, exclude))
    if calibration is not None and not isinstance(calibration, Calibration):
        raise TypeError(f"calibration= takes a svdquant.Calibration, got {type(calibration).__name__}; "
                        "e.g. Calibration(prompts=[...])")
    calib = (calibration or Calibration()).for_pipeline(pipe)
    if pipe is not None and calib.inputs is None:
        check_pipeline_call(pipe, calib)
        # edit pipelines need input images
        check_pipeline_inputs(pipe, calib.images, calib.pipeline_kwargs)
    if not isinstance(text_encoders, bool):
        raise TypeError(f"text_encoders= takes True or False, got {text_encoders!r}")
    te_recipe = get_recipe("w4a16")
    if text_encoders:
        check_text_encoders(pipe, te_recipe)
    if not isinstance(keep_on_device, bool):
        raise TypeError(f"keep_on_device= takes True or False, got {keep_on_device!r}")
    if workers is not None:
        if isinstance(workers, bool) or not isinstance(workers, numbers.Integral):
            raise TypeError(f"workers= takes a whole number of groups quantized at once, got {workers!r}")
        if workers < 1:
            raise ValueError(f"workers= takes 1 or more groups quantized at once, got {workers}")
        workers = int(workers)
    placed = _placement(pipe, model, device, through_pipeline=pipe is not None and calib.inputs is None)
    cap = gpu_cap(max_gpu_memory, placed["device"])
    workers = default_workers(placed["device"]) if workers is None else workers
    # None means the recipe's; 0 is refused by Calibration, never replaced by the default
    tokens = recipe.eval_tokens if calib.tokens_per_layer is None else calib.tokens_per_layer
    plan = QuantPlan(pipe, model, adapter, calib, recipe, tokens, text_encoders, te_recipe, progress, cap=cap,
                     keep_on_device=keep_on_device, started=started, workers=workers, **placed)
    if second is not None:
        plan.experts = _expert_plans(plan, second, second_adapter, device)
    return plan


def _left(model: nn.Module, adapter: Adapter) -> bool:
    """Whether ``adapter`` still finds a 16-bit layer of ``model`` to quantize."""
    blocks = [b for _, b in adapter.blocks(model)] if adapter.stacks else [model]
    return any(adapter.groups(b) for b in blocks)


def _expert_plans(plan: QuantPlan, second: nn.Module, adapter: Adapter, device) -> list[QuantPlan]:
    """One plan per expert of a two-expert pipeline, the low-noise one first: its calibration then runs the
    high-noise steps through the 16-bit ``transformer``, and the high-noise expert's own calls come before any
    call to the quantized one, so both are calibrated on the 16-bit pipeline's trajectory."""
    if plan.calib.inputs is not None:
        raise ValueError(f"{type(plan.pipe).__name__} runs two experts (transformer, {SECOND_EXPERT}), and "
                         "Calibration(inputs=) holds one model's forward inputs: leave inputs out to calibrate each "
                         "expert on its own calls through the pipeline, or quantize each expert as a bare model")
    check_experts(plan.pipe, plan.calib.steps)
    low = dataclasses.replace(plan, model=second, adapter=adapter,
                              **_placement(plan.pipe, second, device, through_pipeline=True))
    # an expert already quantized (a call that failed part way through the other) is left as it is
    parts = [(name, part) for name, part in ((SECOND_EXPERT, low), ("transformer", plan))
             if _left(part.model, part.adapter)]
    return [dataclasses.replace(part, expert=name, label=f"{name}, expert {i} of {len(parts)}")
            for i, (name, part) in enumerate(parts, 1)]


def _placement(pipe, model: nn.Module, device, *, through_pipeline: bool) -> dict:
    """Where ``model`` is and is computed: home, device, whether it streams, and the pipeline's other models that
    stream with it (checked: no offload hooks where streaming places the blocks itself)."""
    home = _model_device(model)
    device, stream = _work_device(device, home)
    if stream and has_offload_hooks(model):
        raise ValueError(f"the {type(model).__name__} has offload hooks; streaming places the blocks itself: "
                         "remove the hooks first (pipe.remove_all_hooks()), or leave device= out")
    others = _pipeline_models(pipe, model) if stream and through_pipeline else []
    return dict(home=home, device=device, stream=stream, others=others)


def _no_layer_message(model: nn.Module, include, exclude) -> str:
    names = [n for n, m in model.named_modules() if n and isinstance(m, (nn.Linear, nn.Conv2d))][:2]
    seen = f"; its layers are named like {', '.join(names)}" if names else ""
    return f"no layer of the {type(model).__name__} matches include={include!r} exclude={exclude!r}{seen}"


def _split_target(target) -> tuple[object | None, nn.Module]:
    model = getattr(target, "transformer", None)
    if isinstance(model, nn.Module):
        return target, model
    if isinstance(target, nn.Module):
        return None, target
    raise TypeError(
        f"svdquant.quantize takes a diffusers pipeline (with a .transformer) or an nn.Module, got {type(target).__name__}"
    )


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _work_device(device, home: torch.device) -> tuple[torch.device, bool]:
    """(the device that computes, whether the model streams to it from the CPU)."""
    if device is None:
        return home, False
    dev = torch.device(_checks.device("device", device))
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    if home.type == "cpu":
        return dev, True
    if dev == home:
        return dev, False  # already there: nothing to stream
    raise ValueError(f"device={str(device)!r} streams a model kept on the CPU, but the model is on {home}; "
                     "move it to the CPU first (pipe.to('cpu')) or leave device= out")


def _pipeline_models(pipe, model: nn.Module) -> list[nn.Module]:
    """A pipeline's models other than ``model`` (text encoders, VAE...): streamed to the GPU one at a time."""
    parts = getattr(pipe, "components", None)
    if not isinstance(parts, dict):
        parts = vars(pipe)
    found = []
    for m in parts.values():
        if isinstance(m, nn.Module) and m is not model and all(m is not f for f in found):
            if has_offload_hooks(m):
                raise ValueError(f"the pipeline's {type(m).__name__} has offload hooks; streaming places the "
                                 "models itself: call pipe.remove_all_hooks() first, or leave device= out")
            found.append(m)
    return found
