"""The quantizer's memory policy: what stays on the device while a model streams to it from the CPU.

Streaming (``quantize(device=...)`` with a model on the CPU), the blocks live at home and cross to the device
when used. Through a pipeline, the first blocks that fit stay on the device between denoising steps
(:func:`resident_blocks`); in the quantize phase, the snapshots (the blocks' inputs) stay there from the first
block to the last when they fit with room for the search (:func:`snapshots_fit`), else wait at home and cross
for every block. ``max_gpu_memory=`` caps what torch may allocate for the duration of the call
(:func:`gpu_cap`, :func:`memory_cap`).
"""

from __future__ import annotations

import contextlib
import time

import torch
import torch.nn as nn

from .._memory import device_room, tensor_bytes
from .._timing import StageClock
from .offload import Streamed

# Room the quantize phase keeps free besides its snapshots: the searched block and, on a GPU, the next one
# replaying alongside, with their layer inputs and the search over its groups (the 16-bit weights in fp32, a
# batch of candidates sized to a quarter of what is then free), 4 x the largest block + 4 GB. A FLUX.1-dev
# double block is 0.68 GB; a streamed FLUX.1-dev quantization (one block at a time, candidates one by one)
# peaked at 11.3 GB with 7 GB of snapshots held (commit f2f8c57).
_BLOCK_MARGIN = 4
_SEARCH_MARGIN = 4 * 10**9


def snapshots_fit(snapshot_bytes: int, block_bytes: int, room: int, search_bytes: int = 0) -> bool:
    """Whether a streaming quantization may keep its snapshots on the device from the first block to the last:
    ``snapshot_bytes`` (what the replays hold at once: the block inputs and the outputs made from them) plus
    the margin for the block and its search (4 x ``block_bytes``, the largest block, + the larger of 4 GB and
    ``search_bytes``, what a block's groups quantized at once hold besides their candidate batches) within
    ``room`` (the cap, or what the device has free). FLUX.1-dev, 128 one-image snapshots at 1024², GPTQ on, three
    groups at once: 8.4 GB + 2.7 GB + 8.2 GB, which fits a 24 GB cap and not a 16 GB one (there the snapshots
    wait at home: held, they ran it out of memory, NOTES-GPU.md session 26)."""
    return snapshot_bytes + _BLOCK_MARGIN * block_bytes + max(_SEARCH_MARGIN, search_bytes) <= room


def resident_blocks(block_bytes: list[int], rest_bytes: int, room: int) -> int:
    """How many of the first blocks stay on the device through a streamed pipeline calibration (``Streamed``'s
    ``resident``): as many as ``room`` holds after the rest of the model and the forward's margin (4 x the
    largest block + 4 GB). They make room while a text encoder runs. FLUX.1-dev under a 24 GB cap: 17 of its
    23.8 GB, so each denoising step moves about 7 GB instead of 23.8."""
    budget = room - rest_bytes - _BLOCK_MARGIN * max(block_bytes, default=0) - _SEARCH_MARGIN
    n = used = 0
    for b in block_bytes:
        if used + b > budget:
            break
        used, n = used + b, n + 1
    return n


def runs_beside(model_bytes: int, block_bytes: list[int]) -> bool:
    """Whether a text encoder streamed one layer at a time fits in the room a streamed forward keeps free (the 4 GB
    of the search margin; :func:`resident_blocks`; the 4-block margin is left for its activations): its rest and
    two of its largest layers (the one running and the next, prefetched). Then it runs beside the resident blocks
    rather than send them home. T5-XXL: 0.26 GB of embeddings and 0.39 GB layers; Qwen2.5-VL-7B (3.5 GB of
    embeddings, head and vision tower) and Mistral 3 (3.6 GB, 1.1 GB layers) do not."""
    rest = model_bytes - sum(block_bytes)
    return bool(block_bytes) and rest + 2 * max(block_bytes) <= _SEARCH_MARGIN


# What the pass ahead may keep of the text encoders' outputs, at home, for the calibration calls (the default draw's
# 83 prompts): T5-XXL's for FLUX.1-dev 0.35 GB (512 x 4,096 bf16 a prompt); Qwen2.5-VL's hidden states of every
# layer for Qwen-Image ~2.3 GB (29 x ~134 tokens x 3,584; its logits and cache are not kept); with an edit's image
# (~1,300 vision tokens, in the negative prompt's encoding too) ~50 GB, and Mistral 3's for FLUX.2 [dev] (41 layers
# x 512 x 5,120 a prompt) ~18 GB, which it does not keep: those calls run their encoders as before.
AHEAD_BYTES = 8 * 10**9


def held_ahead(encoder_bytes: list[int], room: float) -> int:
    """How many of the text encoders (in their call order) stay on the device through the calibration's pass
    ahead: those that fit ``room`` together, with the 4 GB margin for their activations. Under a 24 GB cap, FLUX.1's
    CLIP-L and T5-XXL (9.8 GB) and Qwen2.5-VL-7B (16.6 GB) do; Mistral 3 (48 GB) streams layer by layer."""
    n = used = 0
    for b in encoder_bytes:
        if used + b + _SEARCH_MARGIN > room:
            break
        used, n = used + b, n + 1
    return n


def hold_snapshots(device: torch.device, cap: int | None, stream: bool, held: int, block_bytes: int,
                   search_bytes: int = 0) -> bool:
    """Whether the snapshots stay on the device (no move per block): always unless streaming; streaming, when
    they fit the CUDA device (:func:`snapshots_fit`), or on the CPU, where device and home memory are one."""
    if not stream or device.type == "cpu":
        return True
    if device.type != "cuda":
        return False
    return snapshots_fit(held, block_bytes, device_room(device, cap), search_bytes)


def nbytes(obj, seen: set | None = None) -> int:
    """Bytes of the tensors in a nested structure, a tensor shared by several snapshots once."""
    seen = set() if seen is None else seen
    if torch.is_tensor(obj):
        if id(obj) in seen:
            return 0
        seen.add(id(obj))
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(nbytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(nbytes(v, seen) for v in obj)
    return 0


def stream_model(model: nn.Module, blocks: list[nn.Module], device: torch.device, home: torch.device, *,
                 others: list[nn.Module], clock: StageClock, cap: int | None, through_pipeline: bool,
                 other_blocks: dict[int, list[nn.Module]] | None = None, encoders=()) -> Streamed:
    """The :class:`Streamed` hooks for a calibration of ``model`` on ``device`` from ``home``, the memory
    choices made: whether to pin the home tensors, how many blocks stay resident and which of ``others`` run
    beside them: of the text encoders (``encoders``, ids), those whose layers stream (``other_blocks``: see
    :class:`Streamed`) and fit (:func:`runs_beside`); a two-expert pipeline's other denoiser makes room."""
    # Pinned home memory makes every later copy faster but costs about a second per GB up front: it pays when each
    # block crosses many times (a pipeline's every denoising step), not when each crosses about twice (forward
    # inputs: the calibration forwards stop at the first block).
    pin_model = device.type == "cuda" and through_pipeline
    sizes = [tensor_bytes(b) for b in blocks]
    rest = tensor_bytes(model) - sum(sizes)
    resident = 0
    if pin_model and blocks:  # the same reason: blocks that fit stay on the GPU from step to step
        resident = resident_blocks(sizes, rest, device_room(device, cap))
    t1 = time.perf_counter()
    other_blocks = other_blocks or {}
    beside = [id(m) for m in others if id(m) in other_blocks and id(m) in encoders
              and runs_beside(tensor_bytes(m), [tensor_bytes(b) for b in other_blocks[id(m)]])]
    # Calibrating on forward inputs, every call stops at the first block after the embedders: the rest stays on the
    # device when it is no bigger than a block (within the margin the memory policy keeps for the blocks)
    keep_rest = not through_pipeline and bool(blocks) and rest <= max(sizes)
    streamed = Streamed(model, blocks, device, home, others=others, other_blocks=other_blocks, clock=clock,
                        pin=pin_model, resident=resident, beside=beside, keep_rest=keep_rest)
    if pin_model:
        clock.add("pin memory", time.perf_counter() - t1)
    return streamed


def gpu_cap(max_gpu_memory, device: torch.device) -> int | None:
    """The byte cap of ``max_gpu_memory=``, checked against the device it applies to."""
    if max_gpu_memory is None:
        return None
    from .. import _checks

    cap = _checks.memory_size("max_gpu_memory", max_gpu_memory)
    if device.type != "cuda":
        raise ValueError(f"max_gpu_memory={max_gpu_memory!r} caps a CUDA GPU, but the model is quantized on "
                         f"{device}; pass device='cuda' to stream it there, or leave max_gpu_memory out")
    total = torch.cuda.get_device_properties(device).total_memory
    if cap > total:
        raise ValueError(f"max_gpu_memory={max_gpu_memory!r} is more than {device} has ({total / 1e9:.1f} GB); "
                         "give at most that, or leave it out")
    return cap


@contextlib.contextmanager
def memory_cap(cap: int | None, device: torch.device):
    """Caps what torch's allocator may hold on ``device`` while the quantizer runs, then puts back the
    fraction that was set before (1.0 unless the caller had set one)."""
    if cap is None:
        yield
        return
    get = getattr(torch.cuda, "get_per_process_memory_fraction", None)  # torch >= 2.6
    before = get(device) if get is not None else 1.0
    torch.cuda.set_per_process_memory_fraction(cap / torch.cuda.get_device_properties(device).total_memory, device)
    try:
        yield
    finally:
        torch.cuda.set_per_process_memory_fraction(before, device)


def gpu_memory(device: torch.device, cap: int | None) -> tuple[int | None, int | None]:
    """(bytes allocated on ``device``, the cap) for the progress bar; (None, None) off a GPU."""
    if device.type != "cuda":
        return None, None
    return torch.cuda.memory_allocated(device), cap
