"""Nunchaku's single-file INT4 FLUX checkpoints, in and out (issue 14, part 3).

    model = svdquant.load_quantized("svdq-int4_r32-flux.1-dev.safetensors")      # import on load
    svdquant.convert.to_nunchaku("flux-w4a4f", "flux-nunchaku.safetensors")      # a w4a4-float checkpoint out
    svdquant convert nunchaku FILE.safetensors -o DIR     /     svdquant convert DIR --to nunchaku -o FILE

The format (facts from the public nunchaku repository: the layer names of ``src/FluxModel.cpp``, which
``convert_flux_state_dict`` in ``nunchaku/models/transformers/transformer_flux_v2.py`` maps to diffusers';
the metadata of ``nunchaku/merge_safetensors.py``; and deepcompressor's ``backend/nunchaku/convert.py``,
which writes the published checkpoints; the code here is ours):

* one safetensors file; header metadata ``config`` (the diffusers FLUX config as JSON),
  ``quantization_config`` (``{"method": "svdquant", "weight": {"dtype": "int4", "group_size": 64}, ...,
  "rank": R}``) and ``model_class``; tensors outside the blocks under diffusers' names, 16-bit;
* W4A4 layers (``qweight``, ``wscales``, ``bias``, ``smooth``, ``smooth_orig``, ``lora_down``, ``lora_up``;
  tensor layouts in :mod:`.nunchaku_packing`) compute ``Q((x + shift) / smooth) · Q(R)ᵀ + (x · down) · upᵀ +
  bias``: the branch reads the raw input, ``smooth`` divides, and the post-GELU shift (0.171875, inputs of
  ``mlp_fc2`` only, unsigned codes) is compensated in the bias. That is :class:`~svdquant.SVDQLinear` with
  ``w4a4-float`` formats and ``smooth_inv = 1 / smooth``. ``smooth_orig`` is not read by the kernels
  (for ``out_proj`` deepcompressor fuses the smoothing into the value projection and stores ``smooth = 1``);
* double block: ``qkv_proj`` (to_q | to_k | to_v stacked along N: split into our three layers, each with
  the shared smoothing and down projection and its rows of up, exact), ``qkv_proj_context``, ``out_proj``,
  ``out_proj_context``, ``mlp_fc1`` / ``mlp_fc2``, ``mlp_context_fc1`` / ``mlp_context_fc2``, and the
  ``norm_q`` / ``norm_k`` / ``norm_added_q`` / ``norm_added_k`` RMSNorm weights;
* single block: ``qkv_proj``, ``mlp_fc1`` (= proj_mlp), and diffusers' ``proj_out`` split along K into
  ``out_proj`` (the attention part, signed) and ``mlp_fc2`` (the GELU part, shifted, unsigned), their
  outputs summed. Our ``proj_out`` is one layer over both parts with ``act_unsigned_from = dim``: codes,
  scales and smoothing concatenate along K exactly (the parts end on a group boundary) and the biases add;
  the two branches become one of rank ``R`` (both ``lora_up`` equal: the down projections concatenate, the
  form we export) or ``2R`` (block-diagonal down, the ups side by side: published files);
* the adaLN modulation linears (``norm1.linear``, ``norm1_context.linear``, single ``norm.linear``) are AWQ
  W4A16 (``qweight`` / ``wscales`` / ``wzeros`` / ``bias``), output rows interleaved by chunk and the ``+ 1``
  of each scale chunk folded into the bias. Imported as our ``int4z`` format (or ``int4`` when every zero is
  ``-8 · scale``, which is how we export symmetric layers), rows and bias restored.

Exactness. Import is exact: every stored value keeps its bits (smoothing becomes ``1 / smooth`` in fp32; an adaLN
layer whose scale biases, stored as ``1 + b``, lie outside [0.5, 2] somewhere keeps its bias in fp32, since
``stored − 1`` then needs more bits than 16: published files have 38–85 such values per tensor).
Export is exact except for two things the format cannot hold: it stores the smoothing factor in 16 bits
(ours is fp32: rounded, relative change ≤ 2⁻⁹ in bf16), and it folds ``+ 1`` into the scale chunks' 16-bit
biases (rounded). Both are then fixed points: a model imported from a Nunchaku file exports back to the
same tensors, and re-imports to an identical state dict. (One exception: a published single block's
``out_proj`` and ``mlp_fc2`` biases are held as their sum and written back on ``out_proj``, ``mlp_fc2``'s
zero; the outputs they add up to are the same.)
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from ..checkpoint import (FORMAT_VERSION, CheckpointError, _check_config, _check_layer_counts,
                          _check_values, _empty_quantized_model, _fsync, _json_object, _layers, _model_config,
                          _nonfinite, check_tensor_file)
from ..formats import pack_4bit_halves, unpack_4bit_halves
from ..integrations.diffusers import compat  # h-diffusers
from ..modules import SVDQLinear
from ..recipes import POST_GELU_SHIFT, get_recipe
from .nunchaku_packing import (deinterleave_rows, interleave_rows, pack_awq, pack_lanes, pack_lowrank, pack_qweight,
                               scale_chunks, unpack_awq, unpack_lanes, unpack_lowrank, unpack_qweight)

GROUP = 64
NUNCHAKU_CLASS = "NunchakuFluxTransformer2dModel"  # what merge_safetensors records for FLUX
MODEL_CLASS = "FluxTransformer2DModel"
STACKS = ("transformer_blocks", "single_transformer_blocks")
W4A4_TENSORS = ("qweight", "wscales", "bias", "smooth", "smooth_orig", "lora_down", "lora_up")
AWQ_TENSORS = ("qweight", "wscales", "wzeros", "bias")
_SAFETENSORS_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16"}
_TORCH_DTYPES = {v: k for k, v in _SAFETENSORS_DTYPES.items()}


@dataclass(frozen=True)
class _W4A4:
    """Nunchaku W4A4 layer(s) -> our layer(s): ``theirs`` concatenated along K (the single block's
    out_proj | mlp_fc2 -> proj_out), ``ours`` stacked along N (qkv_proj -> to_q, to_k, to_v)."""
    theirs: tuple[str, ...]
    ours: tuple[str, ...]
    post_gelu: bool = False  # the (last) Nunchaku layer reads a GELU output: shifted, unsigned


@dataclass(frozen=True)
class _AWQ:
    theirs: str
    ours: str
    chunks: int


_DOUBLE = (
    _W4A4(("qkv_proj",), ("attn.to_q", "attn.to_k", "attn.to_v")),
    _W4A4(("qkv_proj_context",), ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")),
    _W4A4(("out_proj",), ("attn.to_out.0",)),
    _W4A4(("out_proj_context",), ("attn.to_add_out",)),
    _W4A4(("mlp_fc1",), ("ff.net.0.proj",)),
    _W4A4(("mlp_fc2",), ("ff.net.2",), post_gelu=True),
    _W4A4(("mlp_context_fc1",), ("ff_context.net.0.proj",)),
    _W4A4(("mlp_context_fc2",), ("ff_context.net.2",), post_gelu=True),
    _AWQ("norm1.linear", "norm1.linear", 6),
    _AWQ("norm1_context.linear", "norm1_context.linear", 6),
)
_SINGLE = (
    _W4A4(("qkv_proj",), ("attn.to_q", "attn.to_k", "attn.to_v")),
    _W4A4(("mlp_fc1",), ("proj_mlp",)),
    _W4A4(("out_proj", "mlp_fc2"), ("proj_out",), post_gelu=True),
    _AWQ("norm.linear", "norm.linear", 3),
)
# 16-bit tensors inside the blocks: Nunchaku name -> ours
_KEPT = {
    "transformer_blocks": {"norm_q.weight": "attn.norm_q.weight", "norm_k.weight": "attn.norm_k.weight",
                           "norm_added_q.weight": "attn.norm_added_q.weight",
                           "norm_added_k.weight": "attn.norm_added_k.weight"},
    "single_transformer_blocks": {"norm_q.weight": "attn.norm_q.weight", "norm_k.weight": "attn.norm_k.weight"},
}
_PLANS = {"transformer_blocks": _DOUBLE, "single_transformer_blocks": _SINGLE}


def _recipe(rank: int) -> dict[str, Any]:
    return get_recipe("w4a4-float", rank=rank).to_dict()


# ------------------------------------------------------------------------------------------------ reading
def is_nunchaku_header(metadata: dict[str, str]) -> bool:
    """A safetensors ``__metadata__`` written by Nunchaku's tools (and not by svdquant)."""
    return "svdquant" not in metadata and ("quantization_config" in metadata or
                                          str(metadata.get("model_class", "")).startswith("Nunchaku"))


@dataclass
class _Layer:
    """One entry of the import plan: which Nunchaku tensors make which of our layers, and how."""
    kind: str                         # "w4a4" or "awq"
    theirs: tuple[str, ...]           # full Nunchaku layer names
    ours: tuple[str, ...]             # full names of our layers
    outs: tuple[int, ...]             # our layers' out_features (split of N)
    ks: tuple[int, ...]               # the Nunchaku layers' in_features (split of K)
    ranks: tuple[int, ...] = ()
    post_gelu: bool = False
    chunks: int = 0
    form: str = ""                    # proj_out: "shared" or "block"; awq: "int4" or "int4z"
    configs: dict[str, dict] = field(default_factory=dict)


@dataclass
class NunchakuPlan:
    """What a Nunchaku file holds and how it becomes an svdquant model (header and a few small tensors read)."""
    path: Path
    header: dict[str, Any]
    config: dict[str, Any]
    dtype: torch.dtype
    layers: list[_Layer]
    kept: dict[str, str]              # our kept tensor -> Nunchaku tensor
    meta: dict[str, Any]              # the svdquant metadata this import amounts to


def _bad(path: Path, what: str) -> CheckpointError:
    return CheckpointError(f"{path}: {what}")


def _metadata(path: Path, md: dict[str, str]) -> tuple[dict, dict]:
    if "svdquant" in md:
        raise _bad(path, "is an svdquant checkpoint already, not a Nunchaku one; load it as it is")
    if "config" not in md:
        raise _bad(path, "is not a Nunchaku checkpoint (its metadata has no 'config'); svdquant imports Nunchaku's "
                         "single-file checkpoints (python -m nunchaku.merge_safetensors makes one from a folder)")
    config = _json_object(md["config"], f"{path}: the 'config' in its metadata")
    if not isinstance(config, dict):
        raise _bad(path, "its 'config' metadata is not a JSON object; the file is corrupt")
    model_class = md.get("model_class")
    if model_class is not None and not (model_class.startswith("Nunchaku") and "Flux" in model_class):
        raise _bad(path, f"is a {model_class[:80]} checkpoint; svdquant converts Nunchaku's FLUX checkpoints "
                         f"({NUNCHAKU_CLASS}) only")
    if config.get("_class_name", MODEL_CLASS) != MODEL_CLASS:
        raise _bad(path, f"its config describes a {str(config['_class_name'])[:80]}; svdquant converts Nunchaku's "
                         "FLUX checkpoints only")
    qc = {}
    if "quantization_config" in md:
        qc = _json_object(md["quantization_config"], f"{path}: the 'quantization_config' in its metadata")
        if not isinstance(qc, dict):
            raise _bad(path, "its 'quantization_config' metadata is not a JSON object; the file is corrupt")
        weight = qc.get("weight") if isinstance(qc.get("weight"), dict) else {}
        if weight.get("dtype", "int4") != "int4" or weight.get("group_size", GROUP) != GROUP:
            raise _bad(path, f"holds {str(weight.get('dtype'))[:40]} weights (group {str(weight.get('group_size'))[:10]}); "
                             "svdquant imports Nunchaku's INT4 checkpoints (group 64) only, not NVFP4 ones")
    _check_config(config, f"{path}: config")
    return config, qc


def _flux_16bit(config: dict, path: Path) -> nn.Module:
    """The 16-bit model the config describes, on the meta device (sizes only)."""
    from diffusers import FluxTransformer2DModel

    try:
        with torch.device("meta"):
            return FluxTransformer2DModel.from_config(config)
    except Exception as e:
        raise _bad(path, f"its config does not build a FLUX transformer ({type(e).__name__}: {str(e)[:200]})") from None


class _Header:
    """The header's entries, checked against what each layer needs before any tensor data is read."""

    def __init__(self, path: Path, header: dict):
        self.path, self.entries, self.used = path, header, set()

    def has(self, name: str) -> bool:
        return name in self.entries

    def shape(self, name: str) -> list[int]:
        if name not in self.entries:
            raise _bad(self.path, f"lacks the tensor {name!r}; the checkpoint is incomplete")
        return self.entries[name]["shape"]

    def expect(self, name: str, dtype: str, shape, optional: bool = False) -> None:
        if name not in self.entries:
            if optional:
                return
            raise _bad(self.path, f"lacks the tensor {name!r}; the checkpoint is incomplete")
        e = self.entries[name]
        if e["dtype"] != dtype or list(e["shape"]) != list(shape):
            raise _bad(self.path, f"tensor {name!r} is {e['shape']} {e['dtype']}, a layer of this model needs "
                                  f"{list(shape)} {dtype}; the file is corrupt or of another model")
        self.used.add(name)


def _w4a4_entries(h: _Header, name: str, n: int, k: int, dt: str) -> int:
    """Check one Nunchaku W4A4 layer's tensors; returns its rank."""
    if n % 128 or k % 128:
        raise _bad(h.path, f"{name} would be {n} x {k}; Nunchaku's INT4 layers are multiples of 128 on both sides")
    has_down, has_up = h.has(f"{name}.lora_down"), h.has(f"{name}.lora_up")
    rank = 0
    if has_down or has_up:
        down = h.shape(f"{name}.lora_down")
        rank = down[1] if len(down) == 2 and isinstance(down[1], int) else -1
        if rank < 0 or rank % 16:
            raise _bad(h.path, f"{name}.lora_down is {down}: the low-rank branch is [in_features, rank], rank a "
                               "multiple of 16; the file is corrupt")
        h.expect(f"{name}.lora_down", dt, [k, rank])
        h.expect(f"{name}.lora_up", dt, [n, rank])
    h.expect(f"{name}.qweight", "I8", [n, k // 2])
    h.expect(f"{name}.wscales", dt, [k // GROUP, n])
    h.expect(f"{name}.bias", dt, [n])
    h.expect(f"{name}.smooth", dt, [k])
    h.expect(f"{name}.smooth_orig", dt, [k], optional=True)
    return rank


def _awq_entries(h: _Header, name: str, n: int, k: int, dt: str) -> None:
    if n % 4 or k % GROUP:
        raise _bad(h.path, f"{name} would be {n} x {k}; Nunchaku's AWQ layers need out % 4 == 0 and in % 64 == 0")
    h.expect(f"{name}.qweight", "I32", [n // 4, k // 2])
    h.expect(f"{name}.wscales", dt, [k // GROUP, n])
    h.expect(f"{name}.wzeros", dt, [k // GROUP, n])
    h.expect(f"{name}.bias", dt, [n])


def _layer_config(k: int, n: int, dt: torch.dtype, *, weights="int4", activations="int4", rank=0, shift=0.0,
                  unsigned_from=0, fp32_bias=False) -> dict[str, Any]:
    return {"type": "linear", "in_features": k, "out_features": n, "bias": True, "weights": weights,
            "activations": activations, "group_size": GROUP, "rank": rank, "act_shift": shift,
            "act_unsigned_from": unsigned_from, "dtype": str(dt).removeprefix("torch."),
            **({"bias_dtype": "float32"} if fp32_bias else {})}


def nunchaku_plan(path: str | os.PathLike) -> NunchakuPlan:
    """Check a Nunchaku file and work out the svdquant model it amounts to, reading only its header and the
    small tensors that decide a layer's form (the single blocks' up projections, the AWQ scales and zeros).
    Every failure is a :class:`CheckpointError` naming the file and the damage."""
    path = Path(path)
    header = check_tensor_file(path)
    md = header.pop("__metadata__", {})
    config, _ = _metadata(path, md)
    _check_layer_counts({"model_config": config}, len(header), path)
    model = _flux_16bit(config, path)
    h = _Header(path, header)
    wscales = [k for k in header if k.endswith(".wscales") and header[k]["dtype"] in _TORCH_DTYPES]
    if not wscales:
        raise _bad(path, "holds no 16-bit group scales; it is not a Nunchaku INT4 checkpoint (NVFP4 ones, with "
                         "FP8 scales, are not supported yet)")
    dts = header[wscales[0]]["dtype"]
    dtype = _TORCH_DTYPES[dts]
    layers: list[_Layer] = []
    kept: dict[str, str] = {}
    for stack in STACKS:
        for i, block in enumerate(model.get_submodule(stack)):
            pre = f"{stack}.{i}"
            for spec in _PLANS[stack]:
                if isinstance(spec, _AWQ):
                    lin = block.get_submodule(spec.ours)
                    _awq_entries(h, f"{pre}.{spec.theirs}", lin.out_features, lin.in_features, dts)
                    layers.append(_Layer("awq", (f"{pre}.{spec.theirs}",), (f"{pre}.{spec.ours}",),
                                         (lin.out_features,), (lin.in_features,), chunks=spec.chunks))
                    continue
                lins = [block.get_submodule(o) for o in spec.ours]
                if len(spec.theirs) == 2:  # proj_out = [attention | GELU(mlp)]
                    gelu = block.proj_mlp.out_features
                    ks = (lins[0].in_features - gelu, gelu)
                else:
                    ks = (lins[0].in_features,)
                n = sum(m.out_features for m in lins)
                ranks = tuple(_w4a4_entries(h, f"{pre}.{t}", n, k, dts) for t, k in zip(spec.theirs, ks))
                layers.append(_Layer("w4a4", tuple(f"{pre}.{t}" for t in spec.theirs),
                                     tuple(f"{pre}.{o}" for o in spec.ours), tuple(m.out_features for m in lins),
                                     ks, ranks, spec.post_gelu))
            for theirs, ours in _KEPT[stack].items():
                kept[f"{pre}.{ours}"] = f"{pre}.{theirs}"
    sd = model.state_dict()
    for name in sd:
        if not name.startswith(tuple(s + "." for s in STACKS)):
            kept[name] = name
    for ours, theirs in kept.items():
        t = sd[ours]
        e = header.get(theirs)
        if e is None:
            raise _bad(path, f"lacks the tensor {theirs!r}; the checkpoint is incomplete")
        if e["dtype"] not in ("BF16", "F16", "F32") or list(e["shape"]) != list(t.shape):
            raise _bad(path, f"tensor {theirs!r} is {e['shape']} {e['dtype']}, the model needs {list(t.shape)} "
                             "floats; the file is corrupt or of another model")
        h.used.add(theirs)
    extra = sorted(set(header) - h.used)
    if extra:
        raise _bad(path, f"holds {len(extra)} tensors a FLUX model does not use, e.g. {extra[:3]}; is it a "
                         "checkpoint of another model, or of a newer Nunchaku format?")
    _decide_forms(path, layers, dtype)
    meta = {
        "format": "svdquant", "format_version": FORMAT_VERSION, "svdquant_version": "(imported from Nunchaku)",
        "model_class": MODEL_CLASS, "model_config": config, "base": None, "base_is_local": False,
        "recipe": _recipe(max([r for lay in layers for r in lay.ranks] + [0])),
        "layers": {name: cfg for lay in layers for name, cfg in lay.configs.items()},
        "report": None, "source": "nunchaku",
    }
    return NunchakuPlan(path, header, config, dtype, layers, kept, meta)


def _read(path: Path) -> Callable[[str], torch.Tensor]:
    from safetensors import safe_open

    def read(name: str) -> torch.Tensor:
        try:
            with safe_open(str(path), "pt", device="cpu") as f:
                return f.get_tensor(name).clone()  # an aligned copy of its own (see load_quantized)
        except Exception as e:  # changed under us since the header check
            raise _bad(path, f"cannot be read ({str(e)[:200]}); the file is truncated or corrupt") from None
    return read


def _decide_forms(path: Path, layers: list[_Layer], dtype: torch.dtype) -> None:
    """The forms that depend on values, and every layer's config."""
    read = _read(path)
    for lay in layers:
        if lay.kind == "awq":
            scales, zeros = read(f"{lay.theirs[0]}.wscales"), read(f"{lay.theirs[0]}.wzeros")
            lay.form = "int4" if torch.equal((-8 * scales.float()).to(dtype), zeros) else "int4z"
            bias = _awq_bias(read, lay)
            # stored − 1 is a 16-bit number only where the stored 1 + b lies in [0.5, 2]: elsewhere the bias is kept in
            # fp32, exact, so that the export (b + 1, rounded once) gives back the stored bits
            lay.configs = {lay.ours[0]: _layer_config(lay.ks[0], lay.outs[0], dtype, weights=lay.form,
                                                      activations=None,
                                                      fp32_bias=not torch.equal(bias.to(dtype).float(), bias))}
            continue
        shift = POST_GELU_SHIFT if lay.post_gelu else 0.0
        if len(lay.theirs) == 2:
            same = lay.ranks[0] == lay.ranks[1] and (
                lay.ranks[0] == 0 or torch.equal(read(f"{lay.theirs[0]}.lora_up"), read(f"{lay.theirs[1]}.lora_up")))
            lay.form = "shared" if same else "block"
            rank = lay.ranks[0] if same else sum(lay.ranks)
            lay.configs = {lay.ours[0]: _layer_config(sum(lay.ks), lay.outs[0], dtype, rank=rank, shift=shift,
                                                      unsigned_from=lay.ks[0])}
        else:
            lay.configs = {o: _layer_config(lay.ks[0], n, dtype, rank=lay.ranks[0], shift=shift)
                           for o, n in zip(lay.ours, lay.outs)}


def _w4a4_tensors(read, name: str, rank: int) -> dict[str, torch.Tensor]:
    """One Nunchaku W4A4 layer in plain order: codes [N, K], scales [N, G], bias [N], smooth [K], down [R, K], up."""
    out = {"codes": unpack_qweight(read(f"{name}.qweight")), "scales": unpack_lanes(read(f"{name}.wscales")),
           "bias": unpack_lanes(read(f"{name}.bias")), "smooth": unpack_lanes(read(f"{name}.smooth"))}
    if rank:
        out["down"] = unpack_lowrank(read(f"{name}.lora_down"), down=True)
        out["up"] = unpack_lowrank(read(f"{name}.lora_up"), down=False)
    return out


def _fill_w4a4(path: Path, read, lay: _Layer, plan_header: dict) -> dict[str, torch.Tensor]:
    parts = [_w4a4_tensors(read, t, r) for t, r in zip(lay.theirs, lay.ranks)]
    for t, p in zip(lay.theirs, parts):
        bad = _nonfinite(p["smooth"]) or int((p["smooth"] == 0).sum())
        if bad:
            raise _bad(path, f"{t}.smooth holds {bad} zero or non-finite smoothing factors; the file is corrupt")
        # smooth_orig is never read by the kernels (module doc), but NaN / Inf there is a damaged file all the same
        if t + ".smooth_orig" in plan_header and _nonfinite(read(f"{t}.smooth_orig")):
            raise _bad(path, f"{t}.smooth_orig holds NaN / Inf values; the file is corrupt")
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


def _awq_bias(read, lay: _Layer) -> torch.Tensor:
    """An AWQ layer's bias in our row order, fp32, with the 1 Nunchaku folds into the scale chunks taken out
    (exact: the difference of a 16-bit number and 1 is an fp32 number)."""
    bias = deinterleave_rows(read(f"{lay.theirs[0]}.bias"), lay.chunks).float()
    d = bias.shape[0] // lay.chunks
    for c in scale_chunks(lay.chunks):  # Nunchaku folds the 1 of (1 + scale) into the bias
        bias[c * d:(c + 1) * d] -= 1
    return bias


def _fill_awq(read, lay: _Layer, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    name, ours, chunks = lay.theirs[0], lay.ours[0], lay.chunks
    codes = deinterleave_rows(unpack_awq(read(f"{name}.qweight")), chunks)
    scales = deinterleave_rows(read(f"{name}.wscales").t(), chunks).contiguous()
    zeros = deinterleave_rows(read(f"{name}.wzeros").t(), chunks).contiguous()
    fp32 = "bias_dtype" in lay.configs[ours]
    out = {f"{ours}.wscales": scales, f"{ours}.bias": _awq_bias(read, lay).to(torch.float32 if fp32 else dtype)}
    if lay.form == "int4":
        out[f"{ours}.qweight"] = pack_4bit_halves(codes.to(torch.int8) - 8, GROUP)
    else:
        out[f"{ours}.qweight"] = pack_4bit_halves(codes, GROUP)
        out[f"{ours}.wzeros"] = zeros
    return out


def from_nunchaku(path: str | os.PathLike, device: str | torch.device = "cpu", *,
                  weight_mode: str = "auto") -> nn.Module:
    """A Nunchaku single-file INT4 FLUX checkpoint as an svdquant-quantized ``FluxTransformer2DModel`` (W4A4 layers
    in ``w4a4-float`` formats, adaLN layers ``int4z`` / ``int4`` weight-only). Checked as hostile input: every
    failure is a :class:`CheckpointError`. :func:`svdquant.load_quantized` calls this for Nunchaku files."""
    from .. import _checks
    from ..modules.linear import WEIGHT_MODES

    if weight_mode not in WEIGHT_MODES:
        raise ValueError(f"weight_mode={weight_mode!r} is unknown; choose one of {WEIGHT_MODES}")
    device = _checks.device("device", device)
    plan = nunchaku_plan(path)
    model = _empty_quantized_model(plan.meta, plan.path, weight_mode)
    read = _read(plan.path)
    tensors: dict[str, torch.Tensor] = {}
    for lay in plan.layers:
        tensors.update(_fill_w4a4(plan.path, read, lay, plan.header) if lay.kind == "w4a4" else _fill_awq(read, lay, plan.dtype))
    for ours, theirs in plan.kept.items():
        tensors[ours] = read(theirs)
    quantized = {k for k in tensors if k.rpartition(".")[0] in plan.meta["layers"]}
    expected = dict(model.state_dict(keep_vars=True))
    if set(expected) != set(tensors):  # the plan and the model disagree: a gap in this converter, not the file
        raise _bad(plan.path, f"does not map onto {MODEL_CLASS} (missing {sorted(set(expected) - set(tensors))[:3]}, "
                              f"extra {sorted(set(tensors) - set(expected))[:3]})")
    _check_values(model, tensors, quantized, plan.path)
    model.load_state_dict(tensors, strict=True, assign=True)
    model._svdquant_recipe = plan.meta["recipe"]
    model._svdquant_source = "nunchaku"  # saved with it: a later load skips the checks of svdquant's own quantizer
    model.eval()
    compat.quantized(model)  # h-diffusers: save_pretrained writes its quantization_config
    return model.to(device) if str(device) != "cpu" else model


def nunchaku_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The svdquant metadata a Nunchaku file amounts to (what ``svdquant.read_metadata`` returns for one)."""
    return nunchaku_plan(path).meta


# ------------------------------------------------------------------------------------------------ writing
def _is_w4a4_float(cfg: dict) -> bool:
    return cfg.get("weights") == "int4" and cfg.get("activations") == "int4" and cfg.get("group_size") == GROUP


def check_exportable(layers: dict[str, dict], model_class: str, model_config: dict, where) -> int:
    """Whether a checkpoint with these layers (``svdquant.json``'s ``layers``) can be written as a Nunchaku file,
    from its metadata alone; returns the branch rank. Raises :class:`CheckpointError` naming every obstacle at
    once, with the one re-quantization that removes them all: a user once re-quantized for ``--dtype bf16``
    (134 s) only to be told then about ``--recipe w4a4-float``."""
    if model_class != MODEL_CLASS:
        raise CheckpointError(f"{where} quantizes a {model_class}; Nunchaku's single-file format holds FLUX "
                              f"({MODEL_CLASS}) models only")
    found = _Obstacles()
    dtypes = set()
    for stack, key in zip(STACKS, ("num_layers", "num_single_layers")):
        for i in range(int(model_config.get(key, 0))):
            pre = f"{stack}.{i}"
            for spec in _PLANS[stack]:
                names = (spec.ours,) if isinstance(spec, _AWQ) else spec.ours
                for o in names:
                    name = f"{pre}.{o}"
                    cfg = layers.get(name)
                    if cfg is None:
                        found.add("16-bit", f"{where} keeps {name} 16-bit; Nunchaku's FLUX quantizes every block "
                                  "linear", "quantize with svdquant's FLUX adapter (no --include/--exclude)")
                        continue
                    if cfg.get("dtype") not in ("bfloat16", "float16"):
                        found.add("dtype", f"{where} is in {cfg.get('dtype')}; Nunchaku runs bf16 or fp16 models",
                                  "quantize the model in bfloat16 (--dtype bf16)", "--dtype bf16")
                    else:
                        dtypes.add(cfg["dtype"])
                    if isinstance(spec, _AWQ):
                        if cfg.get("weights") not in ("int4", "int4z") or cfg.get("activations") is not None \
                                or cfg.get("rank", 0) or cfg.get("group_size") != GROUP:
                            found.add("recipe", f"{where}: {name} is W{cfg.get('weights')}A"
                                      f"{cfg.get('activations') or 16} rank {cfg.get('rank')}; Nunchaku's adaLN layers "
                                      "are INT4 W4A16, group 64, no branch", "quantize with --recipe w4a4-float",
                                      "--recipe w4a4-float")
                        continue
                    if not _is_w4a4_float(cfg):
                        found.add("recipe", f"{where}: {name} is W{cfg.get('weights')}A{cfg.get('activations') or 16} "
                                  f"(group {cfg.get('group_size')}); Nunchaku runs the paper's INT4 W4A4 with 16-bit "
                                  "group scales (group 64) only, and two-level scales are not exactly 16-bit",
                                  "re-quantize with --recipe w4a4-float", "--recipe w4a4-float")
                    k, n = cfg["in_features"], cfg["out_features"]
                    if k % 128 or n % 128:
                        found.add("size", f"{where}: {name} is {n} x {k}; Nunchaku's kernels need both sides to be "
                                  "multiples of 128", None)
                    if cfg.get("rank", 0) % 16:
                        found.add("rank", f"{where}: {name} has rank {cfg.get('rank')}; Nunchaku's branch rank is a "
                                  "multiple of 16", "re-quantize with --rank 32", "--rank 32")
                    want_shift = POST_GELU_SHIFT if spec.post_gelu else 0.0
                    want_from = (cfg["in_features"] - _mlp_width(model_config)) if len(spec.theirs) == 2 else 0
                    if _is_w4a4_float(cfg) and (cfg.get("act_shift", 0.0) != want_shift
                                                or cfg.get("act_unsigned_from", 0) != want_from):
                        found.add("shift", f"{where}: {name} shifts its inputs by {cfg.get('act_shift')} from "
                                  f"channel {cfg.get('act_unsigned_from')}; Nunchaku shifts exactly the post-GELU "
                                  f"inputs by {POST_GELU_SHIFT}", "re-quantize with svdquant's FLUX adapter")
    if len(dtypes) > 1:
        found.add("dtype", f"{where} mixes {sorted(dtypes)} layers; a Nunchaku file has one 16-bit dtype",
                  "quantize the model in bfloat16 (--dtype bf16)", "--dtype bf16")
    rank = _uniform_rank(layers, where, found)
    found.raise_if_any(where)
    return rank


class _Obstacles:
    """What stands between a checkpoint and a Nunchaku file: the first case of each kind (with how many more),
    and the fix, reported together by :meth:`raise_if_any`."""

    def __init__(self):
        self.kinds: dict[str, list] = {}  # kind -> [text, fix, option, count]

    def add(self, kind: str, text: str, fix: str | None, option: str | None = None) -> None:
        if kind in self.kinds:
            self.kinds[kind][3] += 1
        else:
            self.kinds[kind] = [text, fix, option, 1]

    def raise_if_any(self, where) -> None:
        if not self.kinds:
            return
        parts = [text + (f" ({count - 1} more like it)" if count > 1 else "")
                 for text, _, _, count in self.kinds.values()]
        if len(parts) == 1:
            (text, fix, _, _), = self.kinds.values()
            raise CheckpointError(parts[0] + (f": {fix}" if fix else ""))
        options = list(dict.fromkeys(o for _, _, o, _ in self.kinds.values() if o))
        others = list(dict.fromkeys(f for _, f, o, _ in self.kinds.values() if f and not o))
        fixes = ([f"re-quantize once with {' '.join(options)}"] if options else []) + others
        if any(f is None for _, f, _, _ in self.kinds.values()):
            fixes.append("a model whose layer sizes are multiples of 128")
        listed = "; ".join(f"({i}) {p}" for i, p in enumerate(parts, 1))
        raise CheckpointError(f"{where} cannot be written as a Nunchaku file, for {len(parts)} reasons: {listed}. "
                              f"Fix them all at once: {'; '.join(fixes)}")


def _mlp_width(model_config: dict) -> int:
    """The single block's GELU part of proj_out: 4 · dim (FLUX's mlp_ratio)."""
    return 4 * int(model_config.get("num_attention_heads", 24)) * int(model_config.get("attention_head_dim", 128))


def _uniform_rank(layers: dict[str, dict], where, found: _Obstacles) -> int:
    """Nunchaku's loader gives every W4A4 layer the rank in quantization_config; a proj_out imported from a
    published file has twice that (two block-diagonal branches)."""
    plain = {cfg.get("rank", 0) for name, cfg in layers.items()
             if _is_w4a4_float(cfg) and not name.endswith(".proj_out")}
    if len(plain) > 1:
        found.add("ranks", f"{where} mixes branch ranks {sorted(plain)}; Nunchaku loads one rank for all layers",
                  "re-quantize with one --rank", "--rank 32")
        return 0
    rank = plain.pop() if plain else 0
    for name, cfg in layers.items():
        if name.endswith(".proj_out") and _is_w4a4_float(cfg) and cfg.get("rank", 0) not in (rank, 2 * rank):
            found.add("ranks", f"{where}: {name} has rank {cfg.get('rank')}, the other layers {rank}; Nunchaku "
                      "loads one rank for all layers", "re-quantize with one --rank", "--rank 32")
    return rank


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


def _export_w4a4(model: nn.Module, pre: str, spec: _W4A4, rank: int, dtype, where) -> dict[str, torch.Tensor]:
    mods = [model.get_submodule(f"{pre}.{o}") for o in spec.ours]
    parts = [_our_w4a4(m) for m in mods]
    for key, what in (("smooth_inv", "smoothing"), ("down", "low-rank down projection")):
        if not _same([p[key] for p in parts]):
            raise CheckpointError(f"{where}: {', '.join(f'{pre}.{o}' for o in spec.ours)} do not share their {what}, "
                                  "which Nunchaku's fused qkv_proj needs: quantize with svdquant's FLUX adapter")
    # the smoothing factor λ = 1 / smooth_inv, in the 16-bit dtype Nunchaku stores it in (rounded; see module doc)
    smooth = (1.0 / parts[0]["smooth_inv"].double()).to(dtype)
    codes = torch.cat([p["codes"] for p in parts])
    scales = torch.cat([p["scales"] for p in parts])
    bias = torch.cat([p["bias"] for p in parts])
    down = parts[0]["down"]
    up = torch.cat([p["up"] for p in parts]) if down is not None else None
    if len(spec.theirs) == 1:
        return {f"{pre}.{spec.theirs[0]}.{k}": v for k, v in
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
        out.update({f"{pre}.{t}.{k}": v for k, v in _nunchaku_w4a4(
            codes[:, cols], scales[:, gcols], b, smooth[cols], d, u, dtype).items()})
    return out


def _export_awq(model: nn.Module, pre: str, spec: _AWQ, dtype) -> dict[str, torch.Tensor]:
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
    if getattr(model, "_svdquant_loras", None):
        raise CheckpointError(f"LoRAs are loaded ({', '.join(model._svdquant_loras)}); unload them "
                              "(svdquant.unload_lora) before converting")
    config = _model_config(model)
    rank = check_exportable(_layers(model), type(model).__name__, config, where)
    layers = _layers(model)
    dtype = getattr(torch, next(iter(layers.values()))["dtype"])
    out: dict[str, torch.Tensor] = {}
    covered = set()
    for stack in STACKS:
        for i in range(len(model.get_submodule(stack))):
            pre = f"{stack}.{i}"
            for spec in _PLANS[stack]:
                if isinstance(spec, _AWQ):
                    out.update(_export_awq(model, pre, spec, dtype))
                    covered.add(f"{pre}.{spec.ours}.")
                else:
                    out.update(_export_w4a4(model, pre, spec, rank, dtype, where))
                    covered.update(f"{pre}.{o}." for o in spec.ours)
            for theirs, ours in _KEPT[stack].items():
                out[f"{pre}.{theirs}"] = model.get_submodule(pre).get_parameter(ours).to(dtype)
                covered.add(f"{pre}.{ours}")
    blocks = tuple(s + "." for s in STACKS)
    for name, t in model.state_dict().items():
        if not name.startswith(blocks):
            # Nunchaku builds the model in one 16-bit dtype and requires every stored tensor to match it
            out[name] = t.to(dtype) if t.is_floating_point() else t
        elif not (name in covered or name.startswith(tuple(c for c in covered if c.endswith(".")))):
            raise CheckpointError(f"{where} holds {name}, which Nunchaku's FLUX blocks do not have")
    out = {k: v.detach().to("cpu").contiguous() for k, v in out.items()}
    qc = {"method": "svdquant", "weight": {"dtype": "int4", "scale_dtype": None, "group_size": GROUP},
          "activation": {"dtype": "int4", "scale_dtype": None, "group_size": GROUP}, "rank": rank}
    config = {"_class_name": MODEL_CLASS, **{k: v for k, v in config.items() if k != "_class_name"}}
    # keys sorted: a model imported from this file lists its config in another order, and export -> import ->
    # export must give the same bytes
    meta = {"config": json.dumps(config, sort_keys=True), "model_class": NUNCHAKU_CLASS,
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
    from .. import _checks

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
    """Write a ``w4a4-float`` FLUX model (or checkpoint folder) as a Nunchaku single-file INT4 checkpoint that
    Nunchaku's ``NunchakuFluxTransformer2dModel.from_pretrained`` loads. Written to a temporary file and renamed:
    a failure leaves no file (and an existing one untouched)."""
    path = check_output_file(path, overwrite)
    if not isinstance(model, nn.Module):
        from ..checkpoint import load_quantized, read_metadata

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
        _fsync(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


__all__ = ["from_nunchaku", "to_nunchaku", "nunchaku_plan", "nunchaku_metadata", "nunchaku_tensors",
           "check_exportable", "check_output_file", "is_nunchaku_header", "NunchakuPlan"]
