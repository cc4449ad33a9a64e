"""A ready pipeline from a checkpoint: :func:`load_pipeline` (the base pipeline's components with the quantized
transformer and text encoders), and :func:`check_base`, which reads the base's config files to refuse a base of
another model before anything is loaded."""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn as nn

from .. import _checks
from ..checkpoint import CheckpointError, base_of, load_quantized, load_text_encoders, read_metadata, resolve
from . import load_base_pipeline, tiny_transformer_config, transformer_class_of


def check_base(quantized: str | os.PathLike, meta: dict[str, Any], base: str) -> None:
    """Raise CheckpointError if the base pipeline holds another model than the checkpoint quantizes
    (read from config files only, before anything is loaded)."""
    base_cls = transformer_class_of(base)
    if base_cls is not None and base_cls != meta["model_class"]:
        raise CheckpointError(
            f"{quantized} quantizes a {meta['model_class']}, but the pipeline at {base} has a {base_cls}; "
            "pass the base pipeline the checkpoint was made from"
        )
    tiny = tiny_transformer_config(base)
    if tiny is not None:
        ours = meta["model_config"]
        diff = [k for k in sorted(tiny) if not k.startswith("_") and k in ours and ours[k] != tiny[k]]
        if diff:
            k = diff[0]
            raise CheckpointError(f"{quantized} quantizes a {meta['model_class']} with {k}={ours[k]}, but the tiny "
                                  f"base {base} has {k}={tiny[k]}; pass the base pipeline it was made from")


def load_pipeline(base: str | os.PathLike | None, quantized: str | os.PathLike, *, device: str = "cpu",
                  torch_dtype: torch.dtype | None = None, weight_mode: str = "auto", fuse: bool | None = None,
                  verify: bool = True, allow_base_outside: bool = False, optimize: bool | None = None):
    """A ready pipeline: ``base``'s components (local folder or hub id; ``None`` = the one recorded in the
    checkpoint) with the quantized transformer from ``quantized``. ``torch_dtype`` (``None``: as stored)
    applies to the whole pipeline, the quantized transformer's 16-bit layers included. ``weight_mode``: see
    :func:`svdquant.load_quantized`. ``fuse``: apply :func:`svdquant.fuse` (q/k/v as one GEMM, with a FLUX single
    block's MLP up projection; the other MLPs' GELU in their GEMM epilogue; exact); ``None`` = on a CUDA device,
    where it pays (FLUX.1-dev step, H200, eager, q/k/v alone: 194 → 176 ms; see BENCHMARKS.md).
    ``verify``: see :func:`svdquant.load_quantized`. ``allow_base_outside``: load a recorded local base that lies
    outside the folder holding the checkpoint and the current directory
    (:func:`svdquant.checkpoint.check_base_location`); off, such a checkpoint is refused. ``optimize``: :func:`svdquant.optimize` (fusing as ``fuse`` says, the fastest attention
    backend, compiled blocks, the layer choice, CUDA graphs; the first call at each size compiles); ``None`` = on a
    CUDA device."""
    _checks.device("device", device)
    for name, value in (("fuse", fuse), ("optimize", optimize)):
        if value is not None and not isinstance(value, bool):
            raise ValueError(f"{name}={value!r}: use True, False or None (on a CUDA device)")
    if torch_dtype is not None and not (isinstance(torch_dtype, torch.dtype) and torch_dtype.is_floating_point):
        raise ValueError(f"torch_dtype={torch_dtype!r}: use a floating torch.dtype such as torch.bfloat16, or None")
    quantized = resolve(quantized)  # a hub id: its cached copy, so a recorded relative base resolves against it
    meta = read_metadata(quantized)
    base = base_of(quantized, meta, base, allow_outside=allow_base_outside)
    check_base(quantized, meta, base)
    transformer = load_quantized(quantized, device=device, weight_mode=weight_mode, verify=verify)
    encoders = load_text_encoders(quantized, device=device, verify=verify)
    if torch_dtype is not None:
        # The kept 16-bit layers load in the stored dtype; the rest of the pipeline runs in torch_dtype,
        # and a mix fails in the first matmul. Quantized layers keep their formats (SVDQLinear._apply).
        # nn.Module.to: diffusers' own .to warns about fp32-kept modules even when the list is empty.
        nn.Module.to(transformer, torch_dtype)
        for te in encoders.values():
            nn.Module.to(te, torch_dtype)
    pipe = load_base_pipeline(base, transformer=transformer, torch_dtype=torch_dtype, **encoders).to(device)
    cuda = torch.device(device).type == "cuda"
    # after the move: the stacked weights are built once, where they run
    if optimize or (optimize is None and cuda):
        from .optimize import optimize as optimize_pipeline

        optimize_pipeline(pipe, fuse=fuse is not False)
    elif fuse or (fuse is None and cuda):
        from ..modules.fused import fuse as fuse_model

        fuse_model(pipe.transformer)
    return pipe
