"""Wan 2.1 text-to-video 14B on one GPU: 16-bit against svdquant per denoising step and per clip, and the peak
GPU memory of the quantized transformer with the text encoder offloaded (issue 26).

    python benchmarks/video.py --sizes 480p --out $OUT                     # bf16, bf16-compiled, int4, int4-24gb
    python benchmarks/video.py --sizes 720p --variants int4 int4-24gb --out $OUT
    python benchmarks/video.py --quick                                      # CPU smoke: tiny configs

The pipeline is diffusers' ``WanPipeline`` with the real architecture and random weights, built on the GPU in
bf16: ``WanTransformer3DModel``'s defaults are Wan 2.1 T2V 14B's config (40 blocks of 40 heads x 128, FFN 13824,
text 4096 wide), UMT5-XXL as its text encoder (512 tokens, the pipeline's default; a letter tokenizer written
offline), ``AutoencoderKLWan``'s defaults (Wan 2.1's VAE), CFG 5.0 (two transformer calls per step). Sizes:
``480p`` = 832 x 480, ``720p`` = 1280 x 720, 81 frames (21 latent frames: 32,760 / 75,600 tokens per call).

A clip of 50 steps takes minutes per variant, so each variant is timed per step: a call of ``--steps-a`` steps
and one of ``--steps-b`` (latents out, no decode), ``per_step = (t_b - t_a) / (b - a)`` (the text encoding and
the scheduler's setup cancel), after a first call that compiles / captures. The clip estimate is
``t_a + (50 - a) * per_step + decode`` with the VAE decode of 21 latent frames timed once (bf16).

Variants, in order, on one pipeline:

* ``bf16``: everything on the GPU, eager;
* ``bf16-compiled``: the transformer's blocks through ``torch.compile`` (what svdquant compiles too);
* ``int4``: the transformer's layers as svdquant ``int4`` (random valid contents, speed mode), then
  ``svdquant.optimize(pipe)``: fused q/k/v, attention backend, compiled blocks, CUDA graphs;
* ``int4-24gb``: the same layers in memory mode (4-bit resident) and ``pipe.enable_model_cpu_offload()``: the
  text encoder (UMT5-XXL, 11 GB) and the VAE wait on the CPU while the transformer runs. ``peak_steps_gb`` is the
  peak allocated over denoising steps 2 to the last (reset at the end of step 1, when only the transformer is on
  the GPU); ``decode_peak_gb`` the VAE decode's own peak. Graphs are off under offload hooks (svdquant's rule).

Results go to ``--out``/video.json after every measurement; a measurement that would start after ``--budget-s``
is skipped and listed.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from e2e import _sync, compile_denoiser, uncompile  # noqa: E402
from pipeline_memory import T5_XXL, _quiet, components_gb, letter_tokenizer, random_quantize, run_device  # noqa: E402

VARIANTS = ("bf16", "bf16-compiled", "int4", "int4-24gb")
SIZES = {"480p": (480, 832), "720p": (720, 1280)}
CLIP_STEPS = 50  # Wan 2.1's default
# UMT5-XXL (google/umt5-xxl, Wan 2.1's text encoder): T5-XXL's layout with UMT5's vocabulary
UMT5_XXL = dict(T5_XXL, vocab_size=256384)
TINY_WAN = dict(num_attention_heads=2, attention_head_dim=32, in_channels=16, out_channels=16, text_dim=32,
                freq_dim=32, ffn_dim=128, num_layers=2, rope_max_seq_len=32)


def build(quick: bool, device: str, dtype=torch.bfloat16):
    import diffusers as D
    import transformers as T

    scheduler = D.FlowMatchEulerDiscreteScheduler(shift=5.0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            torch.manual_seed(0)
            te = dict(UMT5_XXL, vocab_size=64, d_model=32, d_ff=64, d_kv=16, num_heads=2, num_layers=1,
                      relative_attention_num_buckets=8, relative_attention_max_distance=16) if quick else UMT5_XXL
            vae = dict(base_dim=8, dim_mult=[1, 2, 4, 4], num_res_blocks=1) if quick else {}
            pipe = D.WanPipeline(tokenizer=letter_tokenizer(), text_encoder=T.UMT5EncoderModel(T.UMT5Config(**te)),
                                 vae=D.AutoencoderKLWan(**vae), scheduler=scheduler,
                                 transformer=D.WanTransformer3DModel(**(TINY_WAN if quick else {})))
    finally:
        torch.set_default_dtype(prev)
    for m in pipe.components.values():
        if isinstance(m, torch.nn.Module):
            m.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def timed_call(pipe, call: dict, steps: int, device: str, reset_after_first_step: bool = False):
    """(seconds, latents) of one call with ``steps`` steps; with ``reset_after_first_step`` the peak memory counter
    restarts at the end of the first step."""
    def reset(p, i, t, kw):
        if i == 0 and device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        return kw

    extra = dict(callback_on_step_end=reset) if reset_after_first_step else {}
    _sync(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = pipe(**call, num_inference_steps=steps, generator=torch.Generator("cpu").manual_seed(0),
                   output_type="latent", **extra).frames
    _sync(device)
    return time.perf_counter() - t0, out


def measure(pipe, call: dict, args, device: str, memory: bool = False) -> tuple[dict, torch.Tensor]:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    t_first, _ = timed_call(pipe, call, args.steps_a, device)  # compiles, captures
    t_a, _ = timed_call(pipe, call, args.steps_a, device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t_b, latents = timed_call(pipe, call, args.steps_b, device, reset_after_first_step=memory)
    per_step = (t_b - t_a) / (args.steps_b - args.steps_a)
    r = dict(first_call_s=round(t_first, 2), call_a_s=round(t_a, 3), call_b_s=round(t_b, 3),
             seconds_per_step=round(per_step, 3), finite=bool(torch.isfinite(latents).all()))
    if device == "cuda":
        r["peak_steps_gb" if memory else "peak_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
    return r, latents


def decode(pipe, latents, device: str) -> dict:
    vae = pipe.vae
    moved = next(vae.parameters()).device.type != device
    if moved:
        vae.to(device)
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    z = latents.to(device, vae.dtype)
    with torch.no_grad():
        _sync(device)
        t0 = time.perf_counter()
        video = vae.decode(z, return_dict=False)[0]
        _sync(device)
    r = dict(decode_s=round(time.perf_counter() - t0, 2), frames=int(video.shape[2]),
             finite=bool(torch.isfinite(video).all()))
    if device == "cuda":
        r["decode_peak_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
    if moved:
        vae.to("cpu")
    return r


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", choices=SIZES, default=["480p"])
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--steps-a", type=int, default=1)
    ap.add_argument("--steps-b", type=int, default=3)
    ap.add_argument("--budget-s", type=float, default=480.0, help="start no measurement after this many seconds")
    ap.add_argument("--quick", action="store_true", help="CPU, tiny configs, 64 x 64, 5 frames: checks the script")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    if not 1 <= args.steps_a < args.steps_b:
        ap.error("--steps-b must be larger than --steps-a (both at least 1)")
    if (args.frames - 1) % 4:
        ap.error(f"--frames {args.frames}: Wan takes 4k + 1 frames (81, 49, 17...)")
    order = [v for v in VARIANTS if v in args.variants]
    device = run_device(ap, args.quick)
    _quiet()
    import diffusers
    import svdquant

    t_start = time.perf_counter()
    frames = 5 if args.quick else args.frames
    results = dict(device=torch.cuda.get_device_name() if device == "cuda" else "cpu (quick)", torch=torch.__version__,
                   diffusers=diffusers.__version__, svdquant=svdquant.__version__, command=" ".join(sys.argv),
                   frames=frames, steps=[args.steps_a, args.steps_b], clip_steps=CLIP_STEPS)

    def save():
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "video.json").write_text(json.dumps(results, indent=1))

    t = time.perf_counter()
    pipe = build(args.quick, device)
    results["build_s"] = round(time.perf_counter() - t, 1)
    results["weights_gb_bf16"] = components_gb(pipe)
    den = pipe.transformer
    quantized = False
    for variant in order:
        if variant == "bf16-compiled":
            compile_denoiser(den)
        elif variant.startswith("int4") and not quantized:
            uncompile(den)  # the compiled bf16 blocks go: the int4 layers compile anew
            results["quantized_layers"] = random_quantize(den, "speed")
            quantized = True
            results["weights_gb_int4"] = components_gb(pipe)
        report = None
        if variant == "int4":
            report = svdquant.optimize(pipe)
        elif variant == "int4-24gb":
            svdquant.deoptimize(pipe)
            svdquant.set_weight_mode(pipe, "memory")
            report = svdquant.optimize(pipe, cuda_graphs=False)
            if device == "cuda":
                pipe.enable_model_cpu_offload()
        for size in args.sizes:
            key = f"{variant} {size}"
            if time.perf_counter() - t_start > args.budget_s:
                results[key] = {"skipped": f"past --budget-s {args.budget_s}"}
                save()
                continue
            h, w = (64, 64) if args.quick else SIZES[size]
            call = dict(prompt="a red fox running through fresh snow, cinematic", height=h, width=w, num_frames=frames,
                        guidance_scale=5.0, max_sequence_length=16 if args.quick else 512)
            try:
                r, latents = measure(pipe, call, args, device, memory=variant == "int4-24gb")
                if variant in ("bf16", "int4-24gb") or "decode" not in results.get(f"bf16 {size}", {}):
                    r["decode"] = decode(pipe, latents, device)
                dec = r.get("decode") or results.get(f"bf16 {size}", {}).get("decode", {})
                if "decode_s" in dec:
                    r["clip_s_est"] = round(r["call_a_s"] + (CLIP_STEPS - args.steps_a) * r["seconds_per_step"]
                                            + dec["decode_s"], 1)
            except Exception as e:  # one failed measurement must not cost the others
                import traceback

                traceback.print_exc()
                r = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
            results[key] = r
            if report is not None:  # after the calls: the layer choice is made at the first
                results[f"optimize {variant}"] = str(report)
            print(f"{key:20s} {json.dumps(r)}", flush=True)
            save()
    results["total_s"] = round(time.perf_counter() - t_start, 1)
    save()
    return results


if __name__ == "__main__":
    main()
