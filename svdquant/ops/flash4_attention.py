"""flash-attn-4's BF16 / FP16 forward as a torch custom op (``torch.ops.svdquant.flash4_attention``).

flash-attn-4 (a dependency on Linux, https://github.com/Dao-AILab/flash-attention, ``flash_attn/cute``) writes
FlashAttention's kernels in NVIDIA's CuTe DSL, the DSL svdquant's Hopper GEMM is written in. On sm_90 its forward is
a port of FlashAttention-3's warp-specialized, ping-pong forward (arXiv 2407.08608); its kernels compile at the first
call of each shape and are cached. svdquant offers it as an attention backend where it imports and the GPU is sm_90
/ sm_100 (:func:`available`), and ``svdquant.optimize``'s ``attention="auto"`` times it beside PyTorch's SDPA
backends at the model's shape, taking whichever is fastest.

The op computes exact attention, as cuDNN's and flash SDPA do: fp32 scores and sums, the output rounded to 16 bits
(relative error against fp32 attention at FLUX's shape 0.0034, cuDNN's 0.0023; BENCHMARKS.md, "Session 33"). Its
Python launcher (argument checks, the compile cache) runs on the host at every call; inside svdquant's CUDA graphs
only the kernel is replayed.
"""

from __future__ import annotations

import importlib.util
import math

import torch
from torch import Tensor

ARCHES = (9, 10)  # compute capability majors it runs on (Hopper, Blackwell); sm_80 / sm_120 keep PyTorch's kernels
INSTALL = "pip install flash-attn-4==4.0.0b36, on Linux"
_FUNC = []  # flash_attn.cute.flash_attn_func, imported at the first probe (it imports the CuTe DSL)
# CUDA device index -> whether the op runs there, filled by available(): what the diffusers backend reads in a
# forward (a dict read, folded while tracing), so no capability query or import happens there
USABLE: dict[int, bool] = {}


def installed() -> bool:
    """Whether flash-attn-4 can be found (without importing it: that loads the CuTe DSL)."""
    try:  # finding the subpackage imports ``flash_attn`` itself: FlashAttention-2's, if installed, loads its extension
        return importlib.util.find_spec("flash_attn.cute") is not None
    except Exception:  # noqa: BLE001 - no ``flash_attn`` package, or one that fails to import: not installed here
        return False


def import_error() -> str | None:
    """Why flash-attn-4 cannot be imported (not installed, or an install that fails to import: another DSL, another
    beta), or None once it is imported."""
    if _FUNC:
        return None
    if not installed():
        return f"flash-attn-4 is not installed ({INSTALL})"
    try:
        from flash_attn.cute import flash_attn_func
    except Exception as e:  # noqa: BLE001 - a broken optional install: reported, PyTorch's SDPA stays
        return f"flash-attn-4 fails to import ({type(e).__name__}: {str(e).splitlines()[0][:160]}; {INSTALL})"
    _FUNC.append(flash_attn_func)
    return None


def available(device: torch.device | str | None = None) -> bool:
    """Whether the op runs on ``device`` (default: the current CUDA device): flash-attn-4 imports and the GPU is one
    of :data:`ARCHES`. Records the answer in :data:`USABLE`. A capability query and an import: call it when
    choosing a backend, never in a forward."""
    if not torch.cuda.is_available():
        return False
    device = torch.device(device) if device is not None else torch.device("cuda", torch.cuda.current_device())
    if device.type != "cuda":
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    USABLE[index] = torch.cuda.get_device_capability(index)[0] in ARCHES and import_error() is None
    return USABLE[index]


def probe_devices() -> None:
    """:func:`available` for every visible CUDA device (none without CUDA)."""
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            available(torch.device("cuda", index))


def unsupported(q: Tensor, k: Tensor, v: Tensor, attn_mask=None, dropout_p: float = 0.0, is_causal: bool = False,
                enable_gqa: bool = False) -> str | None:
    """Why the op cannot take this call (``[B, S, H, D]`` tensors), or None if it can. Read from shapes, dtypes
    and arguments only: under ``torch.compile`` it is decided while tracing."""
    if attn_mask is not None or dropout_p or is_causal or enable_gqa:
        return "a mask, dropout, causal or grouped-query attention"
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        return f"tensors of {q.ndim}, {k.ndim}, {v.ndim} dims (it takes [batch, tokens, heads, head_dim])"
    if not (q.dtype == k.dtype == v.dtype and v.dtype in (torch.float16, torch.bfloat16)):
        return f"{q.dtype} / {k.dtype} / {v.dtype} (it takes float16 or bfloat16)"
    d = q.shape[-1]
    if not head_size_ok(d) or k.shape[-1] != d or v.shape[-1] != d:
        return f"head size {d} (it takes a multiple of 8 up to 128, or 256, the same for q, k, v)"
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        return f"q, k, v of shapes {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
    if q.numel() == 0 or k.numel() == 0:
        return f"empty q or k (shapes {tuple(q.shape)}, {tuple(k.shape)})"
    if any(t.stride(-1) != 1 for t in (q, k, v)):
        return "q, k or v without a unit stride in the head dimension"
    if q.device.type != "cuda":
        return f"tensors on {q.device.type} (it runs on a CUDA GPU)"
    if not USABLE.get(q.device.index, False):
        return (f"{q.device}: flash-attn-4 not checked or not usable there (sm_90 / sm_100 with flash-attn-4 "
                "installed; svdquant.optimize or register_flash4() checks)")
    return None


def head_size_ok(d: int) -> bool:
    """The head sizes flash-attn-4 4.0.0b36 takes on both sm_90 (8-256) and sm_100 (up to 128, and 256)."""
    return d % 8 == 0 and (8 <= d <= 128 or d == 256)


@torch.library.custom_op("svdquant::flash4_attention", mutates_args=())
def flash4_attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """softmax(q·kᵀ · scale) · v of ``[B, S, H, D]`` tensors (checked by :func:`unsupported`), by flash-attn-4."""
    if not _FUNC:  # called without a probe (the op directly): import now, or say how to install
        why = import_error()
        if why is not None:
            raise RuntimeError(f"svdquant_flash4 needs flash-attn-4: {why}")
    return _FUNC[0](q, k, v, softmax_scale=scale)[0]


@flash4_attention.register_fake
def _(q, k, v, scale):
    return q.new_empty(*q.shape[:-1], v.shape[-1])


def attention(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None) -> Tensor:
    """:func:`flash4_attention` with SDPA's default scale, ``1 / sqrt(D)``."""
    return flash4_attention(q, k, v, 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale))
