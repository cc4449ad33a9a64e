"""``svdquant.quantize``: the one entry point that turns a 16-bit model into an SVDQuant one.

    import svdquant
    report = svdquant.quantize(pipe, "int4")              # a diffusers pipeline, default prompts
    report = svdquant.quantize(pipe.transformer, "int4",  # a bare model + its forward inputs
                               calibration=svdquant.Calibration(inputs=[kwargs, ...]))
    print(report)

Block by block: the pipeline runs once over the calibration prompts while hooks keep
the inputs of the first block of each stack on the drawn (prompt, step) calls; then
each block is replayed in 16 bits on those inputs, with hooks keeping what its linears
read, its linears are quantized and swapped in place, and the block's 16-bit outputs
become the next block's inputs. Only one block's layer inputs are held at once, and
every layer is calibrated on 16-bit inputs.

Calibrating on forward inputs (``Calibration(inputs=)``), the whole forwards would compute
nothing the replays do not compute again: once one forward has shown that the model chains
its stacks as the replays do (each stack's last block returns what the next stack's first
takes: FLUX's double and single blocks), the other forwards stop at the first block and the
last block of a stack makes the next stack's inputs (``_calibrate_stacks``). Streaming from
the CPU, the snapshots stay on the device for the whole quantize phase when they fit
(:func:`snapshots_fit`), else wait at home and cross for every block.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import statistics
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ._cpu import single_thread_if_contended
from ._memory import device_room
from ._progress import progress as progress_bar
from ._timing import StageClock
from .calibration import Calibration, EntryRecorder, LinearInputRecorder, run_calibration
from .calibration.capture import ChainCheck, keep_entry, next_inputs, run_inputs
from .calibration.offload import Streamed, move
from .models import Group, get_adapter
from .models.pipeline_needs import check_pipeline_inputs  # h-models
from .models.base import QUANTIZABLE, is_quantizable
from .modules import SVDQConv1x1, SVDQLinear
from .modules.conv import as_linear
from .recipes import QuantConfig, get_recipe


@dataclass
class LayerRow:
    names: list[str]
    weights: str
    activations: str | None
    shape: tuple[int, int]     # (sum of out_features, in_features)
    rank: int
    alpha: float
    beta: float
    iterations: int
    rel_error_naive: float
    rel_error: float
    seconds: float
    rel_error_rtn: float = float("nan")  # with the residual rounded to nearest: differs from rel_error with GPTQ


@dataclass
class QuantReport:
    """What ``quantize`` did: one row per quantized group, the layers left 16-bit, the time taken."""

    recipe: dict
    model: str
    rows: list[LayerRow] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (name, class)
    snapshots: int = 0
    seconds_calibration: float = 0.0
    seconds_total: float = 0.0
    peak_memory_gb: float | None = None
    # text encoders quantized weight-only (quantize(..., text_encoders=True)): one row per linear, whose
    # errors are the weight's own (no calibration), and per encoder its class and sizes
    text_encoder_rows: list[LayerRow] = field(default_factory=list)
    text_encoders: dict[str, dict] = field(default_factory=dict)
    # seconds per stage, summed over the run: calibration (and its transfers, when streaming), pin memory,
    # transfers, replays, and per group setup, smoothing search, refinement, assemble, build modules; text
    # encoders. Disjoint, so they add up to at most seconds_total, except on a GPU, where each block's replays
    # (and its transfers) run during the previous block's search and "waiting for replays" is what it did not hide
    stages: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return asdict(self)

    def __str__(self) -> str:
        lines = []
        if self.rows or not self.text_encoders:
            lines.append(f"svdquant: {self.model} with recipe {self.recipe['name']!r}: {len(self.rows)} groups "
                         f"quantized, {len(self.skipped)} layers kept 16-bit, {self.snapshots} snapshots, "
                         f"{self.seconds_total:.1f} s (calibration {self.seconds_calibration:.1f} s)"
                         + (f", peak GPU memory {self.peak_memory_gb:.1f} GB" if self.peak_memory_gb else ""))
            w = max([len(_short(r.names)) for r in self.rows] + [5])
            gptq = bool(self.recipe.get("gptq"))  # one more column: what GPTQ gained over rounding to nearest
            lines.append(f"{'layer':{w}s}  {'format':10s} {'shape':>13s} {'rank':>4s} {'naive':>7s} {'error':>7s} "
                         f"{'SQNR':>6s}" + (f" {'GPTQ':>7s}" if gptq else ""))
            for r in self.rows:
                fmt = f"W{r.weights}A{r.activations or '16'}"
                sq = -20 * math.log10(max(r.rel_error, 1e-12))
                gain = 20 * math.log10(max(r.rel_error_rtn, 1e-12) / max(r.rel_error, 1e-12)) if gptq else 0.0
                lines.append(f"{_short(r.names):{w}s}  {fmt:10s} {str(r.shape[0]) + 'x' + str(r.shape[1]):>13s} "
                             f"{r.rank:4d} {r.rel_error_naive:7.4f} {r.rel_error:7.4f} {sq:5.1f}dB"
                             + (f" {gain:+5.2f}dB" if gptq else ""))
            lines += self._stage_lines()
            if self.skipped:
                lines.append("kept 16-bit: " + ", ".join(n for n, _ in self.skipped))
        for name, te in self.text_encoders.items():
            errs = sorted(r.rel_error for r in self.text_encoder_rows if r.names[0].startswith(name + "."))
            lines.append(f"{name} ({te['class']}): {te['layers']} linears {te['weights']} weight-only, group "
                         f"{te['group_size']}, {te['kept']} other linears kept 16-bit; weight error median "
                         f"{statistics.median(errs):.4f}, worst {errs[-1]:.4f}; {_size(te['bytes_16bit'])} -> "
                         f"{_size(te['bytes_quantized'])}")
        return "\n".join(lines)


    def _stage_lines(self) -> list[str]:
        """Where the time went: seconds and share of the total per stage (the profile of issue 16)."""
        if not self.stages:
            return []
        total = max(self.seconds_total, 1e-9)
        lines = [f"{'stage':22s} {'seconds':>8s} {'share':>6s}"]
        for stage, seconds in self.stages.items():
            lines.append(f"{stage:22s} {seconds:8.2f} {100 * seconds / total:5.1f}%")
        rest = self.seconds_total - sum(self.stages.values())
        if "waiting for replays" in self.stages:  # replays overlapped the search: the stages add up to more
            lines.append("(replays and their transfers ran during the previous block's search)")
        else:
            lines.append(f"{'other (hooks, Python)':22s} {rest:8.2f} {100 * rest / total:5.1f}%")
        return lines


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.2f} MB"


def _short(names: list[str]) -> str:
    if len(names) == 1:
        return names[0]
    head = names[0].rsplit(".", 1)[0]
    return names[0] + "+" + "+".join(n.rsplit(".", 1)[-1] if n.startswith(head) else n for n in names[1:])


def _split_target(target) -> tuple[object | None, nn.Module]:
    model = getattr(target, "transformer", None)
    if isinstance(model, nn.Module):
        return target, model
    if isinstance(target, nn.Module):
        return None, target
    raise TypeError(
        f"svdquant.quantize takes a diffusers pipeline (with a .transformer) or an nn.Module, got {type(target).__name__}"
    )


def _weight_only(recipe: QuantConfig) -> QuantConfig:
    """The recipe for a group that keeps 16-bit activations: the weight format's weight-only choice
    (two-level INT4 recipes keep 16-bit group scales there: a weight-only GEMV reads them for free)."""
    if recipe.activations is None:
        return recipe
    from .formats import get_format

    return recipe.replace(weights=get_format(recipe.weights).weight_only, activations=None, method="naive", rank=0)


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def _quantize_group(root: nn.Module, prefix: str, group: Group, x, amax, recipe: QuantConfig,
                    clock: StageClock | None = None) -> LayerRow:
    t0 = time.perf_counter()
    full = [f"{prefix}.{n}" if prefix else n for n in group.names]
    mods = [root.get_submodule(n) for n in full]
    lins = [as_linear(m) if isinstance(m, nn.Conv2d) else m for m in mods]
    rc = _weight_only(recipe) if group.weight_only else recipe
    qmods = SVDQLinear.from_linears(lins, x, rc, post_gelu=group.post_gelu, shared_branch=group.shared_branch,
                                    act_max=amax)
    for name, old, q in zip(full, mods, qmods):
        _set_module(root, name, SVDQConv1x1(q) if isinstance(old, nn.Conv2d) else q)
    rep = qmods[0].quant_report
    if clock is not None:
        for stage, seconds in rep.stages.items():
            clock.add(stage, seconds)
        # packing the codes, the runner, swapping the modules in
        clock.add("build modules", time.perf_counter() - t0 - sum(rep.stages.values()))
    return LayerRow(full, rc.weights, rc.activations, rep.shape, rep.rank, rep.alpha, rep.beta, rep.iterations,
                    rep.rel_error_naive, rep.rel_error, rep.seconds, rep.rel_error_rtn)


def _check_pipeline_call(pipe, calib: Calibration) -> None:
    """What the calibration will ask of the pipeline, checked before it runs (minutes, on a big model)."""
    from .pipelines import check_size

    prompts = calib.prompt_list()
    if hasattr(pipe, "labels_for"):  # the tiny model draws only its class names
        pipe.labels_for(prompts)
    kw = calib.pipeline_kwargs
    check_size(pipe, kw.get("height"), kw.get("width"))
    if kw.get("guidance_scale") is not None:
        from . import _checks

        _checks.real("guidance_scale", kw["guidance_scale"], lo=0)


def _tensor_bytes(model: nn.Module) -> int:
    """What the model's state holds (the checkpoint's size: speed-mode INT8 copies excluded, tied weights such
    as T5's token embedding once)."""
    unique = {id(t): t for t in model.state_dict(keep_vars=True).values()}
    return sum(t.numel() * t.element_size() for t in unique.values())


def _check_text_encoders(pipe, recipe: QuantConfig) -> dict[str, list[str]]:
    """The pipeline's text encoders and the layers to quantize in each, checked before anything runs."""
    from .models.text_encoders import encoder_layers, text_encoders

    if pipe is None:
        raise ValueError("text_encoders=True needs the pipeline, whose text encoders it quantizes: pass the "
                         "pipeline itself, not its transformer")
    if recipe.activations is not None or recipe.branch_rank:
        raise ValueError(f"text encoders are quantized weight-only; recipe {recipe.name!r} is not (use 'w4a16' "
                         "or 'nf4')")
    found = text_encoders(pipe)
    if not found:
        raise ValueError(f"{type(pipe).__name__} has no text encoder (pipe.text_encoder...); leave text_encoders "
                         "False")
    plan = {}
    for name, te in found.items():
        if any(isinstance(m, SVDQLinear) for m in te.modules()):
            raise ValueError(f"{name} ({type(te).__name__}) is already quantized; quantize a fresh pipeline")
        plan[name] = encoder_layers(te)
    return plan


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
    from .algorithm import quantize_weight_only
    from .models.text_encoders import fit_quantized, text_encoders

    if not isinstance(recipe, (str, QuantConfig)):
        raise TypeError(f"recipe= takes a name such as 'w4a16' or a QuantConfig, got {type(recipe).__name__}")
    recipe = get_recipe(recipe)
    if device is not None:
        from . import _checks

        device = _checks.device("device", device)
    plan = _check_text_encoders(pipe, recipe)
    t0 = time.perf_counter()
    if report is None:
        report = QuantReport(recipe=recipe.to_dict(), model=type(pipe).__name__)
    encoders = text_encoders(pipe)
    for name, layers in plan.items():
        te = encoders[name]
        before = _tensor_bytes(te)
        for layer in progress_bar(layers, desc=f"quantizing {name}", unit="layer", enabled=progress):
            lin = te.get_submodule(layer)
            w, b = lin.weight, lin.bias
            if device is not None:
                w, b = w.to(device), b.to(device) if b is not None else None
            qw, rep = quantize_weight_only(w, b, recipe)
            _set_module(te, layer, SVDQLinear.from_quantized(qw, recipe, w.dtype).to(lin.weight.device))
            report.text_encoder_rows.append(LayerRow([f"{name}.{layer}"], recipe.weights, None, rep.shape, 0, 0.0,
                                                     0.0, 0, rep.rel_error_naive, rep.rel_error, rep.seconds))
        fit_quantized(te)
        te._svdquant_recipe = recipe.to_dict()
        kept = sum(1 for n, m in te.named_modules() if isinstance(m, nn.Linear))
        report.text_encoders[name] = {"class": type(te).__name__, "layers": len(layers), "kept": kept,
                                      "weights": recipe.weights, "group_size": recipe.group_size,
                                      "bytes_16bit": before, "bytes_quantized": _tensor_bytes(te)}
    if isinstance(getattr(pipe, "transformer", None), nn.Module):
        pipe.transformer._svdquant_text_encoders = list(plan)  # so that saving the transformer alone can warn
    report.seconds_total += time.perf_counter() - t0
    return report


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _work_device(device, home: torch.device) -> tuple[torch.device, bool]:
    """(the device that computes, whether the model streams to it from the CPU)."""
    if device is None:
        return home, False
    from . import _checks

    dev = torch.device(_checks.device("device", device))
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    if home.type == "cpu":
        return dev, True
    if dev == home:
        return dev, False  # already there: nothing to stream
    raise ValueError(f"device={str(device)!r} streams a model kept on the CPU, but the model is on {home}; "
                     "move it to the CPU first (pipe.to('cpu')) or leave device= out")


def _gpu_cap(max_gpu_memory, device: torch.device) -> int | None:
    """The byte cap of ``max_gpu_memory=``, checked against the device it applies to."""
    if max_gpu_memory is None:
        return None
    from . import _checks

    cap = _checks.memory_size("max_gpu_memory", max_gpu_memory)
    if device.type != "cuda":
        raise ValueError(f"max_gpu_memory={max_gpu_memory!r} caps a CUDA GPU, but the model is quantized on "
                         f"{device}; pass device='cuda' to stream it there, or leave max_gpu_memory out")
    total = torch.cuda.get_device_properties(device).total_memory
    if cap > total:
        raise ValueError(f"max_gpu_memory={max_gpu_memory!r} is more than {device} has ({total / 1e9:.1f} GB); "
                         "give at most that, or leave it out")
    return cap


@contextlib.contextmanager
def _memory_cap(cap: int | None, device: torch.device):
    """Caps what torch's allocator may hold on ``device`` while the quantizer runs, then puts back the
    fraction that was set before (1.0 unless the caller had set one)."""
    if cap is None:
        yield
        return
    get = getattr(torch.cuda, "get_per_process_memory_fraction", None)  # torch >= 2.6
    before = get(device) if get is not None else 1.0
    torch.cuda.set_per_process_memory_fraction(cap / torch.cuda.get_device_properties(device).total_memory, device)
    try:
        yield
    finally:
        torch.cuda.set_per_process_memory_fraction(before, device)


def _pipeline_models(pipe, model: nn.Module) -> list[nn.Module]:
    """A pipeline's models other than ``model`` (text encoders, VAE...): streamed to the GPU one at a time."""
    parts = getattr(pipe, "components", None)
    if not isinstance(parts, dict):
        parts = vars(pipe)
    found = []
    for m in parts.values():
        if isinstance(m, nn.Module) and m is not model and all(m is not f for f in found):
            if _has_offload(m):
                raise ValueError(f"the pipeline's {type(m).__name__} has offload hooks; streaming places the "
                                 "models itself: call pipe.remove_all_hooks() first, or leave device= out")
            found.append(m)
    return found


def _has_offload(m: nn.Module) -> bool:
    """accelerate's hooks (``enable_model_cpu_offload``...) or diffusers' group offloading."""
    if hasattr(m, "_hf_hook"):
        return True
    if not hasattr(m, "_diffusers_hook"):
        return False
    from diffusers.hooks.group_offloading import _is_group_offload_enabled

    return _is_group_offload_enabled(m)


def progress_postfix(block: str, index: int, n_blocks: int, group: str | None = None,
                     gpu_bytes: int | None = None, gpu_cap: int | None = None) -> str:
    """What the quantize bar shows after its count and ETA: the block (1-based ``index`` of ``n_blocks``),
    how many blocks remain after it, the group being quantized and, on a GPU, the memory in use (of the
    cap, when one is set)."""
    parts = [f"block {index}/{n_blocks} {block}", f"{n_blocks - index} left"]
    if group:
        parts.append(group)
    if gpu_bytes is not None:
        parts.append(f"GPU {gpu_bytes / 1e9:.1f}" + (f"/{gpu_cap / 1e9:.1f}" if gpu_cap else "") + " GB")
    return ", ".join(parts)


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
) -> QuantReport:
    """Quantize a diffusers pipeline's transformer (or any ``nn.Module``) in place.

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
    Returns a :class:`QuantReport` (print it for a table).

    Every argument is checked before calibration starts (ValueError / TypeError, one line).
    """
    t0 = time.perf_counter()
    pipe, model = _split_target(target)
    if not isinstance(recipe, (str, QuantConfig)):
        raise TypeError(f"recipe= takes a name such as 'int4' or a QuantConfig, got {type(recipe).__name__}")
    recipe = get_recipe(recipe)
    for name, patterns in (("include", include), ("exclude", exclude)):
        # a bare string would be read as one pattern per character
        if patterns is not None and (isinstance(patterns, str) or not all(isinstance(p, str) for p in patterns)):
            raise TypeError(f"{name}= takes a list of patterns, e.g. {name}=['*attn*'], got {patterns!r}")
    adapter = get_adapter(model, include, exclude)
    if calibration is not None and not isinstance(calibration, Calibration):
        raise TypeError(f"calibration= takes a svdquant.Calibration, got {type(calibration).__name__}; "
                        "e.g. Calibration(prompts=[...])")
    calib = calibration or Calibration()
    calib = calib.for_pipeline(pipe)
    if pipe is not None and calib.inputs is None:
        _check_pipeline_call(pipe, calib)
        # h-models: edit pipelines need input images; a second expert (Wan 2.2) is refused, not left 16-bit
        check_pipeline_inputs(pipe, calib.images, calib.pipeline_kwargs)
    # None means the recipe's; 0 is refused by Calibration, never replaced by the default
    if not isinstance(text_encoders, bool):
        raise TypeError(f"text_encoders= takes True or False, got {text_encoders!r}")
    te_recipe = get_recipe("w4a16")
    if text_encoders:
        _check_text_encoders(pipe, te_recipe)
    if not isinstance(keep_on_device, bool):
        raise TypeError(f"keep_on_device= takes True or False, got {keep_on_device!r}")
    home = _model_device(model)
    device, stream = _work_device(device, home)
    cap = _gpu_cap(max_gpu_memory, device)
    if stream and _has_offload(model):
        raise ValueError(f"the {type(model).__name__} has offload hooks; streaming places the blocks itself: "
                         "remove the hooks first (pipe.remove_all_hooks()), or leave device= out")
    others = _pipeline_models(pipe, model) if stream and pipe is not None and calib.inputs is None else []
    tokens = recipe.eval_tokens if calib.tokens_per_layer is None else calib.tokens_per_layer
    # on the CPU, one torch thread while other jobs hold the cores (svdquant/_cpu.py: their OpenMP barriers
    # would spin through every small op of the search and the replays)
    threads = single_thread_if_contended() if device.type == "cpu" else contextlib.nullcontext()
    with _memory_cap(cap, device), threads:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        report = QuantReport(recipe=recipe.to_dict(), model=type(model).__name__)
        was_training = model.training
        model.eval()
        clock = StageClock(device)
        _quantize_model(pipe, model, adapter, calib, recipe, tokens, report, clock, progress, device, home, stream,
                        others, cap, keep_on_device, t0)
        report.skipped = [(n, type(m).__name__) for n, m in model.named_modules()
                          if isinstance(m, QUANTIZABLE) and n]
        model._svdquant_recipe = recipe.to_dict()
        model.train(was_training)
        if text_encoders:
            t1 = time.perf_counter()
            quantize_text_encoders(pipe, te_recipe, report=report, progress=progress,
                                   device=device if stream else None)
            clock.add("text encoders", time.perf_counter() - t1)
        report.stages = dict(clock.flush())
        report.seconds_total = time.perf_counter() - t0
        if device.type == "cuda":
            report.peak_memory_gb = torch.cuda.max_memory_allocated(device) / 1e9
    return report


def _quantize_model(pipe, model, adapter, calib, recipe, tokens, report, clock, progress, device, home, stream,
                    others, cap, keep_on_device, t0) -> None:
    blocks = adapter.blocks(model) if adapter.stacks else []
    streamed = None
    if stream:
        # Pinned home memory makes every later copy faster but costs about a second per GB up front: it pays when
        # each block crosses many times (a pipeline's every denoising step), not when each crosses about twice
        # (forward inputs: the calibration forwards stop at the first block).
        pin_model = device.type == "cuda" and calib.inputs is None
        resident = 0
        if pin_model and blocks:  # the same reason: blocks that fit stay on the GPU from step to step
            sizes = [_tensor_bytes(b) for _, b in blocks]
            resident = resident_blocks(sizes, _tensor_bytes(model) - sum(sizes), device_room(device, cap))
        t1 = time.perf_counter()
        streamed = Streamed(model, [b for _, b in blocks], device, home, others=others, clock=clock, pin=pin_model,
                            resident=resident)
        if pin_model:
            clock.add("pin memory", time.perf_counter() - t1)
    t_calib = time.perf_counter()

    def calibrated():
        transfers = clock.flush().pop("transfers", 0.0)
        report.seconds_calibration = time.perf_counter() - t0
        clock.add("calibration", time.perf_counter() - t_calib - transfers)
        if stream:
            clock.add("calibration transfers", transfers)

    if adapter.stacks:
        plan = [(name, block, adapter.groups(block)) for name, block in blocks]
        try:
            cal = _calibrate_stacks(pipe, model, adapter, calib, blocks, device, home, stream, cap, progress, streamed)
        finally:
            if streamed is not None:
                streamed.close()
        calibrated()
        report.snapshots = cal.count
        if report.snapshots == 0 or not all(cal.entries.values()):
            raise RuntimeError("calibration recorded no model calls; check the calibration prompts/inputs")
        # snapshots at home cross to the device and back for every block; held on the device, they never move
        spill = stream and not cal.on_device
        pin = spill and device.type == "cuda"
        store = home if spill else device  # where a stack's last block leaves the next stack's entries
        if stream and cal.on_device and calib.inputs is None:
            with clock.stage("transfers"):  # recorded at home through the pipeline: one crossing for all blocks
                memo: dict = {}  # a value shared by all snapshots (rotary embedding) crosses once
                cal.entries = {k: move(v, device, memo=memo) for k, v in cal.entries.items()}
                del memo
        bar = progress_bar(total=sum(len(g) for _, _, g in plan), desc="quantizing", unit="group",
                           enabled=progress)  # a bar on a terminal, a line now and then in a log
        jobs: list[_ReplayJob] = []
        for si, stack in enumerate(adapter.stacks):
            # recorded entries (else: made by the previous stack's last block, cal.chained: the model was checked
            # to chain so)
            recorded = None if (cal.chained and si > 0) else cal.entries.pop(stack)
            chain_on = cal.chained and si < len(adapter.stacks) - 1  # this stack's last block makes the next's
            stack_blocks = [(n, b, g) for n, b, g in plan if n.rsplit(".", 1)[0] == stack]
            for bi, (bname, block, groups) in enumerate(stack_blocks):
                last = bi == len(stack_blocks) - 1
                jobs.append(_ReplayJob(bname, block, groups, recorded if bi == 0 else None, last, last and chain_on))
        replayer = _Replayer(adapter, streamed, device, home, spill, pin, store, tokens, calib.seed,
                             overlap=_overlap_replays(device))
        try:
            pending = replayer.start(jobs[0], jobs[0].recorded)
            for index, job in enumerate(jobs, 1):
                bar.set_postfix_str(progress_postfix(job.name, index, len(plan), None, *_gpu_memory(device, cap)))
                rec, nxt = replayer.finish(pending, clock)
                if index < len(jobs):  # the next block replays (on a side stream) while this one is searched
                    following = jobs[index]
                    pending = replayer.start(following, following.recorded if following.recorded is not None
                                             else nxt)
                nxt = None
                for g in job.groups:
                    bar.set_postfix_str(progress_postfix(job.name, index, len(plan), _short(list(g.names)),
                                                         *_gpu_memory(device, cap)))
                    x, amax = rec.inputs(g.names[0])
                    report.rows.append(_quantize_group(job.block, "", g, x, amax, recipe, clock))
                    report.rows[-1].names = [f"{job.name}.{n}" for n in g.names]
                    bar.update(1)
                replayer.settle()  # this block's kernels are done before the memory it read can be reused
                rec = x = amax = None  # frees the layer inputs before the next block's arrive
                job.recorded = None
                if streamed is not None:
                    _finish_block(streamed.unit(job.block), job.block, home, keep_on_device, clock)
        finally:
            replayer.close()
            if streamed is not None:  # after an error: a block the worker onloaded goes back home
                streamed.offload()
        bar.close()
    else:
        groups = adapter.groups(model)
        if not groups:
            raise ValueError("no layer of the model matches the include/exclude patterns")
        firsts = {g.names[0]: model.get_submodule(g.names[0]) for g in groups}
        n_snap = len(calib.inputs) if calib.inputs is not None else calib.snapshots
        holder = {}

        def hooks(selector):
            holder["r"] = LinearInputRecorder(firsts, n_snap, tokens, calib.seed, selector)
            return holder["r"].close

        try:
            report.snapshots = run_calibration(pipe, model, calib, hooks, progress)
        finally:
            if streamed is not None:
                streamed.close()
        calibrated()
        if streamed is not None:  # no blocks: the whole model is one unit, on the device while it is quantized
            with clock.stage("transfers"):
                streamed.rest.onload()
        for g in progress_bar(groups, desc="quantizing", unit="group", enabled=progress):
            x, amax = holder["r"].inputs(g.names[0])
            report.rows.append(_quantize_group(model, "", g, x, amax, recipe, clock))
        if streamed is not None:
            _finish_block(streamed.rest, model, home, keep_on_device, clock)
    if stream and keep_on_device:
        with clock.stage("transfers"):
            model.to(device)


@dataclass
class _ReplayJob:
    name: str
    block: nn.Module
    groups: list
    recorded: list[dict] | None  # the stack's recorded entries, for its first block
    last: bool  # the stack's last block: its outputs are no block's inputs...
    chain: bool  # ...unless they make the next stack's entries


def _overlap_replays(device: torch.device) -> bool:
    """Replay the next block while this one is searched: on a GPU, where the search leaves it mostly idle
    (the search is bound by the host's kernel launches, ``benchmarks/quantize_search.py``)."""
    return device.type == "cuda"


class _Replayer:
    """Each block in 16 bits on every snapshot, its linears' inputs recorded; with ``overlap``, in a worker
    thread on a side CUDA stream, so that a block's replays run while the previous block is searched.

    Tensors change streams at three points: a replay starts after the work the main stream has queued
    (:meth:`start`: the calibration's entries), its outputs, recordings and onloaded weights reach the search
    after the worker waited on the host for the replay to complete, and the main stream is drained
    (:meth:`settle`) before a searched block's tensors are freed; so neither stream reads what the other has
    not finished writing, and neither allocator hands out memory that a kernel queued on the other still
    reads. A replay usually ends before the search of the previous block does, so the waits cost nothing."""

    def __init__(self, adapter, streamed, device, home, spill, pin, store, tokens, seed, *, overlap: bool):
        self.adapter, self.streamed, self.device, self.home = adapter, streamed, device, home
        self.spill, self.pin, self.store, self.tokens, self.seed = spill, pin, store, tokens, seed
        self.overlap = overlap
        self.cuda = overlap and device.type == "cuda"
        self._pool = None
        if overlap:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(1, thread_name_prefix="svdquant-replay")
            self._side = torch.cuda.Stream(device) if self.cuda else None

    def start(self, job: _ReplayJob, snaps: list[dict]):
        """Starts the replay (with ``overlap``; else it runs in :meth:`finish`: one block on the device at a
        time); returns what :meth:`finish` takes."""
        clock = StageClock(self.device)
        if not self.overlap:
            return job, snaps, None, clock
        if self.cuda:  # the side stream starts after what the main stream queued (the calibration's entries)
            self._side.wait_stream(torch.cuda.current_stream(self.device))

        def work():
            # grad mode is per thread: without no_grad the worker's forwards would record autograd graphs
            with torch.no_grad(), torch.cuda.stream(self._side) if self.cuda else contextlib.nullcontext():
                out = self.replay(job, snaps, clock)
            if self.cuda:  # complete before the search reads it: no tensor changes streams while one still uses it
                self._side.synchronize()
            return out

        return job, snaps, self._pool.submit(work), clock

    def finish(self, pending, clock: StageClock):
        """The replay's (recorder, next block's inputs), once the main stream may read them; its stage times
        go to ``clock`` (with ``overlap``, "waiting for replays" is what the search did not hide)."""
        job, snaps, future, own = pending
        if future is None:
            result = self.replay(job, snaps, own)
        else:
            t0 = time.perf_counter()
            result = future.result()
            clock.add("waiting for replays", time.perf_counter() - t0)
        for stage, seconds in own.flush().items():
            clock.add(stage, seconds)
        return result

    def settle(self) -> None:
        if self.cuda:
            torch.cuda.current_stream(self.device).synchronize()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)  # a replay still running (an error in the search) ends first

    def replay(self, job: _ReplayJob, snaps: list[dict], clock: StageClock):
        block, spill, pin, device, home = job.block, self.spill, self.pin, self.device, self.home
        if self.streamed is not None:
            with clock.stage("transfers"):
                self.streamed.unit(block).onload()
        firsts = {g.names[0]: block.get_submodule(g.names[0]) for g in job.groups}
        rec = LinearInputRecorder(firsts, len(snaps), self.tokens, self.seed)
        nxt = []
        try:
            for s in snaps:
                if spill:
                    with clock.stage("transfers"):
                        s_dev = move(s, device, non_blocking=pin)
                else:
                    s_dev = s
                with clock.stage("replays"):
                    out = block(**s_dev)
                if not job.last:
                    if spill:
                        with clock.stage("transfers"):
                            out = move(out, home, pin=pin, non_blocking=pin)
                    nxt.append(next_inputs(s, out, self.adapter.outputs_of(job.name)))  # h-models: per stack
                elif job.chain:  # the next stack's entry, kept as the calibration keeps a recorded one
                    with clock.stage("transfers" if spill else "replays"):
                        nxt.append({**s, **keep_entry(next_inputs({}, out, self.adapter.outputs_of(job.name)),
                                                      self.store, pin)})  # h-models: per stack
                del s_dev, out
        finally:
            rec.close()
        return rec, nxt


@dataclass
class _Calibrated:
    """What the calibration leaves for the block replays."""

    entries: dict[str, list[dict]]  # per stack, one dict of first-block arguments per snapshot
    chained: bool  # only the first stack's entries: each stack's last block makes the next stack's
    on_device: bool  # the snapshots stay on the device for the whole quantize phase (else at home, moved per block)
    count: int  # snapshots


def _calibrate_stacks(pipe, model, adapter, calib, blocks, device, home, stream, cap, progress,
                      streamed) -> _Calibrated:
    """Runs the calibration calls, keeping the arguments of each stack's first block (the snapshots).

    Through a pipeline, every call runs whole (the denoising trajectory needs every step) and each stack's entry
    is recorded. On forward inputs (``Calibration(inputs=)``), the whole forward computes nothing the block
    replays do not compute again: the first input runs whole under a :class:`ChainCheck`, and if the model
    chains its blocks and stacks the way the replays do (FLUX: each stack's last block returns what the next
    stack's first block takes), the other inputs stop at the first block and only the first stack's entries
    are kept; otherwise (ControlNet residuals added between blocks...) they run whole, as through a pipeline.
    Either way the replays then see bit for bit the same block inputs.
    """
    stacks = adapter.stacks
    home_pin = stream and device.type == "cuda"  # snapshots left at home wait in pinned memory
    home_store = home if stream else device
    block_bytes = max(_tensor_bytes(b) for _, b in blocks)
    on_stop = streamed.offload if streamed is not None else None
    if calib.inputs is None:
        holder: dict[str, EntryRecorder] = {}

        def hooks(selector):
            holder["r"] = EntryRecorder(model, stacks, selector, home_store, pin=home_pin,
                                        share_except=adapter.outputs)
            return holder["r"].close

        count = run_calibration(pipe, model, calib, hooks, progress)
        entries = holder["r"].entries
        held = _nbytes(entries) + max(_nbytes(e) for e in entries.values())  # and one stack's outputs
        return _Calibrated(entries, False, _hold_snapshots(device, cap, stream, held, block_bytes), count)
    first, chained = _record_first(model, adapter, calib.inputs[0], home_store, on_stop)
    count = len(calib.inputs)
    one = max(_nbytes(e) for e in first.values())  # one snapshot of one stack
    # held at once: one stack's entries and the outputs made from them (and, recording every stack, all of them)
    held = count * (2 * one if chained else _nbytes(first) + one)
    on_device = _hold_snapshots(device, cap, stream, held, block_bytes)
    store, pin = (device, False) if on_device or not stream else (home, home_pin)
    kept = stacks[:1] if chained else stacks
    rec = EntryRecorder(model, kept, None, store, pin, stop=chained, share_except=adapter.outputs,
                        first={s: [move(e, store, pin=pin) for e in first[s]] for s in kept})
    try:
        run_inputs(model, calib.inputs[1:], on_stop=on_stop, progress=progress)
    finally:
        rec.close()
    return _Calibrated(rec.entries, chained, on_device, count)


def _record_first(model, adapter, kw: dict, store, on_stop) -> tuple[dict[str, list[dict]], bool]:
    """The first snapshot's entry of every stack (a list each: empty if the model never called the stack), from
    one forward on ``kw``, and whether the replays may derive the later stacks' entries (:class:`ChainCheck`
    over every block up to the last stack's first; one stack: nothing to derive, and the forward stops at the
    first block)."""
    stacks = adapter.stacks
    if len(stacks) == 1:
        rec = EntryRecorder(model, stacks, None, store, stop=True)
        try:
            run_inputs(model, [kw], on_stop=on_stop, progress=False)
        finally:
            rec.close()
        return rec.entries, True
    seqs = [model.get_submodule(s) for s in stacks]
    check = ChainCheck([b for seq in seqs[:-1] for b in seq] + [seqs[-1][0]], adapter.outputs)
    rec = EntryRecorder(model, stacks, None, store)
    try:
        model(**kw)
    finally:
        rec.close()
        check.close()
    return rec.entries, check.ok


# Room the quantize phase keeps free besides its snapshots: the searched block and, on a GPU, the next one
# replaying alongside, with their layer inputs and the search over its groups (the 16-bit weights in fp32, a
# batch of candidates sized to a quarter of what is then free), 4 x the largest block + 4 GB. A FLUX.1-dev
# double block is 0.68 GB; a streamed FLUX.1-dev quantization (one block at a time, candidates one by one)
# peaked at 11.3 GB with 7 GB of snapshots held (commit f2f8c57).
_BLOCK_MARGIN = 4
_SEARCH_MARGIN = 4 * 10**9


def snapshots_fit(snapshot_bytes: int, block_bytes: int, room: int) -> bool:
    """Whether a streaming quantization may keep its snapshots on the device from the first block to the last:
    ``snapshot_bytes`` (what the replays hold at once: the block inputs and the outputs made from them) plus
    the margin for the block and its search (4 x ``block_bytes``, the largest block, + 4 GB) within ``room``
    (the cap, or what the device has free). FLUX.1-dev, 128 snapshots at 1024²: 2 x 4.3 GB + 2.7 GB + 4 GB,
    which fits a 24 GB cap."""
    return snapshot_bytes + _BLOCK_MARGIN * block_bytes + _SEARCH_MARGIN <= room


def resident_blocks(block_bytes: list[int], rest_bytes: int, room: int) -> int:
    """How many of the first blocks stay on the device through a streamed pipeline calibration (``Streamed``'s
    ``resident``): as many as ``room`` holds after the rest of the model and the forward's margin (4 x the
    largest block + 4 GB). They make room while a text encoder runs. FLUX.1-dev under a 24 GB cap: 17 of its
    23.8 GB, so each denoising step moves about 7 GB instead of 23.8."""
    budget = room - rest_bytes - _BLOCK_MARGIN * max(block_bytes, default=0) - _SEARCH_MARGIN
    n = used = 0
    for b in block_bytes:
        if used + b > budget:
            break
        used, n = used + b, n + 1
    return n


def _hold_snapshots(device: torch.device, cap: int | None, stream: bool, held: int, block_bytes: int) -> bool:
    """Whether the snapshots stay on the device (no move per block): always unless streaming; streaming, when
    they fit the CUDA device (:func:`snapshots_fit`), or on the CPU, where device and home memory are one."""
    if not stream or device.type == "cpu":
        return True
    if device.type != "cuda":
        return False
    return snapshots_fit(held, block_bytes, device_room(device, cap))


def _nbytes(obj, seen: set | None = None) -> int:
    """Bytes of the tensors in a nested structure, a tensor shared by several snapshots once."""
    seen = set() if seen is None else seen
    if torch.is_tensor(obj):
        if id(obj) in seen:
            return 0
        seen.add(id(obj))
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_nbytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v, seen) for v in obj)
    return 0


def _finish_block(unit, block: nn.Module, home: torch.device, keep_on_device: bool, clock: StageClock) -> None:
    """A quantized block's place: back home (its 16-bit leftovers point at their home copies again, its new
    quantized layers move), or kept on the device."""
    with clock.stage("transfers"):
        if not keep_on_device:
            unit.offload()
            block.to(home)
        unit.release()


def _gpu_memory(device: torch.device, cap: int | None) -> tuple[int | None, int | None]:
    if device.type != "cuda":
        return None, None
    return torch.cuda.memory_allocated(device), cap
