"""A ready pipeline from a checkpoint: :func:`load_pipeline` (the base pipeline's components with the quantized
transformer, or both experts, and text encoders), and :func:`check_base`, which reads the base's config files to
refuse a base of another model, or with another number of experts, before anything is loaded."""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn as nn

from .. import _checks
from ..checkpoint import (CheckpointError, base_of, load_experts, load_quantized, load_text_encoders, read_metadata,
                          resolve)
from ..models.pipeline_needs import SECOND_EXPERT
from . import (TinyFluxPipeline, load_base_pipeline, pipeline_class_of, tiny_transformer_config,
               transformer_class_of)


def check_base(quantized: str | os.PathLike, meta: dict[str, Any], base: str) -> None:
    """Raise CheckpointError if the base pipeline holds another model than the checkpoint quantizes
    (read from config files only, before anything is loaded), or runs another number of experts."""
    base_cls = transformer_class_of(base)
    if base_cls is not None and base_cls != meta["model_class"]:
        raise CheckpointError(
            f"{quantized} quantizes a {meta['model_class']}, but the pipeline at {base} has a {base_cls}; "
            "pass the base pipeline the checkpoint was made from"
        )
    _check_experts(quantized, meta, base)
    tiny = tiny_transformer_config(base)
    if tiny is not None:
        ours = meta["model_config"]
        diff = [k for k in sorted(tiny) if not k.startswith("_") and k in ours and ours[k] != tiny[k]]
        if diff:
            k = diff[0]
            raise CheckpointError(f"{quantized} quantizes a {meta['model_class']} with {k}={ours[k]}, but the tiny "
                                  f"base {base} has {k}={tiny[k]}; pass the base pipeline it was made from")


def _check_experts(quantized, meta: dict[str, Any], base: str) -> None:
    """A checkpoint of both experts needs a base that runs two, and a checkpoint of one a base that runs one: the
    base's 16-bit second expert would otherwise run the low-noise steps unquantized."""
    second = (meta.get("experts") or {}).get(SECOND_EXPERT)
    base_second = transformer_class_of(base, SECOND_EXPERT)
    if second is not None and base_second is None:
        raise CheckpointError(f"{quantized} holds two experts (transformer and {SECOND_EXPERT}, Wan 2.2 A14B), but the "
                              f"pipeline at {base} runs one; pass the two-expert base the checkpoint was made from")
    if second is None and base_second is not None:
        raise CheckpointError(f"{quantized} holds one transformer, but the pipeline at {base} runs two experts "
                              f"(transformer and {SECOND_EXPERT}), whose 16-bit {SECOND_EXPERT} would run the "
                              "low-noise steps; quantize and save both (svdquant.quantize(pipe, ...), "
                              "svdquant.save_quantized(pipe, ...)), or pass a one-transformer base")
    if second is not None and base_second != second["model_class"]:
        raise CheckpointError(f"{quantized} quantizes a {second['model_class']} as {SECOND_EXPERT}, but the pipeline "
                              f"at {base} has a {base_second}; pass the base pipeline the checkpoint was made from")


def load_pipeline(base: str | os.PathLike | None, quantized: str | os.PathLike, *, device: str = "cpu",
                  torch_dtype: torch.dtype | None = None, weight_mode: str = "auto", fuse: bool | None = None,
                  verify: bool = True, allow_base_outside: bool = False, optimize: bool | None = None,
                  offload: bool = False, attention: str | None = "auto", compile: bool | str = True):
    """A ready pipeline: ``base``'s components (local folder or hub id; ``None`` = the one recorded in the
    checkpoint) with the quantized transformer from ``quantized`` (both experts, ``transformer`` and
    ``transformer_2``, of a two-expert checkpoint; a base with another number of experts is refused before
    anything is loaded). ``torch_dtype`` (``None``: as stored)
    applies to the whole pipeline, the quantized transformer's 16-bit layers included. ``weight_mode``: see
    :func:`svdquant.load_quantized`. ``fuse``: apply :func:`svdquant.fuse` (q/k/v as one GEMM, with a FLUX single
    block's MLP up projection; each MLP's GELU in its down projection's activation pass; the same math but for the
    GPU's ``tanh.approx`` in the GELU); ``None``
    = on a CUDA device, where it pays (FLUX.1-dev step, H200, eager, q/k/v alone: 194 → 176 ms; BENCHMARKS.md).
    ``verify``: see :func:`svdquant.load_quantized`. ``allow_base_outside``: load a recorded local base that lies
    outside the folder holding the checkpoint and the current directory
    (:func:`svdquant.checkpoint.check_base_location`); off, such a checkpoint is refused. ``optimize``:
    :func:`svdquant.optimize` (fusing as ``fuse`` says, with FLUX's q/k RMSNorm + RoPE as one op, the fastest
    attention backend, compiled blocks, the layer choice, CUDA graphs; the first call at each size compiles);
    ``None`` = on a CUDA device. ``offload``: the pipeline's models stay in CPU memory and each moves to ``device``
    only while it runs (diffusers' ``enable_model_cpu_offload``), the quantized layers 4-bit resident
    (``weight_mode="memory"`` unless another mode is given); optimized on the device first, with no CUDA graphs
    (offload hooks move the weights).
    Wan 2.1 14B at 480p then peaks at 11.4 GB on an H200 (BENCHMARKS.md). ``attention``: what
    :func:`svdquant.optimize` sets (``"auto"``: the fastest SDPA backend; ``"int8"``: svdquant's INT8 Q·Kᵀ
    attention, opt-in, README "Fast by default"). ``compile``: how :func:`svdquant.optimize` compiles the denoiser
    (``True``: each repeated block; ``"model"``: the whole forward as one graph, a faster step and a longer first
    call; ``False``: not at all)."""
    from .optimize import check_attention

    _checks.device("device", device)
    check_attention(attention)
    _check_compile(compile, optimize, offload, device)
    if attention not in ("auto", None) and (optimize is False or torch.device(device).type != "cuda"):
        raise ValueError(f"attention={attention!r} is set by svdquant.optimize, which runs on a CUDA device: give "
                         "device='cuda' (and leave optimize on), or leave attention out")
    if not isinstance(offload, bool):
        raise ValueError(f"offload={offload!r}: use True or False")
    if offload and torch.device(device).type == "cpu":
        raise ValueError("offload=True keeps the models in CPU memory and moves each to device= while it runs: give "
                         "an accelerator (device='cuda'), or leave offload out")
    if offload and weight_mode == "auto":
        weight_mode = "memory"  # the point is the GPU memory: INT8 copies of the weights would double it
    for name, value in (("fuse", fuse), ("optimize", optimize)):
        if value is not None and not isinstance(value, bool):
            raise ValueError(f"{name}={value!r}: use True, False or None (on a CUDA device)")
    if torch_dtype is not None and not (isinstance(torch_dtype, torch.dtype) and torch_dtype.is_floating_point):
        raise ValueError(f"torch_dtype={torch_dtype!r}: use a floating torch.dtype such as torch.bfloat16, or None")
    quantized = resolve(quantized)  # a hub id: its cached copy, so a recorded relative base resolves against it
    meta = read_metadata(quantized)
    base = base_of(quantized, meta, base, allow_outside=allow_base_outside)
    check_base(quantized, meta, base)
    if offload and pipeline_class_of(base) == TinyFluxPipeline.__name__:
        raise ValueError("offload=True: the tiny model's pipeline has no model offload (it fits any GPU); leave "
                         "offload out")
    home = "cpu" if offload else device  # offloaded, every model lives in CPU memory
    transformer = load_quantized(quantized, device=home, weight_mode=weight_mode, verify=verify)
    experts = load_experts(quantized, device=home, weight_mode=weight_mode, verify=verify)
    # offloaded, 4-bit text encoders too stay 4-bit: each call moves them in, and an INT8 copy would double that
    encoders = load_text_encoders(quantized, device=home, weight_mode=weight_mode if offload else "auto",
                                  verify=verify)
    if torch_dtype is not None:
        # The kept 16-bit layers load in the stored dtype; the rest of the pipeline runs in torch_dtype,
        # and a mix fails in the first matmul. Quantized layers keep their formats (SVDQLinear._apply).
        # nn.Module.to: diffusers' own .to warns about fp32-kept modules even when the list is empty.
        for m in (transformer, *experts.values(), *encoders.values()):
            nn.Module.to(m, torch_dtype)
    pipe = load_base_pipeline(base, transformer=transformer, torch_dtype=torch_dtype, **experts, **encoders)
    if offload:
        return offloaded(pipe, device, optimize=optimize, fuse=fuse, attention=attention, compile=compile)
    pipe = pipe.to(device)
    # after the move: the stacked weights are built once, where they run; both experts of a two-expert pipeline
    _speed_up(pipe, device, optimize, fuse, attention=attention, compile=compile)
    return pipe


def _check_compile(compile, optimize: bool | None, offload: bool, device: str) -> None:
    """``compile=`` of :func:`load_pipeline`: a mode :func:`svdquant.optimize` knows, and ``"model"`` only where it
    runs whole."""
    from .compiling import MODEL, compile_mode

    if compile_mode(compile) != MODEL:
        return
    if optimize is False:
        raise ValueError("compile='model' is how svdquant.optimize compiles the denoiser: leave optimize on, or leave "
                         "compile out")
    if offload:
        raise ValueError("compile='model' compiles the whole forward, which offload's hooks run outside the graph: "
                         "leave offload or compile out")
    if torch.device(device).type != "cuda":
        raise ValueError("compile='model' is how svdquant.optimize compiles the denoiser, on a CUDA device: give "
                         "device='cuda', or leave compile out")


def offloaded(pipe, device, *, optimize: bool | None = None, fuse: bool | None = None,
              attention: str | None = "auto", compile: bool | str = True):
    """``pipe`` (in CPU memory) run with diffusers' model offload to ``device``: its denoisers optimized there first
    (``optimize=None``: on a CUDA device), then every model back in CPU memory behind accelerate's hooks."""
    _speed_up(pipe, device, optimize, fuse, offload=True, attention=attention, compile=compile)
    pipe.enable_model_cpu_offload(device=device)
    return pipe


def _speed_up(pipe, device, optimize: bool | None, fuse: bool | None, offload: bool = False,
              attention: str | None = "auto", compile: bool | str = True) -> None:
    """:func:`svdquant.optimize` or only :func:`svdquant.fuse` on ``pipe``'s denoisers, as asked (``None``: on a
    CUDA device). Offloaded, one denoiser at a time goes to the device for it (Wan 2.2's two experts would need
    both there at once) and comes back, and no CUDA graphs are asked for (offload hooks bypass them)."""
    from .optimize import denoisers
    from .optimize import optimize as optimize_model

    cuda = torch.device(device).type == "cuda"
    if optimize or (optimize is None and cuda):
        if not offload:
            optimize_model(pipe, fuse=fuse is not False, attention=attention, compile=compile)
            return
        for m in denoisers(pipe):  # the attention timing and the compiled blocks are made where they run
            m.to(device)
            optimize_model(m, fuse=fuse is not False, cuda_graphs=False, attention=attention, compile=compile)
            m.to("cpu")
    elif fuse or (fuse is None and cuda):
        from ..modules.fusions import fuse_model

        for m in denoisers(pipe):
            fuse_model(m)
