"""Environment switches read by more than one floor (the quantizer's search and the runtime's layers)."""

from __future__ import annotations

import os


def use_reference() -> bool:
    """``SVDQUANT_REFERENCE=1``: the torch reference everywhere, no Triton kernel (read when a layer is prepared or a
    quantization starts, never in a forward)."""
    return os.environ.get("SVDQUANT_REFERENCE", "0") not in ("", "0")
