"""What a quantized linear runs: the one place that decides between fused kernels, cuBLAS and the reference.

:func:`prepare` is called when a :class:`~svdquant.SVDQLinear` is built, loaded, moved
(``.to``), given LoRAs or a new weight mode. It reads the layer's formats, its device's
compute capability and ``SVDQUANT_REFERENCE``, builds kernel-ready tensors once, and
returns a runner whose ``__call__`` only computes. On CUDA the kernel paths are the ordered table
:data:`~svdquant.ops.routes.ROUTES` (:mod:`svdquant.ops.routes`), which :func:`gpu_support` reads too:

| weights × activations          | CUDA (compute capability)                        | elsewhere     |
| ------------------------------ | ------------------------------------------------ | ------------- |
| int4m / int8 × int8 / int4m    | INT8 GEMM kernels (8.0+; persistent + TMA on 9.0+) | ``CpuRunner`` (the reference's numbers, fewer passes) |
| int4 × int4 (float scales)     | the paper's W4A4 kernels (8.0+)                  | reference     |
| nvfp4 × nvfp4                  | NVFP4 kernels (8.9+; before: reference, warned)  | ``CpuRunner`` |
| fp8 × fp8                      | ``torch._scaled_mm`` (8.9+, 16-bit inputs)        | reference     |
| int4 × 16-bit (weight-only)    | W4A16 kernel up to 16 tokens, else dequantize kernel + cuBLAS | reference |
| anything else                  | reference                                        | reference     |
| a layer set to ``compute="dense"`` (``svdquant.optimize``'s layer choice) | ``DenseRunner``: one 16-bit cuBLAS linear | as above |

``SVDQUANT_REFERENCE=1`` makes every layer prepared afterwards run the reference.

| module        | what                                                                            |
| ------------- | ------------------------------------------------------------------------------- |
| runner.py     | the runner interface and its declared capabilities (``fuses_gelu``, ``stacks``...) |
| runners/      | one class per path                                                              |
| routes.py     | which runner a CUDA layer gets, by its formats' fields and the GPU's capability |
| branch.py     | the low-rank branch as runners hold it (padded, stacked, rewritten in place)    |
| library.py    | the kernel paths as torch custom ops (``torch.compile``, CUDA graphs)           |
| reference.py  | the numerics in plain torch: what every kernel is tested against                |
"""

from __future__ import annotations

import torch

from .._env import use_reference
from ..formats import get_format, product_kind
from . import reference
from .routes import choose
from .runner import EMPTY_ON_GPU, ON_META, Gpu, Runner
from .runners import CpuRunner, DenseRunner, ReferenceRunner

MIN_CAPABILITY = (8, 0)


class UnsupportedGPUError(RuntimeError):
    """The layer is on a GPU the kernels cannot run on."""


def _kernels(device: torch.device):
    cap = torch.cuda.get_device_capability(device)
    if cap < MIN_CAPABILITY:
        name = torch.cuda.get_device_name(device)
        raise UnsupportedGPUError(
            f"svdquant's GPU kernels need compute capability 8.0 or newer (A100, RTX 30xx, L40, H100, ...); "
            f"{name} is sm_{cap[0]}{cap[1]}. Run the model on the CPU, or set SVDQUANT_REFERENCE=1 to use the "
            "slow torch reference on this GPU."
        )
    try:
        from .. import kernels
    except ImportError:
        raise UnsupportedGPUError("svdquant's GPU kernels need triton (pip install triton), which ships with "
                                  "CUDA builds of torch") from None
    return kernels, cap


def prepare(m) -> Runner:
    """The runner for :class:`~svdquant.SVDQLinear` ``m`` on its current device (see the module doc)."""
    device = m.wscales.device
    if device.type == "meta":
        return ON_META
    wf = get_format(m.weights)
    af = get_format(m.activations) if m.activations is not None else None
    if device.type == "cpu" and af is not None and af.has_operand and \
            product_kind(wf.name, af.name) in ("integer", "grouped"):
        return CpuRunner(m)  # the reference's numbers in fewer passes
    if device.type != "cuda" or use_reference():
        return ReferenceRunner(m)
    if af is not None and getattr(m, "compute", "quantized") == "dense":
        return DenseRunner(m)  # svdquant.optimize measured cuBLAS faster for this layer's shape
    kernels, cap = _kernels(device)
    return choose(wf, af, cap).runner.build(m, Gpu(device, cap, kernels))


def gpu_support(weights: str, activations: str | None) -> str:
    """Which GPUs run a layer of these formats with a kernel, in words (the route :func:`prepare` takes,
    :mod:`svdquant.ops.routes`). For model cards and ``svdquant info``."""
    return choose(get_format(weights), get_format(activations) if activations is not None else None).support


__all__ = ["prepare", "gpu_support", "EMPTY_ON_GPU", "reference", "use_reference", "UnsupportedGPUError", "MIN_CAPABILITY",
           "Runner"]
