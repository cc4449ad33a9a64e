"""What torch may still allocate on a CUDA device: the quantizer sizes its work to it (snapshots held on the
GPU, resident blocks, batches of smoothing candidates)."""

from __future__ import annotations

import torch


def device_room(device: torch.device, cap: int | None = None) -> int:
    """Bytes free on ``device`` (torch's unused cache included) within ``cap`` bytes of allocation, or, without
    one, within the per-process memory fraction (``torch.cuda.set_per_process_memory_fraction``)."""
    free, total = torch.cuda.mem_get_info(device)
    used = torch.cuda.memory_allocated(device)
    free += torch.cuda.memory_reserved(device) - used
    if cap is None:
        get = getattr(torch.cuda, "get_per_process_memory_fraction", None)  # torch >= 2.6
        cap = int((get(device) if get is not None else 1.0) * total)
    return min(free, cap - used)
