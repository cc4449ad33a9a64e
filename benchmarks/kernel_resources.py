"""Registers, stack (spills) and shared memory of the shipped Triton kernels, compiled ahead of time for a GPU
target on any machine (no GPU needed): what a session without a device can still check.

    python benchmarks/kernel_resources.py                     # sm_90, every shipped config
    python benchmarks/kernel_resources.py --arch 80 86 89 90 --out OUT

Each kernel is compiled by the installed Triton for ``GPUTarget("cuda", arch, 32)`` (``triton.compile`` of an
``ASTSource``: the signature and constexprs the launchers pass), and its cubin read with the ``cuobjdump`` that
ships in Triton's wheel (``--dump-resource-usage``). A stack frame means the kernel spills registers to local
memory: in these kernels a measured slowdown (the INT8 GEMM's GELU epilogue, NOTES-GPU.md session 15). The figures
are the installed Triton's; the GPU machine's Triton (3.6) may allocate differently.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def compile_resources(fn, signature: dict, constexprs: dict, num_warps: int, num_stages: int, arch: int) -> dict:
    """``{"registers", "stack", "shared"}`` of ``fn`` compiled for sm_``arch``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    # the launchers' tensors are 16-byte aligned, and Triton's JIT specializes on that (wide loads) but where a
    # kernel says not to (``do_not_specialize_on_alignment``): so here (it also specializes integers divisible by
    # 16, which vary by call: left out)
    unaligned = {fn.arg_names[a] if isinstance(a, int) else a for a in fn.do_not_specialize_on_alignment or ()}
    aligned = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a, t in signature.items()
               if t.startswith("*") and a not in unaligned}
    k = triton.compile(ASTSource(fn, signature, constexprs, aligned), target=GPUTarget("cuda", arch, 32),
                       options=dict(num_warps=num_warps, num_stages=num_stages))
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        Path(path).write_bytes(k.asm["cubin"])
        usage = subprocess.run([cuobjdump, "--dump-resource-usage", path], capture_output=True, text=True,
                               check=True).stdout
    regs, stack = (int(re.search(rf"{key}:(\d+)", usage).group(1)) for key in ("REG", "STACK"))
    return dict(registers=regs, stack=stack, shared=k.metadata.shared)


def _gemm(gelu: bool, tma: bool):
    G = importlib.import_module("svdquant.kernels.int8_gemm")  # the package exports a function of that name

    cfg = G.HOPPER_CONFIG if tma else G.DEFAULT_CONFIG
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    sig = dict(a_desc=f"tensordesc<i8[{bm}, {bk}]>" if tma else "*i8",
               w_desc=f"tensordesc<i8[{bn}, {bk}]>" if tma else "*i8",
               a_ptr="*i8", w_ptr="*i8", as_ptr="*fp32", ws_ptr="*fp32", la_ptr="*fp32", lu_ptr="*bf16",
               b_ptr="*bf16", y_ptr="*bf16", M="i32", N="i32", K="i32", stride_ym="i32")
    consts = dict(R=32, R_CHUNK=32, HAS_LORA=True, HAS_BIAS=True, GELU=gelu, APPROX_GELU=True, NUM_PROGRAMS=132,
                  TMA=tma, WARP_SPECIALIZE=False, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=cfg["GROUP_M"])
    return G.int8_gemm_kernel, sig, consts, cfg["num_warps"], cfg["num_stages"]


_ACT_SIG = dict(x_ptr="*bf16", t_ptr="*bf16", sinv_ptr="*fp32", M="i32", K="i32", stride_xm="i32",
                stride_tm="i32", k_head="i32", gelu_from="i32", shift="fp32", unsigned_from="i32")


def _activation_pass(stage, two_parts: bool, gelu: bool):
    """The shipped launch of each pass (kernels/activations.py's blocks for the width) at FLUX's proj_out (K =
    15,360, 4,608 tokens), as :func:`~svdquant.kernels.activations.launch_plan` plans it; stage ``"given"``: the
    one pass given a producer's row maxima (60 slices of 256)."""
    A = importlib.import_module("svdquant.kernels.activations")

    m, kp = 4608, 15360
    plan = A.launch_plan(m, kp, given_maxima=stage == "given")
    (s1, s2), bq, warps = plan["splits"], plan["bq"], plan["num_warps"]
    flags = dict(HAS_LORA=True, HAS_SHIFT=False, HAS_TAIL=two_parts, HAS_GELU=gelu, APPROX_GELU=True)
    if stage == 1:
        sig = dict(_ACT_SIG, l1_ptr="*bf16", st_ptr="*fp32", lp_ptr="*fp32")
        consts = dict(BLOCKS_PER_SPLIT=kp // plan["b1"] // s1, R=32, BLOCK_M=plan["stats_block_m"],
                      BLOCK_K=plan["b1"], IEEE=False, F32_DOT=False, **flags)
        return A.activation_stats_kernel, sig, consts, warps, 3
    rest = dict(KP=kp, BLOCKS_PER_SPLIT=kp // bq // s2, R=32, BLOCK_M=plan["block_m"], BLOCK_K=bq, A4=False,
                FAST_ROUND=True, **flags)
    if stage == "given":
        sig = dict(_ACT_SIG, l1_ptr="*bf16", st_ptr="*fp32", q_ptr="*i8", s_ptr="*fp32", lp_ptr="*fp32")
        return A.quantize_given_maxima_kernel, sig, dict(STAT_SPLITS=60, IEEE=False, F32_DOT=False, **rest), warps, 3
    sig = dict(_ACT_SIG, st_ptr="*fp32", lp_ptr="*fp32", q_ptr="*i8", s_ptr="*fp32", la_ptr="*fp32")
    return A.quantize_activations_kernel, sig, dict(STAT_SPLITS=s1, **rest), warps, 3


def _attention(d: int, tma: bool):
    T = importlib.import_module("svdquant.kernels.int8_attention")

    cfg = T.CONFIG_D64 if d == 64 else T.HOPPER_CONFIG if tma else T.CONFIG
    bn = cfg["BLOCK_N"]
    sig = dict(qc_ptr="*i8", qs_ptr="*fp32", kc_ptr="*i8", ks_ptr="*fp32", kb_ptr="*fp32", v_ptr="*bf16",
               o_ptr="*bf16", k_desc=f"tensordesc<i8[{bn}, {d}]>" if tma else "*i8",
               v_desc=f"tensordesc<bf16[1, {bn}, 1, {d}]>" if tma else "*i8", SQ="i32", SK="i32", H="i32",
               qk_scale="fp32", stride_vb="i64", stride_vs="i64", stride_vh="i64", stride_ob="i64",
               stride_os="i64", stride_oh="i64")
    consts = dict(D=d, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=bn, EVEN_N=False, HAS_KB=True, TMA=tma, F32_DOT=False)
    return T.int8_attention_kernel, sig, consts, cfg["num_warps"], cfg["num_stages"]


# the W4A16 kernels' tensor and integer arguments (the GEMV's MAGIC after them)
_W4A16_SIG = dict(x_ptr="*bf16", p_ptr="*u8", s_ptr="*bf16", z_ptr="*bf16", b_ptr="*bf16", y_ptr="*bf16",
                  part_ptr="*fp32", M="i32", N="i32", K="i32", stride_xm="i32", stride_ym="i32")


def _w4a16(split_k: int = 1, block_n: int = 32):
    """The adaLN layers' weight-only kernel (FLUX: 3,072 → 18,432 at one token), its launcher's defaults (4 warps,
    two groups a step); ``split_k`` > 1: the sweep's K slices."""
    W = importlib.import_module("svdquant.kernels.w4a16")
    sig = dict(_W4A16_SIG)
    consts = dict(KP=3072, GROUP=64, BLOCK_N=block_n, HAS_BIAS=True, HAS_ZEROS=False, F32_DOT=False,
                  GROUPS_PER_STEP=W.default_groups_per_step(3072 // 64), SPLIT_K=split_k)
    return W.w4a16_kernel, sig, consts, 4, 4


def _w4a16_gemv(m_pad: int = 1):
    """The W4A16 multiply-add GEMV at its launcher's defaults for one token (64 channels, four groups a step, four K
    slices, 4 warps); ``m_pad`` = 4: the same for four tokens (not a default: the sweep's)."""
    W = importlib.import_module("svdquant.kernels.w4a16")
    sig = dict(_W4A16_SIG, MAGIC="i32")
    groups = 3072 // 64
    gps = W.default_groups_per_step(groups, gemv=True)
    consts = dict(KP=3072, GROUP=64, BLOCK_N=64, HAS_BIAS=True, HAS_ZEROS=False, GROUPS_PER_STEP=gps, M_PAD=m_pad,
                  SPLIT_K=W.default_split_k(groups // gps), EVEN_K=True)
    return W.w4a16_gemv_kernel, sig, consts, 4, 4


def _expand():
    """Memory mode's per-call expansion of 4-bit codes to INT8 (a 3,072-wide weight)."""
    E = importlib.import_module("svdquant.kernels.expand")
    sig = dict(p_ptr="*u8", m_ptr="*u8", w_ptr="*i8", N="i32")
    consts = dict(KP=3072, GROUP=64, BLOCK_N=32, GROUPS_PER_PROG=E.groups_per_program(48))
    return E.expand_int4m_kernel, sig, consts, 4, 3


def _scoring():
    """The quantizer's TF32 error products (kernels/scoring.py), its launcher's config."""
    S = importlib.import_module("svdquant.kernels.scoring")
    sig = dict(a_ptr="*fp32", b_ptr="*fp32", y_ptr="*fp32", T="i32", N="i32", K="i32", stride_ab="i64",
               stride_at="i32", stride_bb="i64", stride_bn="i32", stride_yb="i64", stride_yt="i32")
    cfg = S.CONFIG
    consts = dict(BLOCK_T=cfg["BLOCK_T"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], IEEE=False)
    return S.scoring_product_kernel, sig, consts, cfg["num_warps"], cfg["num_stages"]


def _norm_rope(pair: bool, split: bool = True, round_norm: bool = False, batch_tables: bool = False):
    """FLUX's q/k RMSNorm + RoPE (kernels/norm_rope.py) at its default config; ``pair``: the key in the query's
    launch; ``split``: the rotation's partners from registers; ``round_norm``: Qwen-Image's norm rounding;
    ``batch_tables``: Z-Image's tables, one per batch entry."""
    N = importlib.import_module("svdquant.kernels.norm_rope")
    sig = dict(x_ptr="*bf16", w_ptr="*bf16", cos_ptr="*fp32", sin_ptr="*fp32", out_ptr="*bf16", xk_ptr="*bf16",
               wk_ptr="*bf16", outk_ptr="*bf16", S="i32", stride_xb="i32", stride_xs="i32", stride_ob="i32",
               stride_os="i32", stride_oh="i32", stride_tb="i32", token_offset="i32", eps="fp32")
    return N.norm_rope_kernel, sig, dict(D=128, BLOCK_T=16, HEADS=1, PAIR=pair, SPLIT=split, ROUND_NORM=round_norm,
                                         BATCH_TABLES=batch_tables), 4, 3


def shipped(arch: int) -> dict:
    """Name -> (kernel, signature, constexprs, warps, stages) of every shipped config on ``arch``."""
    tma = arch >= 90
    kernels = {f"int8_gemm{' tma' if tma else ''}": _gemm(False, tma),
               f"int8_gemm{' tma' if tma else ''} + GELU epilogue (fuse_gelu into='up')": _gemm(True, tma)}
    for stage in (1, 2, "given"):
        for two, gelu in ((False, False), (True, False), (False, True), (True, True)):
            label = "given row maxima" if stage == "given" else stage
            name = f"activation pass {label}{', two parts' if two else ''}{', input GELU' if gelu else ''}"
            kernels[name] = _activation_pass(stage, two, gelu)
    for d in (128, 64):
        measured = " (measured tile, spills)" if tma and d == 128 else ""
        kernels[f"int8_attention D={d}{' tma' if tma else ''}{measured}"] = _attention(d, tma)
    kernels["w4a16"] = _w4a16()
    kernels["w4a16 split-K 8 (sweep)"] = _w4a16(split_k=8, block_n=64)
    kernels["w4a16 GEMV (one token)"] = _w4a16_gemv()
    kernels["w4a16 GEMV (4 tokens, sweep)"] = _w4a16_gemv(4)
    kernels["expand_int4m"] = _expand()
    kernels["scoring_product (quantizer)"] = _scoring()
    kernels["norm_rope"] = _norm_rope(False)
    kernels["norm_rope, q and k in one launch (pair=)"] = _norm_rope(True)
    kernels["norm_rope, q and k in one launch, partners loaded again (split=False)"] = _norm_rope(True, False)
    kernels["norm_rope, q and k in one launch, Qwen-Image's norm rounding"] = _norm_rope(True, round_norm=True)
    kernels["norm_rope, q and k in one launch, Z-Image's tables per batch entry"] = _norm_rope(True, round_norm=True,
                                                                                            batch_tables=True)
    return kernels


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[90], help="compute capabilities, e.g. 80 86 89 90")
    ap.add_argument("--out", type=Path, help="folder for resources.json")
    args = ap.parse_args()
    rows = []
    for arch in args.arch:
        for name, spec in shipped(arch).items():
            try:
                row = dict(arch=arch, kernel=name, **compile_resources(*spec, arch))
            except Exception as e:  # recorded; the other kernels still compile
                row = dict(arch=arch, kernel=name, error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "resources.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
