"""The SVDQuant linear on the INT8 path vs the real alternatives, on FLUX.1-dev shapes (one GPU call).

    python benchmarks/kernel_speed.py --out $OUT              # check, then the 24-shape table
    python benchmarks/kernel_speed.py --sweep --out $OUT      # + tile / block sweeps of every kernel first
    python benchmarks/kernel_speed.py --quick                 # two shapes

For each (M, K, N), side by side on the same GPU, warmed up, median of many runs
(``triton.testing.do_bench``), random inputs:

* cuBLAS BF16 ``F.linear``; FP8 row-wise ``torch._scaled_mm`` alone and with its activation
  quantization (eager torch); ``torch._int_mm`` (cuBLAS INT8);
* ours, speed mode (INT8 ``code · m`` resident): activation kernel + INT8 GEMM, rank-32
  branch fused, and without the branch; memory mode (4-bit resident): + the expand kernel;
* stages: the activation kernel, the GEMM as the layer runs it (the CUTLASS kernel on H100 / H200, Triton's
  elsewhere; before 2026-12-05 this column timed Triton's everywhere), the expand kernel alone;
* the GEMM's launch plan: where ``cutlass_launch.launches`` gives a product's last rows a second launch (FLUX's
  4,608 × 3,072 outputs), the GEMM in one launch too, eagerly and in a CUDA graph;
* BF16 and ours (speed mode, rank 32) again in a CUDA graph (ten calls a graph, the layer choice's
  ``graph_ms``), as a compiled, graph-captured step runs them: eagerly, a small shape also times the layer's host
  work (two activation-pass launches and the GEMM's, against cuBLAS's one).

The layer is a real :class:`svdquant.SVDQLinear` (``int4`` recipe: two-level INT4 weights,
INT8 activations) with random valid contents; its output is checked against the torch
reference before timing. The W4A16 kernel (adaLN shapes, M = 1..4, with a sweep of its steps and blocks) is
timed against its 4-bit bytes. Writes ``kernels.json`` and ``kernels.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SHAPES = [(3072, 9216), (3072, 3072), (3072, 12288), (12288, 3072), (3072, 21504), (15360, 3072)]
ADALN_SHAPES = [(3072, 18432), (3072, 9216)]  # FLUX.1's adaLN modulations: double blocks, single blocks
# the W4A16 kernel's sweep (FLUX's adaLN GEMVs run at a quarter of the copy rate with its defaults): on tensor-core
# tiles, the neighbours of its defaults (session 31: the whole grid of sessions 29-30 put none more than 7 % ahead)
W4A16_CONFIGS = [dict(fma=False, groups_per_step=g, block_n=b, num_warps=4) for g in (1, 2, 4) for b in (32, 64)]
# the multiply-add GEMV (w4a16_linear(fma=True), up to 4 tokens: int32 words, no int-to-float conversions), whole or
# split over K, less the one config that spills on sm_90 at 4 tokens (4 groups a step, 128 channels; Triton 3.9) and
# 8 slices of 4 groups a step (K = 3,072 has 12 such steps; refused); 8 warps were slower in session 31's first
# sweep, and the next step's loads issued before this step's arithmetic gained nothing in its second
W4A16_CONFIGS += [dict(fma=True, groups_per_step=g, block_n=b, num_warps=4, split_k=s) for g in (2, 4)
                  for b in (32, 64, 128) for s in (1, 2, 4, 8) if (g, b) != (4, 128) and (g, s) != (4, 8)]
# more bytes in flight a loop step (the GEMV reads 1.2-1.3 TB/s; a step's loads wait on memory, session 31): 8 and 16
# groups a step, none spilling at one token on sm_90 (96-168 registers; Triton 3.9 ahead of time)
W4A16_CONFIGS += [dict(fma=True, groups_per_step=g, block_n=b, num_warps=4, split_k=s)
                  for g, b, s in ((8, 32, 1), (8, 32, 2), (8, 64, 1), (8, 64, 2), (16, 32, 1))]
# the tiles split over K (w4a16_linear(split_k=)): more programs, each a K slice, then one launch summing them
W4A16_CONFIGS += [dict(fma=False, split_k=s, groups_per_step=2, block_n=b, num_warps=4) for s in (2, 4, 8)
                  for b in (32, 128)]
W4A16_WEIGHTS = 4  # distinct weights a timed call cycles through (4 × 28 MB at 3,072 → 18,432): not L2-resident
TOKENS = [4096, 4608]
BATCHES = [1, 4]
GEMM_CONFIGS = [
    dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=3),
    dict(BLOCK_M=256, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=4),
    dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4),
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=4),
    dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=2),
    dict(BLOCK_M=256, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4),
    # (64 x 256, to fill the last wave of N = 3,072 at 4,608 tokens, was slower: BENCHMARKS.md, "a tile sweep")
    # warp-specialized (issue 23, lever 2): Triton runs it on Hopper for descriptor-based persistent loops
    dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=3, WARP_SPECIALIZE=True),
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=4, WARP_SPECIALIZE=True),
    dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4, WARP_SPECIALIZE=True),
]


def random_layer(k, n, rank=32, activations="int8", dtype=torch.bfloat16, device="cuda", seed=0, mode="speed"):
    """An SVDQLinear (two-level INT4 weights) with random valid contents: kernels must be right on any of them."""
    from svdquant import SVDQLinear
    from svdquant.formats import pack_4bit_halves

    g = torch.Generator(device="cpu").manual_seed(seed)
    m = SVDQLinear(k, n, True, weights="int4m", activations=activations, rank=rank, dtype=dtype, device=device)
    with torch.no_grad():
        m.qweight.copy_(pack_4bit_halves(torch.randint(-7, 8, (n, k), generator=g), 64))
        m.wmult.copy_(torch.randint(1, 19, (n, k // 64), generator=g).to(torch.uint8))
        m.wscales.copy_(torch.rand(n, generator=g) * 2e-4 + 1e-5)
        m.smooth_inv.copy_(torch.rand(k, generator=g) + 0.5)
        if rank:
            m.lora_down.copy_((torch.randn(rank, k, generator=g) * 0.02).to(dtype))
            m.lora_up.copy_((torch.randn(n, rank, generator=g) * 0.02).to(dtype))
        m.bias.copy_((torch.randn(n, generator=g) * 0.1).to(dtype))
    m.set_weight_mode(mode)
    return m


def rel_err(y, ref) -> float:
    return float((y.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30))


def bench(fn, ms=100):
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=ms, return_mode="median")


def check_layer(k, n, m_tokens, activations, mode, dev, dtype=torch.bfloat16):
    """Our module's output vs the torch reference of the same layer (poisoned output first)."""
    from svdquant.ops.runners import ReferenceRunner

    layer = random_layer(k, n, activations=activations, device=dev, mode=mode, seed=k + n)
    x = (torch.randn(m_tokens, k, device=dev) * torch.exp(torch.randn(k, device=dev))).to(dtype)
    y = layer(x)
    ref = ReferenceRunner(layer)(x)
    assert torch.isfinite(y).all(), "non-finite output"
    return rel_err(y, ref)


def sweep_gemm(dev, sms, out_rows):
    from svdquant import kernels as K

    for (k, n) in SHAPES:
        for mt in TOKENS:
            a = torch.randint(-127, 128, (mt, k), device=dev, dtype=torch.int8)
            w = torch.randint(-126, 127, (n, k), device=dev, dtype=torch.int8)
            a_s = torch.rand(mt, device=dev)
            w_s = torch.rand(n, device=dev)
            la = torch.randn(mt, 32, device=dev) * 0.01
            lu = (torch.randn(n, 32, device=dev) * 0.01).to(torch.bfloat16)
            ref = (torch._int_mm(a, w.t()).float() * a_s[:, None] * w_s[None, :] + la @ lu.float().T)
            ref = ref.to(torch.bfloat16)
            flops = 2 * mt * k * n
            # the bar (issue 23): bare FP8 row-wise _scaled_mm at the same shape, in the same run
            af8, wf8 = a.to(torch.float8_e4m3fn), w.to(torch.float8_e4m3fn)
            ones_a, ones_w = torch.ones(mt, 1, device=dev), torch.ones(1, n, device=dev)
            fp8 = bench(lambda: torch._scaled_mm(af8, wf8.t(), scale_a=ones_a, scale_b=ones_w,
                                                 out_dtype=torch.bfloat16))
            out_rows.append(dict(k=k, n=n, m=mt, fp8_mm=fp8, fp8_tops=flops / fp8 / 1e9))
            print("gemm", json.dumps(out_rows[-1]), flush=True)
            for cfg in GEMM_CONFIGS:
                for persistent in (True, False):
                    try:
                        kw = dict(tma=True, num_programs=sms if persistent else None, config=cfg)
                        y = K.int8_gemm(a, a_s, w, w_s, la, lu, None, torch.bfloat16, **kw)
                        err = rel_err(y, ref)
                        t = bench(lambda: K.int8_gemm(a, a_s, w, w_s, la, lu, None, torch.bfloat16, **kw))
                        row = dict(k=k, n=n, m=mt, cfg=cfg, persistent=persistent, ms=t, tops=flops / t / 1e9,
                                   err=err)
                    except Exception as e:  # e.g. shared memory exceeded
                        row = dict(k=k, n=n, m=mt, cfg=cfg, persistent=persistent, error=str(e)[:200])
                    out_rows.append(row)
                    print("gemm", json.dumps(row), flush=True)


def act_gelu(rows, K, x, sinv, down, k, mt, copy):
    """The shipped activation pass with the MLP's GELU in it (``input_gelu_from``), against the GELU as its own
    pass before it (what unfused diffusers does); at K = 15,360 also a FLUX single block's proj_out: the input
    as two parts (attention 3,072 | a column slice of the stacked 21,504-wide GEMM output) with the GELU on the
    second, against the GELU + concatenation before the pass. ``-exact``: the GELU without ``tanh.approx``."""
    import torch.nn.functional as F

    gelu_at = 3072 if k == 15360 else 0
    cases = {"plain": lambda: K.quantize_activations(x, sinv, down),
             "gelu-in-pass": lambda: K.quantize_activations(x, sinv, down, input_gelu_from=gelu_at),
             "gelu-in-pass-exact": lambda: K.quantize_activations(x, sinv, down, input_gelu_from=gelu_at,
                                                                  exact_gelu=True),
             "gelu-pass-first": lambda: K.quantize_activations(
                 torch.cat([x[:, :gelu_at], F.gelu(x[:, gelu_at:], approximate="tanh")], 1), sinv, down)}
    if k == 15360:
        attn = x[:, :3072].contiguous()
        mlp = torch.randn(mt, 21504, device=x.device, dtype=x.dtype)[:, 9216:]
        cases["two-parts-gelu-in-pass"] = lambda: K.quantize_activations(attn, sinv, down, tail=mlp,
                                                                          input_gelu_from=3072)
        cases["two-parts-gelu-in-pass-exact"] = lambda: K.quantize_activations(attn, sinv, down, tail=mlp,
                                                                                input_gelu_from=3072, exact_gelu=True)
        cases["gelu-cat-first"] = lambda: K.quantize_activations(
            torch.cat([attn, F.gelu(mlp, approximate="tanh")], 1), sinv, down)
    for name, fn in cases.items():
        rows.append(dict(stage="act-gelu", case=name, k=k, m=mt, ms=bench(fn), copy_ms=copy))
        print(json.dumps(rows[-1]), flush=True)


def sweep_act(dev, rows, blocks=True):
    """Activation kernel blocks, with the branch's down projection in it, without it, and that projection
    alone on cuBLAS (what splitting it out would cost); the GELU cases (:func:`act_gelu`) first, and only them
    without ``blocks``."""
    from svdquant import kernels as K

    for (k, mt) in [(3072, 4608), (12288, 4608), (15360, 4096)]:
        x = torch.randn(mt, k, device=dev, dtype=torch.bfloat16)
        sinv = torch.rand(k, device=dev) + 0.5
        down = (torch.randn(32, k, device=dev) * 0.02).to(torch.bfloat16)
        copy = bench(lambda: x.clone())
        rows.append(dict(stage="act-cublas-down", k=k, m=mt, ms=bench(lambda: x @ down.T), copy_ms=copy))
        print(json.dumps(rows[-1]), flush=True)
        act_gelu(rows, K, x, sinv, down, k, mt, copy)
        if not blocks:
            continue
        for bm in (32, 64, 128):
            for bk in (64, 128):
                for tp in (2048, 8192):
                    for nw in (4, 8):
                        for lora in (down,):
                            kw = dict(stats_block_m=bm, stats_block_k=bk, target_programs=tp, num_warps=nw)
                            try:
                                t = bench(lambda: K.quantize_activations(x, sinv, lora, **kw), ms=50)
                                rows.append(dict(stage="act", k=k, m=mt, **kw, lora=lora is not None, ms=t,
                                                 copy_ms=copy))
                            except Exception as e:
                                rows.append(dict(stage="act", k=k, m=mt, **kw, lora=lora is not None,
                                                 error=str(e)[:200]))
                            print(json.dumps(rows[-1]), flush=True)


def sweep_small(dev, out):
    """Activation kernel and expand block sizes (the W4A16 kernel's sweep is :func:`w4a16_table`'s, checked)."""
    from svdquant import kernels as K

    rows = []
    sweep_act(dev, rows)
    for (k, n) in SHAPES:
        p = torch.randint(0, 256, (n, k // 2), device=dev, dtype=torch.uint8)
        mult = torch.randint(1, 19, (n, k // 64), device=dev, dtype=torch.uint8)
        for bn in (16, 32, 64):
            for nw in (4, 8):
                t = bench(lambda: K.expand_int4m(p, mult, block_n=bn, num_warps=nw))
                gbs = (p.numel() + mult.numel() + 2 * p.numel()) / t / 1e6
                rows.append(dict(stage="expand", k=k, n=n, block_n=bn, warps=nw, ms=t, gbs=gbs))
                print(json.dumps(rows[-1]), flush=True)
    out["small_sweeps"] = rows


def table(dev, shapes, tokens, out, rank=32):
    from svdquant import kernels as K
    from svdquant.pipelines.layer_choice import graph_ms  # the layer choice's CUDA-graph timer

    rows = []
    for mt0 in tokens:
        for b in BATCHES:
            mt = mt0 * b
            for (k, n) in shapes:
                r = dict(m=mt, k=k, n=n)
                try:
                    x = torch.randn(mt, k, device=dev, dtype=torch.bfloat16)
                    w16 = torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02
                    flops = 2 * mt * k * n
                    r["bf16"] = bench(lambda: F.linear(x, w16))
                    wf8 = w16.to(torch.float8_e4m3fn)
                    xs = torch.ones(mt, 1, device=dev)
                    wsc = torch.ones(1, n, device=dev)
                    xf8 = x.to(torch.float8_e4m3fn)
                    r["fp8_mm"] = bench(lambda: torch._scaled_mm(xf8, wf8.t(), scale_a=xs, scale_b=wsc,
                                                                 out_dtype=torch.bfloat16))

                    def fp8_quant_mm():
                        s = x.abs().amax(1, keepdim=True).float() / 448
                        q = (x.float() / s).to(torch.float8_e4m3fn)
                        return torch._scaled_mm(q, wf8.t(), scale_a=s, scale_b=wsc, out_dtype=torch.bfloat16)

                    r["fp8_mm_quant"] = bench(fp8_quant_mm)
                    a8 = torch.randint(-127, 128, (mt, k), device=dev, dtype=torch.int8)
                    w8 = torch.randint(-126, 127, (n, k), device=dev, dtype=torch.int8)
                    r["int_mm"] = bench(lambda: torch._int_mm(a8, w8.t()))
                    for mode in ("speed", "memory"):
                        for rk in (rank, 0):
                            layer = random_layer(k, n, rank=rk, device=dev, mode=mode)
                            r[f"ours_{mode}_r{rk}"] = bench(lambda: layer(x))
                    layer = random_layer(k, n, rank=rank, device=dev, mode="speed")
                    r["bf16_graph"] = graph_ms(lambda: F.linear(x, w16), reps=20, inner=10)
                    r["ours_graph"] = graph_ms(lambda: layer(x), reps=20, inner=10)
                    run = layer._runner
                    # the stages as the layer runs them: X·L1ᵀ in bf16 for the CUTLASS GEMM (H100 / H200)
                    lora_dtype = torch.bfloat16 if run.sm90 else torch.float32
                    a, a_s, la = K.quantize_activations(x, run.sinv, run.down, lora_dtype=lora_dtype)
                    r["act"] = bench(lambda: K.quantize_activations(x, run.sinv, run.down, lora_dtype=lora_dtype))
                    r["gemm_kernel"] = "CUTLASS" if run.sm90 else "Triton"
                    r["gemm"] = bench(lambda: layer_gemm(run, a, a_s, la))
                    r["gemm_nobranch"] = bench(lambda: layer_gemm(run, a, a_s, None))
                    if run.sm90:  # the launch plan's A/B: the tail rows' second launch against one launch
                        from svdquant.kernels import cutlass_launch as cl

                        r["gemm_launches"] = len(cl.launches(mt, n, k, torch.cuda.get_device_properties(dev)
                                                              .multi_processor_count, rank))
                        default, cl.SPLIT_TAIL = cl.SPLIT_TAIL, False
                        r["gemm_one_launch"] = bench(lambda: layer_gemm(run, a, a_s, la))
                        r["gemm_one_launch_graph"] = graph_ms(lambda: layer_gemm(run, a, a_s, la), reps=20, inner=10)
                        cl.SPLIT_TAIL = True
                        r["gemm_split"] = bench(lambda: layer_gemm(run, a, a_s, la))
                        r["gemm_graph"] = graph_ms(lambda: layer_gemm(run, a, a_s, la), reps=20, inner=10)
                        cl.SPLIT_TAIL = default
                    packed = run.packed_weight()
                    r["expand"] = bench(lambda: K.expand_int4m(packed, run.mult))
                    r["gemm_tops"] = flops / r["gemm"] / 1e9
                    r["ours_tops"] = flops / r[f"ours_speed_r{rank}"] / 1e9
                    del layer, run, x, w16, wf8, xf8, a8, w8
                except Exception as e:
                    r["error"] = f"{type(e).__name__}: {e}"[:300]
                    traceback.print_exc()
                rows.append(r)
                print("table", json.dumps(r), flush=True)
                torch.cuda.empty_cache()
    out["table"] = rows
    return rows


def layer_gemm(run, a, a_s, la, out_dtype=torch.bfloat16):
    """The GEMM of a speed-mode layer's runner as its forward calls it (the CUTLASS kernel where the runner uses it,
    else Triton's), with its branch or (``la`` None) without."""
    from svdquant.ops import library

    return library.int8_gemm_impl(a, a_s, la, run.up if la is not None else None, run.bias_gemm, run.w, None,
                                  run.w_scale_gemm, run.group, run.tma, run.num_programs or 0, False, out_dtype,
                                  run.sm90, w_desc=run.w_desc)


def w4a16_table(dev, out):
    """The adaLN-shaped weight-only layers at a few tokens: our kernel, the dequantize-then-cuBLAS reference,
    BF16 cuBLAS, and the 4-bit bytes read per second against a device copy's rate."""
    from svdquant import kernels as K
    from svdquant.formats import get_format, pack_4bit_halves, quantize
    from svdquant.ops.reference import weight_only_linear
    from svdquant.pipelines.layer_choice import graph_ms  # the layer choice's CUDA-graph timer

    big = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
    copy_tbs = 2 * big.numel() / bench(lambda: big.clone()) / 1e9
    del big

    rows = []
    for (k, n) in ADALN_SHAPES:
        w = torch.randn(n, k, device=dev)
        q = quantize(w, "int4", scale_dtype=torch.bfloat16)
        p, sc = pack_4bit_halves(q.codes, 64), q.scales
        w16 = w.to(torch.bfloat16)
        nbytes = p.numel() + sc.numel() * 2
        # in a CUDA graph, as a step runs them, each call on another weight (a step's adaLN weights are all
        # different: one weight called again would come from L2)
        copies = [(p, sc)] + [(torch.randint_like(p, 256), sc.clone()) for _ in range(W4A16_WEIGHTS - 1)]

        def in_graph(x, copies=copies, **cfg):
            return graph_ms(lambda: [K.w4a16_linear(x, pc, scc, None, **cfg) for pc, scc in copies], reps=10,
                            inner=5) / len(copies)

        for mt in (1, 2, 4):
            x = torch.randn(mt, k, device=dev, dtype=torch.bfloat16)
            t = bench(lambda: K.w4a16_linear(x, p, sc, None))
            t_graph = in_graph(x)
            t_ref = bench(lambda: weight_only_linear(x, get_format("int4").dequantize(q, torch.bfloat16), None,
                                                     None, None))
            t16 = bench(lambda: F.linear(x, w16))
            t16_graph = graph_ms(lambda: F.linear(x, w16), reps=10, inner=5)  # 113 / 57 MB: not from L2 either
            want = weight_only_linear(x, get_format("int4").dequantize(q, torch.bfloat16), None, None, None).float()
            # more groups per loop step (bytes in flight per program), other blocks, split K: checked, then timed
            # in CUDA graphs (eagerly a launch costs as much as these kernels take)
            sweep = {}
            for cfg in W4A16_CONFIGS:
                try:
                    got = K.w4a16_linear(x, p, sc, None, **cfg).float()
                    ok = float((got - want).norm() / want.norm()) < 1e-2
                    sweep[json.dumps(cfg)] = in_graph(x, **cfg) if ok else "wrong"
                except Exception as e:  # a config that does not compile: said, not fatal
                    sweep[json.dumps(cfg)] = f"{type(e).__name__}: {str(e)[:120]}"
            timed = {c: v for c, v in sweep.items() if isinstance(v, float)}
            best = min(timed, key=timed.get) if timed else None
            rows.append(dict(k=k, n=n, m=mt, ms=t, graph_ms=t_graph, reference_ms=t_ref, bf16_ms=t16,
                             bf16_graph_ms=t16_graph,
                             tbs=nbytes / t / 1e9, graph_tbs=nbytes / t_graph / 1e9, copy_tbs=copy_tbs, sweep=sweep,
                             best=best, best_ms=timed.get(best), best_tbs=nbytes / timed[best] / 1e9 if best else None))
            print("w4a16", json.dumps(rows[-1]), flush=True)
    out["w4a16"] = rows


def markdown(rows, header) -> str:
    cols = ["M", "K", "N", "BF16 ms", "FP8 mm (+quant) ms", "int_mm ms", "ours ms (speed)", "ours/BF16",
            "ours/FP8 mm", "no-branch ms", "branch cost", "memory mode ms", "mem/BF16", "act ms", "GEMM ms",
            "expand ms", "GEMM TOPS", "graphs: BF16 / ours ms", "graphs: ours/BF16", "GEMM/FP8 mm",
            "launches: GEMM ms (graph) / one launch"]
    lines = [header, "", "| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['m']} | {r['k']} | {r['n']} | error: {r['error'][:80]} |")
            continue
        s, s0, mm = r["ours_speed_r32"], r["ours_speed_r0"], r["ours_memory_r32"]
        lines.append(
            f"| {r['m']} | {r['k']} | {r['n']} | {r['bf16']:.3f} | {r['fp8_mm']:.3f} ({r['fp8_mm_quant']:.3f}) | "
            f"{r['int_mm']:.3f} | {s:.3f} | {r['bf16'] / s:.2f}× | {r['fp8_mm'] / s:.2f}× | {s0:.3f} | "
            f"{(s / s0 - 1) * 100:+.1f}% | {mm:.3f} | {r['bf16'] / mm:.2f}× | {r['act']:.3f} | {r['gemm']:.3f} | "
            f"{r['expand']:.3f} | {r['gemm_tops']:.0f} | {r['bf16_graph']:.3f} / {r['ours_graph']:.3f} | "
            f"{r['bf16_graph'] / r['ours_graph']:.2f}× | {r['fp8_mm'] / r['gemm']:.3f}× | " + (
                f"{r['gemm_launches']}: {r['gemm_split']:.4f} ({r['gemm_graph']:.4f}) / {r['gemm_one_launch']:.4f} "
                f"({r['gemm_one_launch_graph']:.4f}) |" if "gemm_launches" in r else "– |"))
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="out")
    ap.add_argument("--sweep", action="store_true", help="time tile / block variants of every kernel first")
    ap.add_argument("--act-sweep", action="store_true", help="time block variants of the activation kernel")
    ap.add_argument("--small-sweep", action="store_true", help="time block variants of the non-GEMM kernels")
    ap.add_argument("--gemm-sweep", action="store_true", help="only the GEMM tiles (with bare FP8 _scaled_mm)")
    ap.add_argument("--gelu-sweep", action="store_true", help="only the activation pass's GELU cases")
    ap.add_argument("--quick", action="store_true", help="two shapes, M = 4096 only")
    ap.add_argument("--tokens", type=int, nargs="+", choices=TOKENS, help="the table at these tokens only")
    ap.add_argument("--no-table", action="store_true")
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--w4a16", action="store_true", help="only the W4A16 (adaLN) table and its sweep")
    args = ap.parse_args(argv)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    commit = os.environ.get("SVDQUANT_COMMIT") or subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    import triton

    out = dict(device=props.name, sms=props.multi_processor_count, torch=torch.__version__,
               triton=triton.__version__, commit=commit, checks=[])
    t0 = time.time()
    if args.w4a16:
        w4a16_table(dev, out)
        (out_dir / "kernels.json").write_text(json.dumps(out, indent=1))
        return out
    for (k, n) in ([] if args.no_check else SHAPES):
        for act in ("int8", "int4m"):
            for mode in ("speed", "memory"):
                for dt in (torch.bfloat16, torch.float32):
                    try:
                        e = check_layer(k, n, 4608 if k < 15000 else 1000, act, mode, dev, dt)
                    except Exception as ex:
                        e = f"{type(ex).__name__}: {ex}"[:300]
                    out["checks"].append(dict(k=k, n=n, activations=act, mode=mode, dtype=str(dt), rel_err=e))
                    print("check", k, n, act, mode, dt, e, flush=True)
    if args.act_sweep or args.gelu_sweep:  # --gelu-sweep: its GELU cases only
        out["act_sweep"] = []
        sweep_act(dev, out["act_sweep"], blocks=args.act_sweep)
        (out_dir / "kernels.json").write_text(json.dumps(out, indent=1))
    if args.gemm_sweep or args.sweep:
        out["gemm_sweep"] = []
        sweep_gemm(dev, props.multi_processor_count, out["gemm_sweep"])
        (out_dir / "kernels.json").write_text(json.dumps(out, indent=1))
    if args.small_sweep or args.sweep:
        sweep_small(dev, out)
        (out_dir / "kernels.json").write_text(json.dumps(out, indent=1))
    if not args.no_table:
        if not args.tokens:  # --tokens: the linear's table alone
            w4a16_table(dev, out)
        shapes = SHAPES[:2] if args.quick else SHAPES
        tokens = TOKENS[:1] if args.quick else args.tokens or TOKENS
        rows = table(dev, shapes, tokens, out)
        header = (f"{props.name}, torch {torch.__version__}, triton {triton.__version__}, commit {commit}; "
                  "median ms (triton.testing.do_bench; graphs: ten calls a CUDA graph, median of 20 replays); "
                  "TOPS = 2·M·K·N / time; GEMM: "
                  f"{', '.join(sorted({r.get('gemm_kernel', '?') for r in rows if 'error' not in r}))}'s kernel, "
                  "as the layer runs it.")
        (out_dir / "kernels.md").write_text(markdown(rows, header) + "\n")
        print(markdown(rows, header))
    out["seconds"] = time.time() - t0
    (out_dir / "kernels.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
