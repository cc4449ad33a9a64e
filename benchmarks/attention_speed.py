"""Attention at the models' shapes: svdquant's INT8 Q·Kᵀ kernel against the real alternatives (one GPU call).

    python benchmarks/attention_speed.py --out $OUT             # check, then the table
    python benchmarks/attention_speed.py --sweep --out $OUT     # + a tile sweep (and TMA on / off) of the kernel first
    TRITON_INTERPRET=1 python benchmarks/attention_speed.py --quick --out OUT   # CPU: checks at a tiny shape

Side by side on one GPU, random bf16 inputs in diffusers' ``[B, S, H, D]`` layout, warmed up, median of many
runs (``triton.testing.do_bench``):

* PyTorch's SDPA in BF16 through each backend (cuDNN, flash, memory-efficient): what ``svdquant.optimize``
  picks from today;
* SageAttention 1.0.6 (``sageattn``, INT8 Q·Kᵀ per block, FP16 P·V, Triton), if installed: the published kernel
  of the same split;
* flash-attn-4 (``flash_attn.cute.flash_attn_func``, BF16, CuTe DSL: on sm_90 a port of FlashAttention-3's
  warp-specialized forward), if installed: what a Hopper attention can reach beside cuDNN;
* ours (what :func:`svdquant.ops.int8_attention.int8_attention` runs on a GPU, eager): the whole op (the smoothing in torch ops,
  Q and K quantized per token, the attention), and its stages alone (the smoothing, the quantization kernel,
  the attention kernel on quantized inputs). Compiled, inductor fuses the smoothing's reductions.

Each variant's output is compared with fp32 attention first (relative error, on the first batch element).
TFLOP/s = 4 · B · H · S_q · S_k · D / time. Writes ``attention.json`` and ``attention.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from svdquant.ops import library  # noqa: E402
from svdquant.ops.int8_attention import LOG2E, int8_attention_reference, smoothing  # noqa: E402

# (name, B, S, H, D): one 1024² image (FLUX.1: 4,096 image + 512 text tokens; SD3.5 Large: 4,096 + 333 text
# tokens, 38 heads of 64), a batch of four FLUX images, a 480p 81-frame Wan 2.1 14B clip (21 × 60 × 104 / 4)
SHAPES = [("FLUX.1 1024²", 1, 4608, 24, 128), ("FLUX.1 1024² x4", 4, 4608, 24, 128),
          ("SD3.5 Large 1024²", 1, 4429, 38, 64), ("Wan 2.1 14B 480p", 1, 32760, 40, 128)]
QUICK = [("tiny", 1, 80, 2, 64)]
SWEEP = [dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=s)
         for m, n, w, s in itertools.product((64, 128), (64, 128), (4, 8), (2, 3, 4))
         if not (m == 64 and w == 8)]


def rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def bench(fn, cuda: bool) -> float:
    if not cuda:  # the interpreter: one call, for the record only
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=200, return_mode="median")


def bench_graph(fn) -> float:
    """The median of replays of a CUDA graph of ``fn`` (no host launch cost: what a step in a graph sees)."""
    from triton.testing import do_bench_cudagraph

    return do_bench_cudagraph(fn, rep=200, return_mode="median")


def exact(q, k, v):
    """fp32 attention of the first batch element (memory-efficient SDPA on a GPU: no S² matrix)."""
    q, k, v = (x[:1].transpose(1, 2).float() for x in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2)


def variants(cuda: bool):
    """name -> fn(q, k, v) -> [B, S, H, D], for what this machine has."""
    out = {}
    if cuda:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        for name, backend in (("SDPA cuDNN BF16", SDPBackend.CUDNN_ATTENTION),
                              ("SDPA flash BF16", SDPBackend.FLASH_ATTENTION),
                              ("SDPA mem-efficient BF16", SDPBackend.EFFICIENT_ATTENTION)):
            def sdpa(q, k, v, backend=backend):
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                          v.transpose(1, 2)).transpose(1, 2)
            out[name] = sdpa
        try:
            from sageattention import sageattn

            out["SageAttention 1.0.6 (INT8 QK, FP16 PV)"] = lambda q, k, v: sageattn(q, k, v, tensor_layout="NHD")
        except ImportError:
            pass
        from svdquant.ops import flash4_attention

        if flash4_attention.import_error() is None:  # installed and importing (a broken install is left out)
            from flash_attn.cute import flash_attn_func

            out["flash-attn-4 BF16 (CuTe DSL)"] = lambda q, k, v: flash_attn_func(q, k, v)[0]
    # what the op runs on a GPU, eager (the kernels on the CPU too, through the interpreter): smoothing,
    # quantization, attention
    out["ours: INT8 QK per token + BF16 PV"] = lambda q, k, v: library.int8_attention_impl(
        q, k, v, *smoothing(q, k, tokens_dim=1), None, LOG2E / math.sqrt(q.shape[-1]))
    return out


def stages(q, k, v, cuda: bool, config=None, tma=None) -> dict:
    """The op's stages alone: the smoothing (torch ops: the means, the channel balance), the quantization of Q and
    K (with the mean query's scores), and the attention kernel on its output."""
    ka = importlib.import_module("svdquant.kernels.int8_attention")  # the module (the package exports the function)
    sm = smoothing(q, k, tokens_dim=1)

    def quantize():
        return ka.quantize_tokens(q, sm.q_mean, sm.q_factor), ka.quantize_tokens(k, sm.k_mean, sm.k_factor,
                                                                                   dot=sm.q_mean)

    (qc, qs), (kc, ks, kb) = quantize()

    def attend():
        return ka.attend(qc, qs, kc, ks, v, LOG2E / math.sqrt(q.shape[-1]), kb, tma=tma, config=config)

    ms = dict(smoothing=bench(lambda: smoothing(q, k, tokens_dim=1), cuda), quantize=bench(quantize, cuda),
              attention=bench(attend, cuda))
    # heads are independent (the smoothing too): two of them keep the reference's S x S scores in memory at
    # Wan's 32,760 tokens (all 40 asked for 160 GB)
    ref = int8_attention_reference(*(x[:1, :, :2].transpose(1, 2) for x in (q, k, v))).transpose(1, 2)
    return ms, rel(attend()[:1, :, :2], ref)


def sweep(shapes, dev, cuda: bool) -> list[dict]:
    rows = []
    for name, b, s, h, d in shapes:
        q, k, v = inputs(b, s, h, d, dev)
        for cfg, tma in itertools.product(SWEEP, (False, True)):
            try:
                ms, err = stages(q, k, v, cuda, cfg, tma)
                rows.append(dict(shape=name, config=cfg, tma=tma, attention_ms=round(ms["attention"], 4),
                                 rel_err_vs_reference=err))
            except Exception as e:  # a tile that does not fit shared memory: recorded, the sweep goes on
                rows.append(dict(shape=name, config=cfg, error=str(e).splitlines()[0][:200]))
            print(rows[-1], flush=True)
    return rows


def inputs(b, s, h, d, dev, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    # K with a per-channel offset, as projections with a bias give: what smoothing is for
    q, k, v = (torch.randn(b, s, h, d, generator=g) for _ in range(3))
    k += 0.5 * torch.randn(1, 1, h, d, generator=g)
    return [x.to(dev, torch.bfloat16) for x in (q, k, v)]


def table(shapes, dev, cuda: bool) -> list[dict]:
    rows = []
    fns = variants(cuda)
    for name, b, s, h, d in shapes:
        q, k, v = inputs(b, s, h, d, dev)
        ref = exact(q, k, v)
        flops = 4 * b * h * s * s * d
        for vname, fn in fns.items():
            row = dict(shape=name, B=b, S=s, H=h, D=d, variant=vname)
            try:
                row["rel_err_vs_fp32"] = round(rel(fn(q, k, v)[:1], ref), 5)
                row["ms"] = round(bench(lambda: fn(q, k, v), cuda), 4)
                row["tflops"] = round(flops / row["ms"] / 1e9, 1)
                if cuda:
                    try:
                        row["graph_ms"] = round(bench_graph(lambda: fn(q, k, v)), 4)
                    except Exception as e:  # a variant that cannot be captured (a host sync): recorded
                        row["graph_error"] = str(e).splitlines()[0][:200]
            except Exception as e:  # a backend that does not run this shape / GPU: recorded
                row["error"] = str(e).splitlines()[0][:200]
            rows.append(row)
            print(row, flush=True)
        ms, err = stages(q, k, v, cuda)
        rows.append(dict(shape=name, B=b, S=s, H=h, D=d, variant="ours: stages", smoothing_ms=round(ms["smoothing"], 4),
                         quantize_ms=round(ms["quantize"], 4),
                         attention_ms=round(ms["attention"], 4), rel_err_vs_reference=round(err, 5)))
        print(rows[-1], flush=True)
    return rows


def markdown(rows) -> str:
    lines = ["| shape | variant | ms | in a CUDA graph | TFLOP/s | rel. error vs fp32 |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if r["variant"] == "ours: stages":
            lines.append(f"| {r['shape']} | ours, stages: smoothing {r['smoothing_ms']} + quantize {r['quantize_ms']} ms + attention "
                         f"{r['attention_ms']} ms | | | | vs reference {r['rel_err_vs_reference']} |")
        else:
            lines.append(f"| {r['shape']} | {r['variant']} | {r.get('ms', r.get('error', ''))} | "
                         f"{r.get('graph_ms', '')} | {r.get('tflops', '')} | {r.get('rel_err_vs_fp32', '')} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one tiny shape (on the CPU: Triton's interpreter)")
    ap.add_argument("--sweep", action="store_true", help="time every tile config of the attention kernel first")
    ap.add_argument("--shapes", default="", help="only the shapes whose names contain this (e.g. 'FLUX')")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and os.environ.get("TRITON_INTERPRET") != "1":
        ap.error("no CUDA GPU: set TRITON_INTERPRET=1 (with --quick) to check the kernels on the CPU")
    dev = "cuda" if cuda else "cpu"
    known = QUICK if args.quick or not cuda else SHAPES
    shapes = [sh for sh in known if args.shapes in sh[0]]
    if not shapes:
        ap.error(f"--shapes {args.shapes!r} names none of {[sh[0] for sh in known]}")
    res = dict(device=torch.cuda.get_device_name() if cuda else "cpu (Triton interpreter: times are not speeds)",
               commit=os.environ.get("SVDQUANT_COMMIT", ""), torch=torch.__version__, command=" ".join(sys.argv))
    t0 = time.perf_counter()
    try:
        if args.sweep:
            res["sweep"] = sweep(shapes[:1] + shapes[-1:] if not args.quick else shapes, dev, cuda)
        res["rows"] = table(shapes, dev, cuda)
    except Exception:
        res["error"] = traceback.format_exc()
        print(res["error"], flush=True)
    res["seconds"] = round(time.perf_counter() - t0, 1)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "attention.json").write_text(json.dumps(res, indent=1))
        (args.out / "attention.md").write_text(f"{res['device']}, {res['commit']}\n\n" + markdown(res.get("rows", [])))
    return res


if __name__ == "__main__":
    main()
