"""Fused W4A4 linear vs the real alternatives on FLUX.1-dev linear shapes (one GPU call).

    python benchmarks/kernels.py --out $OUT            # full run: check, sweep, table
    python benchmarks/kernels.py --quick               # two shapes, default configs

For each (M, K, N), side by side on the same GPU, warmed up, median of many runs
(``triton.testing.do_bench``), inputs drawn at random:

* cuBLAS BF16 ``F.linear``;
* FP8 row-wise ``torch._scaled_mm``, alone and with its activation quantization (eager torch);
* unfused SVDQuant: kernel 1 without the branch, kernel 2 without the branch, and the
  branch as two torch matmuls plus an add;
* ours: kernel 1 + kernel 2 with the rank-32 branch fused, and without the branch;
* stages: kernel 1 alone, kernel 2 alone, kernel 2 with int32 accumulation and no
  per-group rescale (the ceiling of this tiling), a plain bf16 copy of X (bandwidth);
* NVFP4: kernel 1 + the 16-bit-tensor-core GEMM.

Before timing, each kernel's output is checked against the torch reference on the same
random inputs. Writes ``kernels.json`` and ``kernels.md`` (the table) to ``--out``.
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

DEFAULT_TILE = dict(BLOCK_N=64, BLOCK_M=128, GROUP_N=8, num_warps=4, num_stages=4)
SHAPES = [(3072, 9216), (3072, 3072), (3072, 12288), (12288, 3072), (3072, 21504), (15360, 3072)]
TOKENS = [4096, 4608]
BATCHES = [1, 4]


def random_layer(k, n, rank=32, fmt="int4", dtype=torch.bfloat16, device="cuda", seed=0):
    """An SVDQLinear with random (valid) quantized contents: the kernels must be right on any of them."""
    from svdquant import SVDQLinear
    from svdquant.formats import pack_4bit_halves

    g = torch.Generator(device="cpu").manual_seed(seed)
    group = 64 if fmt == "int4" else 16
    m = SVDQLinear(k, n, True, weights=fmt, activations=fmt, group_size=group, rank=rank, dtype=dtype, device=device)
    with torch.no_grad():
        if fmt == "int4":
            codes = torch.randint(-7, 8, (n, k), generator=g)
            m.wscales.copy_((torch.rand(n, k // group, generator=g) * 0.02 + 0.001).to(dtype))
        else:
            codes = torch.randint(0, 16, (n, k), generator=g)
            m.wscales.copy_((torch.rand(n, k // group, generator=g) * 400 + 1).to(torch.float8_e4m3fn))
            m.wtensor_scale.fill_(1e-4)
            m.input_scale.fill_(3e-3)
        m.qweight.copy_(pack_4bit_halves(codes, group).to(device))
        m.smooth_inv.copy_(torch.exp(0.3 * torch.randn(k, generator=g)))
        if rank:
            m.lora_down.copy_((torch.randn(rank, k, generator=g) / k**0.5).to(dtype))
            m.lora_up.copy_((torch.randn(n, rank, generator=g) * 0.05).to(dtype))
        m.bias.copy_((torch.randn(n, generator=g) * 0.1).to(dtype))
    return m


def rel_err(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def bench(fn, reps_ms=200):
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=reps_ms, return_mode="median")


def check(m, x):
    """Kernel vs reference on the same input; the bound covers bf16 output rounding and tf32 epilogue."""
    from svdquant.ops import reference_linear
    from svdquant.kernels import linear

    y = linear(x, m)
    ref = reference_linear(x, m)
    assert torch.isfinite(y).all(), "non-finite kernel output"
    return rel_err(y, ref)


K2_TILES = [
    dict(BLOCK_N=64, BLOCK_M=128, GROUP_N=8, num_warps=4, num_stages=4),
    dict(BLOCK_N=128, BLOCK_M=128, GROUP_N=8, num_warps=8, num_stages=3),
    dict(BLOCK_N=128, BLOCK_M=128, GROUP_N=8, num_warps=8, num_stages=4),
    dict(BLOCK_N=128, BLOCK_M=256, GROUP_N=8, num_warps=8, num_stages=3),
]
K1_CONFIGS = [dict(block_m=64, num_warps=4), dict(block_m=32, num_warps=4), dict(block_m=128, num_warps=8),
              dict(block_m=64, num_warps=8)]
LAYOUTS = {0: "packed int4 (unpack in registers)", 1: "int8 codes", 2: "fp8 codes"}


def tile_name(cfg):
    return f"{cfg['BLOCK_N']}x{cfg['BLOCK_M']} w{cfg['num_warps']} s{cfg['num_stages']}"


def explore(args, errors):
    """Which kernel 1 config and which kernel 2 layout / tile / rescale order is fastest, on three shapes."""
    from svdquant.formats import unpack_4bit_halves
    from svdquant.kernels import prepared
    from svdquant.kernels.gemm import w4a4_gemm
    from svdquant.kernels.quantize import quantize_input

    out = {}
    for k, n in [(3072, 3072), (3072, 12288)]:  # one K: each variant compiles once
        M = 4096
        m4 = random_layer(k, n)
        kw = prepared(m4)
        x = torch.randn(M, k, device="cuda", dtype=torch.bfloat16)
        res = {"copy_x": bench(lambda: x.clone())}
        for c in K1_CONFIGS:
            try:
                res[f"k1 bm{c['block_m']} w{c['num_warps']}"] = bench(lambda: quantize_input(x, m4.smooth_inv,
                                                                                         kw.lora_down, **c))
            except Exception as e:
                errors.append(f"k1 {c}: {type(e).__name__}: {str(e)[:160]}")
        w_by_layout = {0: m4.qweight}
        w_by_layout[1] = unpack_4bit_halves(m4.qweight, 64, signed=True).to(torch.int8).contiguous()
        w_by_layout[2] = w_by_layout[1].to(torch.float8_e4m3fn)
        ref = None
        for layout in (0, 1, 2):
            cdt = torch.float8_e4m3fn if layout == 2 else torch.int8
            codes, st, la = quantize_input(x, m4.smooth_inv, kw.lora_down, codes_dtype=cdt)
            wq = w_by_layout[layout]
            y = w4a4_gemm(codes, st, wq, kw.wscales_t, la, kw.lora_up, m4.bias, torch.float32, w_layout=layout)
            if ref is None:
                ref = y
            res[f"L{layout} vs L0 rel"] = rel_err(y, ref)
            for cfg in K2_TILES:
                if layout == 0 and cfg["BLOCK_M"] == 256:
                    continue
                for mode in ("plain", "pipeline", "ceiling", "per-channel-w"):
                    kw2 = dict(pipeline=mode == "pipeline", no_rescale=mode == "ceiling",
                               per_channel_w=mode == "per-channel-w")
                    if mode in ("ceiling", "per-channel-w") and cfg is not K2_TILES[0] and cfg is not K2_TILES[2]:
                        continue
                    name = f"k2 L{layout} {tile_name(cfg)} {mode}"
                    try:
                        res[name] = bench(lambda: w4a4_gemm(codes, st, wq, kw.wscales_t, la, kw.lora_up, m4.bias,
                                                            torch.bfloat16, w_layout=layout, **kw2, **cfg), 100)
                    except Exception as e:
                        errors.append(f"{name}: {type(e).__name__}: {str(e)[:160]}")
        flops = 2.0 * M * k * n
        print(f"--- {k}x{n} M={M}: " + ", ".join(f"{kk}={v:.4f}" if "rel" in kk else
                                                  f"{kk}={v:.3f}ms/{flops / v / 1e9:.0f}T" if kk.startswith("k2")
                                                  else f"{kk}={v:.4f}ms" for kk, v in res.items()), flush=True)
        out[f"{k}x{n}"] = res
    return out


def best_k2(explored, layouts=(0, 1, 2)):
    """(layout, tile, pipeline) with the lowest summed time over the explored shapes (rescaled modes only)."""
    totals = {}
    for res in explored.values():
        for key, v in res.items():
            if key.startswith("k2 ") and (key.endswith(" plain") or key.endswith(" pipeline")):
                totals[key.split(" ", 1)[1]] = totals.get(key.split(" ", 1)[1], 0.0) + v
    cands = {k_: v for k_, v in totals.items() if int(k_[1]) in layouts and all(
        f"k2 {k_}" in r for r in explored.values())}
    name = min(cands, key=cands.get)
    layout = int(name[1])
    tile = next(c for c in K2_TILES if tile_name(c) in name)
    return layout, tile, name.endswith("pipeline"), name


def best_k1(explored):
    totals = {}
    for res in explored.values():
        for key, v in res.items():
            if key.startswith("k1 "):
                totals[key] = totals.get(key, 0.0) + v
    name = min(totals, key=totals.get)
    return next(c for c in K1_CONFIGS if f"k1 bm{c['block_m']} w{c['num_warps']}" == name)


def run(args):
    from svdquant.formats import unpack_4bit_halves
    from svdquant.kernels import prepared
    from svdquant.kernels.gemm import fp4_gemm, w4a4_gemm
    from svdquant.kernels.quantize import quantize_input

    dev = "cuda"
    props = torch.cuda.get_device_properties(0)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    import triton

    env = dict(device=props.name, sms=props.multi_processor_count, torch=torch.__version__, triton=triton.__version__,
               commit=commit or os.environ.get("SVDQ_COMMIT", "?"))
    print(env, flush=True)
    rows, errors = [], []
    explored = explore(args, errors) if args.explore else {}
    if explored:
        env["explored"] = explored
        layout, tile, pipe, name = best_k2(explored)
        k1cfg = best_k1(explored)
        # the packed layout is the memory-saving default; report its best too
        p_layout, p_tile, p_pipe, p_name = best_k2(explored, layouts=(0,))
        env["chosen"] = dict(k2=name, k1=k1cfg, packed_k2=p_name)
        print("chosen:", env["chosen"], flush=True)
    else:
        layout, tile, pipe, k1cfg = 0, dict(), False, {}
        p_layout, p_tile, p_pipe = 0, dict(), False
    shapes = SHAPES[:2] if args.quick else SHAPES
    tokens = TOKENS[:1] if args.quick else TOKENS
    batches = BATCHES[:1] if args.quick else BATCHES
    for k, n in shapes:
        m4 = random_layer(k, n, fmt="int4")
        m0 = random_layer(k, n, rank=0, fmt="int4")
        mf = random_layer(k, n, fmt="nvfp4")
        w16 = torch.randn(n, k, device=dev, dtype=torch.bfloat16) / k**0.5
        w8 = w16.to(torch.float8_e4m3fn)
        ws8 = torch.ones(1, n, device=dev, dtype=torch.float32)
        kw4, kwf = prepared(m4), prepared(mf)
        cdt = torch.float8_e4m3fn if layout == 2 else torch.int8
        wq = m4.qweight if layout == 0 else unpack_4bit_halves(m4.qweight, 64, signed=True).to(cdt).contiguous()
        for t in tokens:
            for b in batches:
                M = t * b
                x = torch.randn(M, k, device=dev, dtype=torch.bfloat16)
                flops = 2.0 * M * k * n
                row = dict(M=M, tokens=t, batch=b, K=k, N=n, layout=LAYOUTS[layout], k2_tile=tile_name({
                    **DEFAULT_TILE, **tile}), pipeline=pipe)
                try:
                    row["err_int4"] = check(m4, x[:2048])
                    row["err_nvfp4"] = check(mf, x[:2048])
                except Exception as e:
                    errors.append(f"check {k}x{n}: {e!r}")
                    traceback.print_exc()
                row["bf16"] = bench(lambda: F.linear(x, w16))

                def fp8_q():
                    s_ = x.abs().amax(-1, keepdim=True).float() / 448
                    return (x / s_).to(torch.float8_e4m3fn), s_

                xq8, s8 = fp8_q()
                row["fp8_mm"] = bench(lambda: torch._scaled_mm(xq8, w8.t(), scale_a=s8, scale_b=ws8,
                                                               out_dtype=torch.bfloat16))

                def fp8_full():
                    q, s_ = fp8_q()
                    return torch._scaled_mm(q, w8.t(), scale_a=s_, scale_b=ws8, out_dtype=torch.bfloat16)

                row["fp8_with_quant"] = bench(fp8_full)
                k1 = lambda lora: quantize_input(x, m4.smooth_inv, lora, codes_dtype=cdt, **k1cfg)  # noqa: E731
                codes, st, la = k1(kw4.lora_down)
                codes0, st0, _ = k1(None)
                row["k1"] = bench(lambda: k1(kw4.lora_down))
                row["k1_norank"] = bench(lambda: k1(None))
                row["copy_x"] = bench(lambda: x.clone())
                k2 = lambda c, s_, l_, lu, **kw: w4a4_gemm(c, s_, wq, kw4.wscales_t, l_, lu, m4.bias,  # noqa: E731
                                                           torch.bfloat16, w_layout=layout, pipeline=pipe, **kw,
                                                           **tile)
                row["k2"] = bench(lambda: k2(codes, st, la, kw4.lora_up))
                row["k2_norank"] = bench(lambda: k2(codes0, st0, None, None))
                row["k2_ceiling"] = bench(lambda: k2(codes0, st0, None, None, no_rescale=True))
                row["ours"] = bench(lambda: k2(*k1(kw4.lora_down), kw4.lora_up))
                row["ours_norank"] = bench(lambda: k2(*k1(None)[:2], None, None))

                def unfused():
                    c, s_, _ = k1(None)
                    return k2(c, s_, None, None) + (x @ m4.lora_down.t()) @ m4.lora_up.t()

                row["unfused"] = bench(unfused)
                if layout != 0:  # the memory-saving packed layout, for comparison
                    pk2 = lambda c, s_, l_, lu: w4a4_gemm(c, s_, m4.qweight, kw4.wscales_t, l_, lu,  # noqa: E731
                                                          m4.bias, torch.bfloat16, pipeline=p_pipe, **p_tile)
                    row["ours_packed"] = bench(lambda: pk2(*quantize_input(x, m4.smooth_inv, kw4.lora_down,
                                                                           **k1cfg), kw4.lora_up))
                try:
                    def fp4():
                        v, _, l_ = quantize_input(x, mf.smooth_inv, kwf.lora_down, fmt="nvfp4", group_size=16,
                                                  input_scale=mf.input_scale)
                        return fp4_gemm(v, mf.qweight, mf.wscales, mf.wtensor_scale, mf.input_scale, l_, kwf.lora_up,
                                        mf.bias, torch.bfloat16)
                    row["nvfp4"] = bench(fp4)
                except Exception as e:
                    errors.append(f"nvfp4 {k}x{n}: {type(e).__name__}: {str(e)[:200]}")
                for key in ("bf16", "fp8_mm", "fp8_with_quant", "ours", "ours_norank", "ours_packed", "unfused", "k2",
                            "k2_ceiling", "nvfp4"):
                    if key in row:
                        row[f"tflops_{key}"] = flops / row[key] / 1e9
                rows.append(row)
                print(json.dumps({k_: (round(v, 4) if isinstance(v, float) else v) for k_, v in row.items()}),
                      flush=True)
                if args.out:
                    (args.out / "kernels.json").write_text(json.dumps(dict(env=env, rows=rows, errors=errors), indent=1))
    return env, rows, errors


def table(env, rows) -> str:
    out = [f"{env['device']}, torch {env['torch']}, triton {env['triton']}, commit {env['commit']}; "
           "median ms (triton.testing.do_bench); TFLOP/s = 2·M·K·N / time.", "",
           "| M | K | N | BF16 ms | FP8 mm (+quant) ms | ours ms | ours/BF16 | no-branch ms | branch cost | "
           "unfused ms | ours vs unfused | k1 ms | k2 ms | k2 no-rescale ms | packed-layout ms | NVFP4 ms | "
           "ours TFLOP/s |",
           "| --- " * 17 + "|"]
    for r in rows:
        if "ours" not in r:
            continue
        out.append(
            f"| {r['M']} | {r['K']} | {r['N']} | {r['bf16']:.3f} | {r['fp8_mm']:.3f} ({r['fp8_with_quant']:.3f}) | "
            f"{r['ours']:.3f} | {r['bf16'] / r['ours']:.2f}× | {r['ours_norank']:.3f} | "
            f"{100 * (r['ours'] / r['ours_norank'] - 1):+.1f}% | {r['unfused']:.3f} | {r['unfused'] / r['ours']:.2f}× | "
            f"{r['k1']:.3f} | {r['k2']:.3f} | {r['k2_ceiling']:.3f} | {r.get('ours_packed', r['ours']):.3f} | "
            f"{r.get('nvfp4', float('nan')):.3f} | "
            f"{r['tflops_ours']:.0f} |")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--explore", action="store_true",
                    help="first time kernel variants (layouts, tiles, rescale order) on three shapes, then use the best")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/kernels.py needs a CUDA GPU")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    env, rows, errors = run(args)
    md = table(env, rows)
    print(md)
    print("errors:", *errors, sep="\n  ")
    print(f"{time.time() - t0:.0f} s")
    if args.out:
        (args.out / "kernels.md").write_text(md + "\n")
        (args.out / "kernels.json").write_text(json.dumps(dict(env=env, rows=rows, errors=errors), indent=1))


if __name__ == "__main__":
    main()
