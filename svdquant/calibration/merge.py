"""Recorded calls of one image replayed a few at a time.

The block replays run each stack's recorded first-block arguments through every block in 16 bits
(:mod:`svdquant.calibration.replay`): a FLUX.1-dev-size model replays 57 blocks × 128 snapshots. Recorded one image
a call (``Calibration(inputs=...)`` of single-image forward kwargs), that is 7,296 block calls of one image, each
bound by its launches as much as by its arithmetic (NOTES-GPU.md: 5.3 ms a block call against ~3 ms of BF16
arithmetic, 38.5 s of the quantizer's GPU time). :func:`merge_calls` joins consecutive recorded calls into calls of
up to :data:`REPLAY_IMAGES` images, as a pipeline's batched calibration records them (four prompts a call on a GPU):
the block's batch-major arguments, which its model's adapter names (:attr:`svdquant.models.Adapter.batch_inputs`:
FLUX.1's streams and timestep embedding), are concatenated along the batch, and the others must be one object for
the calls joined (the calibration points a value bit for bit the first snapshot's at that object: FLUX's rotary
embedding). The linears' recorders then keep as many tokens a call, from several images, as they kept from one (other
tokens: a new draw); the amax is over the same tokens. Calls whose other arguments differ (another resolution, a
text of another length) stay apart, and so do all of a model whose adapter names no batch-major arguments.

Off by default (:data:`REPLAY_IMAGES` = 1): four images a call ran out of memory under a 24 GB cap on an H100.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from .chain import same

# images a replayed call holds at most. 1, off: at four a call, the 57-block FLUX.1-dev run under a 24 GB cap ran out
# of memory on an H100 (the replay's forward beside three search workers, NOTES-GPU.md session 25), and fewer were
# not measured; ``quantize_flux.py --replay-images N`` is the A/B
REPLAY_IMAGES = 1
# tokens a joined call holds at most (of its first batch-major argument): four FLUX.1-dev images at 1024² (4,608 each
# with the text); an edit's calls, with the input image's tokens too, join two at a time
REPLAY_TOKENS = 4 * 4608


def merges_replays(device: torch.device) -> bool:
    """Merge one-image recorded calls for the replays: on a GPU, where a block call of one image is bound by its
    launches, once :data:`REPLAY_IMAGES` allows more than one. On the CPU the replays stay as recorded (the same
    token samples as ever: the demo's table)."""
    return device.type == "cuda" and REPLAY_IMAGES > 1


def _images(entry: dict[str, Any], batch: Sequence[str]) -> int:
    return entry[batch[0]].shape[0]


def _tokens(entry: dict[str, Any], batch: Sequence[str]) -> int:
    """Tokens per image of the call's first batch-major argument (1 for a vector per image)."""
    t = entry[batch[0]]
    return t.shape[1] if t.ndim > 2 else 1


def _joinable(a: dict[str, Any], b: dict[str, Any], batch: Sequence[str]) -> bool:
    """Whether call ``b`` can join call ``a``: the same arguments; the batch-major ones (``batch``) tensors alike
    past their leading dimension (their call's images); every other one the same object, or an equal plain value."""
    if a.keys() != b.keys() or not all(torch.is_tensor(e.get(k)) for k in batch for e in (a, b)):
        return False
    na, nb = _images(a, batch), _images(b, batch)
    for k, va in a.items():
        vb = b[k]
        if k in batch:
            if va.ndim == 0 or va.shape[0] != na or vb.shape[0] != nb or va.shape[1:] != vb.shape[1:] or \
                    va.dtype != vb.dtype or va.device != vb.device:
                return False
        elif va is not vb and (torch.is_tensor(va) or torch.is_tensor(vb) or isinstance(va, (dict, list, tuple))
                               or not same(va, vb)):
            return False  # a tensor, or a container of them, is shared only as one object
    return True


def merge_calls(entries: list[dict[str, Any]], batch: Sequence[str], images: int | None = None,
                pin: bool = False) -> int:
    """Join consecutive calls of ``entries`` (a stack's recorded first-block arguments) into calls of up to ``images``
    images (default :data:`REPLAY_IMAGES`, read at the call) and :data:`REPLAY_TOKENS` tokens, in place, in order.
    ``batch``: the block's batch-major arguments (:attr:`svdquant.models.Adapter.batch_inputs`), concatenated (a
    value two calls share as one object too: it is per image); every other argument must be one object (or plain
    value) for the calls joined. ``pin``: the joined
    tensors in pinned memory (entries kept at home for a streaming run). Returns how many calls there are now. The
    originals are let go group by group, so the entries are held about once throughout."""
    images = REPLAY_IMAGES if images is None else images
    if not batch:
        return len(entries)
    calls = list(entries)
    entries.clear()
    while calls:
        group = [calls.pop(0)]
        n = _images(group[0], batch) if all(torch.is_tensor(group[0].get(k)) for k in batch) else images
        most = min(images, max(1, REPLAY_TOKENS // _tokens(group[0], batch))) if n < images else images
        while calls and n + _images(calls[0], batch) <= most and _joinable(group[0], calls[0], batch):
            n += _images(calls[0], batch)
            group.append(calls.pop(0))
        entries.append(group[0] if len(group) == 1 else _joined(group, batch, pin))
    return len(entries)


def _joined(group: list[dict[str, Any]], batch: Sequence[str], pin: bool) -> dict[str, Any]:
    out = dict(group[0])
    for k in batch:
        t = torch.cat([e[k] for e in group], 0)
        out[k] = t.pin_memory() if pin and t.device.type == "cpu" else t
    return out
