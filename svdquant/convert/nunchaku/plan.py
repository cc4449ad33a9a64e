"""Importing, first step: a Nunchaku file's header (and a few small tensors) checked and worked out into the svdquant
model it amounts to (:func:`nunchaku_plan`), before any layer's data is read."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from ...checkpoint import (FORMAT_VERSION, CheckpointError, check_config, check_layer_counts, check_tensor_file,
                           json_object)
from ...recipes import POST_GELU_SHIFT, get_recipe
from .keymap import AWQ, FLUX, GROUP, KNOWN, LAYOUTS, QWENIMAGE, Layout
from .packing import deinterleave_rows, scale_chunks

_TORCH_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16}  # the 16-bit dtypes of Nunchaku's INT4 files


def _recipe(rank: int) -> dict[str, Any]:
    return get_recipe("w4a4-float", rank=rank).to_dict()


@dataclass
class PlannedLayer:
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
    layers: list[PlannedLayer]
    kept: dict[str, str]              # our kept tensor -> Nunchaku tensor
    meta: dict[str, Any]              # the svdquant metadata this import amounts to
    layout: Layout = FLUX


def bad_file(path: Path, what: str) -> CheckpointError:
    return CheckpointError(f"{path}: {what}")


def _metadata(path: Path, md: dict[str, str]) -> tuple[dict, dict]:
    if "svdquant" in md:
        raise bad_file(path, "is an svdquant checkpoint already, not a Nunchaku one; load it as it is")
    if "config" not in md:
        raise bad_file(path, "is not a Nunchaku checkpoint (its metadata has no 'config'); svdquant imports Nunchaku's "
                         "single-file checkpoints (python -m nunchaku.merge_safetensors makes one from a folder)")
    config = json_object(md["config"], f"{path}: the 'config' in its metadata")
    if not isinstance(config, dict):
        raise bad_file(path, "its 'config' metadata is not a JSON object; the file is corrupt")
    qc = {}
    if "quantization_config" in md:
        qc = json_object(md["quantization_config"], f"{path}: the 'quantization_config' in its metadata")
        if not isinstance(qc, dict):
            raise bad_file(path, "its 'quantization_config' metadata is not a JSON object; the file is corrupt")
        weight = qc.get("weight") if isinstance(qc.get("weight"), dict) else {}
        if weight.get("dtype", "int4") != "int4" or weight.get("group_size", GROUP) != GROUP:
            raise bad_file(path, f"holds {str(weight.get('dtype'))[:40]} weights (group "
                                 f"{str(weight.get('group_size'))[:10]}); svdquant imports Nunchaku's INT4 checkpoints (group 64) only, not NVFP4 ones")
    check_config(config, f"{path}: config")
    return config, qc


def _layout(path: Path, md: dict[str, str], config: dict, header: dict) -> Layout:
    """Which model the file holds: its metadata's ``model_class`` (what merge_safetensors records) and its config's
    ``_class_name``, which must agree where both are given. Nunchaku's loaders read neither (the class is the
    caller's choice), so where both are absent the tensors decide: Qwen-Image's image input is ``img_in``,
    FLUX's ``x_embedder``."""
    model_class = md.get("model_class")
    by_class = None
    if model_class is not None:
        by_class = next((lay for lay in LAYOUTS.values()
                         if model_class.startswith("Nunchaku") and lay.marker in model_class), None)
        if by_class is None:
            raise bad_file(path, f"is a {model_class[:80]} checkpoint; svdquant imports Nunchaku's {KNOWN} "
                                 "checkpoints only")
    if "_class_name" not in config:
        return by_class or (QWENIMAGE if "img_in.weight" in header else FLUX)
    name = config["_class_name"]
    by_config = LAYOUTS.get(name) if isinstance(name, str) else None
    if by_config is None:
        raise bad_file(path, f"its config describes a {str(name)[:80]}; svdquant imports Nunchaku's {KNOWN} "
                             "checkpoints only")
    if by_class is not None and by_class is not by_config:
        raise bad_file(path, f"its metadata names a {model_class[:80]} but its config a {name}; the file is corrupt")
    return by_config


def _model_16bit(layout: Layout, config: dict, path: Path) -> nn.Module:
    """The 16-bit model the config describes, on the meta device (sizes only)."""
    import diffusers

    try:
        with torch.device("meta"):
            return getattr(diffusers, layout.model_class).from_config(config)
    except Exception as e:
        raise bad_file(path, f"its config does not build a {layout.label} transformer ({type(e).__name__}: "
                             f"{str(e)[:200]})") from None


class _Header:
    """The header's entries, checked against what each layer needs before any tensor data is read."""

    def __init__(self, path: Path, header: dict):
        self.path, self.entries, self.used = path, header, set()

    def has(self, name: str) -> bool:
        return name in self.entries

    def shape(self, name: str) -> list[int]:
        if name not in self.entries:
            raise bad_file(self.path, f"lacks the tensor {name!r}; the checkpoint is incomplete")
        return self.entries[name]["shape"]

    def expect(self, name: str, dtype: str, shape, optional: bool = False) -> None:
        if name not in self.entries:
            if optional:
                return
            raise bad_file(self.path, f"lacks the tensor {name!r}; the checkpoint is incomplete")
        e = self.entries[name]
        if e["dtype"] != dtype or list(e["shape"]) != list(shape):
            raise bad_file(self.path, f"tensor {name!r} is {e['shape']} {e['dtype']}, a layer of this model needs "
                                  f"{list(shape)} {dtype}; the file is corrupt or of another model")
        self.used.add(name)


def _w4a4_entries(h: _Header, layout: Layout, name: str, n: int, k: int, dt: str) -> int:
    """Check one Nunchaku W4A4 layer's tensors; returns its rank."""
    if n % 128 or k % 128:
        raise bad_file(h.path, f"{name} would be {n} x {k}; Nunchaku's INT4 layers are multiples of 128 on both sides")
    down_name, up_name = layout.w4a4(name, "lora_down"), layout.w4a4(name, "lora_up")
    rank = 0
    if layout.strict or h.has(down_name) or h.has(up_name):
        down = h.shape(down_name)
        rank = down[1] if len(down) == 2 and isinstance(down[1], int) else -1
        if rank < 0 or rank % 16:
            raise bad_file(h.path, f"{down_name} is {down}: the low-rank branch is [in_features, rank], rank a "
                               "multiple of 16; the file is corrupt")
        h.expect(down_name, dt, [k, rank])
        h.expect(up_name, dt, [n, rank])
    h.expect(layout.w4a4(name, "qweight"), "I8", [n, k // 2])
    h.expect(layout.w4a4(name, "wscales"), dt, [k // GROUP, n])
    h.expect(layout.w4a4(name, "bias"), dt, [n])
    h.expect(layout.w4a4(name, "smooth"), dt, [k])
    h.expect(layout.w4a4(name, "smooth_orig"), dt, [k], optional=not layout.strict)
    return rank


def _awq_entries(h: _Header, name: str, n: int, k: int, dt: str) -> None:
    if n % 4 or k % GROUP:
        raise bad_file(h.path, f"{name} would be {n} x {k}; Nunchaku's AWQ layers need out % 4 == 0 and in % 64 == 0")
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


def _plan_blocks(h: _Header, layout: Layout, model: nn.Module, dts: str) -> tuple[list[PlannedLayer], dict[str, str]]:
    """Every block's quantized layers checked against the header and planned, and the blocks' 16-bit tensors."""
    layers: list[PlannedLayer] = []
    kept: dict[str, str] = {}
    for stack in layout.stacks:
        for i, block in enumerate(model.get_submodule(stack)):
            pre = f"{stack}.{i}"
            for spec in layout.plans[stack]:
                if isinstance(spec, AWQ):
                    lin = block.get_submodule(spec.ours)
                    _awq_entries(h, f"{pre}.{spec.theirs}", lin.out_features, lin.in_features, dts)
                    layers.append(PlannedLayer("awq", (f"{pre}.{spec.theirs}",), (f"{pre}.{spec.ours}",),
                                               (lin.out_features,), (lin.in_features,), chunks=spec.chunks))
                    continue
                lins = [block.get_submodule(o) for o in spec.ours]
                if len(spec.theirs) == 2:  # FLUX's single-block proj_out = [attention | GELU(mlp)]
                    gelu = block.proj_mlp.out_features
                    ks = (lins[0].in_features - gelu, gelu)
                else:
                    ks = (lins[0].in_features,)
                n = sum(m.out_features for m in lins)
                ranks = tuple(_w4a4_entries(h, layout, f"{pre}.{t}", n, k, dts) for t, k in zip(spec.theirs, ks))
                layers.append(PlannedLayer("w4a4", tuple(f"{pre}.{t}" for t in spec.theirs),
                                           tuple(f"{pre}.{o}" for o in spec.ours), tuple(m.out_features for m in lins),
                                           ks, ranks, spec.post_gelu))
            for theirs, ours in layout.kept[stack].items():
                kept[f"{pre}.{ours}"] = f"{pre}.{theirs}"
    return layers, kept


def nunchaku_plan(path: str | os.PathLike) -> NunchakuPlan:
    """Check a Nunchaku file and work out the svdquant model it amounts to, reading only its header and the
    small tensors that decide a layer's form (the single blocks' up projections, the AWQ scales and zeros).
    Every failure is a :class:`CheckpointError` naming the file and the damage."""
    path = Path(path)
    header = check_tensor_file(path)
    md = header.pop("__metadata__", {})
    config, _ = _metadata(path, md)
    layout = _layout(path, md, config, header)
    check_layer_counts({"model_config": config}, len(header), path)
    model = _model_16bit(layout, config, path)
    h = _Header(path, header)
    wscales = [k for k in header if k.endswith(".wscales") and header[k]["dtype"] in _TORCH_DTYPES]
    if not wscales:
        raise bad_file(path, "holds no 16-bit group scales; it is not a Nunchaku INT4 checkpoint (NVFP4 ones, with "
                         "FP8 scales, are not supported yet)")
    dts = header[wscales[0]]["dtype"]
    dtype = _TORCH_DTYPES[dts]
    layers, kept = _plan_blocks(h, layout, model, dts)
    sd = model.state_dict()
    for name in sd:
        if not name.startswith(tuple(s + "." for s in layout.stacks)):
            kept[name] = name
    for ours, theirs in kept.items():
        t = sd[ours]
        e = header.get(theirs)
        if e is None:
            raise bad_file(path, f"lacks the tensor {theirs!r}; the checkpoint is incomplete")
        if e["dtype"] not in ("BF16", "F16", "F32") or list(e["shape"]) != list(t.shape):
            raise bad_file(path, f"tensor {theirs!r} is {e['shape']} {e['dtype']}, the model needs {list(t.shape)} "
                             "floats; the file is corrupt or of another model")
        h.used.add(theirs)
    extra = sorted(set(header) - h.used)
    if extra:
        raise bad_file(path, f"holds {len(extra)} tensors a {layout.label} model does not use, e.g. {extra[:3]}; is it "
                         "a checkpoint of another model, or of a newer Nunchaku format?")
    _decide_forms(path, layout, layers, dtype)
    meta = {
        "format": "svdquant", "format_version": FORMAT_VERSION, "svdquant_version": "(imported from Nunchaku)",
        "model_class": layout.model_class, "model_config": config, "base": None, "base_is_local": False,
        "recipe": _recipe(max([r for lay in layers for r in lay.ranks] + [0])),
        "layers": {name: cfg for lay in layers for name, cfg in lay.configs.items()},
        "report": None, "source": "nunchaku",
    }
    return NunchakuPlan(path, header, config, dtype, layers, kept, meta, layout)


def tensor_reader(path: Path) -> Callable[[str], torch.Tensor]:
    from safetensors import safe_open

    def read(name: str) -> torch.Tensor:
        try:
            with safe_open(str(path), "pt", device="cpu") as f:
                return f.get_tensor(name).clone()  # an aligned copy of its own (see load_quantized)
        except Exception as e:  # changed under us since the header check
            raise bad_file(path, f"cannot be read ({str(e)[:200]}); the file is truncated or corrupt") from None
    return read


def _decide_forms(path: Path, layout: Layout, layers: list[PlannedLayer], dtype: torch.dtype) -> None:
    """The forms that depend on values, and every layer's config."""
    read = tensor_reader(path)
    for lay in layers:
        if lay.kind == "awq":
            scales, zeros = read(f"{lay.theirs[0]}.wscales"), read(f"{lay.theirs[0]}.wzeros")
            lay.form = "int4" if torch.equal((-8 * scales.float()).to(dtype), zeros) else "int4z"
            bias = awq_bias(read, lay)
            # stored − 1 is a 16-bit number only where the stored 1 + b lies in [0.5, 2]: elsewhere the bias is kept in
            # fp32, exact, so that the export (b + 1, rounded once) gives back the stored bits
            lay.configs = {lay.ours[0]: _layer_config(lay.ks[0], lay.outs[0], dtype, weights=lay.form,
                                                      activations=None,
                                                      fp32_bias=not torch.equal(bias.to(dtype).float(), bias))}
            continue
        shift = POST_GELU_SHIFT if lay.post_gelu else 0.0
        if len(lay.theirs) == 2:
            ups = [layout.w4a4(t, "lora_up") for t in lay.theirs]
            same = lay.ranks[0] == lay.ranks[1] and (lay.ranks[0] == 0 or torch.equal(read(ups[0]), read(ups[1])))
            lay.form = "shared" if same else "block"
            rank = lay.ranks[0] if same else sum(lay.ranks)
            lay.configs = {lay.ours[0]: _layer_config(sum(lay.ks), lay.outs[0], dtype, rank=rank, shift=shift,
                                                      unsigned_from=lay.ks[0])}
        else:
            lay.configs = {o: _layer_config(lay.ks[0], n, dtype, rank=lay.ranks[0], shift=shift)
                           for o, n in zip(lay.ours, lay.outs)}


def awq_bias(read, lay: PlannedLayer) -> torch.Tensor:
    """An AWQ layer's bias in our row order, fp32, with the 1 Nunchaku folds into the scale chunks taken out
    (exact: the difference of a 16-bit number and 1 is an fp32 number)."""
    bias = deinterleave_rows(read(f"{lay.theirs[0]}.bias"), lay.chunks).float()
    d = bias.shape[0] // lay.chunks
    for c in scale_chunks(lay.chunks):  # Nunchaku folds the 1 of (1 + scale) into the bias
        bias[c * d:(c + 1) * d] -= 1
    return bias


def nunchaku_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The svdquant metadata a Nunchaku file amounts to (what ``svdquant.read_metadata`` returns for one)."""
    return nunchaku_plan(path).meta
