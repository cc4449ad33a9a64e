"""One FLUX.1-dev transformer step at 1024² (BF16 vs svdquant int4), and what a rank-64 LoRA adds.

    python benchmarks/flux_step.py --out $OUT

The real FLUX.1-dev architecture (19 double + 38 single blocks, 4096 image + 512 text
tokens, batch 1) with random weights. The quantized model swaps every layer the FLUX
adapter targets for an ``SVDQLinear`` with random but valid contents (timing does not
depend on the values; the kernels are checked against the reference elsewhere), so no
12-minute calibration is needed to time it. Measured: BF16 eager step; INT4 step; INT4
step with a rank-64 LoRA on every quantized layer; and per linear, the fused INT4 layer
with and without the LoRA (the branch grows from rank 32 to 96, padded to 128).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from quantize_flux import FLUX_DEV, inputs  # noqa: E402


def bench(fn, rep=300):
    import triton.testing

    return triton.testing.do_bench(fn, warmup=50, rep=rep, return_mode="median")


def random_svdq(k, n, rank, weight_only, seed, mode="speed", device="cuda"):
    """An SVDQLinear (the ``int4`` recipe's layouts) with random contents, drawn where it will live (fast on the
    GPU for 12B weights; on the CPU it runs the torch reference, for smoke tests at a few blocks)."""
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
            m.lora_down.copy_(torch.randn(m.lora_down.shape, device=device, generator=g) / k**0.5)
            m.lora_up.copy_(torch.randn(m.lora_up.shape, device=device, generator=g) * 0.01)
    m.set_weight_mode(mode)  # also prepares the kernels' tensors
    return m


def random_quantized(model, rank=32, mode="speed"):
    """Replace the adapter's target layers by SVDQLinear with random contents (weight-only for adaLN), on the
    device the model is on."""
    from svdquant.models import get_adapter

    adapter = get_adapter(model)
    device = next(model.parameters()).device
    n = 0
    for bname, block in adapter.blocks(model):
        for g in adapter.groups(block):
            for name in g.names:
                old = block.get_submodule(name)
                new = random_svdq(old.in_features, old.out_features, rank, g.weight_only, n, mode, device)
                parent, _, child = name.rpartition(".")
                setattr(block.get_submodule(parent) if parent else block, child, new)
                del old
                n += 1
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return n


def attach_random_loras(model, rank=64, name="bench"):
    from svdquant.modules import SVDQLinear

    n = 0
    for m in model.modules():
        if isinstance(m, SVDQLinear) and m.activations is not None:
            g = torch.Generator(device="cuda").manual_seed(n)
            a = torch.randn(rank, m.in_features, device="cuda", generator=g, dtype=torch.bfloat16) * 0.01
            b = torch.randn(m.out_features, rank, device="cuda", generator=g, dtype=torch.bfloat16) * 0.01
            m.add_adapter(name, a, b, 1.0)
            n += 1
    return n


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--double", type=int, default=19)
    ap.add_argument("--single", type=int, default=38)
    ap.add_argument("--weight-mode", choices=["speed", "memory"], default="speed")
    ap.add_argument("--no-linears", action="store_true", help="skip the per-linear LoRA timings")
    ap.add_argument("--no-lora", action="store_true", help="skip the step with a rank-64 LoRA on every layer")
    args = ap.parse_args(argv)
    from diffusers import FluxTransformer2DModel
    from kernels import random_layer

    res = dict(device=torch.cuda.get_device_name(), blocks=[args.double, args.single])
    # --- per linear: rank 32 vs rank 32 + a rank-64 LoRA
    for k, n in ([] if args.no_linears else [(3072, 3072), (3072, 12288), (12288, 3072), (3072, 21504)]):
        m = random_layer(k, n, mode=args.weight_mode)
        x = torch.randn(4096, k, device="cuda", dtype=torch.bfloat16)
        t0 = bench(lambda: m(x))
        attach = torch.randn(64, k, device="cuda", dtype=torch.bfloat16) * 0.01
        m.add_adapter("l", attach, torch.randn(n, 64, device="cuda", dtype=torch.bfloat16) * 0.01)
        t1 = bench(lambda: m(x))
        res[f"linear {k}x{n} M4096"] = dict(rank32_ms=t0, rank32_plus_lora64_ms=t1, added_pct=100 * (t1 / t0 - 1))
        print(k, n, res[f"linear {k}x{n} M4096"], flush=True)
    # --- a whole step
    torch.manual_seed(0)
    t = time.perf_counter()
    with torch.device("cuda"):
        model = FluxTransformer2DModel(num_layers=args.double, num_single_layers=args.single, **FLUX_DEV)
    model = model.to(torch.bfloat16).eval()
    res["build_s"] = time.perf_counter() - t
    kw = inputs(1)[0]
    with torch.no_grad():
        res["bf16_step_ms"] = bench(lambda: model(**kw), 2000)
        ref = model(**kw)[0]
        res["bf16_weights_gb"] = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9
        print("bf16", res["bf16_step_ms"], flush=True)
        res["quantized_layers"] = random_quantized(model, mode=args.weight_mode)
        res["weight_mode"] = args.weight_mode
        res["int4_checkpoint_gb"] = sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 1e9
        torch.cuda.synchronize()
        res["int4_resident_gb"] = torch.cuda.memory_allocated() / 1e9  # what the GPU holds (INT8 codes in speed mode)
        out = model(**kw)[0]  # compile the kernels
        torch.cuda.synchronize()
        assert torch.isfinite(out).all() and out.shape == ref.shape
        res["int4_step_ms"] = bench(lambda: model(**kw), 2000)
        print("int4", res["int4_step_ms"], flush=True)
        if not args.no_lora:
            res["lora_layers"] = attach_random_loras(model, 64)
            model(**kw)
            res["int4_lora64_step_ms"] = bench(lambda: model(**kw), 2000)
            res["lora_added_pct"] = 100 * (res["int4_lora64_step_ms"] / res["int4_step_ms"] - 1)
    res["peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
    print(json.dumps(res, indent=1))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "flux_step.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
