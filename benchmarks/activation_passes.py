"""The INT8 activation passes of a FLUX.1-dev step, each timed in a CUDA graph, against their bandwidth floor.

    python3 benchmarks/activation_passes.py --out $OUT            # GPU: the step's passes, then a block sweep
    python3 benchmarks/activation_passes.py --no-sweep --out $OUT # the passes at the shipped blocks only
    python benchmarks/activation_passes.py --smoke                # CPU: tiny shapes through the interpreter

A compiled FLUX.1-dev step spent 12.8-13.3 ms (H200 / H100, batch 1) in ~228 activation passes (smoothing,
per-token INT8 quantization and ``X·L1ᵀ``: :func:`svdquant.kernels.quantize_activations`, two kernels each). Read
twice, X and the codes take 11.3 ms at an H100's measured copy rate, read once 6.3 (session 29: the blocks by
width now reach the first). Timing the kernel eagerly cannot say where the time goes: a pass is ~15-100 µs of
GPU work behind ~50 µs of host work (Python, five allocations, two launches), so ``do_bench`` times the host at
the small shapes. Here every pass type of the step (the image and text streams of
a double block, a single block's stacked input and its two-part ``proj_out`` with the MLP's GELU) is captured
``--calls`` times in one CUDA graph and replayed, as the step runs it: µs per pass, against its floor (the bytes
of one and two reads of X, the partial maxima and down projections pass 1 writes and pass 2 reads, and the codes,
at this card's copy rate), and the step's total (count × µs). The calls of one graph read the same X: a small one
stays in L2 between them, as a pass's input, just written by its producer, often does in the step.

Each pass type is also timed as one pass given its rows' maxima (``row_maxima=``, what a producer's epilogue
would write: here computed in torch per 256 columns, a GEMM tile's width; its codes checked within one step of the
two passes', the torch GELU differing from the kernel's in the last bit), in row chunks (``chunk_bytes``: both
passes over a chunk of rows at a time, so that pass 2 reads from L2 what pass 1 read), and at the blocks the
kernel took before they were chosen by width (``uniform_us``). The sweep then times the block options (each checked
against the shipped blocks' output first: codes and scales equal, ``X·L1ᵀ`` within 1e-3): its best per pass type is
what :func:`svdquant.kernels.activations.default_blocks` ships. Writes ``activation_passes.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

RANK = 32
# name, rows per image, K, GELU from (None: no GELU), K of the first part (None: one part), passes per step
FLUX_PASSES = [
    ("double, image: q/k/v, out, fc1", 4096, 3072, None, None, 19 * 3),
    ("double, image: fc2 (GELU)", 4096, 12288, 0, None, 19),
    ("double, text: q/k/v, out, fc1", 512, 3072, None, None, 19 * 3),
    ("double, text: fc2 (GELU)", 512, 12288, 0, None, 19),
    ("single: q/k/v + MLP up", 4608, 3072, None, None, 38),
    ("single: proj_out (two parts, GELU)", 4608, 15360, 3072, 3072, 38),
]
SWEEP = dict(stats_block_m=(32, 64, 128), stats_block_k=(128, 256), target_programs=(512, 1024, 2048, 8192),
             num_warps=(4, 8))
SMOKE_SWEEP = dict(stats_block_m=(32,), stats_block_k=(128,), target_programs=(512, 8192), num_warps=(4,))
GIVEN_SWEEP = dict(block_m=(16, 32, 64), target_programs=(512, 2048, 8192), num_warps=(4, 8))  # row_maxima= given
SMOKE_GIVEN_SWEEP = dict(block_m=(16, 32), target_programs=(8192,), num_warps=(4,))
UNIFORM = dict(stats_block_m=64, stats_block_k=128, target_programs=8192, num_warps=8)  # before session 29
# row chunks at the shipped blocks (quantize_activations(chunk_bytes=): pass 2 reads from L2 what pass 1 just read)
CHUNKS = (8 << 20, 16 << 20, 24 << 20, 32 << 20)
SMOKE_CHUNKS = (1,)  # chunks of one row-block unit: the single blocks' 72 rows in two


def pass_inputs(m, k, gelu_from, head, device, dtype, seed=0):
    """X (or its two parts), 1/λ and a rank-32 down projection, random."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(device, dtype)
    sinv = (torch.rand(k, generator=g) + 0.5).to(device)
    down = (torch.randn(RANK, k, generator=g) * 0.02).to(device, dtype)
    kw = dict(input_gelu_from=gelu_from, lora_dtype=torch.bfloat16 if device != "cpu" else torch.float32)
    if head is not None:  # the attention output | a column slice of the stacked GEMM's 21,504-wide output
        wide = torch.randn(m, 9216 + k - head, generator=g).to(device, dtype)
        return (x[:, :head].contiguous(), sinv, down), dict(kw, tail=wide[:, 9216:])
    return (x, sinv, down), kw


def torch_maxima(pos, kw, cols: int = 256) -> torch.Tensor:
    """``[2, S, M]``: each row's max of ``|x · λ⁻¹|`` (after the input GELU, in the input's dtype) per ``cols``
    columns, and zero unsigned maxima: what a producer would hand ``quantize_activations(row_maxima=)``."""
    x = torch.cat([pos[0], kw["tail"]], 1) if kw.get("tail") is not None else pos[0]
    x = x.to(torch.float32, copy=True)  # the GELU below writes into it: never into the input
    g = kw.get("input_gelu_from")
    if g is not None:
        x[:, g:] = torch.nn.functional.gelu(x[:, g:], approximate="tanh").to(pos[0].dtype).float()
    u = (x * pos[1]).abs()
    pad = (-u.shape[1]) % cols
    m = torch.nn.functional.pad(u, (0, pad)).unflatten(1, (-1, cols)).amax(2).t()
    return torch.stack([m, torch.zeros_like(m)]).contiguous()


def floor_us(m, k, copy_gbs, splits, with_lora=True) -> dict:
    """The pass's bytes at the copy rate: X read once or twice, pass 1's partials (maxima, and the down projections
    in fp32) written and read, the codes and scales written."""
    x = m * k * 2
    partials = splits * m * (2 * 4 + (RANK * 4 if with_lora else 0))
    out = m * (k + 4 + RANK * 2)
    return {"one_read_us": (x + out) / copy_gbs / 1e3, "two_reads_us": (2 * x + 2 * partials + out) / copy_gbs / 1e3}


def graph_us(fn, calls: int, reps: int) -> float:
    """µs per call of ``fn`` captured ``calls`` times in one CUDA graph and replayed ``reps`` times (median): the
    layer choice's own timer (:func:`svdquant.pipelines.layer_choice.graph_ms`)."""
    from svdquant.pipelines.layer_choice import graph_ms

    return graph_ms(fn, reps=reps, inner=calls) * 1e3


def wall_us(fn, calls: int, reps: int) -> float:
    """The CPU smoke run's stand-in for :func:`graph_us` (the interpreter: plumbing, not speed)."""
    fn()
    t = time.perf_counter()
    for _ in range(calls * reps):
        fn()
    return (time.perf_counter() - t) * 1e6 / (calls * reps)


def same(a, b) -> bool:
    """Codes and scales equal, ``X·L1ᵀ`` within 1e-3 (another split sums the down projection in another order)."""
    la, lb = a[2].float(), b[2].float()
    return torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and float((la - lb).norm() / lb.norm()) < 1e-3


def splits_of(k, m) -> int:
    """Pass 1's K splits at the shipped blocks, as the launcher plans them."""
    from svdquant.kernels import activations as A

    return A.launch_plan(m, k)["splits"][0]


def run(args) -> dict:
    from svdquant import kernels as K

    dev = "cpu" if args.smoke else "cuda"
    timer = wall_us if args.smoke else graph_us
    scale = (64, 16) if args.smoke else (1, 1)  # tiny shapes through the interpreter
    if args.smoke:
        copy_gbs = 1.0
    else:
        big = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
        copy_gbs = 2 * big.numel() / timer(lambda: big.clone(), 5, 10) / 1e3
        del big
    res = dict(device=torch.cuda.get_device_name() if dev == "cuda" else "cpu (smoke)", batch=args.batch,
               copy_gbs=copy_gbs, passes=[])
    for name, rows, k, gelu_from, head, count in FLUX_PASSES:
        m, k = rows * args.batch // scale[0], k // scale[1]
        gelu_from = None if gelu_from is None else gelu_from // scale[1]
        head = None if head is None else head // scale[1]
        pos, kw = pass_inputs(m, k, gelu_from, head, dev, torch.float32 if args.smoke else torch.bfloat16)
        want = K.quantize_activations(*pos, **kw)
        us = timer(lambda: K.quantize_activations(*pos, **kw), args.calls, args.reps)
        row = dict(name=name, m=m, k=k, count=count, us=us, step_ms=count * us / 1e3,
                   **floor_us(m, k, copy_gbs, splits_of(k, m)))
        row["uniform_us"] = sweep({}, pos, dict(kw, **UNIFORM), want, timer, args)["{}"]
        given = dict(kw, row_maxima=torch_maxima(pos, kw))
        near = K.quantize_activations(*pos, **given)
        row["given_maxima_us"] = timer(lambda: K.quantize_activations(*pos, **given), args.calls, args.reps) \
            if int((near[0].int() - want[0].int()).abs().max()) <= 1 else "wrong"
        if args.sweep:  # the one pass's blocks, each checked against its own output at the shipped blocks
            row["given_sweep"] = sweep(SMOKE_GIVEN_SWEEP if args.smoke else GIVEN_SWEEP, pos, given, near, timer,
                                       args)
        chunks = dict(chunk_bytes=SMOKE_CHUNKS if args.smoke else CHUNKS)  # each checked against no chunks first
        row["chunks"] = {str(json.loads(c)["chunk_bytes"]): t
                         for c, t in sweep(chunks, pos, kw, want, timer, args).items()}
        if args.sweep:
            row["sweep"] = sweep(SMOKE_SWEEP if args.smoke else SWEEP, pos, kw, want, timer, args)
            timed = {c: t for c, t in row["sweep"].items() if isinstance(t, float)}
            if timed:
                row["best"] = min(timed, key=timed.get)
                row["best_us"] = timed[row["best"]]
        res["passes"].append(row)
        print("pass", json.dumps({k_: v for k_, v in row.items() if k_ not in ("sweep", "given_sweep")}), flush=True)
    res["step_ms"] = sum(r["step_ms"] for r in res["passes"])
    res["step_ms_best"] = sum(r["count"] * r.get("best_us", r["us"]) / 1e3 for r in res["passes"])
    res["step_floor_ms"] = sum(r["count"] * r["two_reads_us"] / 1e3 for r in res["passes"])
    res["step_ms_uniform"] = sum(r["count"] * r["uniform_us"] / 1e3 for r in res["passes"])
    res["step_ms_given_maxima"] = sum(r["count"] * r["given_maxima_us"] / 1e3 for r in res["passes"]
                                      if isinstance(r["given_maxima_us"], float))
    return res


def sweep(grid: dict, pos, kw, want, timer, args) -> dict:
    """µs per pass for every choice of ``grid`` (``{}``: ``kw`` alone) on top of ``kw``, each checked against
    ``want`` first ("wrong" if it differs; a choice that does not compile or launch is said, not fatal)."""
    from svdquant import kernels as K

    out = {}
    for values in itertools.product(*grid.values()):
        blocks = dict(zip(grid, values))
        try:
            call = dict(kw, **blocks)
            ok = same(K.quantize_activations(*pos, **call), want)
            out[json.dumps(blocks)] = timer(lambda: K.quantize_activations(*pos, **call), args.calls,
                                            args.reps) if ok else "wrong"
        except Exception as e:
            out[json.dumps(blocks)] = f"{type(e).__name__}: {str(e)[:120]}"
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--calls", type=int, default=20, help="passes captured in one graph")
    ap.add_argument("--reps", type=int, default=20, help="graph replays (the median is taken)")
    ap.add_argument("--no-sweep", dest="sweep", action="store_false", help="the shipped blocks only")
    ap.add_argument("--smoke", action="store_true", help="CPU: tiny shapes through Triton's interpreter")
    args = ap.parse_args(argv)
    if args.batch < 1 or args.calls < 1 or args.reps < 1:
        ap.error("--batch, --calls and --reps must be at least 1")
    if not args.smoke and not torch.cuda.is_available():
        ap.error("needs a CUDA GPU; --smoke runs the plumbing on the CPU")
    if args.smoke:
        args.calls, args.reps = 1, 1
    res = run(args)
    print(f"step: {res['step_ms']:.2f} ms in activation passes (best blocks {res['step_ms_best']:.2f}, floor with "
          f"two reads {res['step_floor_ms']:.2f}; the uniform blocks before session 29 {res['step_ms_uniform']:.2f};"
          f" given the rows' maxima {res['step_ms_given_maxima']:.2f})")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "activation_passes.json").write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
