"""A CUTLASS-class INT8 GEMM for Hopper, in NVIDIA's CuTe DSL, against what we have: is it worth building?

Our Triton INT8 GEMM (``svdquant/kernels/int8_gemm.py``) reaches 0.75-0.97× of cuBLAS FP8 row-wise
``torch._scaled_mm`` on FLUX.1 shapes, though INT8 and FP8 wgmma peaks are equal on Hopper. This probe measures
whether CUTLASS's structure (TMA loads into an mbarrier-guarded multistage ring, a producer warp and two consumer
warpgroups, a persistent tile scheduler, clusters multicasting W) closes the gap, before any such kernel is
built. The kernel, ``svdquant/kernels/cutlass_gemm.py``, computes the GEMM's epilogue semantics
``Y = (A · Wᵀ)·a_scale[M]·w_scale[N]`` → bf16 (``--lora``: ``+ lora_act · lora_upᵀ``, rank 32, bf16 operands).

    python benchmarks/cutlass_int8_gemm.py --compile-only              # no GPU: compile every config for sm_90a
    python benchmarks/cutlass_int8_gemm.py --compile-only --keep-ptx DIR --lora
    python benchmarks/cutlass_int8_gemm.py --out $OUT                   # H100 / H200: check, then time
    python benchmarks/cutlass_int8_gemm.py --out $OUT --lora --configs 128x256_c1x1

``--compile-only`` compiles each tile configuration once with symbolic M, N, K (fake tensors, no GPU; the
target comes from ``CUTE_DSL_ARCH``, set to ``sm_90a`` unless given), reports the wgmma instructions of its PTX,
registers and spills (ptxas), and statically checks the accumulator → coordinate and epilogue store mappings
for every consumer thread. On a GPU each configuration is compiled once (shapes are dynamic) and, per FLUX.1-dev
shape (M tokens = 4096, 4608), checked against the torch reference (bf16: max |error| / max |reference| ≤ 1e-2;
the raw int32 product: equal to ``torch._int_mm``) and timed (``triton.testing.do_bench``, median) beside bare
FP8 row-wise ``torch._scaled_mm``, ``torch._int_mm`` and our Triton kernel. Writes ``cutlass_int8_gemm.json``.
A configuration that fails to compile, fails its check or hangs is reported and the others still run.

Needs ``nvidia-cutlass-dsl`` (4.8.1; ``cuda-bindings`` comes with it), which is not a project dependency.
"""

import argparse
import contextlib
import json
import os
import re
import sys
import tempfile
import threading
import time
import traceback
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # svdquant: the kernel and the Triton one
sys.path.insert(0, str(HERE))  # kernel_speed, beside this file

SHAPES = [(3072, 9216), (3072, 3072), (3072, 12288), (12288, 3072), (3072, 21504), (15360, 3072)]  # (K, N)
TOKENS = [4096, 4608]  # FLUX.1's image stream and single blocks at 1024²; --tokens 512 for the text stream
RANK = 32
CONFIGS = {  # name: (CTA tile M × N, cluster M × N, walk down M first, swizzle); two consumer warpgroups in all
    "128x256_c1x1": ((128, 256), (1, 1), True, 1),
    "128x256_c2x1": ((128, 256), (2, 1), True, 1),
    "256x128_c1x1": ((256, 128), (1, 1), True, 1),
    "256x128_c2x1": ((256, 128), (2, 1), True, 1),
    # twice the tiles of 128 × 256: for M = 512 (FLUX's text stream) 128 × 256 fills 48 of 132 SMs at N = 3,072
    "128x128_c1x1": ((128, 128), (1, 1), True, 1),
    # along N first: the CTAs at work share A's rows and sweep W, for A larger than L2 (batch 4: M = 16,384)
    "128x256_c1x1_rn": ((128, 256), (1, 1), False, 1),
    "128x128_c1x1_rn": ((128, 128), (1, 1), False, 1),
    # in groups of 4 tiles: down M over 4 N tiles (A swept once per group), or along N over 4 M tiles (W swept once
    # per group, Triton's GROUP_M order); the grouped tile count must be a multiple of 4
    "128x256_c1x1_s4": ((128, 256), (1, 1), True, 4),
    "128x256_c1x1_rn_s4": ((128, 256), (1, 1), False, 4),
}
SM90_SMS = 132  # H100 SXM and H200: the persistent grid a compile without a GPU assumes
TOLERANCE = 1e-2


def load_dsl(compile_only):
    if compile_only:  # no GPU to ask: the DSL would otherwise target sm_100
        os.environ.setdefault("CUTE_DSL_ARCH", "sm_90a")
        # --keep-ptx (needed to read the PTX back) also writes a file per compile into this folder, else the cwd
        os.environ.setdefault("CUTE_DSL_DUMP_DIR", tempfile.mkdtemp(prefix="cutlass_int8_gemm_"))
    warnings.filterwarnings("ignore", category=DeprecationWarning)  # the DSL's notices about its own utils
    import cutlass
    import cutlass.cute as cute

    from svdquant.kernels import cutlass_gemm as kern

    return cutlass, cute, kern


def variants(names, lora, int32=True, rank=RANK):
    """(label, config name, out, rank): the scaled bf16 GEMM, the raw int32 product, the fused branch."""
    outs = [("bf16", 0)] + ([("int32", 0)] if int32 else []) + ([("bf16", rank)] if lora else [])
    return [(f"{name}/{'lora' if rank else out}", name, out, rank) for name in names for out, rank in outs]


def make_gemm(kern, name, out, rank):
    tile, cluster, raster_m, swizzle = CONFIGS[name]
    return kern.Int8GemmSm90(tile, cluster, out, rank, swizzle=swizzle, raster_m=raster_m)


@contextlib.contextmanager
def stderr_to(sink):
    """Capture file descriptor 2 (ptxas's report is written there, below Python) into the list ``sink``."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            sink.append(tmp.read().decode(errors="replace"))


def ptxas_facts(log):
    regs = re.findall(r"Used (\d+) registers", log)
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return dict(registers=int(regs[-1]) if regs else None,
                spill_bytes=sum(int(a) + int(b) for a, b in spills) if spills else None)


def compile_fake(cutlass, cute, gemm, clusters, tvm_ffi=False):
    """Compile ``gemm`` (its output, branch and bias as configured) for symbolic M, N, K (one compile serves every
    shape) without a GPU, PTX kept; ptxas reports on standard error. ``tvm_ffi``: as the engine launches it, taking
    torch tensors and torch's current stream through apache-tvm-ffi."""
    from cutlass.cute.runtime import make_fake_compact_tensor, make_fake_stream

    m, n, k = cute.sym_int(), cute.sym_int(), cute.sym_int()

    def mat(dtype, rows, cols):  # row-major, 16-byte aligned, as the GPU run passes torch tensors
        return make_fake_compact_tensor(dtype, (rows, cols), stride_order=(1, 0), assumed_align=16)

    def vec(dtype, size):
        return make_fake_compact_tensor(dtype, (size,), assumed_align=16)

    r = gemm.rank
    args = [mat(cutlass.Int8, m, k), mat(cutlass.Int8, n, k), vec(cutlass.Float32, m), vec(cutlass.Float32, n),
            mat(gemm.out_dtype, m, n), mat(cutlass.BFloat16, m, r) if r else None,
            mat(cutlass.BFloat16, n, r) if r else None, vec(gemm.bias_dtype, n) if gemm.bias_dtype else None]
    options = "--keep-ptx remarks{ptx}" + (" --enable-tvm-ffi" if tvm_ffi else "")
    return cute.compile(gemm, *args, clusters, make_fake_stream(use_tvm_ffi_env_stream=tvm_ffi), options=options)


def epilogue_mapping_check(cutlass, cute, kern, bm, bn, out):
    """The mismatches of :func:`check_epilogue_mapping` (compiled with the DSL imported here), [] if none."""

    @cute.jit(preprocess=False)  # plain Python control flow: every value here is static
    def check_epilogue_mapping(kern: cutlass.Constexpr, bm: cutlass.Constexpr, bn: cutlass.Constexpr,
                               out: cutlass.Constexpr, bad: cutlass.Constexpr):
        """A static check of the two index mappings the kernel relies on, for every consumer thread (no GPU: the
        layouts are compile-time). (1) The coordinate ``partition_C`` gives each accumulator register (hence the
        scales ``scale`` reads) is the PTX ISA's wgmma D-fragment layout: row 16·warp + lane/4 (+8), column
        2·(lane%4) (+1) (+8 per register quad), per 64-row warpgroup block. (2) The register ``store_tile`` sends
        as value v of sub-tile s lands, through the stmatrix partition and the TMA store of sub-tile s, on that
        register's own coordinate. Appends the mismatches to the list ``bad``."""
        tiled_mma = kern.make_mma(cutlass.Int8, cutlass.Int32, bn)
        copy_r2s = kern.make_copy_r2s(tiled_mma, kern.OUT_DTYPES[out])
        cC = cute.make_identity_tensor((bm, bn))
        cE = cute.make_identity_tensor(kern.EPI_TILE)
        subs_n = bn // kern.EPI_TILE[1]
        # store_tile's walk of sub-tiles
        order = cute.make_layout((bm // kern.EPI_TILE[0], subs_n), stride=(subs_n, 1))
        for s in range(bm // kern.EPI_TILE[0] * subs_n):
            if tuple(order.get_hier_coord(s)) != (s // subs_n, s % subs_n):
                bad.append(("sub-tile order", s, tuple(order.get_hier_coord(s))))
        for t in range(kern.MMA_WARPGROUPS * kern.WG_THREADS):
            tc = tiled_mma.get_slice(t).partition_C(cC)
            wg, warp, lane = t // kern.WG_THREADS, t % kern.WG_THREADS // 32, t % 32
            for i in range(cute.size(tc)):
                row = i // (bn // 2) * 128 + wg * 64 + warp * 16 + lane // 4 + 8 * (i // 2 % 2)
                col = 8 * (i // 4 % (bn // 8)) + 2 * (lane % 4) + i % 2
                if tuple(tc[i]) != (row, col):
                    bad.append(("accumulator", t, i, tuple(tc[i]), (row, col)))
            rc = copy_r2s.retile(tc)
            ts = copy_r2s.get_slice(t).partition_S(cE)
            per_sub = cute.size(ts)
            for s in range(bm // kern.EPI_TILE[0] * subs_n):
                for v in range(per_sub):
                    lands = (s // subs_n * kern.EPI_TILE[0] + ts[v][0], s % subs_n * kern.EPI_TILE[1] + ts[v][1])
                    if tuple(rc[s * per_sub + v]) != lands:
                        bad.append(("epilogue", t, s, v, tuple(rc[s * per_sub + v]), lands))

    bad = []
    cute.compile(check_epilogue_mapping, kern, bm, bn, out, bad)
    return bad


def compile_only(args):
    cutlass, cute, kern = load_dsl(True)
    print(f"nvidia-cutlass-dsl {dsl_version()}, target {os.environ.get('CUTE_DSL_ARCH')}")
    failures = 0
    checked = {}
    for label, name, out, rank in variants(args.configs, args.lora, not args.no_int32, args.lora_rank):
        tile = CONFIGS[name][0]
        if (tile, out) not in checked:  # the cluster shape does not enter these mappings
            t0 = time.time()
            bad = epilogue_mapping_check(cutlass, cute, kern, *tile, out)
            checked[tile, out] = bad
            failures += bool(bad)
            print(f"mapping check {tile[0]}x{tile[1]} {out}: {'OK' if not bad else f'{len(bad)} MISMATCHES'} "
                  f"(all 256 consumer threads, {time.time() - t0:.0f} s){'' if not bad else f': {bad[:3]}'}")
        try:
            gemm = make_gemm(kern, name, out, rank)
            size = CONFIGS[name][1][0] * CONFIGS[name][1][1]
            t0 = time.time()
            logs = []
            with stderr_to(logs):
                compiled = compile_fake(cutlass, cute, gemm, SM90_SMS // size)
            log = logs[0]
            ptx = compiled.__ptx__ or ""
            mma = sorted(set(re.findall(r"wgmma\.mma_async[\w.]*", ptx)))
            int8 = any(op.endswith(".s32.s8.s8") for op in mma)
            facts = ptxas_facts(log)
            failures += not int8 or bool(facts["spill_bytes"])
            if args.keep_ptx:
                Path(args.keep_ptx).mkdir(parents=True, exist_ok=True)
                (Path(args.keep_ptx) / f"{label.replace('/', '_')}.ptx").write_text(ptx)
            print(f"{label:22s} compiled OK in {time.time() - t0:4.1f} s: {gemm.ab_stage} stages, "
                  f"{gemm.smem_bytes} B smem, {facts['registers']} registers, {facts['spill_bytes']} B spilled; "
                  f"{' '.join(mma)}{'' if int8 else '  NO s8 WGMMA'}")
            for k, n in SHAPES:
                for m in args.tokens:
                    if (why := gemm.problem_error(m, n, k)) is not None:
                        failures += 1
                        print(f"    M={m} K={k} N={n}: {why}")
        except Exception as e:
            failures += 1
            print(f"{label:22s} FAILED: {type(e).__name__}: {str(e).strip()[:400]}")
    print(f"every config covers all {len(SHAPES) * len(args.tokens)} shapes (M, N, K symbolic); "
          f"{failures} problem(s)")
    return 1 if failures else 0


def dsl_version():
    from importlib.metadata import version

    return version("nvidia-cutlass-dsl")


class Watchdog:
    """A kernel that deadlocks (an mbarrier never completing) blocks the host in a CUDA call forever: past
    ``seconds`` without a ``beat`` the process reports the step and exits, its rows already written."""

    def __init__(self, seconds):
        self.seconds, self.label, self.deadline = seconds, "start", time.time() + seconds
        threading.Thread(target=self._watch, daemon=True).start()

    def beat(self, label):
        self.label, self.deadline = label, time.time() + self.seconds

    def _watch(self):
        while True:
            time.sleep(1)
            if time.time() > self.deadline:
                print(f"HUNG for {self.seconds} s in {self.label}: exiting; results so far are in the JSON",
                      flush=True)
                os._exit(3)


def make_data(torch, m, k, n, dev, rank=RANK):
    g = torch.Generator(device=dev).manual_seed(m + k + n)
    a = torch.randint(-127, 128, (m, k), device=dev, dtype=torch.int8, generator=g)
    w = torch.randint(-126, 127, (n, k), device=dev, dtype=torch.int8, generator=g)
    a_s = torch.rand(m, device=dev, generator=g) * 1e-2 + 1e-3
    w_s = torch.rand(n, device=dev, generator=g) * 1e-3 + 1e-4
    # a branch over 5 % of the main term's largest value at every shape: dropping it, in any tile, fails the check
    la = torch.randn(m, rank, device=dev, generator=g).to(torch.bfloat16)
    lu = (torch.randn(n, rank, device=dev, generator=g) * 0.05).to(torch.bfloat16)
    return dict(a=a, w=w, a_s=a_s, w_s=w_s, la=la, lu=lu)


def baselines(torch, d, sms, bench):
    """Bare FP8 row-wise cuBLAS, cuBLASLt INT8 (int32 out), our Triton kernel (without / with the branch) and the
    engine's launch of the CUTLASS kernel with the branch (``engine_lora``: ``int8_gemm_sm90`` as a layer calls it
    eagerly, through the DSL's DLPack views, its host-side conversions included: where it is slower than the bare
    compiled kernel, the host is the bound; ``engine_lora_ffi`` the same through apache-tvm-ffi, the engine's
    default), in ms (None where one failed: the error beside it)."""
    from svdquant.kernels.int8_gemm import int8_gemm

    a, w, a_s, w_s = d["a"], d["w"], d["a_s"], d["w_s"]
    af8, wf8 = a.to(torch.float8_e4m3fn), w.to(torch.float8_e4m3fn)
    sa, sw = a_s[:, None].contiguous(), w_s[None, :].contiguous()
    la32 = d["la"].float()  # the same values the CUTLASS branch multiplies, in the Triton kernel's dtype
    fns = dict(
        fp8=lambda: torch._scaled_mm(af8, wf8.t(), scale_a=sa, scale_b=sw, out_dtype=torch.bfloat16),
        int_mm=lambda: torch._int_mm(a, w.t()),
        triton=lambda: int8_gemm(a, a_s, w, w_s, None, None, None, torch.bfloat16, tma=True, num_programs=sms),
        triton_lora=lambda: int8_gemm(a, a_s, w, w_s, la32, d["lu"], None, torch.bfloat16, tma=True,
                                      num_programs=sms),
        engine_lora=lambda: engine_through(False, a, a_s, w, w_s, d["la"], d["lu"], None, torch.bfloat16),
        engine_lora_ffi=lambda: engine_through(True, a, a_s, w, w_s, d["la"], d["lu"], None, torch.bfloat16))
    res = {}
    for key, fn in fns.items():
        try:
            res[key] = bench(fn)
        except Exception as e:
            res[key], res[f"{key}_error"] = None, f"{type(e).__name__}: {str(e).strip()[:200]}"
    return res


_LAUNCH_STATES: dict = {True: {}, False: {}}  # the launcher's compiled kernels per launch (tvm-ffi or views)


def engine_through(ffi: bool, *args):
    """``int8_gemm_sm90`` launching through apache-tvm-ffi (``ffi``) or the DSL's DLPack views (their host cost)."""
    from svdquant.kernels import cutlass_launch as cl

    saved = cl._STATE, cl.TVM_FFI
    cl._STATE, cl.TVM_FFI = _LAUNCH_STATES[ffi], ffi
    try:
        return cl.int8_gemm_sm90(*args)
    finally:
        cl._STATE, cl.TVM_FFI = saved


def check(torch, y, d, out, rank, int_mm):
    """(ok, error, mismatching elements) against the torch reference; the output was poisoned before the run."""
    if out == "int32":
        bad = int((y != int_mm).sum())
        return bad == 0, float((y.long() - int_mm.long()).abs().max()), bad
    ref = int_mm.float() * d["a_s"][:, None] * d["w_s"][None, :]
    if rank:
        ref = ref + d["la"].float() @ d["lu"].float().T
    ref = ref.to(torch.bfloat16)
    err = float((y.float() - ref.float()).abs().max() / ref.float().abs().max())
    ok = bool(torch.isfinite(y).all()) and err <= TOLERANCE
    return ok, err, int((y != ref).sum())


def run_variant(torch, cute_view, compiled, stream, d, out, rank, int_mm, bench):
    m, n = d["a"].shape[0], d["w"].shape[0]
    y = torch.empty(m, n, device=d["a"].device, dtype=torch.bfloat16 if out == "bf16" else torch.int32)
    y.fill_(float("nan") if out == "bf16" else -(2 ** 31))  # an unwritten tile cannot pass
    views = [cute_view(t) for t in (d["a"], d["w"], d["a_s"], d["w_s"], y)]
    views += [cute_view(d["la"]), cute_view(d["lu"])] if rank else [None, None]
    views.append(None)  # no bias
    compiled(*views, stream)
    torch.cuda.synchronize()
    ok, err, mismatches = check(torch, y, d, out, rank, int_mm)
    ms = bench(lambda: compiled(*views, stream)) if ok else None
    return dict(ok=ok, err=err, mismatches=mismatches, ms=ms)


def gpu_run(args):
    import torch
    import triton
    import kernel_speed  # beside this file (on the path): its bench() times every kernel benchmark

    cutlass, cute, kern = load_dsl(False)
    import cuda.bindings.driver as cuda
    from cutlass.cute.runtime import from_dlpack

    props = torch.cuda.get_device_properties(0)
    if props.major != 9:
        raise SystemExit(f"{props.name} is sm_{props.major}{props.minor}; this kernel is for sm_90a (H100 / H200)")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    res = dict(device=props.name, sms=props.multi_processor_count, torch=torch.__version__, cuda=torch.version.cuda,
               triton=triton.__version__, cutlass_dsl=dsl_version(), tolerance=TOLERANCE, baselines=[], rows=[])

    def save():
        (out_dir / "cutlass_int8_gemm.json").write_text(json.dumps(res, indent=1))

    def bench(fn):
        return kernel_speed.bench(fn, ms=args.rep)  # the project's timing: do_bench's median after its warmup

    def cute_view(t):  # dynamic shape and leading stride: one compile serves every shape; TMA needs 16-byte bases
        return from_dlpack(t, assumed_align=16).mark_layout_dynamic(leading_dim=t.dim() - 1)

    dog = Watchdog(args.hang_seconds)
    stream = cuda.CUstream(torch.cuda.current_stream().cuda_stream)  # do_bench's events are on this stream
    problems = [(m, k, n) for k, n in SHAPES[:args.shapes] for m in args.tokens]
    data = {}
    for m, k, n in problems:
        dog.beat(f"baselines {m}x{k}x{n}")
        d = data[m, k, n] = make_data(torch, m, k, n, "cuda", args.lora_rank)
        d["int_mm"] = torch._int_mm(d["a"], d["w"].t())
        res["baselines"].append(dict(m=m, k=k, n=n, **baselines(torch, d, props.multi_processor_count, bench)))
        print("baseline", json.dumps(res["baselines"][-1]), flush=True)
        save()
    for label, name, out, rank in variants(args.configs, args.lora, not args.no_int32, args.lora_rank):
        compiled = None
        gemm = make_gemm(kern, name, out, rank)
        for m, k, n in problems:
            d = data[m, k, n]
            row = dict(variant=label, config=name, out=out, rank=rank, m=m, k=k, n=n, stages=gemm.ab_stage)
            try:
                if (why := gemm.problem_error(m, n, k)) is not None:
                    raise ValueError(why)
                if compiled is None or args.compile_per_shape:
                    dog.beat(f"compiling {label}")
                    y0 = torch.empty(m, n, device="cuda", dtype=torch.bfloat16 if out == "bf16" else torch.int32)
                    views = [cute_view(t) for t in (d["a"], d["w"], d["a_s"], d["w_s"], y0)]
                    views += [cute_view(d["la"]), cute_view(d["lu"])] if rank else [None, None]
                    views.append(None)  # no bias
                    # clusters of this size that fit the GPU at once (one CTA per SM): the persistent grid
                    size = CONFIGS[name][1][0] * CONFIGS[name][1][1]
                    clusters = cutlass.utils.HardwareInfo().get_max_active_clusters(size)
                    compiled = cute.compile(gemm, *views, clusters, stream)
                dog.beat(f"{label} at {m}x{k}x{n}")
                row.update(run_variant(torch, cute_view, compiled, stream, d, out, rank, d["int_mm"], bench))
            except Exception as e:
                row.update(ok=False, error=f"{type(e).__name__}: {str(e).strip()[:300]}")
                traceback.print_exc(limit=2)
            res["rows"].append(row)
            print("row", json.dumps(row), flush=True)
            save()
    print(table(res, problems))
    save()


def table(res, problems):
    """One line per shape: the baselines, then each variant's ms, speed relative to FP8 (fp8 ms / ms; to int_mm
    for the raw int32 product, which has int_mm's output) and TOPS."""
    labels = list(dict.fromkeys(r["variant"] for r in res["rows"]))
    base = {(b["m"], b["k"], b["n"]): b for b in res["baselines"]}
    cells = {(r["m"], r["k"], r["n"], r["variant"]): r for r in res["rows"]}
    head = ["M", "K", "N", "fp8 ms", "int_mm ms", "triton ms (×)", "triton+lora ms (×)", "engine+lora ms (×)",
            "engine+lora, tvm-ffi ms (×)"] + labels
    lines = [f"{res['device']}, torch {res['torch']}, triton {res['triton']}, nvidia-cutlass-dsl "
             f"{res['cutlass_dsl']}; median ms; (×) = FP8 _scaled_mm ms / ms, above 1 is faster than FP8 "
             "(the raw int32 variants: int_mm ms / ms)",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m, k, n in problems:
        b = base[m, k, n]
        fp8 = b["fp8"]

        def ms(t, bar=fp8):  # "ms (× bar)"
            return "—" if t is None else f"{t:.3f}" + ("" if bar is None else f" ({bar / t:.2f})")

        row = [str(m), str(k), str(n), ms(fp8, None), ms(b["int_mm"], None), ms(b["triton"]), ms(b["triton_lora"]),
               ms(b.get("engine_lora")), ms(b.get("engine_lora_ffi"))]
        for label in labels:
            r = cells.get((m, k, n, label), {})
            if r.get("ms"):
                bar = b["int_mm"] if label.endswith("/int32") else fp8
                row.append(f"{ms(r['ms'], bar)} {2 * m * k * n / r['ms'] / 1e9:.0f} TOPS")
            else:
                row.append("FAIL " + (r.get("error") or f"err {r.get('err')}")[:40])
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--compile-only", action="store_true", help="no GPU: compile every config for sm_90a")
    ap.add_argument("--keep-ptx", metavar="DIR", help="with --compile-only: write each config's PTX here")
    ap.add_argument("--out", help="the GPU run's output folder (cutlass_int8_gemm.json)")
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--lora", action="store_true", help="also the fused low-rank branch (bf16 operands)")
    ap.add_argument("--lora-rank", type=int, default=RANK, help=f"its rank (default {RANK}; up to 128: a stacked "
                    "group's branch with its members' LoRAs, on 128 x 128 tiles)")
    ap.add_argument("--no-int32", action="store_true", help="skip the raw int32 variants")
    ap.add_argument("--tokens", type=int, nargs="+", default=TOKENS, help="the M values (tokens) of every shape")
    ap.add_argument("--shapes", type=int, default=len(SHAPES), help="only the first N (K, N) shapes")
    ap.add_argument("--rep", type=int, default=100, help="do_bench's rep (ms)")
    ap.add_argument("--compile-per-shape", action="store_true",
                    help="compile each shape apart (should dynamic shapes misbehave)")
    ap.add_argument("--hang-seconds", type=int, default=180, help="give up on a step this long (a deadlock)")
    args = ap.parse_args(argv)
    if args.compile_only:
        return compile_only(args)
    if not args.out:
        ap.error("--out DIR (GPU run) or --compile-only")
    gpu_run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
