"""A FLUX.1-dev transformer step at 1024²: diffusers BF16 (eager, compiled), torchao FP8 row-wise (compiled)
and svdquant int4 (eager, compiled; speed and memory weight modes), side by side in one run.

    python benchmarks/flux_step.py --out $OUT            # bf16, bf16-compiled, int4, int4-compiled
    python benchmarks/flux_step.py --variants fp8-torchao-compiled --out $OUT   # needs torchao
    python benchmarks/flux_step.py --smoke                                      # CPU: the plumbing, tiny config

The real FLUX.1-dev architecture (19 double + 38 single blocks, 4096 image + 512 text tokens per image)
with random weights. The quantized model swaps every layer the FLUX adapter targets for an ``SVDQLinear``
with random but valid contents (timing does not depend on the values; the kernels are checked against the
reference in tests/test_kernels.py), so no calibration is needed to time it.

"Compiled" is diffusers' regional compilation (``compile_repeated_blocks(fullgraph=True)``: each block
class is compiled once, default inductor mode, static shapes); "-whole" instead compiles the whole transformer as
one graph (``model.compile(fullgraph=True)``, as flux-fast does: fusions across the blocks, a longer first
compile). Our variants compile with ``svdquant.optimize``'s
inductor options (``COMPILE_OPTIONS``: coordinate-descent tuning; ``--inductor-defaults`` leaves them out,
``--inductor-options`` gives others); torchao's ``quantize_`` sets the same flags process-wide for its own variant,
and they are reset after it. All variants
use the same attention backend (``--attention``; ``auto`` times the native SDPA backends, and flash-attn-4 where
it runs, at the FLUX shape first and takes the fastest; ``svdquant_int8``: svdquant's INT8 Q·Kᵀ attention;
``svdquant_flash4``: flash-attn-4's exact attention, if installed). Per variant and batch: median
ms per step (``triton.testing.do_bench``), peak GPU memory during the step, weights in GB; ``--profile`` adds a
per-kernel-class breakdown of our steps (INT8 GEMMs, activation passes, attention, adaLN W4A16, other GEMMs, the
rest). ``int4-fused`` runs every run-time fusion (``svdquant.fuse``: q/k/v as one GEMM, in single blocks with the
MLP's up projection, each MLP's GELU in its down projection's activation pass, a single block's ``proj_out``
reading its two parts);
``int4-fused-triton`` the same with the Triton INT8 GEMM wherever an H100 / H200 would run the CUTLASS one
(the GEMMs' A/B); ``int4-fused-up`` the same with the GELUs in the up projections' GEMM epilogues instead (as
before 2026-12-05), where a single block's GELU stays a pass of its own (its proj_out still reads the two parts);
``int4-qkv`` the q/k/v stacking alone (single blocks' MLPs apart, as first measured); ``int4-act`` the stacking
with the A8 activation quantization left to inductor (``svdquant.fuse(gelu=False, compiled_activations=True)``:
fused into the LayerNorm/modulation and GELU kernels);
``int4-memory`` memory mode (4-bit codes resident, expanded per call), ``int4-memory-fused`` with every fusion too;
``int4-fused-ahead`` every fusion and the adaLN modulations computed ahead in one GEMV (``fuse(modulations=True)``);
``int4-fused-normrope`` every fusion and the q/k RMSNorm + RoPE as one op (``fuse(norm_rope=True)``);
``int4-fused-joint`` every fusion with the compiled single blocks normalizing their streams' concatenation, as
diffusers does (``compat.NORM_PER_STREAM`` off; compiled, the default normalizes each stream apart: the A/B; eagerly
both are ``int4-fused``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from quantize_flux import FLUX_DEV, inputs  # noqa: E402

from svdquant.pipelines.compiling import COMPILE_OPTIONS  # noqa: E402

BASES = ("bf16", "fp8-torchao", "int4", "int4-qkv", "int4-fused", "int4-fused-triton", "int4-fused-up", "int4-act",
         "int4-memory", "int4-memory-fused", "int4-fused-ahead", "int4-fused-joint",
         "int4-fused-normrope")
# base, then "-compiled" (regional torch.compile) or "-whole" (the whole transformer as one torch.compile graph),
# then "-graph" (the whole step captured in one CUDA graph)
VARIANTS = tuple(b + c + g for b in BASES for c in ("", "-compiled", "-whole") for g in ("", "-graph")
                 if b + c != "fp8-torchao")
ATTENTION = ("auto", "native", "_native_flash", "_native_cudnn", "_native_efficient", "sage", "svdquant_int8",
             "svdquant_flash4")


def sm90_runners(model) -> list:
    """The quantized layers' runners that use the CUTLASS GEMM on an H100 / H200 (``Int8Runner.sm90``, decided at
    load): setting their ``sm90`` to False runs the Triton GEMM instead (their branch and padded scales read alike).
    A FLUX single block's stack (q/k/v + the MLP's up projection) is held in the block's state, not as a submodule:
    its runner is counted too (until 2026-12-05 it was missed, and the Triton A/B ran those GEMMs on CUTLASS)."""
    from svdquant.modules import stacks

    holders = [*model.modules(), *stacks(model)]  # a stack among the submodules comes twice: counted once
    return list({id(r): r for r in (getattr(h, "_runner", None) for h in holders) if getattr(r, "sm90", False)}
                .values())


def bench(fn, rep=300):
    import triton.testing

    return triton.testing.do_bench(fn, warmup=50, rep=rep, return_mode="median")


def cpu_bench(fn, rep=3):
    fn()
    ts = []
    for _ in range(rep):
        t = time.perf_counter()
        fn()
        ts.append(1e3 * (time.perf_counter() - t))
    return sorted(ts)[len(ts) // 2]


def random_svdq(k, n, rank, weight_only, seed, mode="speed", device="cuda", down=None):
    """An SVDQLinear (the ``int4`` recipe's layouts) with random contents drawn on the GPU (fast for 12B weights);
    ``down``: its branch's down projection (another member's of its group), else drawn too."""
    from svdquant.modules import SVDQLinear

    g = torch.Generator(device=device).manual_seed(seed)
    if weight_only:  # the adaLN linears: INT4 with 16-bit group scales, 16-bit activations
        m = SVDQLinear(k, n, True, weights="int4", activations=None, rank=0, dtype=torch.bfloat16, device=device)
    else:
        m = SVDQLinear(k, n, True, rank=rank, dtype=torch.bfloat16, device=device)
    with torch.no_grad():
        m.qweight.copy_(torch.randint(0, 256, m.qweight.shape, device=device, generator=g, dtype=torch.uint8))
        m.wscales.copy_(torch.rand(m.wscales.shape, device=device, generator=g) * 0.002 + 1e-4)
        m.bias.zero_()
        if not weight_only:
            m.wmult.copy_(torch.randint(1, 19, m.wmult.shape, device=device, generator=g, dtype=torch.uint8))
            m.smooth_inv.fill_(1.0)
            m.lora_down.copy_(torch.randn(m.lora_down.shape, device=device, generator=g) / k**0.5 if down is None
                              else down)
            m.lora_up.copy_(torch.randn(m.lora_up.shape, device=device, generator=g) * 0.01)
    m.set_weight_mode(mode)  # also prepares the kernels' tensors
    return m


def random_quantized(model, rank=32, mode="speed", device=None):
    """Replace the adapter's target layers by SVDQLinear with random contents (weight-only for adaLN), drawn on
    ``device`` (default: where the model is; on the CPU they run the torch reference, for smoke tests). The
    members of a shared-branch group (q/k/v) share one down projection, as a quantized checkpoint's do: their
    stacked GEMM then has a rank-32 branch, not a block-diagonal rank-96 (padded to 128) one, which the CUTLASS
    GEMM does not take (before session 22 every stacked GEMM here ran Triton's kernel with a rank-128 branch)."""
    from svdquant.models import get_adapter

    adapter = get_adapter(model)
    device = str(device or next(model.parameters()).device)
    n = 0
    for bname, block in adapter.blocks(model):
        for g in adapter.groups(block):
            down = None
            for name in g.names:
                old = block.get_submodule(name)
                new = random_svdq(old.in_features, old.out_features, rank, g.weight_only, n, mode, device, down)
                if g.shared_branch and not g.weight_only and down is None:  # the group's one branch
                    down = new.lora_down
                parent, _, child = name.rpartition(".")
                setattr(block.get_submodule(parent) if parent else block, child, new)
                del old
                n += 1
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return n


def attach_random_loras(model, rank=64, name="bench"):
    from svdquant.modules import SVDQLinear

    n = 0
    for m in model.modules():
        if isinstance(m, SVDQLinear) and m.activations is not None:
            g = torch.Generator(device=m.wscales.device).manual_seed(n)
            a = torch.randn(rank, m.in_features, device=m.wscales.device, generator=g, dtype=torch.bfloat16) * 0.01
            b = torch.randn(m.out_features, rank, device=m.wscales.device, generator=g, dtype=torch.bfloat16) * 0.01
            m.add_adapter(name, a, b, 1.0)
            n += 1
    return n


def batched(kw: dict, b: int) -> dict:
    """One image's step inputs repeated into a batch of ``b`` (ids are per token, not per image)."""
    out = dict(kw)
    for key in ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "guidance"):
        out[key] = kw[key].expand(b, *kw[key].shape[1:]).contiguous()
    return out


def weights_gb(model) -> float:
    """What the model holds on its device: parameters, buffers and the tensors the runners hold instead of a
    buffer (speed mode's INT8 codes; fused q/k/v members hold views of one stacked weight), each storage once."""
    seen, total = set(), 0

    def leaves(t):  # tensor subclasses (torchao's FP8 weights) hold their data in inner tensors
        if type(t) not in (torch.Tensor, torch.nn.Parameter) and hasattr(t, "__tensor_flatten__"):
            for name in t.__tensor_flatten__()[0]:
                yield from leaves(getattr(t, name))
        else:
            yield t

    tensors = list(model.parameters()) + list(model.buffers())
    for m in model.modules():
        runner = getattr(m, "_runner", None)
        tensors += [v for v in vars(runner).values() if isinstance(v, torch.Tensor)] if runner is not None else []
    for p in tensors:
        for t in leaves(p):
            key = t.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes()
    return total / 1e9


def checkpoint_gb(model) -> float:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 1e9


def compile_kwargs(backend, options=None) -> dict:
    kw = dict(fullgraph=True, dynamic=False)
    if backend != "inductor":
        kw["backend"] = backend
    elif options:
        kw["options"] = dict(options)
    return kw


def compile_blocks(model, backend, options=None):
    model.compile_repeated_blocks(**compile_kwargs(backend, options))


def compile_whole(model, backend, options=None):
    """The transformer as one graph (as flux-fast compiles FLUX): inductor also fuses across the blocks, e.g. a
    block's last gated residual add into the next block's LayerNorm, which a regional compile keeps apart."""
    model.compile(**compile_kwargs(backend, options))


def uncompile_blocks(model):
    for m in model.modules():
        if getattr(m, "_compiled_call_impl", None) is not None:
            m._compiled_call_impl = None
    torch._dynamo.reset()


def pick_attention(device, dtype, smoke):
    """The fastest native SDPA backend, or flash-attn-4 where it runs (``svdquant_flash4``), at FLUX.1-dev's shape
    (24 heads × 128, 4608 tokens, batch 1)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if smoke:
        return "native", {}
    q, k, v = (torch.randn(1, 24, 4608, 128, device=device, dtype=dtype) for _ in range(3))
    flop = 4 * 4608 * 4608 * 128 * 24
    times = {}
    for name, be in (("_native_flash", SDPBackend.FLASH_ATTENTION), ("_native_cudnn", SDPBackend.CUDNN_ATTENTION),
                     ("_native_efficient", SDPBackend.EFFICIENT_ATTENTION)):
        try:
            with sdpa_kernel(be):
                torch.nn.functional.scaled_dot_product_attention(q, k, v)
                ms = bench(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
            times[name] = dict(ms=ms, tflops=flop / ms / 1e9)
        except RuntimeError as e:
            times[name] = dict(error=str(e).splitlines()[0][:200])
    from svdquant.ops import flash4_attention as flash4

    if flash4.available(device):
        qs, ks, vs = (x.transpose(1, 2).contiguous() for x in (q, k, v))  # its [B, S, H, D]
        try:
            flash4.attention(qs, ks, vs)
            ms = bench(lambda: flash4.attention(qs, ks, vs))
            times["svdquant_flash4"] = dict(ms=ms, tflops=flop / ms / 1e9)
        except Exception as e:  # noqa: BLE001 - a failing optional library: recorded, SDPA's backends stand
            times["svdquant_flash4"] = dict(error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
    ok = {k: v["ms"] for k, v in times.items() if "ms" in v}
    try:  # 8-bit attention for reference (SageAttention v1, Triton: INT8 QK^T, fp16 PV); timed, never picked
        from sageattention import sageattn

        ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float())
        out = sageattn(q, k, v, tensor_layout="HND", is_causal=False)
        ms = bench(lambda: sageattn(q, k, v, tensor_layout="HND", is_causal=False))
        bf = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        times["sage (8-bit, not picked)"] = dict(ms=ms, tflops=flop / ms / 1e9,
                                                rel_err=float((out.float() - ref).norm() / ref.norm()),
                                                bf16_rel_err=float((bf.float() - ref).norm() / ref.norm()))
    except Exception as e:  # not installed, or it does not run here: say so in the results
        times["sage (8-bit, not picked)"] = dict(error=f"{type(e).__name__}: {str(e)[:200]}")
    return min(ok, key=ok.get), times


CLASSES = (  # kernel-name fragments -> class, first match wins (inductor's triton_* kernels: see kernel_class)
    # the CuTe DSL names its kernel after the class (kernel_cutlass_kernel_...Int8GemmSm90_object_at_...)
    ("int8gemmsm90", "INT8 GEMM (CUTLASS)"), ("int8_gemm", "INT8 GEMM (Triton)"),
    ("activation_stats", "activation pass"), ("quantize_activations", "activation pass"),
    ("expand_int4m", "expand (memory mode)"), ("w4a16", "adaLN W4A16"),
    ("flash", "attention"), ("fmha", "attention"), ("cudnn", "attention"), ("attention", "attention"),
    ("sdpa", "attention"), ("gemm", "other GEMM (cuBLAS)"), ("gemv", "other GEMM (cuBLAS)"),
    ("nvjet", "other GEMM (cuBLAS)"), ("cutlass", "other GEMM (cuBLAS)"), ("xmma", "other GEMM (cuBLAS)"),
)


def kernel_class(name: str) -> str:
    """The class a profiled kernel's time counts in (:data:`CLASSES`). Inductor's own kernels (``triton_*``) count
    as elementwise first: it names a fused kernel after the ops it came from, which can include ours
    (``triton_red_fused_add_cat_int8_linear_mul_native_layer_norm_...``, the producer of an int8_linear's input;
    with int4-act, ``..._int8_gemm_...``)."""
    name = name.lower()
    if name.startswith("triton_"):
        return "elementwise / rest"
    return next((c for frag, c in CLASSES if frag in name), "elementwise / rest")


def breakdown(fn, steps=3):
    """GPU time per kernel class, per step, from torch.profiler (kernel self time)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    classes, rest = {}, {}
    for e in prof.key_averages():
        t = getattr(e, "self_device_time_total", 0) / 1e3 / steps  # us -> ms per step
        if t <= 0:
            continue
        cls = kernel_class(e.key)
        classes[cls] = classes.get(cls, 0.0) + t
        if cls == "elementwise / rest":  # whole names: kernels of the double and single blocks share long prefixes
            rest[e.key] = t
    top = dict(sorted(rest.items(), key=lambda kv: -kv[1])[:12])
    return dict(classes=dict(sorted(classes.items(), key=lambda kv: -kv[1])), total_ms=sum(classes.values()),
                top_rest=top)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--variants", default="bf16,bf16-compiled,int4,int4-compiled",
                    help=f"comma-separated, from {', '.join(VARIANTS)}")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--double", type=int, default=19)
    ap.add_argument("--single", type=int, default=38)
    ap.add_argument("--attention", choices=ATTENTION, default="auto")
    ap.add_argument("--profile", action="store_true", help="per-kernel-class breakdown of the int4 steps")
    ap.add_argument("--lora", action="store_true", help="also time int4 with a rank-64 LoRA on every layer")
    ap.add_argument("--rep-ms", type=int, default=2000, help="do_bench time budget per measurement")
    ap.add_argument("--smoke", action="store_true", help="CPU, a tiny config, aot_eager: checks the plumbing")
    ap.add_argument("--cutlass-views", action="store_true",
                    help="launch the CUTLASS GEMM through the DSL's DLPack views instead of apache-tvm-ffi (the "
                         "host-cost A/B)")
    ap.add_argument("--gemm-one-launch", action="store_true",
                    help="run every CUTLASS GEMM as one launch, without the second launch that the last rows of "
                         "products whose last wave would mostly idle take by default (FLUX's 4,608-row ones; "
                         "cutlass_launch.SPLIT_TAIL: the A/B)")
    ap.add_argument("--act-chunk-bytes", type=int,
                    help="run the INT8 activation passes in row chunks of about this many input bytes "
                         "(svdquant.kernels.activations.CHUNK_BYTES; 0: off, the default)")
    ap.add_argument("--act-blocks", choices=("width", "uniform"), default="width",
                    help="the INT8 activation passes' blocks: chosen by width (the default), or one choice for all "
                         "(as before session 29: the A/B)")
    ap.add_argument("--inductor-defaults", action="store_true",
                    help="compile our blocks at inductor's defaults instead of svdquant.optimize's options "
                         "(COMPILE_OPTIONS: coordinate-descent tuning; the A/B)")
    ap.add_argument("--inductor-options", metavar="JSON",
                    help="our blocks' inductor options instead of COMPILE_OPTIONS, a JSON object (e.g. "
                         "'{\"coordinate_descent_tuning\": true, \"max_autotune_pointwise\": true}')")
    args = ap.parse_args(argv)
    ours_options = {} if args.inductor_defaults else COMPILE_OPTIONS
    if args.inductor_options is not None:
        try:
            ours_options = json.loads(args.inductor_options)
        except json.JSONDecodeError as e:
            ap.error(f"--inductor-options: not JSON ({e})")
        known = torch._inductor.config.get_config_copy()
        if not isinstance(ours_options, dict) or args.inductor_defaults or any(k not in known for k in ours_options):
            ap.error("--inductor-options: a JSON object of inductor config names (torch._inductor.config), and not "
                     "with --inductor-defaults")
    if args.act_blocks == "uniform":
        from activation_passes import UNIFORM

        from svdquant.kernels import activations

        activations.NARROW_BLOCKS = activations.WIDE_BLOCKS = UNIFORM
    if args.act_chunk_bytes is not None:
        if args.act_chunk_bytes < 0:
            ap.error(f"--act-chunk-bytes {args.act_chunk_bytes}: use 0 (off) or a byte count")
        from svdquant.kernels import activations

        activations.CHUNK_BYTES = args.act_chunk_bytes
    if args.cutlass_views:
        from svdquant.kernels import cutlass_launch

        cutlass_launch.TVM_FFI = False  # read when the DSL is first imported, before any layer runs
    if args.gemm_one_launch:
        from svdquant.kernels import cutlass_launch

        cutlass_launch.SPLIT_TAIL = False
    variants = [v for v in args.variants.split(",") if v]
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        ap.error(f"unknown variant(s) {', '.join(bad)}; choose from {', '.join(VARIANTS)}")
    if any(b < 1 for b in args.batch):
        ap.error("--batch values must be >= 1")
    if any(v.startswith("fp8-torchao") for v in variants) and importlib.util.find_spec("torchao") is None:
        ap.error("the fp8-torchao variants need torchao: pip install torchao, or leave them out")
    if args.attention == "svdquant_flash4" and not args.smoke:
        from svdquant.ops.flash4_attention import import_error

        if (why := import_error()) is not None:
            ap.error(f"--attention svdquant_flash4: {why}")
    from diffusers import FluxTransformer2DModel

    device = "cpu" if args.smoke else "cuda"
    backend = "aot_eager" if args.smoke else "inductor"
    timer = cpu_bench if args.smoke else (lambda fn: bench(fn, args.rep_ms))
    cfg = dict(FLUX_DEV, num_attention_heads=2, attention_head_dim=32, joint_attention_dim=64,
               pooled_projection_dim=32, axes_dims_rope=(8, 12, 12)) if args.smoke else FLUX_DEV
    tok = dict(img=64, txt=16, width=64, pooled=32) if args.smoke else {}
    res = dict(device="cpu (smoke)" if args.smoke else torch.cuda.get_device_name(), blocks=[args.double, args.single],
               variants={}, compile="compile_repeated_blocks(fullgraph=True, dynamic=False), default mode",
               our_compile_options=ours_options)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)

    def save():
        from svdquant.kernels import activations, cutlass_launch

        res["act_passes"] = dict(narrow=activations.NARROW_BLOCKS, wide=activations.WIDE_BLOCKS,
                                 narrow_max_k=activations.NARROW_MAX_K, chunk_bytes=activations.CHUNK_BYTES)
        # what the runs used, not what was asked ("not used" where no runner loaded the DSL)
        used = cutlass_launch._STATE.get("ffi") if cutlass_launch._STATE.get("dsl") else None
        res["cutlass_launch"] = {None: "not used", True: "apache-tvm-ffi", False: "DLPack views"}[used]
        res["cutlass_tail_launch"] = cutlass_launch.SPLIT_TAIL  # the last rows' second launch (launches)
        if args.out:
            (args.out / "flux_step.json").write_text(json.dumps(res, indent=1))

    attention, times = (args.attention, {}) if args.attention != "auto" else pick_attention(device, torch.bfloat16,
                                                                                          args.smoke)
    res["attention"], res["attention_backends"] = attention, times
    print("attention:", attention, json.dumps(times), flush=True)
    torch.manual_seed(0)
    t = time.perf_counter()
    with torch.device(device):
        model = FluxTransformer2DModel(num_layers=args.double, num_single_layers=args.single, **cfg)
    model = model.to(torch.bfloat16).eval()
    if attention in ("svdquant_int8", "svdquant_flash4"):  # svdquant's backends (every variant, BF16 ones included)
        from svdquant.integrations.diffusers.attention import register, register_flash4

        register() if attention == "svdquant_int8" else register_flash4()
    model.set_attention_backend(attention)
    res["build_s"] = time.perf_counter() - t
    kw1 = inputs(1, device=device, **tok)[0]
    feeds = {b: batched(kw1, b) for b in args.batch}
    refs = {}

    def captured(m, kw):
        """The whole step in one CUDA graph over static inputs: what a serving loop replays."""
        static = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(2):
                m(**static)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.no_grad():
            out = m(**static)[0]
        return graph.replay, lambda: out

    def measure(name, m):
        row = res["variants"].setdefault(name, {})
        row["weights_gb"] = weights_gb(m)
        for b, kw in feeds.items():
            try:
                if device == "cuda":  # from here: the first call (or the capture's pool) and the timed steps
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    before = torch.cuda.memory_allocated()
                t0 = time.perf_counter()
                with torch.no_grad():
                    if name.endswith("-graph"):
                        replay, result = captured(m, kw)
                        replay()
                        step = replay
                        out = result()
                    else:
                        step = lambda: m(**kw)  # noqa: E731
                        out = step()[0]
                    if device == "cuda":
                        torch.cuda.synchronize()
                    first_s = time.perf_counter() - t0
                    if not torch.isfinite(out).all():
                        raise RuntimeError("non-finite output")
                    if name == "bf16":
                        refs[b] = out.float()
                    elif b in refs and not name.startswith("int4"):
                        row[f"b{b}_rel_err_vs_eager"] = float((out.float() - refs[b]).norm() / refs[b].norm())
                    ms = timer(step)
                    # this model's weights + what the step adds (another variant's model may be resident too)
                    peak = (row["weights_gb"] + (torch.cuda.max_memory_allocated() - before) / 1e9
                            if device == "cuda" else None)
                row[f"b{b}"] = dict(ms=ms, ms_per_image=ms / b, peak_gb=peak, first_call_s=first_s)
                if args.profile and name.startswith("int4") and device == "cuda":
                    with torch.no_grad():
                        row[f"b{b}"]["breakdown"] = breakdown(step)
            except Exception as e:  # one failed variant must not cost the others' figures
                row[f"b{b}"] = dict(error=f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
                traceback.print_exc()
            print(name, b, json.dumps(row[f"b{b}"])[:600], flush=True)
            save()

    def run_base(base, m, options=None):
        """Every requested variant of one base model: eager, then regionally and wholly compiled, each with and
        without a CUDA graph."""
        for suffix in ("", "-graph"):
            if base + suffix in variants:
                measure(base + suffix, m)
        for mode, compile_fn in (("-compiled", compile_blocks), ("-whole", compile_whole)):
            if any(v.startswith(base + mode) for v in variants):
                compile_fn(m, backend, options)
                for suffix in ("", "-graph"):
                    if base + mode + suffix in variants:
                        measure(base + mode + suffix, m)
                uncompile_blocks(m)

    if any(v.startswith("bf16") or v.startswith("fp8") for v in variants) and "bf16" not in variants:
        variants.insert(0, "bf16")  # the reference the other variants' errors are measured against
    run_base("bf16", model)
    if any(v.startswith("fp8-torchao") for v in variants):
        import copy

        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

        fp8 = copy.deepcopy(model)
        # torchao's recipe for diffusion transformers (as in diffusers' torchao docs): every nn.Linear. Its
        # quantize_ also sets inductor's config process-wide (recommended_inductor_config_setter: coordinate-descent
        # tuning, ...): torchao's users get that, so its variant runs with it; the variants after it must not
        inductor_config = torch._inductor.config.get_config_copy()
        quantize_(fp8, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))
        run_base("fp8-torchao", fp8)
        torch._inductor.config.load_config(inductor_config)
        del fp8
        if device == "cuda":
            torch.cuda.empty_cache()
    ours = [b for b in BASES if b.startswith("int4") and
            any(v == b or v.startswith(b + "-c") or v.startswith(b + "-w") or v == b + "-graph" for v in variants)]
    if ours:
        res["bf16_weights_gb"] = weights_gb(model)
        memory = ours[0].startswith("int4-memory")
        res["quantized_layers"] = random_quantized(model, mode="memory" if memory else "speed", device=device)
        res["int4_checkpoint_gb"] = checkpoint_gb(model)
        from svdquant import fuse, set_weight_mode, unfuse
        from svdquant.integrations.diffusers import compat
        from svdquant.modules import fuse_projections, unfuse_projections

        for base in ours:
            set_weight_mode(model, "memory" if base.startswith("int4-memory") else "speed")
            if base == "int4-qkv":  # q/k/v as one GEMM per stream (svdquant/modules/fused.py)
                res["fused_attentions"] = fuse_projections(model, single_mlp=False)
            if base in ("int4-fused", "int4-fused-triton", "int4-memory-fused", "int4-fused-joint"):  # + GELUs
                res["fused"] = fuse(model)
            # the single blocks normalize their streams' concatenation, as diffusers does (read when traced)
            compat.NORM_PER_STREAM = base != "int4-fused-joint"
            if base == "int4-fused-triton":  # the Triton INT8 GEMM where the CUTLASS one would run (H100 / H200)
                switched = sm90_runners(model)
                res["sm90_gemm_layers"] = len(switched)
                for r in switched:
                    r.sm90 = False
            if base == "int4-fused-up":  # the GELUs in the up projections' epilogues instead
                from svdquant.modules.fused import fuse_gelu

                res["fused_up"] = {"qkv": fuse_projections(model), "gelu": fuse_gelu(model, into="up")}
            if base == "int4-act":  # q/k/v + the A8 quantization in the compiled graph (inductor fuses it)
                res["fused_act"] = fuse(model, gelu=False, compiled_activations=True)
            if base == "int4-fused-ahead":  # + every adaLN modulation in one GEMV (svdquant/modules/modulations.py)
                res["fused_ahead"] = fuse(model, modulations=True)
            if base == "int4-fused-normrope":  # + q/k RMSNorm and RoPE as one op (svdquant/modules/norm_rope.py)
                res["fused_normrope"] = fuse(model, norm_rope=True)
            if device == "cuda":
                torch.cuda.empty_cache()
            run_base(base, model, ours_options)
            if base == "int4-qkv":
                unfuse_projections(model)
            if base == "int4-fused-triton":
                for r in switched:
                    r.sm90 = True
            if base in ("int4-fused", "int4-fused-triton", "int4-fused-up", "int4-act", "int4-memory-fused",
                        "int4-fused-ahead", "int4-fused-joint", "int4-fused-normrope"):
                unfuse(model)
            compat.NORM_PER_STREAM = True
        if args.lora:
            res["lora_layers"] = attach_random_loras(model, 64)
            measure(f"{ours[-1]}+lora64", model)
    save()
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
