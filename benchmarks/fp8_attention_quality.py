"""Would FP8 attention keep the images? The shipped tiny FLUX with its attention computed as FP8 attention computes
it (:func:`svdquant.ops.fp8_attention.fp8_sdpa_reference`), against its own 16-bit images (issue 23, lever 1: the
gate is the tiny FLUX table moving at most 0.3 dB).

    python benchmarks/fp8_attention_quality.py --per-class 3 --out OUT       # CPU: a few minutes

Samples ``--per-class`` images of every class from fixed noise with the 16-bit model, then, from the same noise:
the 16-bit model and the ``int4`` model, each with exact attention and with FP8 attention at each scale
granularity (per tensor, per head, per 128-token block), K smoothed by its token mean or not, and with the INT8 Q·Kᵀ
attention kernel's numerics (:func:`svdquant.ops.int8_attention.int8_attention_reference`). Reports PSNR against
the 16-bit images (mean over images) and writes ``fp8_attention_quality.json``. The attention is swapped by
replacing ``torch.nn.functional.scaled_dot_product_attention`` for the sampling calls (what diffusers' native
attention backend calls): a what-if of the numerics, not a kernel.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from svdquant import Calibration, quantize  # noqa: E402
from svdquant.metrics import psnr  # noqa: E402
from svdquant.ops.fp8_attention import fp8_sdpa_reference  # noqa: E402
from svdquant.ops.int8_attention import int8_attention_reference  # noqa: E402
from svdquant.pipelines import TinyFluxPipeline  # noqa: E402

from quality import sample  # noqa: E402  (the same fixed-noise sampling as the quality table)

# (name, the numerics: attention()'s keywords; {} is exact attention)
FP8_BLOCK_SMOOTHED = dict(granularity="block", smooth_k=True)
VARIANTS = [("exact", {}), ("fp8 tensor", dict(granularity="tensor")),
            ("fp8 tensor, K smoothed", dict(granularity="tensor", smooth_k=True)),
            ("fp8 head", dict(granularity="head")), ("fp8 head, K smoothed", dict(granularity="head", smooth_k=True)),
            ("fp8 block, K smoothed", FP8_BLOCK_SMOOTHED),
            ("fp8 head, K smoothed, fp32 P", dict(granularity="head", smooth_k=True, fp8_probabilities=False)),
            ("fp8 head, K smoothed, fp32 output", dict(granularity="head", smooth_k=True, fp8_output=False)),
            ("fp8 Q/K/V only (head, K smoothed)",
             dict(granularity="head", smooth_k=True, fp8_probabilities=False, fp8_output=False)),
            ("int8 Q/K (block, K smoothed), fp8 P/V/output", dict(FP8_BLOCK_SMOOTHED, int8_qk=True)),
            ("int8 Q/K (block, K smoothed), 16-bit P/V/output",
             dict(FP8_BLOCK_SMOOTHED, int8_qk=True, fp8_probabilities=False, fp8_output=False, fp8_v=False)),
            # the INT8 attention kernel's numerics (svdquant/ops/int8_attention.py): one scale per token, Q and K
            # centred, channels balanced between them
            ("int8 Q/K per token, fp32 P/V", dict(granularity="token", p_dtype=torch.float32)),
            ("int8 Q/K per token, bf16 P", dict(granularity="token", p_dtype=torch.bfloat16))]  # V, output: fp32


@contextlib.contextmanager
def attention(granularity=None, smooth_k=False, fp8_probabilities=True, fp8_output=True, int8_qk=False, fp8_v=True,
              p_dtype=None):
    """``F.scaled_dot_product_attention`` computed as FP8 attention for the duration (no mask, no dropout: what
    the tiny FLUX asks), as the INT8 attention kernel computes it for ``granularity="token"`` (``p_dtype``: the
    probabilities' rounding), or left alone for ``granularity=None``."""
    if granularity is None:
        yield
        return
    original = torch.nn.functional.scaled_dot_product_attention

    def fp8(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if attn_mask is not None or dropout_p or is_causal or enable_gqa:
            raise NotImplementedError("the FP8 reference takes plain attention only")
        if granularity == "token":
            return int8_attention_reference(query, key, value, scale, p_dtype=p_dtype)
        return fp8_sdpa_reference(query, key, value, granularity=granularity, smooth_k=smooth_k, scale=scale,
                                  fp8_probabilities=fp8_probabilities, fp8_output=fp8_output, int8_qk=int8_qk,
                                  fp8_v=fp8_v)

    torch.nn.functional.scaled_dot_product_attention = fp8
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = original


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per-class", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--recipe", default="int4")
    ap.add_argument("--variants", nargs="+", choices=[v[0] for v in VARIANTS], help="default: all")
    ap.add_argument("--models", nargs="+", choices=("16-bit", "int4"), default=["16-bit", "int4"],
                    help="int4: the --recipe")
    ap.add_argument("--quick", action="store_true", help="one image per class, 2 steps, two variants")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    variants = VARIANTS[:2] if args.quick else [v for v in VARIANTS if args.variants is None or v[0] in args.variants]
    if args.quick:
        args.per_class, args.steps = 1, 2
    t0 = time.perf_counter()
    base = TinyFluxPipeline.default(torch.float32)
    labels = torch.arange(len(base.classes)).repeat_interleave(args.per_class)
    noise = base.noise(len(labels), torch.Generator().manual_seed(args.seed))
    ref = sample(base, labels, noise, args.steps, args.batch)
    models = [("16-bit", base)] if "16-bit" in args.models else []
    if "int4" in args.models:
        quantized = copy.deepcopy(base)
        quantize(quantized, args.recipe, Calibration(steps=args.steps, snapshots=32, seed=args.seed), progress=False)
        models.append((args.recipe, quantized))
    rows = []
    for model, pipe in models:
        for name, numerics in variants:
            with attention(**numerics):
                imgs = sample(pipe, labels, noise, args.steps, args.batch)
            p = float(psnr(imgs, ref).clamp_max(100.0).mean())  # identical images: 100 dB, not inf (JSON)
            rows.append(dict(model=model, attention=name, psnr_db=round(p, 2)))
            print(f"{model:8s} {name:24s} PSNR {p:6.2f} dB", flush=True)
    res = dict(images=len(labels), steps=args.steps, seed=args.seed, recipe=args.recipe, rows=rows,
               seconds=round(time.perf_counter() - t0, 1))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "fp8_attention_quality.json").write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
