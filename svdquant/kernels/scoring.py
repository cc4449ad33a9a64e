"""The quantizer's scoring products ``A · Bᵀ`` (fp32 in, fp32 out) on TF32 tensor cores: the smoothing search and
the refinement score every candidate by its output error, whose largest term is ``X̂ · Ŵᵀ`` (512 tokens × K × N
per candidate, batched over candidates).

Reference: ``a @ b.mT`` in fp32. Each operand is read as TF32 (10-bit mantissa; products and sums in fp32). In
fp32 these products run on the CUDA cores at ~1/8 of the TF32 rate on an H100 / H200; torch turns TF32 on only
process-wide (``torch.backends.cuda.matmul``), which would also round the SVD fits and GPTQ's Hessian, hence a kernel
of its own. Whether TF32 changes what the quantizer picks was emulated on the CPU (BENCHMARKS.md, "Faster products
for scoring the candidates": the demo's table unchanged for ``int4`` and ``w4a4``, +0.03 dB for one ``nvfp4``
choice), then measured on an H100 ("Session 25 on an H100": the tiny FLUX table within 0.03 dB). A plain tiled
GEMM as in Triton's matrix multiplication tutorial, batched over the grid's second axis; a batch stride of 0
broadcasts an operand that every candidate shares.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import interpreting

CONFIG = dict(BLOCK_T=128, BLOCK_N=128, BLOCK_K=32, num_warps=8, num_stages=3)


@triton.jit
def scoring_product_kernel(a_ptr, b_ptr, y_ptr, T, N, K, stride_ab, stride_at, stride_bb, stride_bn, stride_yb,
                           stride_yt, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           IEEE: tl.constexpr):
    pid, batch = tl.program_id(0), tl.program_id(1).to(tl.int64)
    tiles_n = tl.cdiv(N, BLOCK_N)
    rt = (pid // tiles_n) * BLOCK_T + tl.arange(0, BLOCK_T)
    rn = (pid % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    a_rows = a_ptr + batch * stride_ab + rt.to(tl.int64)[:, None] * stride_at
    b_rows = b_ptr + batch * stride_bb + rn.to(tl.int64)[:, None] * stride_bn
    acc = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        a = tl.load(a_rows + kk[None, :], mask=(rt < T)[:, None] & (kk < K)[None, :], other=0.0)
        b = tl.load(b_rows + kk[None, :], mask=(rn < N)[:, None] & (kk < K)[None, :], other=0.0)
        if IEEE:  # the CPU interpreter: fp32 as the reference
            acc = tl.dot(a, b.T, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b.T, acc, input_precision="tf32")
    y = y_ptr + batch * stride_yb + rt.to(tl.int64)[:, None] * stride_yt + rn[None, :]
    tl.store(y, acc, mask=(rt < T)[:, None] & (rn < N)[None, :])


def scoring_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b.mT`` for fp32 ``a`` ``[T, K]`` or ``[B, T, K]`` and ``b`` ``[N, K]`` or ``[B, N, K]`` (an operand
    without the batch dimension is shared by the batch): fp32 ``[T, N]`` or ``[B, T, N]``, the operands read as
    TF32 on a GPU (the interpreter computes in fp32)."""
    if a.dtype != torch.float32 or b.dtype != torch.float32 or a.ndim not in (2, 3) or b.ndim not in (2, 3) \
            or a.shape[-1] != b.shape[-1]:
        raise ValueError(f"scoring_product takes fp32 [(B,) T, K] and [(B,) N, K], got {a.dtype} {tuple(a.shape)} "
                         f"and {b.dtype} {tuple(b.shape)}")
    batched = a.ndim == 3 or b.ndim == 3
    nb = max(a.shape[0] if a.ndim == 3 else 1, b.shape[0] if b.ndim == 3 else 1)
    if (a.ndim == 3 and a.shape[0] != nb) or (b.ndim == 3 and b.shape[0] != nb):
        raise ValueError(f"scoring_product: batch sizes differ ({a.shape[0]} and {b.shape[0]})")
    a, b = a.contiguous(), b.contiguous()  # rows along K, contiguous: what the loads assume
    t, k, n = a.shape[-2], a.shape[-1], b.shape[-2]
    y = torch.empty(nb, t, n, dtype=torch.float32, device=a.device)
    if y.numel() == 0:
        return y if batched else y[0]
    cfg = CONFIG
    grid = (triton.cdiv(t, cfg["BLOCK_T"]) * triton.cdiv(n, cfg["BLOCK_N"]), nb)
    scoring_product_kernel[grid](
        a, b, y, t, n, k, a.stride(0) if a.ndim == 3 else 0, a.stride(-2), b.stride(0) if b.ndim == 3 else 0,
        b.stride(-2), y.stride(0), y.stride(1), BLOCK_T=cfg["BLOCK_T"], BLOCK_N=cfg["BLOCK_N"],
        BLOCK_K=cfg["BLOCK_K"], IEEE=interpreting(), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return y if batched else y[0]
