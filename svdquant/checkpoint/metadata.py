"""Reading a checkpoint's metadata (``svdquant.json``, or the copy in its tensor file's header), every entry the
loader uses checked; a foreign file (:mod:`.foreign`) gives the metadata its import amounts to."""

from __future__ import annotations

import os
import re
from typing import Any

from .foreign import foreign_format
from .header import MAX_METADATA_BYTES, check_tensor_file, is_int, json_object, read_bounded
from .layout import FORMAT_VERSION, META_FILE, TENSOR_FILE, CheckpointError
from .locate import resolve
from .validation import check_config, check_experts, check_layer, check_text_encoders


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
            foreign = foreign_format(md)
            if foreign is not None:  # e.g. a Nunchaku single-file checkpoint: what importing it amounts to
                return foreign.metadata(meta_file)
            part = md.get("svdquant_expert") or md.get("svdquant_text_encoder")
            if isinstance(part, str):  # one of a checkpoint's other tensor files, given by itself
                raise CheckpointError(f"{meta_file} is the {part[:40]} file of an svdquant checkpoint: pass the "
                                      f"checkpoint folder ({meta_file.parent})")
            raise CheckpointError(f"{meta_file} has no svdquant metadata; was it written by svdquant (or Nunchaku)?")
    else:
        raw = read_bounded(meta_file, MAX_METADATA_BYTES, "svdquant metadata")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise CheckpointError(f"{meta_file} is not svdquant metadata (not text); pass a checkpoint folder") from None
    meta = json_object(text, str(meta_file))
    if not isinstance(meta, dict) or meta.get("format") != "svdquant":
        raise CheckpointError(f"{meta_file} is not svdquant metadata")
    version = meta.get("format_version")
    if not is_int(version) or version < 1:
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
    check_config(meta["model_config"], f"{meta_file}: model_config")
    for name, cfg in meta["layers"].items():
        check_layer(name, cfg, meta_file)
    if meta.get("text_encoders") is not None:
        check_text_encoders(meta, meta_file)
    if meta.get("experts") is not None:
        check_experts(meta, meta_file)
    if meta.get("sha256") is not None:
        files = {TENSOR_FILE} | {f"{n}.safetensors" for key in ("text_encoders", "experts") for n in meta.get(key) or ()}
        h = meta["sha256"]
        if not (isinstance(h, dict) and set(h) <= files
                and all(isinstance(v, str) and _SHA256.fullmatch(v) for v in h.values())):
            raise CheckpointError(f"{meta_file} has a malformed 'sha256' entry (64 hex digits per tensor file of "
                                  "the checkpoint); the checkpoint is corrupt")
    return meta


_SHA256 = re.compile(r"[0-9a-f]{64}")
