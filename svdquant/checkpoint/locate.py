"""Where a checkpoint and its base pipeline are: a local path or a Hugging Face Hub id, the tensor file of a
checkpoint, and the base it records, which a downloaded checkpoint must not use to pick local files."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from .._tiny_facts import TINY_BASE
from .layout import META_FILE, TENSOR_FILE, CheckpointError

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
        # svdquant.json first, then exactly the tensor files it names: the hub's patterns match across folders
        # ("transformer*.safetensors" would take a diffusers repo's transformer/ shards too), and a repo that is
        # not a checkpoint should cost one small file, not its weights
        meta_dir = Path(snapshot_download(str(path), allow_patterns=[META_FILE, "README.md"]))
        if not (meta_dir / META_FILE).is_file():
            return meta_dir  # not an svdquant checkpoint: read_metadata says so
        files = [META_FILE, "README.md", TENSOR_FILE, *_named_tensor_files(meta_dir / META_FILE)]
        return Path(snapshot_download(str(path), allow_patterns=files))
    except Exception as e:  # offline (HF_HUB_OFFLINE or no network), unknown repo, gated repo...
        raise CheckpointError(
            f"{path} is neither a local folder nor a Hugging Face Hub checkpoint that can be fetched here "
            f"({type(e).__name__}: {str(e)[:200]}). Offline: where a network exists run `hf download {path} "
            "--local-dir DIR`, copy DIR here and pass it; or unset HF_HUB_OFFLINE where the Hub is reachable"
        ) from None


# what a checkpoint calls its other models (text_encoder_2, transformer_2): a plain name, so never a pattern or path
_MODEL_NAME = re.compile(r"[A-Za-z0-9_]{1,64}")


def _named_tensor_files(meta_file: Path) -> list[str]:
    """The extra tensor files (``<name>.safetensors``) of the second expert and the text encoders that a downloaded
    svdquant.json names; nothing for a missing or unreadable one (read_metadata then says what is wrong)."""
    import json

    from .header import MAX_METADATA_BYTES

    try:
        if meta_file.stat().st_size > MAX_METADATA_BYTES:
            return []
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    names = [n for key in ("experts", "text_encoders") if isinstance(meta, dict) and isinstance(meta.get(key), dict)
             for n in meta[key]]
    return [f"{n}.safetensors" for n in names if isinstance(n, str) and _MODEL_NAME.fullmatch(n)]


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
