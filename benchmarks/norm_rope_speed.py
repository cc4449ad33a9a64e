"""q/k RMSNorm + RoPE at FLUX.1's shapes: svdquant's kernel (``svdquant.ops.norm_rope``) beside diffusers' math,
eager and compiled by inductor (what a compiled FLUX step runs without ``fuse(norm_rope=True)``).

    python benchmarks/norm_rope_speed.py --out OUT            # GPU: FLUX.1's two cases, CUDA-graph timings
    python benchmarks/norm_rope_speed.py --quick --out OUT    # CPU: tiny shapes, the kernel in Triton's interpreter

Cases (batch 1, 24 heads of 128, 1024²): a single block's q, a slice of its stacked q/k/v + MLP GEMM output
(4,608 tokens, rows of 21,504), and a double block's q, 4,096 image tokens (a slice of the q/k/v output) after 512
text tokens (a slice of the text stream's; contiguous until session 36's runs). Per variant: the median of
``triton.testing.do_bench_cudagraph`` (ms), the bytes a single pass must move (the input read, the output
written) over that time, and the largest difference from the reference. The kernel runs with each ``(block_t,
heads per program, partners split)`` of :data:`CONFIGS` (the op launches the first), and the op once more writing
heads first (the layout diffusers' SDPA backends read). Then a block's q and k, heads first, on twice the bytes: the
op for each (two launches a stream), the qk op (one launch a stream, the kernel's ``pair=``: what
``fuse(norm_rope=True)`` runs), the same with the partners loaded a second time (the kernel to session 36), and
inductor's kernels compiled for both at once.

Then Qwen-Image's case (``qwenimage``: a block's q and k, 4,096 image tokens after 256 text tokens, slices of
stacked q/k/v outputs, heads first): diffusers' math (its ``RMSNorm``, then the complex product of
``apply_rotary_emb_qwen``) eager and compiled, where inductor generates no code for the complex product, against
the qk op with diffusers' RMSNorm rounding, its tables made from the complex ones in the timed call, as the
processor makes them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

# (block_t, heads a program, rotation partners split from registers), the op's default first
CONFIGS = ((16, 1, True), (32, 1, True), (64, 1, True), (16, 4, True), (16, 1, False), (32, 1, False))
CASES = {"single": dict(tokens=4608, text=None, row=21504), "double": dict(tokens=4096, text=512, row=9216)}


def inputs(case: dict, heads: int, dim: int, device: str, dtype=torch.bfloat16):
    """``q``, ``k``, ``cos``, ``sin``: q's and k's inputs as dicts of ``x``, ``w`` and the text stream's ``x2``,
    ``w2`` (None in the single case), the first and second column blocks of the stacked output (the text stream's
    of its own stack), then the rotary tables."""
    g = torch.Generator().manual_seed(0)
    hd = heads * dim
    rows = torch.randn(1, case["tokens"], case["row"], generator=g).to(device=device, dtype=dtype)
    text = None if case["text"] is None else torch.randn(1, case["text"], 3 * hd, generator=g).to(device, dtype)
    w, w2, wk, w2k = (torch.randn(dim, generator=g).to(device, dtype) for _ in range(4))
    angles = torch.randn(case["tokens"] + (case["text"] or 0), dim // 2, generator=g).repeat_interleave(2, 1)
    q = dict(x=rows[..., :hd], w=w, x2=None if text is None else text[..., :hd], w2=None if text is None else w2)
    k = dict(x=rows[..., hd:2 * hd], w=wk, x2=None if text is None else text[..., hd:2 * hd],
             w2=None if text is None else w2k)
    return q, k, angles.cos().to(device), angles.sin().to(device)


def launches(norm_rope_into, q: dict, cos, sin, out, block_t: int, group: int, split: bool, k: dict | None = None,
             out_k=None) -> None:
    """The text stream's launch (if any), then the image stream's; with ``k``: the key in the same launches."""
    text = 0 if q["x2"] is None else q["x2"].shape[1]
    for stream, offset in (("x2", 0), ("x", text)) if text else (("x", 0),):
        weight = "w2" if stream == "x2" else "w"
        pair = None if k is None else (out_k, k[stream], k[weight])
        norm_rope_into(out, q[stream], q[weight], cos, sin, 1e-6, offset, block_t=block_t, group=group, pair=pair,
                       split=split)


def kernel_label(block_t: int, group: int, split: bool) -> str:
    return f"svdquant kernel, block_t {block_t}, {group} heads" + (", split" if split else "")


def timer(device: str):
    if device == "cuda":
        from triton.testing import do_bench_cudagraph

        return lambda fn: do_bench_cudagraph(fn, rep=100)

    def cpu(fn, reps=3):
        fn()
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t) / reps * 1e3
    return cpu


def run(args) -> dict:
    from svdquant.kernels.norm_rope import norm_rope_into
    from svdquant.ops.norm_rope import norm_rope, norm_rope_qk, norm_rope_reference

    device = "cpu" if args.quick else "cuda"
    heads, dim = (2, 32) if args.quick else (24, 128)
    cases = {k: dict(v, tokens=16, text=v["text"] and 8, row=3 * heads * dim) for k, v in CASES.items()} \
        if args.quick else CASES
    bench = timer(device)
    results = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "heads": heads, "dim": dim,
               "commit": os.environ.get("SVDQUANT_COMMIT", ""), "cases": {}}
    for name, case in cases.items():
        q, k, cos, sin = inputs(case, heads, dim, device)
        x, w, x2, w2 = q["x"], q["w"], q["x2"], q["w2"]
        ref = norm_rope_reference(x, w, cos, sin, 1e-6, heads, x2, w2)
        ref_qk = torch.cat([ref, norm_rope_reference(k["x"], k["w"], cos, sin, 1e-6, heads, k["x2"], k["w2"])])
        moved = 2 * ref.numel() * ref.element_size()  # read once, written once
        variants = {"diffusers eager": lambda: norm_rope_reference(x, w, cos, sin, 1e-6, heads, x2, w2)}
        if not args.quick:
            compiled = torch.compile(norm_rope_reference, dynamic=False)
            variants["diffusers compiled (inductor)"] = lambda: compiled(x, w, cos, sin, 1e-6, heads, x2, w2)
        for block_t, group, split in CONFIGS:
            group = max(g for g in range(1, min(group, heads) + 1) if heads % g == 0)  # the tiny case's 2 heads

            def kernel(block_t=block_t, group=group, split=split):
                out = torch.empty_like(ref)
                launches(norm_rope_into, q, cos, sin, out, block_t, group, split)
                return out
            variants[kernel_label(block_t, group, split)] = kernel
        variants["svdquant op, written heads first (SDPA's layout)"] = \
            lambda: norm_rope(x, w, cos, sin, 1e-6, heads, x2, w2, heads_first=True)

        def q_then_k():  # the op for each, as fuse(norm_rope=True) ran to session 36
            return (norm_rope(x, w, cos, sin, 1e-6, heads, x2, w2, heads_first=True),
                    norm_rope(k["x"], k["w"], cos, sin, 1e-6, heads, k["x2"], k["w2"], heads_first=True))

        def q_and_k():  # the qk op: one launch a stream (the kernel's pair=), as the processor runs it now
            return norm_rope_qk(x, k["x"], w, k["w"], cos, sin, 1e-6, heads, x2, k["x2"], w2, k["w2"],
                                heads_first=True)

        def q_and_k_loaded():  # the qk op's launches with the partners loaded again (the kernel to session 36)
            out, out_k = (torch.empty_permuted(ref.shape, (0, 2, 1, 3), dtype=ref.dtype, device=ref.device)
                          for _ in range(2))  # heads first, as the qk op writes them
            launches(norm_rope_into, q, cos, sin, out, 16, 1, False, k=k, out_k=out_k)
            return out, out_k
        pairs = {"svdquant op, q then k (two launches a stream)": q_then_k,
                 "svdquant qk op, q and k in one launch a stream": q_and_k,
                 "svdquant kernel, q and k in one launch a stream, partners loaded": q_and_k_loaded}
        if not args.quick:  # inductor given both at once, as in a compiled step, where it may fuse them
            both = torch.compile(lambda *a: (norm_rope_reference(*a[:8]), norm_rope_reference(*a[8:])),
                                 dynamic=False)
            pairs["diffusers compiled (inductor), q and k"] = lambda: both(
                x, w, cos, sin, 1e-6, heads, x2, w2, k["x"], k["w"], cos, sin, 1e-6, heads, k["x2"], k["w2"])
        rows = {label: timed(name, label, fn, ref, moved, bench) for label, fn in variants.items()}
        rows |= {label: timed(name, label, lambda fn=fn: torch.cat(fn()), ref_qk, 2 * moved, bench, fn)
                 for label, fn in pairs.items()}
        results["cases"][name] = {"bytes": moved, "variants": rows}
    return results


def timed(case: str, label: str, fn, expect, nbytes: int, bench, run=None) -> dict:
    """One variant's row: its largest error against ``expect`` (from ``fn``) and ``run``'s median ms (``fn``'s if not
    given: the pairs are timed without the concatenation their check makes), printed as it is measured."""
    err = float((fn().float() - expect.float()).abs().max())
    ms = bench(run or fn)
    print(f"{case:9s} {label:62s} {ms:8.4f} ms {nbytes / ms / 1e6:8.1f} GB/s  err {err:.3g}", flush=True)
    return {"ms": round(ms, 4), "bytes": nbytes, "GB/s": round(nbytes / ms / 1e6, 1), "max_abs_err": err}


def qwen_case(quick: bool, device: str, bench) -> dict:
    """Qwen-Image's q and k (see the module doc): diffusers' math against the qk op, ``round_norm`` on."""
    from diffusers.models.normalization import RMSNorm
    from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen

    from svdquant.ops.norm_rope import complex_tables, norm_rope_qk

    heads, dim, tokens, text = (2, 32, 16, 8) if quick else (24, 128, 4096, 256)
    q, k, _, _ = inputs(dict(tokens=tokens, text=text, row=3 * heads * dim), heads, dim, device)
    g = torch.Generator().manual_seed(1)
    image, txt = (torch.polar(torch.ones(n, dim // 2), torch.randn(n, dim // 2, generator=g) * 10).to(device)
                  for n in (tokens, text))

    norms = {}
    for name, weight in (("q", q["w"]), ("q2", q["w2"]), ("k", k["w"]), ("k2", k["w2"])):
        # the q/k norms Qwen-Image has, their weights not requiring grad, as in a pipeline's call (no_grad): with
        # autograd recording, diffusers' side also saved tensors for a backward (session 42's call80 timed it so)
        norms[name] = RMSNorm(dim, eps=1e-6).to(device=device, dtype=weight.dtype).requires_grad_(False)
        norms[name].weight.copy_(weight)

    def diffusers_way(t, t2, norm, norm2):  # QwenDoubleStreamAttnProcessor2_0's steps, text first
        def one(x, rms, freqs):
            return apply_rotary_emb_qwen(rms(x.unflatten(-1, (heads, -1))), freqs, use_real=False)
        return torch.cat([one(t2, norm2, txt), one(t, norm, image)], dim=1)  # [B, S, H, D], as the attention reads

    def both():
        return (diffusers_way(q["x"], q["x2"], norms["q"], norms["q2"]),
                diffusers_way(k["x"], k["x2"], norms["k"], norms["k2"]))

    def ours():
        cos, sin = complex_tables(txt, image)
        return norm_rope_qk(q["x"], k["x"], q["w"], k["w"], cos, sin, 1e-6, heads, q["x2"], k["x2"], q["w2"],
                            k["w2"], heads_first=True, round_norm=True)
    variants = {"diffusers Qwen-Image eager, q and k": both, "svdquant qk op, diffusers' RMSNorm rounding": ours}
    if not quick:
        variants["diffusers Qwen-Image compiled (inductor), q and k"] = torch.compile(both, dynamic=False)
    expect = torch.cat(both())
    moved = 2 * 2 * expect[0].numel() * expect.element_size()  # q and k, each read once and written once
    rows = {label: timed("qwenimage", label, lambda fn=fn: torch.cat(fn()), expect, moved, bench, fn)
            for label, fn in variants.items()}
    return {"bytes": moved, "heads": heads, "dim": dim, "tokens": tokens, "text": text, "variants": rows}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="CPU, tiny shapes: checks the script runs")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    if args.quick:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    elif not torch.cuda.is_available():
        sys.exit("norm_rope_speed.py times a CUDA GPU; on the CPU give --quick")
    results = run(args)
    results["cases"]["qwenimage"] = qwen_case(args.quick, "cpu" if args.quick else "cuda",
                                              timer("cpu" if args.quick else "cuda"))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "norm_rope_speed.json").write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
