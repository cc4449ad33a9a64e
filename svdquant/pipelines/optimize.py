"""``svdquant.optimize``: a loaded pipeline as fast as svdquant makes it, in one call.

    pipe = svdquant.load_pipeline(None, "flux-int4", device="cuda")   # already optimized (optimize=None: on CUDA)
    report = svdquant.optimize(pipe)                                   # a pipeline built another way
    print(report)                                                      # what it did, and what it skipped and why

On a CUDA device, in this order (each step can be turned off):

1. ``fuse``: :func:`svdquant.fuse` (q/k/v as one GEMM; a FLUX single block's MLP up projection with them; an MLP's
   GELU in its down projection's activation pass) and, in FLUX's, Qwen-Image's and Z-Image's attentions,
   ``norm_rope`` (q/k RMSNorm and RoPE as one Triton launch a stream: a FLUX.1-dev step 91.39 -> 89.03 ms on an
   H100, BENCHMARKS.md "Session 37"; a Z-Image pipeline 2.278 -> 2.107 s, "Session 42"). The same math, but for
   the GPU's one-instruction tanh in the GELU (an INT8 code moves by at most one step) and the norm's fp32 sum in
   another order (at most one bf16 step).
2. ``attention``: the fastest of PyTorch's SDPA backends (cuDNN, flash, memory-efficient) and, on sm_90 / sm_100
   where it imports (a dependency on Linux), flash-attn-4 (:mod:`svdquant.ops.flash4_attention`), all exact, at the
   model's attention shape, timed once per process and GPU (in CUDA graphs where the step runs in them), set on this
   model only, where its attention dispatches through diffusers' backends. On an H100 flash-attn-4 took a FLUX.1-dev
   step's attention from 23.7 to 21.7 ms (BENCHMARKS.md). ``attention="flash4"`` asks for flash-attn-4 without
   timing. ``attention="int8"`` (opt-in) instead runs svdquant's INT8 Q·Kᵀ attention
   (:mod:`svdquant.ops.int8_attention`: costs the tiny FLUX ~0.2 dB, BENCHMARKS.md), calls it cannot take on
   PyTorch's SDPA.
3. ``compile``: every repeated block (the svdquant adapter's block stacks, else the model's ``_repeated_blocks``)
   through ``torch.compile(dynamic=False)`` with inductor's coordinate-descent tuning
   (:mod:`svdquant.pipelines.compiling`); the quantized kernels are custom ops, so a block is one graph.
   Compilation happens at the first call at each new shape (about 3 minutes for FLUX.1-dev on an H100 with empty
   caches, 187 s with the CUTLASS GEMM's and Triton's compiles in session 30, 77 s in session 34; seconds once
   inductor has cached what it found). ``compile="model"`` compiles the whole forward as one graph instead: a
   FLUX.1-dev step 2 ms faster on an H100 in a benchmark's variant of it, about twice the first call's compile.
4. ``layers`` (with graphs): at the first call, each quantized layer's shape is timed on this GPU against a
   16-bit cuBLAS linear of its dequantized weight, and runs as one where that is faster
   (:mod:`svdquant.pipelines.layer_choice`: few tokens, narrow layers);
5. ``cuda_graphs``: the denoiser's whole forward replayed from a CUDA graph per call signature
   (:mod:`svdquant.pipelines.graphs`: a small cache of shapes and batch sizes; LoRA strength changes stay in the
   graph; an added LoRA, a weight-mode change or a new resolution captures again).

What each costs and gains is measured in BENCHMARKS.md ("Fast by default"). On the CPU it does nothing (the
report says so): the CPU runs the quantized layers through :class:`svdquant.ops.runners.CpuRunner` already.
:func:`deoptimize` undoes steps 2-5 (fusion stays; :func:`svdquant.unfuse` undoes it).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .._state import state, take
from .compiling import BLOCKS, MODEL, compile_blocks, compile_mode, compile_model, hooked, uncompile
from .graphs import DEFAULT_GRAPHS, StepGraphs
from ..integrations.diffusers.attention import FLASH4 as FLASH4_BACKEND
from ..integrations.diffusers.compat import dispatches_attention, set_attention_backend_locally
from ..models.pipeline_needs import SECOND_EXPERT, second_expert
from ..modules import SVDQLinear
from ..modules.linear import bump_revision
from .layer_choice import choose_layers

ATTENTION_BACKENDS = ("_native_cudnn", "_native_flash", "_native_efficient")  # diffusers' names, fastest first
INT8_ATTENTION = "int8"  # svdquant's INT8 Q·Kᵀ attention, registered in diffusers' dispatcher when asked
FLASH4_ATTENTION = "flash4"  # flash-attn-4's exact attention (optional library), likewise
_attention_choice: dict = {}  # (GPU, heads, head dim, tokens, dtype, flash4 runs, in graphs) -> backend, timed once


@dataclass
class Optimized:
    """What :func:`optimize` did to a denoiser (``str()`` for a summary)."""

    device: str
    fused: dict = field(default_factory=dict)
    attention: str | None = None
    attention_ms: dict = field(default_factory=dict)
    compiled_blocks: int = 0
    compiled_model: bool = False  # compile="model": the whole forward as one graph
    cuda_graphs: bool = False
    max_graphs: int = 0
    # the layer choice, made at the first call: {"dense_layers", "quantized_layers", "shapes": [...]}
    layers: dict | None = None
    skipped: dict = field(default_factory=dict)  # step -> why
    # a two-expert pipeline's other denoiser (Wan 2.2's ``transformer_2``): its own report
    experts: dict = field(default_factory=dict)

    def __str__(self) -> str:
        done = []
        if any(self.fused.values()):
            done.append("fused " + ", ".join(f"{k} {v}" for k, v in self.fused.items() if v))
        if self.attention:
            done.append(f"attention {self.attention}")
        if self.compiled_model:
            done.append("the whole forward compiled as one graph (at the first call of each shape)")
        if self.compiled_blocks:
            done.append(f"{self.compiled_blocks} blocks compiled (at the first call of each shape)")
        if self.cuda_graphs:
            done.append(f"CUDA graphs (up to {self.max_graphs} shapes)")
        if self.layers is not None:
            done.append(f"{self.layers['dense_layers']} quantized layers run as 16-bit GEMMs where cuBLAS measured "
                        f"faster, {self.layers['quantized_layers']} on the INT8 path")
        line = f"svdquant.optimize on {self.device}: " + ("; ".join(done) if done else "nothing to do")
        for step, why in self.skipped.items():
            line += f"\n  {step}: skipped ({why})"
        for name, report in self.experts.items():
            line += f"\n{name}: " + str(report)
        return line

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def denoiser(target, what: str = "svdquant.optimize") -> nn.Module:
    """The model a pipeline denoises with (``.transformer`` or ``.unet``), or the module itself."""
    for name in ("transformer", "unet"):
        model = getattr(target, name, None)
        if isinstance(model, nn.Module):
            return model
    if isinstance(target, nn.Module):
        return target
    raise TypeError(f"{what} takes a diffusers pipeline or an nn.Module (a pipeline with a .transformer or .unet), "
                    f"got {type(target).__name__}")


def denoisers(target, what: str = "svdquant.optimize") -> list[nn.Module]:
    """:func:`denoiser`, and a two-expert pipeline's second one (Wan 2.2's ``transformer_2``) after it."""
    model = denoiser(target, what)
    second = second_expert(target)
    return [model] if second is None or second is model else [model, second]


def check_attention(attention) -> None:
    """``attention=`` of :func:`optimize` and :func:`svdquant.load_pipeline`, checked before any work."""
    if attention is not None and attention not in ("auto", INT8_ATTENTION, FLASH4_ATTENTION, *ATTENTION_BACKENDS):
        raise ValueError(f"attention={attention!r}: use 'auto', None, {INT8_ATTENTION!r}, {FLASH4_ATTENTION!r} or one "
                         f"of {ATTENTION_BACKENDS}")


def optimize(target, *, fuse: bool = True, attention: str | None = "auto", compile: bool | str = True,
             cuda_graphs: bool = True, max_graphs: int = DEFAULT_GRAPHS, layers: bool = True) -> Optimized:
    """Make a pipeline's (or model's) denoiser as fast as svdquant can on its CUDA device; see the module doc.

    ``attention``: ``"auto"`` (timed), a diffusers backend name such as ``"_native_cudnn"``, ``"int8"``
    (svdquant's INT8 Q·Kᵀ attention; opt-in) or ``None`` (leave it). ``compile``: ``True`` (each repeated block),
    ``"model"`` (the whole forward as one graph) or ``False``. ``max_graphs``: how many call signatures
    (resolution × batch size) keep a captured graph. Calling it again is harmless (what is done stays done). Returns
    an :class:`Optimized` report. A two-expert pipeline (Wan 2.2 A14B) gets both denoisers optimized, the second's
    report under ``experts["transformer_2"]``."""
    models = denoisers(target)
    for name, value in (("fuse", fuse), ("cuda_graphs", cuda_graphs), ("layers", layers)):
        if not isinstance(value, bool):
            raise ValueError(f"{name}={value!r}: use True or False")
    check_attention(attention)
    if isinstance(max_graphs, bool) or not isinstance(max_graphs, int) or max_graphs < 1:
        raise ValueError(f"max_graphs={max_graphs!r}: use a whole number >= 1")
    mode = compile_mode(compile)
    reports = [_optimize_model(m, fuse, attention, mode, cuda_graphs, max_graphs, layers) for m in models]
    reports[0].experts.update({SECOND_EXPERT: r for r in reports[1:]})
    return reports[0]


def _optimize_model(model: nn.Module, fuse: bool, attention: str | None, compile: str | None, cuda_graphs: bool,
                    max_graphs: int, layers: bool) -> Optimized:
    """:func:`optimize`'s steps on one denoiser, its arguments checked."""
    device = _device_of(model)
    report = Optimized(device=str(device))
    if device.type != "cuda":
        report.skipped["all"] = "not on a CUDA device: the CPU runs the quantized layers as they are"
        return report
    if fuse:
        from ..modules.fusions import fuse_model
        from ..modules.norm_rope import OPTIMIZED

        report.fused = fuse_model(model, norm_rope=OPTIMIZED)
    if attention is not None:
        _set_attention(model, attention, report, cuda_graphs)
    if compile == MODEL and hooked(model.modules()):
        report.skipped["compile"] = ("model: hooks on the model (offloading or a cache) run its forward outside one "
                                     "graph; its blocks compiled instead")
        compile = BLOCKS
    if compile == MODEL:
        compile_model(model)
        report.compiled_model = True
    elif compile:
        report.compiled_blocks = compile_blocks(model)
        if not report.compiled_blocks:
            report.skipped["compile"] = "no repeated blocks known for this model"
    if cuda_graphs:
        why = _why_no_graphs(model)
        if why:
            report.skipped["cuda_graphs"] = why
        else:
            graphs = model.__dict__.get("forward")
            if isinstance(graphs, StepGraphs):
                graphs.max_graphs = max_graphs
            else:
                modules = list(model.modules())
                graphs = StepGraphs(model, model.forward, max_graphs, bypass=lambda: hooked(modules))
                model.forward = graphs
            if layers:
                graphs.prepare = lambda args, kwargs: report.__setattr__(
                    "layers", choose_layers(model, graphs.forward, args, kwargs))
            report.cuda_graphs, report.max_graphs = True, max_graphs
    if layers and not report.cuda_graphs:
        report.skipped["layers"] = "decided at the first call of a graph-captured model only"
    state(model).optimized = report
    return report


def deoptimize(target) -> None:
    """Undo :func:`optimize`'s graphs, compilation and attention choice (fusion stays: :func:`svdquant.unfuse`), on
    both denoisers of a two-expert pipeline."""
    for model in denoisers(target):
        _deoptimize_model(model)


def _deoptimize_model(model: nn.Module) -> None:
    uncompile(model)
    graphs = model.__dict__.get("forward")
    if isinstance(graphs, StepGraphs):
        graphs.remove()
    for m in model.modules():  # the layer choice
        if isinstance(m, SVDQLinear) and m.compute != "quantized":
            m.set_compute("quantized")
    report = take(model, "optimized")
    if report is not None and report.attention and hasattr(model, "reset_attention_backend"):
        model.reset_attention_backend()


def graphs_of(target) -> StepGraphs | None:
    """The CUDA-graph cache :func:`optimize` put on a pipeline's denoiser, if any (``captures``, ``replays``)."""
    graphs = denoiser(target).__dict__.get("forward")
    return graphs if isinstance(graphs, StepGraphs) else None


# ------------------------------------------------------------------------------------------------ steps
def _device_of(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def _attention_shape(model: nn.Module):
    cfg = getattr(model, "config", {})
    heads = cfg.get("num_attention_heads") if hasattr(cfg, "get") else None
    dim = cfg.get("attention_head_dim") if hasattr(cfg, "get") else None
    if not isinstance(heads, int) or not isinstance(dim, int):
        return None
    return heads, dim, 4096  # a 1024² image's tokens: the shape these models spend their attention time on


def _why_not_svdquant_backend(model: nn.Module) -> str | None:
    """What both of svdquant's attention backends need of ``model``: attention dispatched through diffusers'
    backends, and 16-bit weights."""
    if not dispatches_attention(model):
        return "the model's attention processors are diffusers' legacy ones, which call PyTorch's SDPA themselves"
    dtype = next(model.parameters()).dtype
    if dtype not in (torch.float16, torch.bfloat16):
        return f"a {dtype} model (the kernel takes 16-bit)"
    return None


def _why_not_int8_attention(model: nn.Module) -> str | None:
    """Why svdquant's INT8 attention cannot run ``model``'s attention (read from its processors, config and dtype),
    or None."""
    from ..ops.int8_attention import HEAD_DIMS

    shape = _attention_shape(model)
    if shape is not None and shape[1] not in HEAD_DIMS:
        return f"head size {shape[1]} (the kernel takes {', '.join(map(str, HEAD_DIMS))})"
    return _why_not_svdquant_backend(model)


def _why_not_flash4(model: nn.Module) -> str | None:
    """Why flash-attn-4 cannot run ``model``'s attention, or None (imports flash-attn-4 to know)."""
    from ..ops import flash4_attention as flash4

    why = _why_not_svdquant_backend(model)
    if why is not None:
        return why
    device = _device_of(model)
    if device.type != "cuda":
        return f"a model on the {device.type} (flash-attn-4 runs on a CUDA GPU)"
    major, minor = torch.cuda.get_device_capability(device)
    if major not in flash4.ARCHES:  # before importing it (the CuTe DSL: seconds) where it would not run anyway
        return f"an sm_{major}{minor} GPU (flash-attn-4's kernels run on sm_90 and sm_100 here)"
    why = flash4.import_error()
    if why is not None:
        return why
    flash4.available(device)  # recorded usable there: what the backend's forward reads
    shape = _attention_shape(model)
    if shape is not None and not flash4.head_size_ok(shape[1]):
        return f"head size {shape[1]} (it takes a multiple of 8 up to 128, or 256)"
    return None


def _svdquant_backend(model: nn.Module, attention: str, report: Optimized) -> bool:
    """Route ``model``'s attention to one of svdquant's diffusers backends (``attention``: ``"int8"``, or flash-attn-4
    by the user's name or its backend's); False (with the reason in the report) where it cannot run."""
    from ..integrations.diffusers import attention as backends

    int8 = attention == INT8_ATTENTION
    why = _why_not_int8_attention(model) if int8 else _why_not_flash4(model)
    if why is not None:
        report.skipped["attention"] = f"{INT8_ATTENTION if int8 else FLASH4_ATTENTION}: {why}; attention left as it was"
        return False
    report.attention = backends.register() if int8 else backends.register_flash4()
    set_attention_backend_locally(model, report.attention)  # not the process's default for others
    bump_revision()  # graphs captured with the previous attention are captured again
    return True


def _set_attention(model: nn.Module, attention: str, report: Optimized, graphs: bool = True) -> None:
    """``attention`` set on ``model`` (``graphs``: the step will run in CUDA graphs, so "auto" times in them)."""
    if not hasattr(model, "set_attention_backend"):
        report.skipped["attention"] = "the model has no set_attention_backend"
        return
    if attention in (INT8_ATTENTION, FLASH4_ATTENTION):
        _svdquant_backend(model, attention, report)
        return
    if attention == "auto":
        shape = _attention_shape(model)
        if shape is None:
            report.skipped["attention"] = "no attention shape in the model's config"
            return
        dtype = next(model.parameters()).dtype
        dtype = dtype if dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
        flash4 = _why_not_flash4(model) is None
        graphs = graphs and _why_no_graphs(model) is None  # timed as the step will run: in a CUDA graph or not
        key = (torch.cuda.get_device_name(_device_of(model)), *shape, dtype, flash4, graphs)
        if key not in _attention_choice:
            _attention_choice[key] = _time_attention(*shape, dtype, _device_of(model), flash4, graphs)
        attention, report.attention_ms = _attention_choice[key]
        if attention is None:
            report.skipped["attention"] = "no SDPA backend ran at the model's shape"
            return
        if attention == FLASH4_BACKEND:
            _svdquant_backend(model, attention, report)
            return
    try:
        set_attention_backend_locally(model, attention)  # diffusers' own call would make it every model's default
        bump_revision()
    except (ValueError, RuntimeError, NotImplementedError) as e:
        report.skipped["attention"] = f"{attention}: {str(e).splitlines()[0][:200]}"
        return
    report.attention = attention


def _time_attention(heads: int, dim: int, tokens: int, dtype, device, flash4: bool = False, graphs: bool = True):
    """(fastest backend, {backend: ms}) at one image's shape: PyTorch's SDPA backends, and flash-attn-4 where it can
    run (``flash4``); each timed with CUDA events, over a CUDA graph's replay where the step runs in graphs
    (:func:`_cuda_ms`), on ``device``."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kernels = {"_native_cudnn": SDPBackend.CUDNN_ATTENTION, "_native_flash": SDPBackend.FLASH_ATTENTION,
               "_native_efficient": SDPBackend.EFFICIENT_ATTENTION}
    times = {}
    with torch.cuda.device(device):  # events, graphs and flash-attn-4's arch cache follow the current device
        q, k, v = (torch.randn(1, heads, tokens, dim, device=device, dtype=dtype) for _ in range(3))
        for name in ATTENTION_BACKENDS:
            try:
                with sdpa_kernel(kernels[name]):
                    times[name] = _cuda_ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v), graphs)
            except RuntimeError:  # not available for this GPU, dtype or head size
                continue
        if flash4:
            from ..ops.flash4_attention import attention

            qs, ks, vs = (x.transpose(1, 2).contiguous() for x in (q, k, v))  # diffusers' [B, S, H, D]
            try:  # the first call compiles the kernel for this shape (cached for the model's calls)
                times[FLASH4_BACKEND] = _cuda_ms(lambda: attention(qs, ks, vs), graphs)
            except Exception:  # noqa: BLE001 - an optional library failing at this shape: the SDPA backends stand
                pass
    best = min(times, key=times.get) if times else None
    return best, {k: round(v, 4) for k, v in times.items()}


def _cuda_ms(fn, graphs: bool = True, warmup: int = 3, reps: int = 10) -> float:
    """Milliseconds a call of ``fn``, timed as the optimized step runs it: with ``graphs``, ``reps`` calls captured
    in one CUDA graph and replayed (no host launch cost: flash-attn-4's Python launcher costs more than SDPA's, and
    the step's graph hides both); eagerly without, or if ``fn`` cannot be captured."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    replay = None
    if graphs:
        stream = torch.cuda.current_stream()
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for _ in range(reps):
                    fn()
            replay = graph.replay
            replay()  # the first replay uploads the graph
        except RuntimeError:  # not capturable: timed eagerly
            replay = None
            torch.cuda.set_stream(stream)  # a failed capture's exit leaves its side stream current
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    if replay is not None:
        replay()
    else:
        for _ in range(reps):
            fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def _why_no_graphs(model: nn.Module) -> str | None:
    if hooked(list(model.modules())):
        return "hooks on the model (offloading or a cache): its weights move, or blocks are skipped on the host"
    devices = {t.device for t in list(model.parameters()) + list(model.buffers())}
    if len(devices) != 1:
        return f"the model spans {len(devices)} devices"
    return None
