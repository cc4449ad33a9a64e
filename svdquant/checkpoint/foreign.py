"""Other projects' checkpoints that load as ours: each format's reader is registered by the package that
understands it (:mod:`svdquant.convert` registers Nunchaku's single files), so :func:`~.load.load_quantized` and
:func:`~.metadata.read_metadata` take such a file without this package importing the converters, which are
built on it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch.nn as nn


@dataclass(frozen=True)
class ForeignFormat:
    name: str
    # a safetensors header's ``__metadata__`` -> whether this format's reader takes the file
    recognizes: Callable[[dict[str, str]], bool]
    # the file -> the svdquant metadata importing it amounts to (what read_metadata returns)
    metadata: Callable[[Path], dict[str, Any]]
    # (file, device, *, weight_mode) -> the quantized model (what load_quantized returns)
    load: Callable[..., nn.Module]


_FORMATS: dict[str, ForeignFormat] = {}


def register_foreign_format(fmt: ForeignFormat) -> None:
    """Make :func:`load_quantized` and :func:`read_metadata` read files of ``fmt`` (again by name: replaced)."""
    _FORMATS[fmt.name] = fmt


def foreign_format(metadata: dict[str, str]) -> ForeignFormat | None:
    """The registered format whose reader takes a safetensors file with this ``__metadata__``, if any."""
    return next((f for f in _FORMATS.values() if f.recognizes(metadata)), None)
