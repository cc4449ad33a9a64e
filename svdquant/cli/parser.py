"""The ``svdquant`` command line: every subcommand, option and help text in one declarative table
(:func:`build_parser`), each subcommand bound to its checks (``validate``) and its work (``func``)."""

from __future__ import annotations

import argparse

from .. import _checks
from .common import DTYPES
from .convert import cmd_convert, validate_convert
from .demo import cmd_demo, validate_demo
from .info import cmd_info, validate_info
from .media import DEFAULT_FPS, DEFAULT_VIDEO as VIDEO_DEFAULT
from .quantize import cmd_quantize, validate_quantize
from .sampling import cmd_compare, cmd_generate, validate_compare, validate_generate
from .serve import cmd_serve, validate_serve

USAGE = """The ``svdquant`` command.

    svdquant demo                                   # offline: tiny model, 16-bit vs 4-bit, compare.png
    svdquant quantize MODEL -o OUT --recipe int4    # MODEL: diffusers pipeline folder or hub id
    svdquant generate OUT "a photo of a cat" -o cat.png
    svdquant generate KONTEXT_OUT "make it snow" --image in.png -o out.png   # an edit pipeline: its input image
    svdquant generate WAN_OUT "a fox running" -o fox.webp     # a video pipeline: .webp, .gif (animated) or .mp4
    svdquant compare OUT "a photo of a cat" -o compare.png
    svdquant info OUT
    svdquant serve [MODEL] --port 8000                # HTTP service + web page (default MODEL: tiny)
    svdquant convert nunchaku FILE.safetensors -o OUT # a Nunchaku INT4 FLUX or Qwen-Image file -> svdquant
    svdquant convert OUT --to nunchaku -o FILE.safetensors   # a w4a4-float FLUX or Qwen-Image checkpoint -> Nunchaku
"""


class _Parser(argparse.ArgumentParser):
    """argparse's own errors (a missing argument, ``--rank abc``) as the one line every other mistake gets,
    instead of the usage block above it; exit status 2 as argparse's."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def build_parser() -> argparse.ArgumentParser:
    from ..recipes import DEMO_VARIANTS, METHODS, RECIPES

    from .. import __version__

    ap = _Parser(prog="svdquant", description=USAGE, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--version", action="version", version=f"svdquant {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)
    ap.verbs = sub.choices  # name -> subcommand parser, for errors that argparse reports at the top (main)

    def common_device(p):
        p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda if present)")
        p.add_argument("--dtype", choices=list(DTYPES), help="16-bit compute dtype (default: bf16 on GPU, fp32 on CPU)")

    def optimize_flag(p):
        p.add_argument("--no-optimize", dest="optimize", action="store_false",
                       help="on CUDA, skip svdquant.optimize (fused layers, the fastest attention backend, compiled "
                            "blocks, CUDA graphs): no compilation at the first call, slower steps")
        p.add_argument("--attention", choices=("auto", "int8", "flash4"), default="auto",
                       help="on CUDA, the attention svdquant.optimize sets: auto (the fastest of PyTorch's SDPA "
                            "backends and, if installed, flash-attn-4: exact), int8 (svdquant's INT8 Q·Kᵀ attention: "
                            "opt-in, costs the tiny FLUX ~0.2 dB) or flash4 (flash-attn-4, exact)")
        p.add_argument("--compile", choices=("blocks", "model"), default="blocks",
                       help="on CUDA, how svdquant.optimize compiles the denoiser: blocks (each repeated block) or "
                            "model (the whole forward as one graph: a FLUX.1-dev step ~2 %% faster on an H100 in a "
                            "benchmark, about twice the first call's compile)")

    def checkpoint_prompt(p, output):
        p.add_argument("checkpoint")
        p.add_argument("prompt")
        stem, suffix = output.rsplit(".", 1)
        many = f"; with --num-images 2: {stem}-0.{suffix} and {stem}-1.{suffix}" if output == "image.png" else ""
        video = (f"; a video pipeline (Wan) writes an animated .webp (lossless) or .gif, or .mp4 (needs imageio "
                 f"and imageio-ffmpeg), default {VIDEO_DEFAULT}") if output == "image.png" else ""
        p.add_argument("-o", "--output", help=f"image file to write (default {output}{many}){video}")
        p.set_defaults(default_output=output)  # -o's default: set once the pipeline's kind is known
        p.add_argument("--base", help="base pipeline folder or hub id (default: the one the checkpoint records)")
        p.add_argument("--overwrite", action="store_true", help="replace the output file(s) if they exist")

    def sampling(p):
        p.add_argument("--steps", type=int, help="denoising steps (default: the pipeline's)")
        p.add_argument("--seed", type=int, default=0, help="seed of the initial noise (default 0; image i of a call "
                                                            "uses the same generator, so a seed gives the same images)")
        p.add_argument("--num-images", type=int, default=1,
                       help=f"images (videos) per call (1 to {_checks.MAX_IMAGES})")
        size_options(p, "image")
        p.add_argument("--guidance-scale", dest="guidance_scale", type=float,
                       help="classifier-free / distilled guidance (default: the pipeline's)")
        p.add_argument("--image", metavar="FILE",
                       help="the input image of an edit pipeline (FLUX.1 Kontext, Qwen-Image-Edit, Wan "
                            "image-to-video): required for those, refused for the others")

    def size_options(p, what):
        p.add_argument("--height", type=int, help=f"{what} height in pixels (default: the pipeline's; the tiny "
                                                  "model draws 32 only)")
        p.add_argument("--width", type=int, help=f"{what} width in pixels (default: the pipeline's; the tiny model "
                                                 "draws 32 only)")

    p = sub.add_parser("demo", help="offline default job: tiny model, 16-bit vs 4-bit images, compare.png",
                       description="Build the tiny model (no download), quantize it with each recipe, sample one "
                                   "image per class from the same noise and write compare.png and quality.md.")
    p.add_argument("-o", "--output", default="svdquant-demo", help="output folder (default: svdquant-demo)")
    p.add_argument("--recipes", nargs="+", default=list(DEMO_VARIANTS), metavar="VARIANT",
                   help=f"recipes to compare, optionally with an ablation method: {' '.join(DEMO_VARIANTS)} "
                        "(default), int4-lorc, int4-smooth, ...")
    p.add_argument("--steps", type=int, default=6, help="Euler sampling steps (default 6; the model card uses 20)")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise all variants sample from (default 0)")
    p.add_argument("--overwrite", action="store_true", help="replace earlier demo outputs in the folder")
    p.set_defaults(func=cmd_demo, validate=validate_demo)

    p = sub.add_parser("quantize", help="quantize a pipeline's transformer and save a checkpoint",
                       description="Calibrate on prompts, quantize the transformer block by block, save OUT/.")
    p.add_argument("model", help="diffusers pipeline folder or hub id (FLUX.1, SD3, PixArt-Σ, SANA), or 'tiny' "
                                 "(the shipped 32x32 CIFAR-10 model)")
    p.add_argument("-o", "--output", required=True, help="checkpoint folder to write")
    p.add_argument("--recipe", default="int4", help=f"quantization scheme: {', '.join(sorted(RECIPES))} (default int4)")
    p.add_argument("--method", choices=METHODS, help="ablation baseline instead of svdquant")
    p.add_argument("--rank", type=int, help="low-rank branch rank (default: the recipe's)")
    p.add_argument("--no-gptq", action="store_true",
                   help="round the residual to nearest instead of with GPTQ (the 4-bit recipes' default)")
    p.add_argument("--prompts", help="text file, one calibration prompt per line (default: the built-in 128)")
    p.add_argument("--num-prompts", type=int, help="use only the first N prompts")
    p.add_argument("--images", nargs="+", metavar="FILE",
                   help="input images for an edit pipeline (FLUX.1 Kontext, Qwen-Image-Edit, Wan image-to-video): "
                        "prompt i edits image i mod N; required for those, refused for the others")
    p.add_argument("--steps", type=int, help="denoising steps per calibration prompt (default 8; tiny: 4)")
    p.add_argument("--snapshots", type=int,
                   help="(prompt, step) samples drawn (default 128, tiny: 16; at most prompts x steps are)")
    p.add_argument("--tokens", type=int, help="tokens kept per layer (default: the recipe's eval_tokens)")
    p.add_argument("--calibration-batch", dest="calibration_batch", type=int, metavar="N",
                   help="prompts per calibration call, at most: prompts drawn at the same steps run together "
                        "(default: up to 4 with --stream / --max-gpu-memory, where each call streams the model to "
                        "the GPU; else 1, and 1 for videos, edits, Qwen-Image and Z-Image)")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration: which (prompt, step) samples "
                                                        "are drawn and each prompt's noise (default 0)")
    size_options(p, "calibration image")
    p.add_argument("--guidance-scale", dest="guidance_scale", type=float,
                   help="guidance of the calibration runs (default: the pipeline's)")
    p.add_argument("--include", nargs="+", help="quantize only layers matching these patterns (generic adapter)")
    p.add_argument("--exclude", nargs="+", help="never quantize layers matching these patterns")
    p.add_argument("--text-encoders", action="store_true",
                   help="also quantize the text encoders (T5, CLIP, Qwen2.5-VL) weight-only: INT4, group 64 (W4A16)")
    p.add_argument("--push-to-hub", metavar="REPO", help="after saving, upload OUT with its model card to this "
                   "Hugging Face Hub repo (created if needed; needs a token: `hf auth login`)")
    p.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")
    p.add_argument("--stream", action="store_true",
                   help="keep the 16-bit pipeline in CPU memory and move each block, text encoder and snapshot to "
                        "--device only while it is used: the GPU needs about one block's memory")
    p.add_argument("--max-gpu-memory", metavar="SIZE",
                   help="cap the GPU memory torch may use, e.g. 24GB, 22GiB, 16000MB (implies --stream)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    common_device(p)
    p.set_defaults(func=cmd_quantize, validate=validate_quantize)

    p = sub.add_parser("generate", help="sample images (or videos) with a quantized checkpoint",
                       description="Load the base pipeline the checkpoint records (or --base) with the quantized "
                                   "transformer and sample: images, edits of --image, or videos.")
    checkpoint_prompt(p, "image.png")
    p.add_argument("--lora", action="append", metavar="PATH[:STRENGTH]",
                   help="apply a LoRA .safetensors file at a strength (default 1); repeatable")
    sampling(p)
    p.add_argument("--num-frames", dest="num_frames", type=int,
                   help="video pipelines: frames per video (default: the pipeline's, 81 for Wan; Wan takes 4k+1)")
    p.add_argument("--fps", type=int, help=f"video pipelines: frames per second of the file (default {DEFAULT_FPS}, "
                                           "Wan 2.1's)")
    common_device(p)
    optimize_flag(p)
    p.add_argument("--offload", action="store_true",
                   help="GPUs with little memory: keep the pipeline's models in CPU memory and move each to the GPU "
                        "only while it runs, the quantized layers 4-bit resident (Wan 2.1 14B at 480p peaks at "
                        "11.4 GB); every call moves the models in and out, and runs without CUDA graphs")
    p.set_defaults(func=cmd_generate, validate=validate_generate)

    p = sub.add_parser("compare", help="16-bit and quantized images side by side, with PSNR/SSIM",
                       description="Sample the base pipeline and the quantized one from the same seed; write both "
                                   "side by side in one PNG and print PSNR and SSIM.")
    checkpoint_prompt(p, "compare.png")
    sampling(p)
    common_device(p)
    optimize_flag(p)
    p.set_defaults(func=cmd_compare, validate=validate_compare)

    p = sub.add_parser("serve", help="an OpenAI-compatible text-to-image HTTP service and web page",
                       description="Serve MODEL over HTTP: POST /v1/images/generations (OpenAI's images API), "
                                   "GET /v1/models, /health, /metrics (Prometheus) and a web page at /.")
    p.add_argument("model", nargs="?", default="tiny",
                   help="'tiny' (default: the shipped CIFAR-10 model, offline, CPU), an svdquant checkpoint folder, "
                        "or a 16-bit diffusers pipeline folder")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port to listen on (default 8000)")
    p.add_argument("--lora", action="append", metavar="PATH[:STRENGTH]",
                   help="load a LoRA .safetensors file at a default strength (1); clients and the page can change "
                        "it per request; repeatable")
    p.add_argument("--max-queue", dest="max_queue", type=int, default=16,
                   help="requests waiting at most; more get 429 with Retry-After (default 16)")
    p.add_argument("--max-batch", dest="max_batch", type=int, default=4,
                   help="images sampled together from compatible requests (default 4)")
    p.add_argument("--batch-wait-ms", dest="batch_wait_ms", type=int, default=10,
                   help="how long the worker waits for compatible requests to fill a batch (default 10)")
    p.add_argument("--replicas", type=int,
                   help="deploy N copies with Ray Serve, one per GPU, behind Ray's HTTP proxy (needs ray[serve])")
    p.add_argument("--api-key", dest="api_key", metavar="KEY",
                   help="require Authorization: Bearer KEY on the API and /metrics (default: $SVDQUANT_API_KEY; "
                        "prefer it: a command line is visible to other users)")
    p.add_argument("--allowed-host", dest="allowed_host", action="append", metavar="NAME",
                   help="a name clients reach the server by, besides the loopback names and --host (Host header; "
                        "anything else gets 403, which stops DNS rebinding); '*' for any; repeatable")
    p.add_argument("--cors-origin", dest="cors_origin", action="append", metavar="ORIGIN",
                   help="a web origin (https://app.example.com) whose pages may call the API; repeatable (default: "
                        "none, only the server's own page)")
    p.add_argument("--max-body-bytes", dest="max_body_bytes", type=int, default=1 << 20,
                   help="larger request bodies get 413, unread (default 1048576)")
    p.add_argument("--read-timeout", dest="read_timeout", type=float, default=10.0,
                   help="seconds a client has to send a request's headers, then its body (default 10)")
    p.add_argument("--drain-timeout", dest="drain_timeout", type=float, default=30.0,
                   help="on SIGTERM, seconds to finish queued and running work; then the rest gets 503 and the "
                        "process exits (default 30)")
    p.add_argument("--max-connections", dest="max_connections", type=int, default=128,
                   help="open connections at most; more are closed as they open (default 128)")
    p.add_argument("--allow-base-outside", dest="allow_base_outside", action="store_true",
                   help="load a checkpoint's recorded base pipeline even outside the checkpoint's folder and the "
                        "current directory (trust the checkpoint)")
    common_device(p)
    optimize_flag(p)
    p.set_defaults(func=cmd_serve, validate=validate_serve)

    p = sub.add_parser("convert", help="Nunchaku checkpoints in and out",
                       description="svdquant convert nunchaku FILE.safetensors -o DIR: import a Nunchaku single-file "
                                   "INT4 FLUX.1 or Qwen-Image checkpoint as an svdquant checkpoint (exact). svdquant convert DIR --to "
                                   "nunchaku -o FILE.safetensors: write a w4a4-float FLUX.1 or Qwen-Image checkpoint in Nunchaku's "
                                   "format (its 16-bit smoothing and scale biases rounded).")
    p.add_argument("source", nargs="+", metavar="SOURCE",
                   help="'nunchaku FILE.safetensors' to import, or a checkpoint folder with --to nunchaku")
    p.add_argument("--to", metavar="FORMAT", help="write SOURCE in this format: nunchaku")
    p.add_argument("-o", "--output", required=True, help="checkpoint folder (import) or .safetensors file (--to)")
    p.add_argument("--base", help="import: the base pipeline to record, e.g. black-forest-labs/FLUX.1-dev "
                                  "(Nunchaku files do not say which)")
    p.add_argument("--two-level", dest="two_level", action="store_true",
                   help="import: convert the W4A4 layers to two-level scales (the INT8 GEMM path, fast on Hopper) "
                        "and print the error it adds")
    p.add_argument("--overwrite", action="store_true", help="replace the output if it exists")
    p.set_defaults(func=cmd_convert, validate=validate_convert)

    p = sub.add_parser("info", help="what a checkpoint holds", description="Print a checkpoint's metadata.")
    p.add_argument("checkpoint")
    p.add_argument("--json", action="store_true", help="print the full metadata as JSON instead")
    p.set_defaults(func=cmd_info, validate=validate_info)
    return ap
