"""What is read of a file before its tensors, bounded: a safetensors header checked against the file
(:func:`check_tensor_file`), a small file read whole, JSON without duplicate keys, and a file's SHA-256 checked
against the one its ``svdquant.json`` records."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

from .layout import META_FILE, CheckpointError

# bytes per element of each safetensors dtype
_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "I16": 2, "U16": 2, "F16": 2,
                "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}

# Checkpoints come from the internet: every length a file states is checked against these bounds
# before anything of that length is read or allocated. FLUX.1-dev's header is ~0.3 MB and its
# svdquant.json ~0.2 MB, so the bounds are far above any real checkpoint and far below a harmful read.
MAX_HEADER_BYTES = 64 << 20
MAX_METADATA_BYTES = 16 << 20
_MAX_DIM = 1 << 40        # no real tensor has a dimension this long; a bigger one is a lie


def json_object(text, what: str) -> Any:
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


def is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def read_bounded(path: Path, limit: int, what: str) -> bytes:
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


def header_bytes(path: Path) -> bytes:
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


def header_budget(path: Path, raw: bytes, max_entries: int) -> int:
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
    raw = header_bytes(path)
    n, size = len(raw), path.stat().st_size
    header_budget(path, raw, min(max_entries, MAX_TENSORS))
    header = json_object(raw, f"{bad}: its header")
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
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(is_int(o) for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise CheckpointError(f"{entry} (data_offsets {str(offsets)[:100]})")
        if not (isinstance(shape, list) and len(shape) <= 8 and all(is_int(d) and 0 <= d <= _MAX_DIM for d in shape)):
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


def sha256_of(path: str | os.PathLike) -> str:
    """The file's SHA-256 as 64 hex digits, read in 8 MiB chunks (a checkpoint may be larger than the memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def verify_sha256(tensor_file: Path, meta: dict[str, Any]) -> None:
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
