"""Importing, second step: the planned layers' tensors read, unpacked into our layouts and loaded into an
svdquant model after the checks every checkpoint gets (:func:`from_nunchaku`)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn

from ..._state import state
from ... import _checks
from ...checkpoint import check_values, count_nonfinite, empty_quantized_model
from ...formats import pack_4bit_halves
from ...integrations.diffusers import compat
from .keymap import GROUP, Layout
from .packing import deinterleave_rows, unpack_awq, unpack_lanes, unpack_lowrank, unpack_qweight
from .plan import NunchakuPlan, PlannedLayer, awq_bias, bad_file, nunchaku_plan, tensor_reader


def _w4a4_tensors(read, layout: Layout, name: str, rank: int) -> dict[str, torch.Tensor]:
    """One Nunchaku W4A4 layer in plain order: codes [N, K], scales [N, G], bias [N], smooth [K], down [R, K], up."""
    def get(role: str) -> torch.Tensor:
        return read(layout.w4a4(name, role))

    out = {"codes": unpack_qweight(get("qweight")), "scales": unpack_lanes(get("wscales")),
           "bias": unpack_lanes(get("bias")), "smooth": unpack_lanes(get("smooth"))}
    if rank:
        out["down"] = unpack_lowrank(get("lora_down"), down=True)
        out["up"] = unpack_lowrank(get("lora_up"), down=False)
    return out


def _fill_w4a4(plan: NunchakuPlan, read, lay: PlannedLayer) -> dict[str, torch.Tensor]:
    path, layout = plan.path, plan.layout
    parts = [_w4a4_tensors(read, layout, t, r) for t, r in zip(lay.theirs, lay.ranks)]
    for t, p in zip(lay.theirs, parts):
        bad = count_nonfinite(p["smooth"]) or int((p["smooth"] == 0).sum())
        if bad:
            raise bad_file(path, f"{layout.w4a4(t, 'smooth')} holds {bad} zero or non-finite smoothing factors; the "
                                 "file is corrupt")
        # smooth_orig is never read by the kernels (module doc), but NaN / Inf there is a damaged file all the same
        orig = layout.w4a4(t, "smooth_orig")
        if orig in plan.header and count_nonfinite(read(orig)):
            raise bad_file(path, f"{orig} holds NaN / Inf values; the file is corrupt")
    if len(parts) == 2:  # proj_out: concatenate along K
        a, b = parts
        ka = a["codes"].shape[1]
        codes = torch.cat([a["codes"], b["codes"]], 1)
        scales = torch.cat([a["scales"], b["scales"]], 1)
        smooth = torch.cat([a["smooth"], b["smooth"]])
        bias = (a["bias"].float() + b["bias"].float()).to(a["bias"].dtype)
        if lay.form == "shared":
            down = torch.cat([a["down"], b["down"]], 1) if "down" in a else None
            up = a.get("up")
        else:  # two branches: block-diagonal down, ups side by side
            ra, rb = lay.ranks
            down = a["bias"].new_zeros(ra + rb, codes.shape[1])
            up = a["bias"].new_zeros(codes.shape[0], ra + rb)
            if ra:
                down[:ra, :ka], up[:, :ra] = a["down"], a["up"]
            if rb:
                down[ra:, ka:], up[:, ra:] = b["down"], b["up"]
        rows = [slice(None)]
    else:
        (p,) = parts
        codes, scales, smooth, bias = p["codes"], p["scales"], p["smooth"], p["bias"]
        down, up = p.get("down"), p.get("up")
        starts = [0]
        for n in lay.outs:
            starts.append(starts[-1] + n)
        rows = [slice(s, e) for s, e in zip(starts, starts[1:])]
    out = {}
    smooth_inv = 1.0 / smooth.float()
    for name, r in zip(lay.ours, rows):
        out[f"{name}.qweight"] = pack_4bit_halves(codes[r], GROUP)
        out[f"{name}.wscales"] = scales[r].contiguous()
        out[f"{name}.bias"] = bias[r].contiguous()
        out[f"{name}.smooth_inv"] = smooth_inv.clone()
        if down is not None and down.shape[0]:
            out[f"{name}.lora_down"] = down.contiguous().clone()
            out[f"{name}.lora_up"] = up[r].contiguous()
    return out


def _fill_awq(read, lay: PlannedLayer, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    name, ours, chunks = lay.theirs[0], lay.ours[0], lay.chunks
    codes = deinterleave_rows(unpack_awq(read(f"{name}.qweight")), chunks)
    scales = deinterleave_rows(read(f"{name}.wscales").t(), chunks).contiguous()
    zeros = deinterleave_rows(read(f"{name}.wzeros").t(), chunks).contiguous()
    fp32 = "bias_dtype" in lay.configs[ours]
    out = {f"{ours}.wscales": scales, f"{ours}.bias": awq_bias(read, lay).to(torch.float32 if fp32 else dtype)}
    if lay.form == "int4":
        out[f"{ours}.qweight"] = pack_4bit_halves(codes.to(torch.int8) - 8, GROUP)
    else:
        out[f"{ours}.qweight"] = pack_4bit_halves(codes, GROUP)
        out[f"{ours}.wzeros"] = zeros
    return out


def from_nunchaku(path: str | os.PathLike, device: str | torch.device = "cpu", *,
                  weight_mode: str = "auto") -> nn.Module:
    """A Nunchaku single-file INT4 checkpoint (FLUX.1, Kontext, Qwen-Image / -Edit) as an svdquant-quantized
    ``FluxTransformer2DModel`` / ``QwenImageTransformer2DModel`` (W4A4 layers in ``w4a4-float`` formats, adaLN
    layers ``int4z`` / ``int4`` weight-only). Checked as hostile input: every failure is a
    :class:`CheckpointError`. :func:`svdquant.load_quantized` calls this for Nunchaku files."""
    from ...modules.linear import WEIGHT_MODES

    if weight_mode not in WEIGHT_MODES:
        raise ValueError(f"weight_mode={weight_mode!r} is unknown; choose one of {WEIGHT_MODES}")
    device = _checks.device("device", device)
    plan = nunchaku_plan(path)
    model = empty_quantized_model(plan.meta, plan.path, weight_mode)
    read = tensor_reader(plan.path)
    tensors: dict[str, torch.Tensor] = {}
    for lay in plan.layers:
        tensors.update(_fill_w4a4(plan, read, lay) if lay.kind == "w4a4" else _fill_awq(read, lay, plan.dtype))
    for ours, theirs in plan.kept.items():
        tensors[ours] = read(theirs)
    quantized = {k for k in tensors if k.rpartition(".")[0] in plan.meta["layers"]}
    expected = dict(model.state_dict(keep_vars=True))
    if set(expected) != set(tensors):  # the plan and the model disagree: a gap in this converter, not the file
        raise bad_file(plan.path, f"does not map onto {plan.layout.model_class} (missing "
                                  f"{sorted(set(expected) - set(tensors))[:3]}"
                                  f", extra {sorted(set(tensors) - set(expected))[:3]})")
    check_values(model, tensors, quantized, plan.path)
    model.load_state_dict(tensors, strict=True, assign=True)
    state(model).recipe = plan.meta["recipe"]
    state(model).source = "nunchaku"  # saved with it: a later load skips the checks of svdquant's own quantizer
    model.eval()
    compat.quantized(model)  # save_pretrained then writes its quantization_config
    return model.to(device) if str(device) != "cpu" else model
