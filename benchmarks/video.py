"""Wan video on one GPU: 16-bit against svdquant per denoising step and per clip, and the peak GPU memory of the
quantized transformer(s) with the text encoder offloaded (issue 26). ``--model``:

* ``t2v`` (default): Wan 2.1 text-to-video 14B, ``WanPipeline``;
* ``i2v``: Wan 2.1 image-to-video 14B 480p, ``WanImageToVideoPipeline``, animating a fixed random picture of the
  clip's size;
* ``wan22``: Wan 2.2 text-to-video A14B, ``WanPipeline`` with two experts (``transformer`` for the high-noise
  steps, ``transformer_2`` for the rest, ``boundary_ratio`` 0.875).

    python benchmarks/video.py --sizes 480p --out $OUT                     # bf16, bf16-compiled, int4, int4-24gb
    python benchmarks/video.py --sizes 720p --variants int4 int4-24gb --out $OUT
    python benchmarks/video.py --model i2v --sizes 480p --out $OUT         # Wan 2.1 I2V 14B 480p
    python benchmarks/video.py --model wan22 --sizes 480p --out $OUT       # Wan 2.2 T2V A14B (two 14B experts)
    python benchmarks/video.py --quick [--model i2v|wan22]                  # CPU smoke: tiny configs

Each pipeline is diffusers' with the real architecture and random weights, built on the GPU in bf16:
``WanTransformer3DModel``'s defaults are Wan 2.1 T2V 14B's config (40 blocks of 40 heads x 128, FFN 13824, text
4096 wide), UMT5-XXL as the text encoder (512 tokens, the pipeline's default; a letter tokenizer written offline),
``AutoencoderKLWan``'s defaults (Wan 2.1's VAE, which Wan 2.2 A14B uses too). Per model:

* ``t2v``: CFG 5.0 (two transformer calls per step), flow shift 5.0; a clip is 50 steps (Wan's default);
* ``i2v``: the transformer of Wan2.1-I2V-14B-480P (diffusers' ``convert_wan_to_diffusers.py``: the same blocks with
  36 input channels, 16 noise + 4 first-frame mask + 16 of the conditioning clip's latents, ``image_dim=1280`` and
  ``added_kv_proj_dim=5120``: each block's cross-attention also reads the picture's 257 CLIP tokens); the image
  encoder ``CLIPVisionModel`` of OpenCLIP ViT-H/14 (laion/CLIP-ViT-H-14-laion2B-s32B-b79K: 32 layers of 1280, 16
  heads, MLP 5120, GELU, 224 px in 14 px patches; the pipeline reads its last-but-one hidden states) with
  ``CLIPImageProcessor``'s defaults, which are that model's (224 shortest edge, 224 centre crop, bicubic, CLIP's
  mean and std), built offline; each call the VAE also encodes the conditioning clip (the picture, then
  zeros for the other 80 frames); CFG 5.0, flow shift 3.0 (Wan's for 480p I2V); a clip is 40 steps (Wan's I2V
  default);
* ``wan22``: two transformers of Wan 2.1 T2V 14B's config (Wan2.2-T2V-A14B's high- and low-noise experts), both on
  the GPU except under ``int4-24gb``; CFG 4.0 on the high-noise expert and 3.0 on the low-noise one, flow shift 12.0
  and a clip of 40 steps (Wan 2.2's t2v-A14B config). The ``int4`` variants quantize both experts.

Sizes: ``480p`` = 832 x 480, ``720p`` = 1280 x 720, 81 frames (21 latent frames: 32,760 / 75,600 tokens per call).

A clip of 40-50 steps takes minutes per variant, so each variant is timed per step: a call of ``--steps-a`` steps
and one of ``--steps-b`` (latents out, no decode), ``per_step = (t_b - t_a) / (b - a)`` (the text and image
encoding and the scheduler's setup cancel), after a first call that compiles / captures. The clip estimate is
``t_a + (clip steps - a) * per_step + decode`` with the VAE decode of 21 latent frames timed once (bf16). For
``wan22`` ``--steps-a`` defaults to 2 (else 1): at flow shift 12 a 2-step call runs one step on each expert and a
3-step call two on the high-noise one and one on the other, so both calls move each expert once under offload and
the difference is one high-noise step (the experts have the same shape); its first call runs ``--steps-b`` steps,
so both experts are compiled / captured before anything is timed. ``expert_steps`` records each timed call's
[high-noise, low-noise] steps, ``step_s`` every step's seconds. Under ``int4-24gb`` a Wan 2.2 call moves both
experts between CPU and GPU memory, and those moves vary by seconds from call to call (a 3-step call once measured
0.56 s longer than a 2-step one), so per step is there the median of call b's steady steps (run by the expert of
the step before: nothing moved in them); ``seconds_per_step_difference`` keeps the calls' difference.

Variants, in order, on one pipeline:

* ``bf16``: everything on the GPU, eager;
* ``bf16-compiled``: the transformer's blocks through ``torch.compile`` (what svdquant compiles too; both experts);
* ``int4``: the transformer's layers as svdquant ``int4`` (random valid contents, speed mode; each expert's), then
  ``svdquant.optimize(pipe)``: fused q/k/v, attention backend, compiled blocks, CUDA graphs;
* ``int4-int8attn``: the same with ``svdquant.optimize(pipe, attention="int8")`` (INT8 Q·Kᵀ attention, opt-in);
* ``int4-24gb``: the same layers in memory mode (4-bit resident) and ``pipe.enable_model_cpu_offload()``: the
  text encoder (UMT5-XXL, 11 GB), the image encoder and the VAE wait on the CPU while the transformer runs, and
  of two experts only the one running is on the GPU (diffusers moves the other out first). ``peak_steps_gb`` is the
  peak allocated over denoising steps 2 to the last (reset at the end of step 1, when only the transformer is on
  the GPU, with I2V's VAE, ~0.25 GB, left there after it encoded the first frame); ``decode_peak_gb`` the VAE
  decode's own peak. Graphs are off under offload hooks (svdquant's rule).

Results go to ``--out``/video.json (``video-i2v.json``, ``video-wan22.json`` for the other models; each names its
model) after every measurement; a measurement that would start after ``--budget-s`` is skipped and listed.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from e2e import _sync, compile_denoiser, uncompile  # noqa: E402
from pipeline_memory import (  # noqa: E402
    T5_XXL, _quiet, components_gb, letter_tokenizer, random_image, random_quantize, run_device,
)

VARIANTS = ("bf16", "bf16-compiled", "int4", "int4-int8attn", "int4-24gb")
SIZES = {"480p": (480, 832), "720p": (720, 1280)}
# per model: the pipeline, Wan's sampling defaults (flow shift, a clip's steps, guidance), --steps-a's default
MODELS = {
    "t2v": dict(pipeline="Wan 2.1 T2V 14B (WanPipeline)", shift=5.0, clip_steps=50, steps_a=1,
                guidance=dict(guidance_scale=5.0)),
    "i2v": dict(pipeline="Wan 2.1 I2V 14B 480p (WanImageToVideoPipeline)", shift=3.0, clip_steps=40, steps_a=1,
                guidance=dict(guidance_scale=5.0)),
    "wan22": dict(pipeline="Wan 2.2 T2V A14B (WanPipeline, transformer + transformer_2)", shift=12.0, clip_steps=40,
                  steps_a=2, guidance=dict(guidance_scale=4.0, guidance_scale_2=3.0)),
}
BOUNDARY_RATIO = 0.875  # Wan 2.2 t2v-A14B: the high-noise expert takes the timesteps >= 875 of 1000
# UMT5-XXL (google/umt5-xxl, Wan 2.1's text encoder): T5-XXL's layout with UMT5's vocabulary
UMT5_XXL = dict(T5_XXL, vocab_size=256384)
# Wan 2.1 I2V 14B (480p and 720p): WanTransformer3DModel's defaults (T2V 14B) with these
WAN21_I2V = dict(in_channels=36, image_dim=1280, added_kv_proj_dim=5120)
# OpenCLIP ViT-H/14's vision tower (laion/CLIP-ViT-H-14-laion2B-s32B-b79K), Wan 2.1 I2V's image encoder
CLIP_VIT_H14 = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                    image_size=224, patch_size=14, hidden_act="gelu", layer_norm_eps=1e-5)
TINY_WAN = dict(num_attention_heads=2, attention_head_dim=32, in_channels=16, out_channels=16, text_dim=32,
                freq_dim=32, ffn_dim=128, num_layers=2, rope_max_seq_len=32)
TINY_WAN_I2V = dict(TINY_WAN, in_channels=36, image_dim=32, added_kv_proj_dim=64)  # 64: the tiny inner width
TINY_CLIP_VISION = dict(CLIP_VIT_H14, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=2, image_size=32, patch_size=8)


def build(quick: bool, device: str, model: str = "t2v", dtype=torch.bfloat16):
    import diffusers as D
    import transformers as T

    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; choose from {tuple(MODELS)}")
    scheduler = D.FlowMatchEulerDiscreteScheduler(shift=MODELS[model]["shift"])
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            torch.manual_seed(0)
            te = dict(UMT5_XXL, vocab_size=64, d_model=32, d_ff=64, d_kv=16, num_heads=2, num_layers=1,
                      relative_attention_num_buckets=8, relative_attention_max_distance=16) if quick else UMT5_XXL
            vae = dict(base_dim=8, dim_mult=[1, 2, 4, 4], num_res_blocks=1) if quick else {}
            wan = (TINY_WAN_I2V if quick else WAN21_I2V) if model == "i2v" else (TINY_WAN if quick else {})
            parts = dict(tokenizer=letter_tokenizer(), text_encoder=T.UMT5EncoderModel(T.UMT5Config(**te)),
                         vae=D.AutoencoderKLWan(**vae), scheduler=scheduler,
                         transformer=D.WanTransformer3DModel(**wan))
            if model == "t2v":
                pipe = D.WanPipeline(**parts)
            elif model == "wan22":
                pipe = D.WanPipeline(**parts, transformer_2=D.WanTransformer3DModel(**wan),
                                     boundary_ratio=BOUNDARY_RATIO)
            else:
                side = 32 if quick else 224
                pipe = D.WanImageToVideoPipeline(
                    **parts, image_encoder=T.CLIPVisionModel(T.CLIPVisionConfig(
                        **(TINY_CLIP_VISION if quick else CLIP_VIT_H14))),
                    image_processor=T.CLIPImageProcessor(size={"shortest_edge": side},
                                                         crop_size={"height": side, "width": side}))
    finally:
        torch.set_default_dtype(prev)
    for m in pipe.components.values():
        if isinstance(m, torch.nn.Module):
            m.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def experts(pipe) -> list:
    """The pipeline's transformers: Wan 2.2's two experts, else the one."""
    second = getattr(pipe, "transformer_2", None)
    return [pipe.transformer] + ([second] if second is not None else [])


def step_experts(pipe) -> list[int] | None:
    """The expert of each step of the call just made (0: high-noise, 1: low-noise; its scheduler's timesteps
    against the boundary), or None for a one-transformer pipeline."""
    ratio = pipe.config.get("boundary_ratio")
    if ratio is None:
        return None
    bound = ratio * pipe.scheduler.config.num_train_timesteps
    return [0 if float(t) >= bound else 1 for t in pipe.scheduler.timesteps]


def expert_steps(pipe) -> list[int] | None:
    """[high-noise, low-noise] steps of the call just made, or None for a one-transformer pipeline."""
    which = step_experts(pipe)
    return None if which is None else [which.count(0), which.count(1)]


def timed_call(pipe, call: dict, steps: int, device: str, reset_after_first_step: bool = False):
    """(seconds, latents, step seconds) of one call with ``steps`` steps: the step seconds from the end of one
    step to the end of the next (the first from the call's start: the text encoding and setup in it), each step's
    end synchronized with the GPU (steps take seconds: the sync costs nothing measurable); with
    ``reset_after_first_step`` the peak memory counter restarts at the end of the first step."""
    ends = []

    def at_step_end(p, i, t, kw):
        _sync(device)
        ends.append(time.perf_counter())
        if i == 0 and reset_after_first_step and device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        return kw

    _sync(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = pipe(**call, num_inference_steps=steps, generator=torch.Generator("cpu").manual_seed(0),
                   output_type="latent", callback_on_step_end=at_step_end).frames
    _sync(device)
    t = time.perf_counter() - t0
    return t, out, [round(b - a, 3) for a, b in zip([t0] + ends[:-1], ends)]


def measure(pipe, call: dict, args, device: str, memory: bool = False) -> tuple[dict, torch.Tensor]:
    """Per step: ``(t_b - t_a) / (b - a)``, except under offload with two experts (``memory`` on Wan 2.2), where
    each call moves both experts between CPU and GPU memory and those moves vary by seconds from call to call (one
    run measured a 3-step call 0.56 s longer than a 2-step one): there, the median of the steady steps of call b,
    those run by the expert of the step before (no move in them). The same median (of call b's steps after the
    first) where the difference comes out at zero or less: two calls that vary by more than their steps."""
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    # compiles, captures: every expert the timed calls use (a two-expert call of --steps-b steps runs both)
    first_steps = args.steps_b if len(experts(pipe)) > 1 else args.steps_a
    t_first, _, _ = timed_call(pipe, call, first_steps, device)
    t_a, _, steps_a = timed_call(pipe, call, args.steps_a, device)
    split_a = expert_steps(pipe)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t_b, latents, steps_b = timed_call(pipe, call, args.steps_b, device, reset_after_first_step=memory)
    per_step = (t_b - t_a) / (args.steps_b - args.steps_a)
    r = dict(first_call_s=round(t_first, 2), call_a_s=round(t_a, 3), call_b_s=round(t_b, 3),
             step_s={"call_a": steps_a, "call_b": steps_b}, seconds_per_step=round(per_step, 3),
             finite=bool(torch.isfinite(latents).all()), latents_shape=list(latents.shape))
    which = step_experts(pipe)
    steady = steps_b[1:]
    if which is not None:
        r["first_call_steps"] = first_steps
        r["expert_steps"] = {"call_a": split_a, "call_b": expert_steps(pipe)}
        steady = [s for i, s in enumerate(steps_b) if i > 0 and which[i] == which[i - 1]]
    # the difference of two calls is noise where the calls vary by more than the steps they differ by: the expert
    # moves under offload (per_step_from), or a loaded CPU on the tiny run, a step of zero or less (per_step_fallback)
    moves = memory and which is not None
    if (moves or per_step <= 0) and steady:
        r["seconds_per_step_difference"] = r["seconds_per_step"]
        r["seconds_per_step"] = round(statistics.median(steady), 3)
        if moves:
            r["per_step_from"] = "the median steady step of call b (no expert moved in it)"
        else:
            r["per_step_fallback"] = "the median of call b's steps after the first: the calls' difference was <= 0"
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
    ap.add_argument("--model", choices=MODELS, default="t2v",
                    help="t2v: Wan 2.1 T2V 14B (default); i2v: Wan 2.1 I2V 14B 480p; wan22: Wan 2.2 T2V A14B")
    ap.add_argument("--sizes", nargs="+", choices=SIZES, default=["480p"])
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--steps-a", type=int, default=None, help="default 1 (wan22: 2, one step on each expert)")
    ap.add_argument("--steps-b", type=int, default=3)
    ap.add_argument("--budget-s", type=float, default=480.0, help="start no measurement after this many seconds")
    ap.add_argument("--quick", action="store_true", help="CPU, tiny configs, 64 x 64, 5 frames: checks the script")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    spec = MODELS[args.model]
    if args.steps_a is None:
        args.steps_a = spec["steps_a"]
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
    clip_steps = spec["clip_steps"]
    results = dict(device=torch.cuda.get_device_name() if device == "cuda" else "cpu (quick)", torch=torch.__version__,
                   diffusers=diffusers.__version__, svdquant=svdquant.__version__, command=" ".join(sys.argv),
                   model=args.model, pipeline=spec["pipeline"], frames=frames, steps=[args.steps_a, args.steps_b],
                   clip_steps=clip_steps, flow_shift=spec["shift"], guidance=spec["guidance"])
    if args.model == "wan22":
        results["boundary_ratio"] = BOUNDARY_RATIO
    name = "video.json" if args.model == "t2v" else f"video-{args.model}.json"

    def save():
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / name).write_text(json.dumps(results, indent=1))

    t = time.perf_counter()
    pipe = build(args.quick, device, args.model)
    results["build_s"] = round(time.perf_counter() - t, 1)
    results["weights_gb_bf16"] = components_gb(pipe)
    dens = experts(pipe)
    quantized = False
    for variant in order:
        if variant == "bf16-compiled":
            results["compiled_blocks"] = [compile_denoiser(den) for den in dens]  # per expert
        elif variant.startswith("int4") and not quantized:
            for den in dens:
                uncompile(den)  # the compiled bf16 blocks go: the int4 layers compile anew
            counts = [random_quantize(den, "speed") for den in dens]
            results["quantized_layers"] = sum(counts)
            if len(dens) > 1:
                results["quantized_layers_per_expert"] = counts
            quantized = True
            results["weights_gb_int4"] = components_gb(pipe)
        report = None
        if variant == "int4":
            report = svdquant.optimize(pipe)
        elif variant == "int4-int8attn":  # attention is most of a video step (32,760 tokens at 480p)
            svdquant.deoptimize(pipe)
            report = svdquant.optimize(pipe, attention="int8")
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
            # Wan's image cross-attention takes the context past the first 512 tokens as the picture's: I2V needs
            # the full 512 text tokens even on the tiny run
            call = dict(prompt="a red fox running through fresh snow, cinematic", height=h, width=w, num_frames=frames,
                        max_sequence_length=16 if args.quick and args.model != "i2v" else 512, **spec["guidance"])
            if args.model == "i2v":
                call["image"] = random_image(w, h)
            try:
                r, latents = measure(pipe, call, args, device, memory=variant == "int4-24gb")
                if variant in ("bf16", "int4-24gb") or "decode" not in results.get(f"bf16 {size}", {}):
                    r["decode"] = decode(pipe, latents, device)
                dec = r.get("decode") or results.get(f"bf16 {size}", {}).get("decode", {})
                if "decode_s" in dec:
                    r["clip_s_est"] = round(r["call_a_s"] + (clip_steps - args.steps_a) * r["seconds_per_step"]
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
