"""Checkpoints: a folder with ``svdquant.json`` (metadata) and ``transformer.safetensors``.

    svdquant.save_quantized(pipe.transformer, "flux-int4", base="black-forest-labs/FLUX.1-dev")
    svdquant.save_quantized(pipe, "flux-int4", base=...)   # + the 4-bit text encoders, if quantized
    transformer = svdquant.load_quantized("flux-int4", device="cuda")
    pipe = svdquant.load_pipeline("black-forest-labs/FLUX.1-dev", "flux-int4")

``svdquant.json`` holds the format version, the recipe, the model class and config,
the base pipeline it was made from and every quantized layer's layout; the same JSON is
copied into the safetensors header, so the tensor file alone still says what it is.
The safetensors file holds the whole transformer: packed 4-bit layers and the 16-bit
layers that were kept. Loading builds the model on the meta device, swaps in empty
quantized layers and assigns the stored tensors, so the 16-bit weights of quantized
layers are never materialized. safetensors only: nothing is unpickled.

Quantized text encoders (``svdquant.quantize(pipe, ..., text_encoders=True)``) are stored the same
way, whole, one file each (``text_encoder_2.safetensors``...), under ``text_encoders`` in the
metadata: their transformers class and config, quantized layers and tied weights (T5's token
embedding is one tensor under two names, stored once). ``load_pipeline`` builds them on meta and
hands them to the base pipeline, so the base's 16-bit encoders are never read.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from . import _checks
from .integrations.diffusers import compat  # h-diffusers
from .modules import SVDQConv1x1, SVDQLinear

FORMAT_VERSION = 4
# Version 2 added the two-level ``int4m`` layers (a ``wmult`` buffer); version 3 the zero-point ``int4z``
# layers (``wzeros``: AWQ adaLN layers imported from Nunchaku) and the quantized text encoders
# (``text_encoders``). A checkpoint is written with the lowest version that holds its contents, so older
# svdquant still reads the rest: a checkpoint with text encoders is refused by svdquant before 3
# ("upgrade") rather than loaded with the base's 16-bit encoders in their place.
_FORMAT_SINCE = {"int4m": 2, "int4z": 3}
TEXT_ENCODERS_SINCE = 3
# Version 4: a layer may hold its bias in fp32 (``bias_dtype``: Nunchaku adaLN scale biases the model dtype cannot
# hold exactly once the folded 1 is taken out); older svdquant would refuse the key as a malformed entry.
BIAS_DTYPE_SINCE = 4
META_FILE = "svdquant.json"
TENSOR_FILE = "transformer.safetensors"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as asked: missing, corrupt, or for another model."""


def _layers(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Every quantized layer's type and constructor arguments, by module name."""
    out, inner = {}, set()
    for name, m in model.named_modules():  # parents come before their children
        if isinstance(m, SVDQConv1x1):
            out[name] = {"type": "conv1x1", **m.linear.config()}
            inner.add(f"{name}.linear")
        elif isinstance(m, SVDQLinear) and name not in inner:
            out[name] = {"type": "linear", **m.config()}
    return out


def format_version(layers: dict[str, dict[str, Any]]) -> int:
    """The lowest format version that holds these layers."""
    return max([1] + [_FORMAT_SINCE.get(cfg.get(k), 1) for cfg in layers.values() for k in ("weights", "activations")]
               + [BIAS_DTYPE_SINCE for cfg in layers.values() if "bias_dtype" in cfg])


def _all_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict plus non-persistent buffers (which a meta-device build cannot recreate)."""
    tensors = dict(model.state_dict())
    for name, b in model.named_buffers():
        if b is not None and name not in tensors:
            tensors[name] = b
    return {k: v.detach().contiguous().cpu() for k, v in tensors.items()}


def _encoder_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """:func:`_all_tensors` with each tied weight once (safetensors refuses shared memory), and the ties
    as alias -> stored name."""
    tensors, tied, seen = {}, {}, {}
    for name, t in _all_tensors_live(model).items():
        if id(t) in seen:
            tied[name] = seen[id(t)]
            continue
        seen[id(t)] = name
        tensors[name] = t.detach().contiguous().cpu()
    return tensors, tied


def _all_tensors_live(model: nn.Module) -> dict[str, torch.Tensor]:
    tensors = dict(model.state_dict(keep_vars=True))
    for name, b in model.named_buffers():
        if b is not None and name not in tensors:
            tensors[name] = b
    return tensors


def _quantized_encoders(pipe) -> dict[str, nn.Module]:
    from .models.text_encoders import text_encoders

    return {n: te for n, te in text_encoders(pipe).items() if _layers(te)}


# Config entries that say where the model was loaded from (a user's absolute path, e.g. /home/ann/FLUX.1-dev/
# transformer), not what it is: never written into a checkpoint that may be published.
_WHERE_FROM = ("_name_or_path",)


def _model_config(model: nn.Module) -> dict[str, Any]:
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise CheckpointError(f"{type(model).__name__} has no .config; only diffusers-style models can be saved")
    cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)  # a transformers config, or diffusers' dict
    cfg = {k: v for k, v in cfg.items() if k not in _WHERE_FROM and k not in compat.QUANTIZER_CONFIG_KEYS}  # h-diffusers
    return json.loads(json.dumps(cfg, default=lambda o: list(o) if isinstance(o, tuple) else str(o)))


def save_quantized(model, path: str | os.PathLike, *, base: str | None = None, report=None,
                   overwrite: bool = False, model_card: bool = False) -> Path:
    """Write a quantized model to the folder ``path`` (created; atomically replaced with ``overwrite``).

    ``model``: the quantized transformer, or its pipeline, which also saves the pipeline's quantized text
    encoders (``text_encoder_2.safetensors``...; see the module doc).

    ``base`` records the pipeline (local folder or hub id) the model came from, so
    ``load_pipeline`` and the CLI can find its VAE, text encoders and scheduler.
    ``model_card=True`` also writes README.md for the Hugging Face Hub (:mod:`svdquant.model_card`):
    base model, license (the base's, when its README is at hand), recipe, ranks, the report's quality
    figures and the GPUs the layers run on.
    """
    from . import __version__
    from .pipelines.tiny import TINY_BASE
    from .quantize import QuantReport

    encoders = {}
    if not isinstance(model, nn.Module) and isinstance(getattr(model, "transformer", None), nn.Module):
        encoders = _quantized_encoders(model)
        model = model.transformer
    elif getattr(model, "_svdquant_text_encoders", None):
        warnings.warn(f"the pipeline's text encoders ({', '.join(model._svdquant_text_encoders)}) were quantized "
                      "too; save_quantized(pipe, ...) saves them with the transformer, this saves the transformer "
                      "alone", stacklevel=2)
    if not isinstance(model, nn.Module):
        raise TypeError(f"save_quantized takes the quantized model (e.g. pipe.transformer, pipe.unet) or a pipeline "
                        f"with a .transformer, got {type(model).__name__}")
    path = Path(path)
    loras = [n for m in (model, *encoders.values()) for n in (getattr(m, "_svdquant_loras", None) or ())]
    if loras:
        raise CheckpointError(f"LoRAs are loaded ({', '.join(loras)}); checkpoints hold the "
                              "quantized model alone: unload them (svdquant.unload_lora) before saving")
    layers = _layers(model)
    if not layers:
        raise CheckpointError("the model has no quantized layers; run svdquant.quantize(...) on it first")
    check_output_folder(path, overwrite)
    version = max([format_version(layers)] + [format_version(_layers(te)) for te in encoders.values()]
                  + [TEXT_ENCODERS_SINCE] * bool(encoders))
    if report is not None and not isinstance(report, QuantReport):
        raise TypeError(f"report= takes the QuantReport svdquant.quantize returned, got {type(report).__name__}")
    if base is not None:
        base = str(base)
        if base != TINY_BASE and base.startswith(("/", ".", "~")) and not Path(base).expanduser().exists():
            raise CheckpointError(f"base={base!r} does not exist; pass the base pipeline's folder or hub id")
    # "tiny" names the shipped model even if the current folder happens to hold a "tiny" folder
    local = bool(base) and base != TINY_BASE and Path(base).exists()
    meta = {
        "format": "svdquant",
        "format_version": version,
        "svdquant_version": __version__,
        "model_class": type(model).__name__,
        "model_config": _model_config(model),
        # A local base is stored relative to the checkpoint, so the two can move together.
        "base": os.path.relpath(Path(base).resolve(), path.resolve()) if local else base,
        "base_is_local": local,
        "recipe": getattr(model, "_svdquant_recipe", None),
        "layers": layers,
        # where the layers came from when not from svdquant's quantizer ("nunchaku"): the load then checks only
        # what holds for any quantizer (see _check_values)
        **({"source": model._svdquant_source} if getattr(model, "_svdquant_source", None) else {}),
        "report": report.to_dict() if report is not None else None,
    }
    encoder_files = {}
    if encoders:
        meta["text_encoders"] = {}
        for name, te in encoders.items():
            tensors, tied = _encoder_tensors(te)
            meta["text_encoders"][name] = {"model_class": type(te).__name__, "model_config": _model_config(te),
                                           "layers": _layers(te), "tied": tied,
                                           "recipe": getattr(te, "_svdquant_recipe", None)}
            encoder_files[f"{name}.safetensors"] = tensors
    text = json.dumps(meta, indent=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes 0700; a checkpoint should be as readable as a normal folder
    try:
        # the header keeps the metadata without the hashes: they are hashes of the very file it sits in
        save_file(_all_tensors(model), str(tmp / TENSOR_FILE), metadata={"svdquant": text})
        (tmp / TENSOR_FILE).chmod(0o666 & ~umask)  # safetensors creates it 0600; follow the umask like the rest
        written = [TENSOR_FILE, META_FILE]
        for fname, tensors in encoder_files.items():
            save_file(tensors, str(tmp / fname), metadata={"svdquant_text_encoder": fname.removesuffix(".safetensors")})
            (tmp / fname).chmod(0o666 & ~umask)
            written.append(fname)
        meta["sha256"] = {f: sha256_of(tmp / f) for f in [TENSOR_FILE, *encoder_files]}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1))
        if model_card:
            from .model_card import base_license, render

            (tmp / "README.md").write_text(render(meta, license=base_license(base, local)), encoding="utf-8")
            written.append("README.md")
        for f in written:  # on disk before the rename publishes them: a crash leaves the old
            _fsync(tmp / f)                 # checkpoint or the new one, never a renamed folder of empty files
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            path.rename(old)
            try:
                tmp.rename(path)
            except BaseException:
                old.rename(path)  # put the previous checkpoint back before reporting the failure
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def sha256_of(path: str | os.PathLike) -> str:
    """The file's SHA-256 as 64 hex digits, read in 8 MiB chunks (a checkpoint may be larger than the memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def _verify(tensor_file: Path, meta: dict[str, Any]) -> None:
    """Compare ``tensor_file`` with the SHA-256 its svdquant.json records (checkpoints written before hashes, or
    read through the tensor file's own header copy, record none: nothing to compare)."""
    hashes = meta.get("sha256")
    if hashes is None:
        return
    want = hashes.get(tensor_file.name)
    if want is None:
        raise CheckpointError(f"{tensor_file.parent / META_FILE} records SHA-256 hashes but none for "
                              f"{tensor_file.name}; "
                              "the checkpoint is corrupt (or pass verify=False to load it unchecked)")
    try:
        got = sha256_of(tensor_file)
    except OSError as e:
        raise CheckpointError(f"{tensor_file} cannot be read ({e})") from None
    if got != want:
        raise CheckpointError(f"{tensor_file} has SHA-256 {got[:16]}..., its {META_FILE} records {want[:16]}...: the "
                              "file was damaged or changed after saving; copy or download it again (verify=False loads "
                              "it unchecked)")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_output_folder(path: str | os.PathLike, overwrite: bool, name: str = "path") -> None:
    """Raise CheckpointError unless a checkpoint can be written to the folder ``path``.

    ``overwrite`` replaces an earlier checkpoint (or an empty folder), never a folder of other files:
    a mistyped ``-o .`` must not delete the current folder.
    """
    path = Path(path)
    try:
        _checks.output_parent(name, path)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    if not path.exists():
        return
    if not path.is_dir():
        raise CheckpointError(f"{path} is a file; a checkpoint is a folder: choose another {name}")
    if not overwrite:
        fix = "--overwrite" if name.startswith("-") else "overwrite=True"
        raise CheckpointError(f"{path} already exists; choose another folder or pass {fix}")
    if any(path.iterdir()) and not (path / META_FILE).is_file():
        raise CheckpointError(f"{path} is a folder of other files, not an svdquant checkpoint; overwrite replaces "
                              "only a checkpoint: choose another folder")


# bytes per element of each safetensors dtype, and the torch dtype it reads as
_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "I16": 2, "U16": 2, "F16": 2,
                "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
_TORCH_DTYPES = {"BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "F8_E4M3": torch.float8_e4m3fn,
                 "F8_E5M2": torch.float8_e5m2, "I16": torch.int16, "F16": torch.float16, "BF16": torch.bfloat16,
                 "I32": torch.int32, "F32": torch.float32, "I64": torch.int64, "F64": torch.float64}
_KEPT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # what a 16-bit layer is stored in

# Checkpoints come from the internet: every length a file states is checked against these bounds
# before anything of that length is read or allocated. FLUX.1-dev's header is ~0.3 MB and its
# svdquant.json ~0.2 MB, so the bounds are far above any real checkpoint and far below a harmful read.
MAX_HEADER_BYTES = 64 << 20
MAX_METADATA_BYTES = 16 << 20
_MAX_DIM = 1 << 40        # no real tensor has a dimension this long; a bigger one is a lie
_MAX_CONFIG_INT = 1 << 24  # nor a model config a size this large (it would build forever even on meta)
_MAX_CONFIG_LIST = 1024


def _json_object(text, what: str) -> Any:
    """``json.loads`` with duplicate keys rejected (two entries for one tensor are a lie about the file) and
    its other failures (deep nesting, 5000-digit integers) turned into CheckpointError."""
    def no_duplicates(pairs):
        out = {}
        for k, v in pairs:
            if k in out:
                raise CheckpointError(f"{what}: the key {k!r} appears twice")
            out[k] = v
        return out

    try:
        return json.loads(text, object_pairs_hook=no_duplicates)
    except CheckpointError:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise CheckpointError(f"{what} is not valid JSON ({type(e).__name__}: {str(e)[:200]})") from None


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _read_bounded(path: Path, limit: int, what: str) -> bytes:
    """The bytes of a regular file no longer than ``limit`` (a FIFO or device would block or never end)."""
    try:
        if not path.is_file():
            raise CheckpointError(f"{path} is not a regular file; {what} must be one")
        size = path.stat().st_size
        if size > limit:
            raise CheckpointError(f"{path} is {size} bytes; {what} is never over {limit} (a corrupt or hostile file)")
        with open(path, "rb") as f:
            return f.read(limit + 1)[:limit]
    except OSError as e:
        raise CheckpointError(f"{path} cannot be read ({e})") from None


# At most this many tensors in one safetensors file (FLUX.1-dev's transformer holds ~2,000, a Qwen-Image one
# ~7,000): a header is refused above it before it is parsed. Loading a checkpoint also bounds it by the model
# its config builds. A valid header holds 5 strings per entry (its name, "dtype", the dtype, "shape",
# "data_offsets") and at most 11 commas (8 dimensions), "__metadata__" and at most MAX_METADATA_KEYS entries of
# two strings there.
MAX_TENSORS = 100_000
MAX_METADATA_KEYS = 64      # ours write 1, diffusers 1, Nunchaku's tools 3
_ESCAPES = re.compile(rb"\\.", re.S)
_STRINGS = re.compile(rb'"[^"]*"')


def _header_bytes(path: Path) -> bytes:
    """The header of a safetensors file, its length checked against the file and MAX_HEADER_BYTES."""
    bad = f"{path} is truncated or corrupt"
    if not path.exists():
        raise CheckpointError(f"{path} is missing: the checkpoint is incomplete")
    if not path.is_file():  # a FIFO would block the read below
        raise CheckpointError(f"{path} is not a regular file; a tensor file must be one")
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{bad}: {size} bytes, too short for a safetensors header")
            n = int.from_bytes(head, "little")
            if n > size - 8:
                raise CheckpointError(f"{bad}: the header claims {n} bytes, the file has {size - 8} after the length")
            if n > MAX_HEADER_BYTES:
                raise CheckpointError(f"{bad}: the header claims {n} bytes; svdquant reads headers of up to "
                                      f"{MAX_HEADER_BYTES} (a corrupt or hostile file)")
            return f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path} cannot be read ({e})") from None


def _header_budget(path: Path, raw: bytes, max_entries: int) -> int:
    """Refuse a header with more than ``max_entries`` tensors, or more commas than they can hold, without parsing
    it (parsing 600,000 empty entries cost 4 s and 200 MB); returns how many entries it can hold at most. Counted
    outside strings, after dropping escapes: C-speed passes with no backtracking; the strings are removed (the
    slow part, per string) only when the raw comma count is over the budget, and by then there are few."""
    bare = _ESCAPES.sub(b"", raw)
    strings = bare.count(b'"') // 2
    commas = bare.count(b",")
    if commas > 11 * max_entries + MAX_METADATA_KEYS and strings <= 5 * max_entries + 1 + 2 * MAX_METADATA_KEYS:
        commas = _STRINGS.sub(b"", bare).count(b",")  # those in the metadata's strings do not count
    if strings > 5 * max_entries + 1 + 2 * MAX_METADATA_KEYS or commas > 11 * max_entries + MAX_METADATA_KEYS:
        raise CheckpointError(f"{path} is truncated or corrupt: its header holds {strings} strings and {commas} commas, "
                              f"more than a safetensors header of at most {max_entries} tensors can (a hostile file?)")
    return strings // 5


def check_tensor_file(path: str | os.PathLike, max_entries: int = MAX_TENSORS) -> dict[str, Any]:
    """Read a safetensors file's header and check it against the file: a bounded header length, no more than
    ``max_entries`` tensors (counted before the header is parsed), every entry well formed (a known dtype, a
    shape of non-negative integers, two offsets), every tensor's byte range matching its shape and dtype, the
    ranges tiling the data, and the file exactly that long. Returns the header; raises CheckpointError naming
    the damage. Reads no tensor data."""
    path = Path(path)
    bad = f"{path} is truncated or corrupt"
    raw = _header_bytes(path)
    n, size = len(raw), path.stat().st_size
    _header_budget(path, raw, min(max_entries, MAX_TENSORS))
    header = _json_object(raw, f"{bad}: its header")
    if not isinstance(header, dict):
        raise CheckpointError(f"{bad}: its header is not a JSON object")
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CheckpointError(f"{bad}: its __metadata__ is not a map of strings")
    if len(meta) > MAX_METADATA_KEYS:
        raise CheckpointError(f"{bad}: its __metadata__ has {len(meta)} entries; at most {MAX_METADATA_KEYS} are read")
    spans = []
    for name, t in header.items():
        if name == "__metadata__":
            continue
        entry = f"{bad}: malformed tensor entry {name[:100]!r} in its header"
        if not isinstance(t, dict) or set(t) != {"dtype", "shape", "data_offsets"}:
            raise CheckpointError(f"{entry} (it needs exactly dtype, shape and data_offsets)")
        offsets, shape, dtype = t["data_offsets"], t["shape"], t["dtype"]
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise CheckpointError(f"{entry} (data_offsets {str(offsets)[:100]})")
        if not (isinstance(shape, list) and len(shape) <= 8 and all(_is_int(d) and 0 <= d <= _MAX_DIM for d in shape)):
            raise CheckpointError(f"{entry} (shape {str(shape)[:100]})")
        if not isinstance(dtype, str):
            raise CheckpointError(f"{entry} (dtype {str(dtype)[:100]})")
        numel = 1
        for d in shape:
            numel *= d
        width = _DTYPE_BYTES.get(dtype)  # a dtype newer than this table: only the tiling is checked
        begin, stop = offsets
        if width is not None and stop - begin != numel * width:
            raise CheckpointError(f"{bad}: tensor {name!r} has {stop - begin} bytes for shape {shape} {dtype}")
        spans.append((begin, stop))
    end = 0
    for begin, stop in sorted(spans):
        if begin != end:
            raise CheckpointError(f"{bad}: tensor data overlaps or leaves a gap at byte {end}")
        end = stop
    if 8 + n + end != size:
        raise CheckpointError(f"{bad}: the header describes {8 + n + end} bytes, the file has {size}")
    return header


def tensor_file_of(path: str | os.PathLike) -> Path:
    """The tensor file of a checkpoint given as its folder, its tensor file or its svdquant.json."""
    path = Path(path)
    if path.is_dir():
        return path / TENSOR_FILE
    return path if path.suffix == ".safetensors" else path.with_name(TENSOR_FILE)


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")


def resolve(path: str | os.PathLike) -> Path:
    """A checkpoint's local path: ``path`` itself, or for a Hugging Face Hub id ("owner/name") that is not a
    local path, the hub cache's copy of its svdquant.json and tensor file (downloaded if a network exists)."""
    local = Path(path)
    if local.exists() or isinstance(path, Path) or not _HUB_ID.fullmatch(str(path)) or ".." in str(path):
        return local
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(path), allow_patterns=[META_FILE, TENSOR_FILE, "text_encoder*.safetensors",
                                                                 "README.md"]))
    except Exception as e:  # offline (HF_HUB_OFFLINE or no network), unknown repo, gated repo...
        raise CheckpointError(
            f"{path} is neither a local folder nor a Hugging Face Hub checkpoint that can be fetched here "
            f"({type(e).__name__}: {str(e)[:200]}). Offline: where a network exists run `hf download {path} "
            "--local-dir DIR`, copy DIR here and pass it; or unset HF_HUB_OFFLINE where the Hub is reachable"
        ) from None


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint's metadata, with a clear error for anything that is not an svdquant checkpoint.
    Every entry the loader uses is checked for its type here, so a malformed one is a CheckpointError.
    ``path``: a checkpoint folder, its svdquant.json or tensor file, or a hub id (:func:`resolve`)."""
    path = resolve(path)
    meta_file = path / META_FILE if path.is_dir() else path
    if not path.exists():
        raise CheckpointError(f"no svdquant checkpoint at {path}: the path does not exist")
    if path.is_dir() and not meta_file.exists():
        raise CheckpointError(f"{path} is not an svdquant checkpoint: {META_FILE} is missing")
    if meta_file.suffix == ".safetensors":
        # our own bounded header check, not safe_open: safetensors would parse up to 100 MB of a hostile header
        md = check_tensor_file(meta_file).get("__metadata__", {})
        text = md.get("svdquant")
        if text is None:
            from .convert.nunchaku import is_nunchaku_header, nunchaku_metadata

            if is_nunchaku_header(md):  # a Nunchaku single-file checkpoint: what importing it amounts to
                return nunchaku_metadata(meta_file)
            raise CheckpointError(f"{meta_file} has no svdquant metadata; was it written by svdquant (or Nunchaku)?")
    else:
        raw = _read_bounded(meta_file, MAX_METADATA_BYTES, "svdquant metadata")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise CheckpointError(f"{meta_file} is not svdquant metadata (not text); pass a checkpoint folder") from None
    meta = _json_object(text, str(meta_file))
    if not isinstance(meta, dict) or meta.get("format") != "svdquant":
        raise CheckpointError(f"{meta_file} is not svdquant metadata")
    version = meta.get("format_version")
    if not _is_int(version) or version < 1:
        raise CheckpointError(f"{meta_file} has no integer format_version ({version!r}); the checkpoint is corrupt")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{meta_file} has format version {meta['format_version']}; this svdquant reads up to {FORMAT_VERSION}. "
            "Upgrade svdquant."
        )
    for key, kind in (("model_class", str), ("model_config", dict), ("layers", dict)):
        if not isinstance(meta.get(key), kind):
            raise CheckpointError(f"{meta_file} lacks a valid {key!r} entry; the checkpoint is corrupt")
    for key, kind in (("recipe", dict), ("report", dict), ("base", str), ("base_is_local", bool), ("source", str)):
        if meta.get(key) is not None and not isinstance(meta[key], kind):
            raise CheckpointError(f"{meta_file} has a malformed {key!r} entry; the checkpoint is corrupt")
    _check_config(meta["model_config"], f"{meta_file}: model_config")
    for name, cfg in meta["layers"].items():
        _check_layer(name, cfg, meta_file)
    if meta.get("text_encoders") is not None:
        _check_text_encoders(meta, meta_file)
    if meta.get("sha256") is not None:
        files = {TENSOR_FILE} | {f"{n}.safetensors" for n in meta.get("text_encoders") or ()}
        h = meta["sha256"]
        if not (isinstance(h, dict) and set(h) <= files
                and all(isinstance(v, str) and _SHA256.fullmatch(v) for v in h.values())):
            raise CheckpointError(f"{meta_file} has a malformed 'sha256' entry (64 hex digits per tensor file of "
                                  "the checkpoint); the checkpoint is corrupt")
    return meta


_SHA256 = re.compile(r"[0-9a-f]{64}")


_ENCODER_KEYS = {"model_class", "model_config", "layers", "tied", "recipe"}


def _check_text_encoders(meta: dict[str, Any], meta_file: Path) -> None:
    """The ``text_encoders`` entry: names that are file names we write (never a path), and per encoder the
    same checks as the transformer's entries."""
    from .models.text_encoders import NAME

    tes = meta["text_encoders"]
    if not isinstance(tes, dict) or not tes:
        raise CheckpointError(f"{meta_file} has a malformed 'text_encoders' entry; the checkpoint is corrupt")
    if meta["format_version"] < TEXT_ENCODERS_SINCE:
        raise CheckpointError(f"{meta_file} holds text encoders but says format version {meta['format_version']} "
                              f"(they came with {TEXT_ENCODERS_SINCE}); the checkpoint is corrupt")
    for name, entry in tes.items():
        bad = f"{meta_file}: text encoder {name[:100]!r} has a malformed entry"
        if not NAME.fullmatch(name):
            raise CheckpointError(f"{meta_file} names a text encoder {name[:100]!r}; svdquant writes text_encoder, "
                                  "text_encoder_2 ... only: the checkpoint is corrupt")
        if not isinstance(entry, dict) or not set(entry) <= _ENCODER_KEYS or not {"model_class", "model_config",
                                                                                    "layers"} <= set(entry):
            raise CheckpointError(f"{bad} (it needs model_class, model_config and layers, at most "
                                  f"{sorted(_ENCODER_KEYS)})")
        for key, kind in (("model_class", str), ("model_config", dict), ("layers", dict)):
            if not isinstance(entry[key], kind):
                raise CheckpointError(f"{bad} ({key})")
        tied = entry.get("tied") or {}
        if not isinstance(tied, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in tied.items()):
            raise CheckpointError(f"{bad} (tied)")
        if entry.get("recipe") is not None and not isinstance(entry["recipe"], dict):
            raise CheckpointError(f"{bad} (recipe)")
        _check_config(entry["model_config"], f"{meta_file}: {name}.model_config")
        for layer, cfg in entry["layers"].items():
            _check_layer(layer, cfg, meta_file)


def _check_config(value, where: str, depth: int = 0) -> None:
    """A model config is sizes and flags: bounded integers, short lists, shallow nesting. A huge one
    would make even a meta-device build run for hours."""
    if depth > 6:
        raise CheckpointError(f"{where} is nested too deeply; the checkpoint is corrupt")
    if _is_int(value) and abs(value) > _MAX_CONFIG_INT:
        raise CheckpointError(f"{where} = {value} is larger than any real model's; the checkpoint is corrupt")
    if isinstance(value, list):
        if len(value) > _MAX_CONFIG_LIST:
            raise CheckpointError(f"{where} has {len(value)} entries; the checkpoint is corrupt")
        for i, v in enumerate(value):
            _check_config(v, f"{where}[{i}]", depth + 1)
    if isinstance(value, dict):
        for k, v in value.items():
            _check_config(v, f"{where}.{k[:100]}", depth + 1)


_LAYER_REQUIRED = {"type", "in_features", "out_features", "weights"}
_LAYER_KEYS = _LAYER_REQUIRED | {"bias", "activations", "group_size", "rank", "act_shift", "act_unsigned_from", "dtype",
                                  "bias_dtype"}
_LAYER_DTYPES = ("float32", "bfloat16", "float16")


def _check_layer(name: str, cfg, meta_file: Path) -> None:
    """One ``layers`` entry: exactly SVDQLinear's constructor arguments, each of the right type and size."""
    bad = f"{meta_file}: quantized layer {name[:100]!r} has a malformed entry"
    if not isinstance(cfg, dict) or not _LAYER_REQUIRED <= set(cfg) <= _LAYER_KEYS:
        raise CheckpointError(f"{bad} (it needs {sorted(_LAYER_REQUIRED)} and at most {sorted(_LAYER_KEYS)})")
    if cfg["type"] not in ("linear", "conv1x1"):
        raise CheckpointError(f"{bad} (type {str(cfg['type'])[:50]!r})")
    for key, low in (("in_features", 1), ("out_features", 1), ("group_size", 0), ("rank", 0),
                     ("act_unsigned_from", 0)):
        if key in cfg and not (_is_int(cfg[key]) and low <= cfg[key] <= _MAX_CONFIG_INT):
            raise CheckpointError(f"{bad} ({key} = {str(cfg[key])[:50]})")
    for key, ok in (("bias", lambda v: isinstance(v, bool)), ("weights", lambda v: isinstance(v, str)),
                    ("activations", lambda v: v is None or isinstance(v, str)),
                    ("act_shift", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
                     and abs(v) < 1e6), ("dtype", lambda v: v in _LAYER_DTYPES),
                    ("bias_dtype", lambda v: v in _LAYER_DTYPES)):
        if key in cfg and not ok(cfg[key]):
            raise CheckpointError(f"{bad} ({key} = {str(cfg[key])[:50]!r})")


def _model_class(name: str, where: Path):
    import diffusers
    from diffusers import ModelMixin

    try:
        cls = getattr(diffusers, name, None)
    except Exception:  # diffusers' lazy module imports optional backends (flax, onnx...) on first access
        cls = None
    if cls is None:
        raise CheckpointError(f"{where} is a checkpoint of {name}, which this diffusers ({diffusers.__version__}) "
                              "lacks; install the diffusers version it was made with")
    if not (isinstance(cls, type) and issubclass(cls, ModelMixin)):
        raise CheckpointError(f"{where} names {name!r} as its model class, which is not a diffusers model")
    return cls


def _transformers_class(name: str, where: Path):
    import transformers

    try:
        cls = getattr(transformers, name, None)
    except Exception:  # transformers' lazy module imports optional backends on first access
        cls = None
    if cls is None:
        raise CheckpointError(f"{where} holds a text encoder of class {name[:100]!r}, which this transformers "
                              f"({transformers.__version__}) lacks; install the transformers version it was made with")
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise CheckpointError(f"{where} names {name[:100]!r} as a text encoder class, which is not a transformers "
                              "model")
    return cls


def _check_layer_counts_unparsed(meta: dict[str, Any], tensor_file: Path, where: Path) -> None:
    """:func:`_check_layer_counts` against how many tensors the header can describe at most, from its unparsed
    text (:func:`_header_budget`). When that fails, the header (then known to be under the hard cap) is parsed:
    a damaged one is reported as such, a sound one with its exact count."""
    try:
        _check_layer_counts(meta, _header_budget(tensor_file, _header_bytes(tensor_file), MAX_TENSORS), where)
    except CheckpointError:
        header = check_tensor_file(tensor_file)
        header.pop("__metadata__", None)
        _check_layer_counts(meta, len(header), where)
        raise


def _tensor_count(model: nn.Module) -> int:
    """The tensors a checkpoint of ``model`` holds (parameters and buffers, persistent or not, by name)."""
    return len({**dict(model.state_dict(keep_vars=True)), **dict(model.named_buffers())})


def _check_layer_counts(meta: dict[str, Any], n_tensors: int, where: Path) -> None:
    """Every block holds at least one tensor, so a config with more blocks than the file has tensors lies;
    refusing it first keeps a hostile config from building millions of (meta) blocks."""
    for key, value in meta["model_config"].items():
        if ("layers" in key or "blocks" in key) and _is_int(value) and value > n_tensors:
            raise CheckpointError(f"{where}: model_config {key} = {value}, but the tensor file holds only "
                                  f"{n_tensors} tensors; the checkpoint is corrupt")


def _has_plain_meta_tensors(model: nn.Module) -> bool:
    """A tensor kept as a plain attribute (neither parameter nor buffer: Qwen-Image's rotary tables) is
    in no state dict, so a meta-device build leaves it on meta for good."""
    return any(torch.is_tensor(v) and v.is_meta for m in model.modules() for v in vars(m).values())


def _empty_quantized_model(meta: dict[str, Any], where: Path, weight_mode: str = "auto") -> nn.Module:
    cls = _model_class(meta["model_class"], where)
    try:
        with torch.device("meta"):
            model = cls.from_config(meta["model_config"])
        if _has_plain_meta_tensors(model):
            # rebuild with only the parameters on meta, so those tables are computed as the 16-bit model's are
            from accelerate import init_empty_weights

            with init_empty_weights(include_buffers=False):
                model = cls.from_config(meta["model_config"])
    except Exception as e:
        raise CheckpointError(f"{where}: {meta['model_class']} cannot be built from the stored config ({e})") from None
    swap_quantized_layers(model, meta["layers"], where, weight_mode)
    model._svdquant_recipe = meta.get("recipe")
    return model


def swap_quantized_layers(model: nn.Module, layers: dict[str, dict[str, Any]], where, weight_mode: str = "auto"):
    """Replace each layer named in ``layers`` (entries checked by :func:`_check_layer`) by an empty
    :class:`SVDQLinear` / :class:`SVDQConv1x1` on the meta device; CheckpointError where they do not fit."""
    model_class = type(model).__name__
    for name, cfg in layers.items():
        cfg = dict(cfg)
        kind = cfg.pop("type")
        try:  # the types were checked by read_metadata; the values (format names, sizes) are checked here
            lin = SVDQLinear.from_config(cfg, device="meta")
        except Exception as e:
            raise CheckpointError(f"{where}: quantized layer {name[:100]!r} cannot be built ({type(e).__name__}: "
                                  f"{str(e)[:200]}); the checkpoint is corrupt") from None
        lin.weight_mode = weight_mode  # read when the loaded tensors prepare the layer
        new = SVDQConv1x1(lin) if kind == "conv1x1" else lin
        parent, _, child = name.rpartition(".")
        try:
            owner = model.get_submodule(parent) if parent else model
            old = getattr(owner, child)
        except AttributeError:
            raise CheckpointError(
                f"{where} quantizes layer {name!r}, which {model_class} built from the stored config "
                "does not have; the checkpoint and the model code disagree"
            ) from None
        # The layer it replaces must be a linear (a 1x1 conv) of the same size, or the file lies about the
        # model and the first forward would fail far from here.
        if kind == "conv1x1":
            fits = (isinstance(old, nn.Conv2d) and old.kernel_size == (1, 1)
                    and (old.in_channels, old.out_channels) == (lin.in_features, lin.out_features))
        else:
            fits = isinstance(old, nn.Linear) and (old.in_features, old.out_features) == (lin.in_features,
                                                                                           lin.out_features)
        if not fits:
            raise CheckpointError(f"{where} quantizes {name!r} as a {lin.in_features}->{lin.out_features} "
                                  f"{kind}, but the model has a {type(old).__name__} there"
                                  f"{'' if not isinstance(old, nn.Linear) else f' {old.in_features}->{old.out_features}'}"
                                  "; the checkpoint and the model code disagree")
        setattr(owner, child, new)


class NonFiniteWarning(UserWarning):
    """A loaded checkpoint's 16-bit (kept) layers hold NaN or Inf values."""


def _nonfinite(t: torch.Tensor) -> int:
    """How many NaN / Inf values ``t`` holds (float8 has no isfinite on the CPU: read the bit patterns)."""
    if t.dtype == torch.float8_e4m3fn:
        return int(((t.view(torch.uint8) & 0x7F) == 0x7F).sum())  # e4m3fn: only NaN, no Inf
    if t.dtype == torch.float8_e5m2:
        return int(((t.view(torch.uint8) & 0x7C) == 0x7C).sum())
    if not t.dtype.is_floating_point:
        return 0
    return int((~torch.isfinite(t)).sum())


# What the quantizer can write, derived from svdquant/algorithm (checked on load, so a damaged or hostile file
# cannot load values that make NaN images; measured margins on the tiny test models in the comments):
# * 1/λ: candidate_smoothing clamps λ to [1e-6, 1e6] (λ = 1 without smoothing);
SMOOTH_INV_RANGE = (1e-6 * (1 - 1e-6), 1e6 * (1 + 1e-6))
# * the branch: low_rank splits each singular value evenly, up = U·√S and down·λ = √S·Vᵀ (layers reading one input
#   share one down and split the rows of up), so for every rank component j, summed over the layers sharing a
#   down, ‖up[:, j]‖² = ‖(down·λ)[j]‖² = s_j. Tolerance 2⁻⁴ for 16-bit rounding (measured ≤ 0.5 %);
BRANCH_BALANCE_TOL = 2.0 ** -4
# * the residual, for methods whose branch is the top of Ŵ's spectrum (svdquant, lowrank): every entry of Ŵ and of
#   its rank-r part is at most the spectral norm σ₁ ≈ s₀ (the branch's first component), so |Q(R)| ≤ 2·s₀ plus
#   rounding; 4·s₀ allowed (measured ≤ 0.14·s₀). LoRC fits the branch to the rounding error instead: no bound;
RESIDUAL_BOUND = 4.0
# * everything the algorithm takes from the base model as it is (kept layers, biases, weight-only layers, and any
#   layer without the bounds above): finite, and beyond float16's largest value a NonFiniteWarning (no diffusion
#   model's weights come near; bit flips in an exponent do).
BASE_VALUE_WARN = 65504.0
_DERIVED_METHODS = {"svdquant": True, "lowrank": True, "lorc": False}  # method -> residual bounded by the branch


def _check_values(model: nn.Module, tensors: dict[str, torch.Tensor], quantized_keys: set[str],
                  tensor_file: Path, method: str | None = None) -> None:
    """Values a file can hold but svdquant never writes. In quantized layers (scales, 1/λ, branch, bias,
    codes) they are a CheckpointError: the quantizer checks its inputs and never writes NaN / Inf,
    int4m multipliers outside [1, 18] or the code -8, and an INT8 kernel would overflow on the last two.
    ``method``: the recipe's method when svdquant's quantizer wrote the layers (not an import): then 1/λ, the
    branch and the residual's scales must also lie within the bounds it can produce (SMOOTH_INV_RANGE,
    BRANCH_BALANCE_TOL, RESIDUAL_BOUND above). Kept 16-bit layers are the base model's own weights: NaN / Inf
    there, and values the base model cannot have held (beyond BASE_VALUE_WARN) anywhere, get a NonFiniteWarning."""
    from .formats import get_format
    from .formats.int4m import MULT_MAX

    kept, huge = [], []
    for k, t in tensors.items():
        bad = _nonfinite(t)
        if bad and k in quantized_keys:
            raise CheckpointError(f"{tensor_file}: tensor {k!r} holds {bad} NaN / Inf values, which svdquant never "
                                  "writes into a quantized layer; the checkpoint is corrupt")
        if bad:
            kept.append(f"{k} ({bad})")
        elif k not in quantized_keys and t.is_floating_point() and t.numel() and float(t.abs().max()) > BASE_VALUE_WARN:
            huge.append(k)
    shared: dict[tuple, list[str]] = {}
    for name, m in model.named_modules():
        if not isinstance(m, SVDQLinear):
            continue
        prefix = f"{name}." if name else ""
        t = {k: tensors[prefix + k] for k in m._buffers if prefix + k in tensors}
        if "wmult" in t:
            mult, codes = t["wmult"], t["qweight"]
            if mult.numel() and (int(mult.min()) < 1 or int(mult.max()) > MULT_MAX):
                raise CheckpointError(f"{tensor_file}: {prefix}wmult holds multipliers outside [1, {MULT_MAX}]; "
                                      "the checkpoint is corrupt")
            if bool(((codes & 0x0F) == 8).any() or ((codes >> 4) == 8).any()):
                raise CheckpointError(f"{tensor_file}: {prefix}qweight holds the 4-bit code -8 (codes are in "
                                      "[-7, 7]); the checkpoint is corrupt")
        sinv = t.get("smooth_inv")
        if method in _DERIVED_METHODS or method in ("naive", "smooth"):
            if sinv is not None and sinv.numel() and not (SMOOTH_INV_RANGE[0] <= float(sinv.min())
                                                          and float(sinv.max()) <= SMOOTH_INV_RANGE[1]):
                raise CheckpointError(f"{tensor_file}: {prefix}smooth_inv holds {float(sinv.min()):g} .. "
                                      f"{float(sinv.max()):g}; svdquant's smoothing keeps 1/λ within [1e-6, 1e6]: "
                                      "the checkpoint is corrupt")
        if "bias" in t and t["bias"].numel() and float(t["bias"].abs().max()) > BASE_VALUE_WARN:
            huge.append(prefix + "bias")  # the base model's bias (less the post-GELU shift's compensation)
        if m.rank and method in _DERIVED_METHODS:
            key = tuple(None if x is None else x.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
                        for x in (t["lora_down"], sinv))  # bit-identical down and 1/λ: one shared branch
            shared.setdefault(key, []).append(prefix)
            continue
        # no relation to check: bound what the layer can add to an output entry by the base model's range
        scale = float(sinv.max()) if sinv is not None and sinv.numel() else 1.0
        reach = float(get_format(m.weights).magnitude_bound(t).max()) * scale if m.out_features else 0.0
        if m.rank:
            reach = max(reach, m.rank * float(t["lora_up"].abs().max()) * float(t["lora_down"].abs().max()))
        if reach > BASE_VALUE_WARN:
            huge.append(prefix.rstrip("."))
    for prefixes in shared.values():
        _check_branch(model, tensors, prefixes, tensor_file, method)
    if kept:
        warnings.warn(f"{tensor_file}: {len(kept)} tensors of 16-bit layers hold NaN / Inf values, e.g. "
                      f"{', '.join(kept[:3])}; the model will likely produce NaN images", NonFiniteWarning,
                      stacklevel=3)
    if huge:
        warnings.warn(f"{tensor_file}: {len(huge)} tensors or layers hold values beyond ±{BASE_VALUE_WARN:g} (float16's "
                      f"largest; no model's weights come near), e.g. {', '.join(huge[:3])}; the model will likely "
                      "produce NaN images", NonFiniteWarning, stacklevel=3)


def _check_branch(model: nn.Module, tensors: dict[str, torch.Tensor], prefixes: list[str], tensor_file: Path,
                  method: str) -> None:
    """The layers sharing one down projection (and 1/λ): their branch against the even split of the singular
    values, and (svdquant, lowrank) their residual's reach against the largest singular value."""
    from .formats import get_format

    first = prefixes[0]
    down = tensors[first + "lora_down"].double()
    sinv = tensors.get(first + "smooth_inv")
    if sinv is not None:
        down = down / sinv.double()  # down·λ = √S·Vᵀ
    s = down.square().sum(1)
    u = sum(tensors[p + "lora_up"].double().square().sum(0) for p in prefixes)
    top = float(torch.maximum(s, u).max())
    off = (u - s).abs() > BRANCH_BALANCE_TOL * torch.maximum(u, s) + 2.0 ** -20 * top
    if bool(off.any()):
        j = int(off.nonzero()[0])
        raise CheckpointError(
            f"{tensor_file}: the low-rank branch of {', '.join(p.rstrip('.') for p in prefixes)[:200]} is out of "
            f"balance (component {j}: ‖up‖² = {float(u[j]):.4g}, ‖down·λ‖² = {float(s[j]):.4g}); svdquant splits "
            "each singular value evenly between the two: the checkpoint is corrupt")
    if not _DERIVED_METHODS[method]:
        return
    s0 = float(s.max())
    for p in prefixes:
        m = model.get_submodule(p.rstrip("."))
        t = {k: tensors[p + k] for k in m._buffers if p + k in tensors}
        reach = float(get_format(m.weights).magnitude_bound(t).max())
        if reach > RESIDUAL_BOUND * s0 + 2.0 ** -10:
            raise CheckpointError(
                f"{tensor_file}: {p}wscales reach {reach:.4g}, above {RESIDUAL_BOUND:g}× the branch's largest "
                f"singular value ({s0:.4g}), which svdquant's residual never exceeds: the checkpoint is corrupt")


def _quantizer_method(meta: dict[str, Any]) -> str | None:
    """The recipe's method when svdquant's quantizer wrote the layers, else None (an import, an unknown recipe)."""
    from .recipes import METHODS

    recipe = meta.get("recipe")
    if meta.get("source") is not None or not isinstance(recipe, dict):
        return None
    return recipe.get("method") if recipe.get("method") in METHODS else None


def _fill(model: nn.Module, layers: dict[str, dict[str, Any]], tensor_file: Path, header: dict[str, Any], device,
          tied: dict[str, str] | None = None, verify: dict[str, Any] | None = None, method: str | None = None) -> None:
    """Load ``tensor_file`` (its checked ``header``) into ``model``, built on meta with its quantized ``layers``
    swapped in: every name, shape and dtype is checked against the model before any tensor is read, then the
    values (:func:`_check_values`), then, with the metadata as ``verify``, the file's SHA-256 (last: the checks
    before it name the damage they find, and the file it reads again is in the page cache by then; nothing has
    run on the tensors yet). ``tied``: alias -> name of weights the model shares (stored once)."""
    tied = tied or {}
    expected = {**dict(model.state_dict(keep_vars=True)), **dict(model.named_buffers())}
    for alias, source in tied.items():
        if alias not in expected or source not in expected or expected[alias] is not expected[source]:
            raise CheckpointError(f"{tensor_file}: the checkpoint ties {alias[:100]!r} to {source[:100]!r}, which "
                                  f"{type(model).__name__} does not share; the checkpoint is corrupt")
        del expected[alias]
    quantized_keys = {f"{layer}.{k}" for layer in layers for k in
                      model.get_submodule(layer).state_dict(keep_vars=True)}
    missing = sorted(set(expected) - set(header))
    if missing:
        raise CheckpointError(f"{tensor_file} lacks {len(missing)} tensors the model needs, e.g. {missing[:3]}")
    unexpected = sorted(set(header) - set(expected))
    if unexpected:
        raise CheckpointError(
            f"{tensor_file} has {len(unexpected)} tensors the model does not use, e.g. {unexpected[:3]}; "
            "is it a checkpoint of another model?"
        )
    for k in sorted(header):  # from the header: nothing is read until every tensor is known to fit
        shape, dtype, want = tuple(header[k]["shape"]), _TORCH_DTYPES.get(header[k]["dtype"]), expected[k]
        # Kept layers are built in the default dtype; the stored 16/32-bit dtype of a floating tensor
        # wins (an fp8 one would be a quantized layer in disguise). Packed codes and scales match exactly.
        same_kind = dtype is not None and (dtype == want.dtype or (
            dtype in _KEPT_DTYPES and want.dtype.is_floating_point and k not in quantized_keys))
        if shape != tuple(want.shape) or not same_kind:
            raise CheckpointError(
                f"{tensor_file}: tensor {k!r} is {shape} {dtype or header[k]['dtype']}, the model expects "
                f"{tuple(want.shape)} {want.dtype}"
            )
    try:
        with safe_open(str(tensor_file), "pt", device=str(device)) as f:
            tensors = {}
            for k in sorted(header):
                t = f.get_tensor(k)
                if t.device.type == "cpu":
                    # get_tensor on CPU returns views into one byte buffer at arbitrary offsets, and
                    # unaligned weights make CPU GEMMs round differently from the model that was saved.
                    t = t.clone()
                tensors[k] = t
    except Exception as e:  # changed under us since the header check: safetensors' own errors
        raise CheckpointError(f"{tensor_file} cannot be read ({e}); the file is truncated or corrupt") from None
    _check_values(model, tensors, quantized_keys, tensor_file, method)
    if verify is not None:
        _verify(tensor_file, verify)
    persistent = set(model.state_dict())
    for alias, source in tied.items():
        tensors[alias] = tensors[source]
    try:
        model.load_state_dict({k: v for k, v in tensors.items() if k in persistent}, strict=True, assign=True)
    except RuntimeError as e:  # every name, shape and dtype was checked above: a mismatch here is a format gap
        raise CheckpointError(f"{tensor_file} does not fit the model ({str(e)[:300]})") from None
    for alias, source in tied.items():  # assign=True wrapped each name in its own Parameter: one again
        owner, _, name = alias.rpartition(".")
        setattr(model.get_submodule(owner) if owner else model, name, model.get_parameter(source))
    for k, v in tensors.items():
        if k not in persistent:
            owner, _, name = k.rpartition(".")
            (model.get_submodule(owner) if owner else model)._buffers[name] = v


def load_quantized(path: str | os.PathLike, device: str | torch.device = "cpu", *,
                   weight_mode: str = "auto", verify: bool = True) -> nn.Module:
    """Rebuild a quantized transformer from a checkpoint folder, straight onto ``device``. ``path`` may also be
    a Nunchaku single-file INT4 FLUX checkpoint (``.safetensors``): it is imported (:mod:`svdquant.convert.nunchaku`).

    ``weight_mode``: on a GPU, ``"speed"`` (``"auto"``) expands two-level INT4 codes to INT8 once, at load;
    ``"memory"`` keeps them 4-bit and expands each layer before its GEMM (see :class:`SVDQLinear`).

    ``verify``: compare the tensor file with the SHA-256 that ``svdquant.json`` records (written by every save
    since format hashes came in; a checkpoint without them loads unverified, and so does one given as its
    tensor file), once the other checks have passed and before the model is built from the tensors. It catches
    any damage in transfer or on disk that those let through; ``verify=False`` skips the read it costs.

    Hostile files: everything the files state (lengths, names, shapes, dtypes, offsets, sizes in the
    config) is checked before anything of that size is read or built, and the values afterwards
    (:func:`_check_values`); every failure is a :class:`CheckpointError`."""
    from .modules.linear import WEIGHT_MODES

    if weight_mode not in WEIGHT_MODES:
        raise ValueError(f"weight_mode={weight_mode!r} is unknown; choose one of {WEIGHT_MODES}")
    device = _checks.device("device", device)  # before any file is read, so a missing GPU is not blamed on them
    path = resolve(path)
    if path.suffix == ".safetensors" and path.is_file():
        from .convert.nunchaku import from_nunchaku, is_nunchaku_header

        if is_nunchaku_header(check_tensor_file(path).get("__metadata__", {})):
            return from_nunchaku(path, device, weight_mode=weight_mode)
    meta = read_metadata(path)
    tensor_file = tensor_file_of(path)
    _check_layer_counts_unparsed(meta, tensor_file, path)  # before a hostile config builds millions of blocks
    model = _empty_quantized_model(meta, path, weight_mode)
    # no more entries than the model has tensors, counted before the header is parsed
    header = check_tensor_file(tensor_file, max_entries=_tensor_count(model))
    header.pop("__metadata__", None)
    _fill(model, meta["layers"], tensor_file, header, device, verify=meta if verify else None,
          method=_quantizer_method(meta))
    model._svdquant_source = meta.get("source")
    model.eval()
    return compat.quantized(model)  # h-diffusers: save_pretrained writes its quantization_config


def load_text_encoders(path: str | os.PathLike, device: str | torch.device = "cpu", *,
                       verify: bool = True) -> dict[str, nn.Module]:
    """The checkpoint's quantized text encoders by pipeline attribute (``{}`` if it has none), straight onto
    ``device``: built on meta from the stored config, quantized layers swapped in, tensors assigned from
    ``text_encoder*.safetensors`` after the same checks as :func:`load_quantized`'s (``verify`` too)."""
    device = _checks.device("device", device)
    path = resolve(path)
    meta = read_metadata(path)
    folder = path if path.is_dir() else path.parent
    out = {}
    for name, entry in (meta.get("text_encoders") or {}).items():
        tensor_file = folder / f"{name}.safetensors"
        _check_layer_counts_unparsed(entry, tensor_file, tensor_file)
        cls = _transformers_class(entry["model_class"], tensor_file)
        try:
            config = cls.config_class.from_dict(entry["model_config"])
            with torch.device("meta"):
                model = cls(config)
            if _has_plain_meta_tensors(model):  # see _empty_quantized_model
                from accelerate import init_empty_weights

                with init_empty_weights(include_buffers=False):
                    model = cls(config)
        except Exception as e:
            raise CheckpointError(f"{tensor_file}: {entry['model_class']} cannot be built from the stored config "
                                  f"({type(e).__name__}: {str(e)[:200]})") from None
        swap_quantized_layers(model, entry["layers"], tensor_file)
        tied = entry.get("tied") or {}
        header = check_tensor_file(tensor_file, max_entries=max(0, _tensor_count(model) - len(tied)))
        header.pop("__metadata__", None)
        _fill(model, entry["layers"], tensor_file, header, device, tied, verify=meta if verify else None,
              method=_quantizer_method({**entry, "source": meta.get("source")}))
        from .models.text_encoders import fit_quantized

        fit_quantized(model)
        model._svdquant_recipe = entry.get("recipe")
        out[name] = model.eval()
    return out


def recorded_base(path: str | os.PathLike, meta: dict[str, Any]) -> str | None:
    """The base pipeline the checkpoint records: a folder (resolved against the checkpoint) or a hub id."""
    base = meta.get("base")
    if base and meta.get("base_is_local"):
        folder = Path(path) if Path(path).is_dir() else Path(path).parent  # given as one of its files
        return str((folder / base).resolve())
    return base


def base_of(quantized: str | os.PathLike, meta: dict[str, Any], base=None, *, allow_outside: bool = False) -> str:
    """The base pipeline to load ``quantized`` with: ``base`` if given, else the recorded one, which must
    still be there (a checkpoint copied without its base folder is the usual case) and, if it is a local folder,
    inside the folder that holds the checkpoint or the current directory (:func:`check_base_location`) unless
    ``allow_outside``."""
    if base is not None:
        return str(base)  # the user's own choice: trusted as given
    base = recorded_base(quantized, meta)
    if base is None:
        raise CheckpointError(f"{quantized} does not record its base pipeline; pass base= (svdquant --base) with "
                              "the pipeline's folder or hub id")
    if meta.get("base_is_local") and not Path(base).exists():
        raise FileNotFoundError(
            f"{quantized} was made from the base pipeline {base} ({meta['base']} relative to the checkpoint), which "
            "is not there: the checkpoint moved without it; pass base= (svdquant --base) with its folder or hub id"
        )
    if not allow_outside:
        check_base_location(quantized, meta, base)
    return base


def _is_hub_id(name: str) -> bool:
    return bool(_HUB_ID.fullmatch(name)) and ".." not in name


def check_base_location(quantized: str | os.PathLike, meta: dict[str, Any], base: str) -> None:
    """A checkpoint from the internet must not choose which local files get loaded: a recorded base that is a
    local folder (``base_is_local``, or a path-like or existing ``base``) must resolve, symlinks followed, inside
    the folder that holds the checkpoint folder (where :func:`save_quantized` records a sibling base as
    ``../name``) or the current directory. CheckpointError otherwise, naming both fixes."""
    from .pipelines.tiny import TINY_BASE

    if base == TINY_BASE or (not meta.get("base_is_local") and _is_hub_id(base) and not Path(base).exists()):
        return  # the shipped model, or a hub id (fetched to the hub cache, never a local path)
    q = Path(quantized)
    folder = q if q.is_dir() else q.parent
    roots = [folder.resolve().parent, Path.cwd().resolve()]
    where = Path(base).expanduser().resolve()
    if any(where == r or where.is_relative_to(r) for r in roots):
        return
    raise CheckpointError(
        f"{quantized} records its base pipeline at {where}, outside {roots[0]} (the folder holding the checkpoint) "
        "and the current directory; a downloaded checkpoint must not pick local files to load: pass the base "
        "yourself (base= / --base), or allow_base_outside=True (svdquant serve --allow-base-outside) if you trust it"
    )


def check_base(quantized: str | os.PathLike, meta: dict[str, Any], base: str) -> None:
    """Raise CheckpointError if the base pipeline holds another model than the checkpoint quantizes
    (read from config files only, before anything is loaded)."""
    from .pipelines import tiny_transformer_config, transformer_class_of

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
    :func:`load_quantized`. ``fuse``: apply :func:`svdquant.fuse` (q/k/v as one GEMM, with a FLUX single
    block's MLP up projection; the other MLPs' GELU in their GEMM epilogue; exact); ``None`` = on a CUDA device,
    where it pays (FLUX.1-dev step, H200, eager, q/k/v alone: 194 → 176 ms; see BENCHMARKS.md).
    ``verify``: see :func:`load_quantized`. ``allow_base_outside``: load a recorded local base that lies outside
    the folder holding the checkpoint and the current directory (:func:`check_base_location`); off, such a
    checkpoint is refused. ``optimize``: :func:`svdquant.optimize` (fusing as ``fuse`` says, the fastest attention
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
    from .pipelines import load_base_pipeline

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
        from .pipelines.optimize import optimize as optimize_pipeline

        optimize_pipeline(pipe, fuse=fuse is not False)
    elif fuse or (fuse is None and cuda):
        from .modules.fused import fuse as fuse_model

        fuse_model(pipe.transformer)
    return pipe
