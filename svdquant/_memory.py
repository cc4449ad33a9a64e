"""What torch may still allocate on a CUDA device, and what a model holds: the quantizer sizes its work to them
(snapshots held on the GPU, resident blocks, batches of smoothing candidates)."""

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


def tensor_bytes(model: torch.nn.Module) -> int:
    """What the model's state holds (the checkpoint's size: speed-mode INT8 copies excluded, tied weights such
    as T5's token embedding once)."""
    unique = {id(t): t for t in model.state_dict(keep_vars=True).values()}
    return sum(t.numel() * t.element_size() for t in unique.values())
