"""Building blocks of the hostile-file campaigns (test_fuzz_checkpoint.py, test_fuzz_nunchaku.py): parse a
safetensors file into its parts, write parts back, and the damage both campaigns do to them."""

from __future__ import annotations

import json
import os

import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

WIDTHS = {"F32": 4, "F16": 2, "BF16": 2, "U8": 1, "I8": 1, "I32": 4, "F8_E4M3": 1}


def fuzz_settings(default_examples: int, *, divide: int = 1, at_least: int = 1, deadline: int = 5000):
    """Derandomized (the same cases every run, so CI is stable); ``SVDQUANT_FUZZ_EXAMPLES=N`` runs N per test
    (``N // divide``, at least ``at_least``, for slower tests)."""
    n = int(os.environ.get("SVDQUANT_FUZZ_EXAMPLES", str(default_examples)))
    return settings(max_examples=max(at_least, n // divide), deadline=deadline, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def parse(raw: bytes) -> tuple[dict, dict, dict]:
    """``(header without __metadata__, metadata, name -> (dtype, shape, bytes))``."""
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    metadata = header.pop("__metadata__")
    data = raw[8 + n:]
    entries = {k: (v["dtype"], v["shape"], data[v["data_offsets"][0]:v["data_offsets"][1]]) for k, v in header.items()}
    return header, metadata, entries


def serialize(entries: dict, metadata: dict | None, header_extra: dict | None = None) -> bytes:
    """A safetensors file from ``name -> (dtype, shape, bytes)`` (offsets computed, in name order)."""
    header, data, off = {}, [], 0
    for k, (dtype, shape, raw) in entries.items():
        header[k] = {"dtype": dtype, "shape": shape, "data_offsets": [off, off + len(raw)]}
        data.append(raw)
        off += len(raw)
    if metadata is not None:
        header["__metadata__"] = metadata
    header.update(header_extra or {})
    h = json.dumps(header).encode()
    return len(h).to_bytes(8, "little") + h + b"".join(data)


def with_header(raw: bytes, header: bytes | dict) -> bytes:
    """``raw``'s data under another header (bytes as they are, a dict as JSON): the length prefix follows it."""
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = int.from_bytes(raw[:8], "little")
    return len(h).to_bytes(8, "little") + h + raw[8 + n:]


def flip_bytes(raw: bytes, data) -> bytes:
    """1–8 bytes flipped, mostly in the header, where they do the most harm."""
    out = bytearray(raw)
    n = int.from_bytes(out[:8], "little")
    for _ in range(data.draw(st.integers(1, 8))):
        where = data.draw(st.one_of(st.integers(0, 8 + n - 1), st.integers(0, len(out) - 1)))
        out[where] ^= data.draw(st.integers(1, 255))
    return bytes(out)


def resized(entry: tuple, shape: list[int]) -> tuple:
    """The tensor with another shape and bytes to match it (its element width kept)."""
    dtype, old, raw = entry
    width = len(raw) // max(1, torch.Size(old).numel())
    return dtype, shape, bytes(width * torch.Size(shape).numel())


def retyped(entry: tuple, dtype: str) -> tuple:
    """The tensor with another dtype and bytes to match it."""
    return dtype, entry[1], bytes(WIDTHS[dtype] * torch.Size(entry[1]).numel())
