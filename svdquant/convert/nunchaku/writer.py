"""Exporting, second step: an svdquant FLUX or Qwen-Image model as the tensors and metadata of a Nunchaku file
(:func:`nunchaku_tensors`), written byte-reproducibly and atomically (:func:`to_nunchaku`)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..._state import peek
from ... import _checks
from ...checkpoint import CheckpointError, fsync_file, load_quantized, model_config_of, quantized_layers, read_metadata
from ...formats import unpack_4bit_halves
from ...modules import SVDQLinear
from .exportable import check_exportable
from .keymap import AWQ, GROUP, LAYOUTS, W4A4, Layout
from .packing import interleave_rows, pack_awq, pack_lanes, pack_lowrank, pack_qweight, scale_chunks


def _same(tensors: list[torch.Tensor | None]) -> bool:
    return all((t is None) == (tensors[0] is None) and (t is None or torch.equal(t, tensors[0])) for t in tensors)


def _our_w4a4(m: SVDQLinear) -> dict[str, torch.Tensor]:
    q = m.weight_buffers()
    codes = unpack_4bit_halves(q["qweight"], GROUP, signed=True)
    bias = m.bias if m.bias is not None else torch.zeros(m.out_features, dtype=m.dtype)
    return {"codes": codes, "scales": q["wscales"], "bias": bias, "smooth_inv": m.smooth_inv,
            "down": m.lora_down if m.rank else None, "up": m.lora_up if m.rank else None}


def _nunchaku_w4a4(codes, scales, bias, smooth, down, up, dtype) -> dict[str, torch.Tensor]:
    out = {"qweight": pack_qweight(codes), "wscales": pack_lanes(scales.to(dtype)),
           "bias": pack_lanes(bias.to(dtype)), "smooth": pack_lanes(smooth), "smooth_orig": pack_lanes(smooth)}
    if down is not None:
        out["lora_down"] = pack_lowrank(down.to(dtype), down=True)
        out["lora_up"] = pack_lowrank(up.to(dtype), down=False)
    return out


def _export_w4a4(model: nn.Module, layout: Layout, pre: str, spec: W4A4, rank: int, dtype,
                 where) -> dict[str, torch.Tensor]:
    mods = [model.get_submodule(f"{pre}.{o}") for o in spec.ours]
    parts = [_our_w4a4(m) for m in mods]
    for key, what in (("smooth_inv", "smoothing"), ("down", "low-rank down projection")):
        if not _same([p[key] for p in parts]):
            raise CheckpointError(f"{where}: {', '.join(f'{pre}.{o}' for o in spec.ours)} do not share their {what}, "
                                  f"which Nunchaku's fused {spec.theirs[0].rpartition('.')[2]} needs: quantize with "
                                  f"svdquant's {layout.label} adapter")
    # the smoothing factor λ = 1 / smooth_inv, in the 16-bit dtype Nunchaku stores it in (rounded; see module doc)
    smooth = (1.0 / parts[0]["smooth_inv"].double()).to(dtype)
    codes = torch.cat([p["codes"] for p in parts])
    scales = torch.cat([p["scales"] for p in parts])
    bias = torch.cat([p["bias"] for p in parts])
    down = parts[0]["down"]
    up = torch.cat([p["up"] for p in parts]) if down is not None else None
    if len(spec.theirs) == 1:
        return {layout.w4a4(f"{pre}.{spec.theirs[0]}", k): v for k, v in
                _nunchaku_w4a4(codes, scales, bias, smooth, down, up, dtype).items()}
    ka = mods[0].act_unsigned_from  # proj_out -> out_proj (attention) | mlp_fc2 (GELU part)
    ga = ka // GROUP
    if down is None:
        downs, ups = (None, None), (None, None)
    elif down.shape[0] == rank:  # one branch: the same up for both parts
        downs, ups = (down[:, :ka], down[:, ka:]), (up, up)
    elif bool(down[:rank, ka:].any()) or bool(down[rank:, :ka].any()):
        raise CheckpointError(f"{where}: {pre}.proj_out has rank {down.shape[0]} without the block form of two "
                              f"rank-{rank} branches; Nunchaku loads one rank for all layers")
    else:  # two block-diagonal branches (as imported from a published file)
        downs, ups = (down[:rank, :ka], down[rank:, ka:]), (up[:, :rank], up[:, rank:])
    out = {}
    for t, cols, gcols, b, d, u in zip(spec.theirs, (slice(None, ka), slice(ka, None)), (slice(None, ga), slice(ga, None)),
                                       (bias, torch.zeros_like(bias)), downs, ups):
        out.update({layout.w4a4(f"{pre}.{t}", k): v for k, v in _nunchaku_w4a4(
            codes[:, cols], scales[:, gcols], b, smooth[cols], d, u, dtype).items()})
    return out


def _export_awq(model: nn.Module, pre: str, spec: AWQ, dtype) -> dict[str, torch.Tensor]:
    m = model.get_submodule(f"{pre}.{spec.ours}")
    q = m.weight_buffers()
    if m.weights == "int4":  # symmetric: code + 8 with the zero at -8 · scale (exact: a power of two)
        codes = (unpack_4bit_halves(q["qweight"], GROUP, signed=True).to(torch.int16) + 8).to(torch.uint8)
        scales, zeros = q["wscales"], (-8 * q["wscales"].float()).to(dtype)
    else:
        codes, scales, zeros = unpack_4bit_halves(q["qweight"], GROUP), q["wscales"], q["wzeros"]
    bias = (m.bias.float() if m.bias is not None else torch.zeros(m.out_features)).clone()
    d = bias.shape[0] // spec.chunks
    for c in scale_chunks(spec.chunks):
        bias[c * d:(c + 1) * d] += 1
    name = f"{pre}.{spec.theirs}"
    return {f"{name}.qweight": pack_awq(interleave_rows(codes, spec.chunks)),
            f"{name}.wscales": interleave_rows(scales.to(dtype), spec.chunks).t().contiguous(),
            f"{name}.wzeros": interleave_rows(zeros.to(dtype), spec.chunks).t().contiguous(),
            f"{name}.bias": interleave_rows(bias.to(dtype), spec.chunks)}


def nunchaku_tensors(model: nn.Module, where="the model") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of the Nunchaku file for ``model`` (checked first; CheckpointError with the fix)."""
    if peek(model).loras:
        raise CheckpointError(f"LoRAs are loaded ({', '.join(peek(model).loras)}); unload them "
                              "(svdquant.unload_lora) before converting")
    config = model_config_of(model)
    rank = check_exportable(quantized_layers(model), type(model).__name__, config, where)
    layout = LAYOUTS[type(model).__name__]
    layers = quantized_layers(model)
    dtype = getattr(torch, next(iter(layers.values()))["dtype"])
    out: dict[str, torch.Tensor] = {}
    covered = set()
    for stack in layout.stacks:
        for i in range(len(model.get_submodule(stack))):
            pre = f"{stack}.{i}"
            for spec in layout.plans[stack]:
                if isinstance(spec, AWQ):
                    out.update(_export_awq(model, pre, spec, dtype))
                    covered.add(f"{pre}.{spec.ours}.")
                else:
                    out.update(_export_w4a4(model, layout, pre, spec, rank, dtype, where))
                    covered.update(f"{pre}.{o}." for o in spec.ours)
            for theirs, ours in layout.kept[stack].items():
                out[f"{pre}.{theirs}"] = model.get_submodule(pre).get_parameter(ours).to(dtype)
                covered.add(f"{pre}.{ours}")
    blocks = tuple(s + "." for s in layout.stacks)
    for name, t in model.state_dict().items():
        if not name.startswith(blocks):
            # Nunchaku builds the model in one 16-bit dtype and requires every stored tensor to match it
            out[name] = t.to(dtype) if t.is_floating_point() else t
        elif not (name in covered or name.startswith(tuple(c for c in covered if c.endswith(".")))):
            raise CheckpointError(f"{where} holds {name}, which Nunchaku's {layout.label} blocks do not have")
    out = {k: v.detach().to("cpu").contiguous() for k, v in out.items()}
    qc = {"method": "svdquant", "weight": {"dtype": "int4", "scale_dtype": None, "group_size": GROUP},
          "activation": {"dtype": "int4", "scale_dtype": None, "group_size": GROUP}, "rank": rank}
    config = {"_class_name": layout.model_class, **{k: v for k, v in config.items() if k != "_class_name"}}
    # keys sorted: a model imported from this file lists its config in another order, and export -> import ->
    # export must give the same bytes
    meta = {"config": json.dumps(config, sort_keys=True), "model_class": layout.nunchaku_class,
            "quantization_config": json.dumps(qc, sort_keys=True)}
    return out, meta


_SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                       torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                       torch.uint8: "U8", torch.bool: "BOOL"}


def _save_safetensors(tensors: dict[str, torch.Tensor], path, metadata: dict[str, str]) -> None:
    """The safetensors format, written here rather than by ``safetensors.torch.save_file``, whose writer takes the
    metadata through a hash map and orders it differently on every run: the same model must give the same
    bytes. The layout is safetensors' own (8-byte header length, JSON header padded with spaces to a multiple
    of 8, the tensors' bytes back to back), tensors ordered as it orders them: largest element first, then by
    name."""
    names = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    header: dict[str, Any] = {"__metadata__": dict(sorted(metadata.items()))}
    offset = 0
    for k in names:
        t = tensors[k]
        size = t.numel() * t.element_size()
        header[k] = {"dtype": _SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for k in names:  # a uint8 view of the contiguous CPU tensor: its bytes as stored, any dtype
            f.write(tensors[k].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def check_output_file(path: str | os.PathLike, overwrite: bool, name: str = "path") -> Path:
    """Raise CheckpointError unless a Nunchaku ``.safetensors`` file can be written to ``path``."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{_checks.show(name, str(path))}: a Nunchaku checkpoint is one .safetensors file; "
                              "give a name ending in .safetensors")
    try:
        _checks.output_parent(name, path)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder; give a file name ending in .safetensors")
    if path.exists() and not overwrite:
        fix = "--overwrite" if name.startswith("-") else "overwrite=True"
        raise CheckpointError(f"{path} already exists; choose another name or pass {fix}")
    return path


def to_nunchaku(model: nn.Module | str | os.PathLike, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write a ``w4a4-float`` FLUX or Qwen-Image model (or checkpoint folder) as a Nunchaku single-file INT4
    checkpoint that Nunchaku's ``NunchakuFluxTransformer2dModel`` / ``NunchakuQwenImageTransformer2DModel``
    ``.from_pretrained`` loads. Written to a temporary file and renamed:
    a failure leaves no file (and an existing one untouched)."""
    path = check_output_file(path, overwrite)
    if not isinstance(model, nn.Module):
        meta = read_metadata(model)
        check_exportable(meta["layers"], meta["model_class"], meta["model_config"], model)
        model = load_quantized(model)
    tensors, meta = nunchaku_tensors(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    try:
        _save_safetensors(tensors, tmp, meta)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        fsync_file(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path

