"""Model adapters: which linears of an architecture to quantize, and how to walk its blocks."""

from __future__ import annotations

import torch.nn as nn

from .architectures import ADAPTERS
from .base import Adapter, Group, generic_adapter

SUPPORTED = tuple(ADAPTERS)


def get_adapter(model: nn.Module, include=None, exclude=None) -> Adapter:
    """The adapter for ``model``'s class; with ``include``/``exclude`` patterns (or an unknown
    class) the generic one, which quantizes every matching ``nn.Linear`` on its own."""
    cls = type(model).__name__
    if include is None and exclude is None and cls in ADAPTERS:
        return ADAPTERS[cls]()
    if include is None and exclude is None:
        raise ValueError(
            f"svdquant has no adapter for {cls}; supported: {', '.join(SUPPORTED)}. "
            "Pass include=['pattern', ...] (and exclude=) to quantize the matching nn.Linear layers of any model."
        )
    return generic_adapter(model, include or ("*",), exclude or ())


__all__ = ["Adapter", "Group", "get_adapter", "generic_adapter", "SUPPORTED"]
