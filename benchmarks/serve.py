"""``svdquant serve`` throughput and latency on one GPU: batch 1 vs micro-batched (issue 13).

    python benchmarks/serve.py --out $OUT                # GPU: tiny model + FLUX.1-dev size at 512² and 1024²
    python benchmarks/serve.py --quick --out out/serve   # CPU smoke run: tiny model, a few requests (~10 s)

What is measured is the real server stack: ``svdquant.serve.create_app`` on a live uvicorn on 127.0.0.1 (in
this process, as ``svdquant serve`` runs it: one event loop, one worker thread owning the pipeline), driven
over HTTP by httpx clients in a *separate* process, so that the clients' Python does not take the GIL from
the server's. For each model and size, two servers are started in turn on the same loaded pipeline:
``--max-batch 1`` and micro-batched (``--max-batch 4 --batch-wait-ms 10`` by default). The load is a closed
loop: ``--clients`` clients each send ``--requests`` requests one after the other (n=1, distinct seeds, all
of the same size and steps, so any two may share a batch); ``--max-queue`` defaults to the number of clients,
so no request should get 429 (any that do are counted). Per server: images/s (images answered / wall time
from the first request sent to the last answer), client-side latency p50 / p95 / max, the batch sizes the
worker actually formed (recorded by the engine, cross-checked with ``/metrics``), and HTTP status counts.
Each size is warmed up first (one 1-step pipeline call at batch 1 and one at ``--max-batch``), so that
Triton's compilation is not measured.

Models:

* ``tiny``: the shipped tiny FLUX (CIFAR-10, 32x32, its own 20 Euler steps), 16-bit, as ``svdquant serve``
  serves it by default (bf16 on a GPU, fp32 on the CPU).
* ``flux-dev``: a diffusers ``FluxPipeline`` whose transformer is FLUX.1-dev's architecture (19 double +
  38 single blocks, 12B parameters) with random weights, every layer the FLUX adapter targets replaced by an
  ``int4`` ``SVDQLinear`` with random but valid contents (``random_quantized`` of ``flux_step.py``: rank 32,
  speed mode), so no calibration is needed; timing does not depend on the values. The VAE has FLUX.1's real
  config (``AutoencoderKL`` 128-256-512-512, 16 latent channels, 84M parameters) with random weights, so
  its decode costs what the real one does. The text encoders are one-layer CLIP (768 wide) and T5 (4096
  wide) with letter tokenizers (``tests/tiny_models.py``, offline): they cost next to nothing, while T5's
  output still pads to 512 tokens, so the transformer sees FLUX.1-dev's 4096 + 512 tokens at 1024². Only the
  transformer and the VAE cost real time. 4 steps (FLUX.1-schnell's count, not -dev's 28: the question is
  batch 1 vs micro-batched, and 4 steps keep the run within minutes), guidance 3.5 (the guidance embedding
  runs, no second pass), at 512² and 1024². bf16, CUDA only at full size (``--blocks 1 1`` builds a 2-block
  model that also runs on the CPU, its quantized layers through the torch reference).

Requests ask for JPEG (``--output-format``): random weights draw noise, which PNG compresses slowly (about
0.2 s per 1024² image, in the worker thread) where a real image takes a fraction of that; JPEG costs about
the same for both.

Writes ``serve.json`` (every figure, the device, the commit) and ``serve.md`` (the table, also printed) to
``--out``. On the GPU machine the tree's ``.git`` may be stale: pass ``SVDQUANT_COMMIT=<hash>``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

# everything here is built from configs; nothing may be fetched (huggingface_hub reads this when imported)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))  # tiny_models: the offline tokenizers and one-layer text encoders

MODELS = ("tiny", "flux-dev")
FLUX_DEV_BLOCKS = (19, 38)
FLUX_MODEL_ID = "flux-dev-random-int4"
CPU_FLUX_BLOCKS = 4          # each FLUX.1-dev-size block adds seconds per step on a CPU even at 64²
PROMPT = "a red fox"         # fits the letter-tokenized CLIP's 16 tokens
REQUEST_TIMEOUT_S = 300      # a request that takes longer is counted as an error, never waited for forever

# the defaults of a full GPU run and of --quick; a full run is sized for ~4 min of an H200
FULL = dict(models=list(MODELS), sizes=[512, 1024], steps=4, tiny_steps=20, clients=8, blocks=list(FLUX_DEV_BLOCKS))
QUICK = dict(models=["tiny"], sizes=[64], steps=1, tiny_steps=1, clients=4, blocks=[1, 1])


def default_requests(side: int | None, quick: bool) -> int:
    """Requests per client: about 10-25 s per server on an H200, by estimate (4 steps at 1024² are ~0.7 s of
    transformer plus the VAE, 512² about a third of that, a tiny image ~0.1 s)."""
    if quick:
        return 2 if side is None else 1
    return 12 if side is None else 4 if side <= 512 else 3


# ---------------------------------------------------------------------------------------------- arguments
def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="benchmarks/serve.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, help="folder for serve.json and serve.md (created)")
    ap.add_argument("--quick", action="store_true",
                    help="a smoke run: tiny model only, 1 step, 4 clients x 2 requests, CPU unless --device")
    ap.add_argument("--device", help="cuda (default when there is a GPU) or cpu")
    ap.add_argument("--models", nargs="+", choices=MODELS, help="default: both (--quick: tiny)")
    ap.add_argument("--sizes", nargs="+", type=int, metavar="PX", help="flux-dev square sizes (default 512 1024)")
    ap.add_argument("--blocks", nargs=2, type=int, metavar=("DOUBLE", "SINGLE"),
                    help="flux-dev transformer blocks (default FLUX.1-dev's 19 38; 1 1 for a CPU smoke run)")
    ap.add_argument("--steps", type=int, help="flux-dev steps per image (default 4)")
    ap.add_argument("--tiny-steps", dest="tiny_steps", type=int, help="tiny model steps per image (default 20)")
    ap.add_argument("--clients", type=int, help="concurrent clients (default 8)")
    ap.add_argument("--requests", type=int,
                    help="requests per client, for every model and size (default: tiny 12, up to 512² 4, larger 3; "
                         "--quick: 2, 1)")
    ap.add_argument("--max-batch", dest="max_batch", type=int, default=4,
                    help="the micro-batched server's --max-batch (default 4; --max-batch 1 is always measured)")
    ap.add_argument("--batch-wait-ms", dest="batch_wait_ms", type=int, default=10,
                    help="the micro-batched server's --batch-wait-ms (default 10)")
    ap.add_argument("--max-queue", dest="max_queue", type=int, help="server --max-queue (default: --clients)")
    ap.add_argument("--output-format", dest="output_format", choices=("png", "jpeg", "webp"), default="jpeg")
    args = ap.parse_args(argv)
    try:
        _validate(args)
    except ValueError as e:
        ap.error(str(e))
    return args


def _validate(args) -> None:
    """Fill the defaults (full run or --quick) and check everything before any model is built."""
    preset = QUICK if args.quick else FULL
    for key in ("models", "sizes", "steps", "tiny_steps", "clients", "blocks"):
        if getattr(args, key) is None:
            setattr(args, key, preset[key])
    # first, since svdquant.serve itself imports them: a GPU machine may lack some (carried as wheels)
    for name in ["fastapi", "pydantic", "uvicorn", "prometheus_client", "httpx", "PIL", "diffusers"] + (
            ["transformers"] if "flux-dev" in args.models else []):
        try:
            __import__(name)
        except ImportError:
            raise ValueError(f"this benchmark needs the {name} package: pip install it (on a machine without "
                             "network, carry its wheel and its dependencies)") from None
    import torch

    from svdquant import _checks
    from svdquant.serve.schema import MAX_SIDE, MAX_STEPS, MIN_SIDE, SIDE_MULTIPLE

    if args.device is None:
        args.device = "cpu" if args.quick or not torch.cuda.is_available() else "cuda"
    args.device = _checks.device("--device", args.device)
    for side in args.sizes:
        if not MIN_SIDE <= side <= MAX_SIDE or side % SIDE_MULTIPLE:
            raise ValueError(f"--sizes {side}: each size must be a multiple of {SIDE_MULTIPLE} "
                             f"from {MIN_SIDE} to {MAX_SIDE} (e.g. 512)")
    _checks.count("--blocks DOUBLE", args.blocks[0], lo=0, hi=FLUX_DEV_BLOCKS[0])
    _checks.count("--blocks SINGLE", args.blocks[1], lo=0, hi=FLUX_DEV_BLOCKS[1])
    if sum(args.blocks) == 0:
        raise ValueError("--blocks 0 0: the transformer needs at least one block (e.g. --blocks 1 1)")
    _checks.count("--steps", args.steps, hi=MAX_STEPS)
    _checks.count("--tiny-steps", args.tiny_steps, hi=MAX_STEPS)
    _checks.count("--clients", args.clients, hi=256)
    if args.requests is not None:
        _checks.count("--requests", args.requests, hi=10_000)
    _checks.count("--max-batch", args.max_batch, lo=2, hi=_checks.MAX_IMAGES,
                  why=" (it is the micro-batched server; --max-batch 1 is always measured)")
    _checks.count("--batch-wait-ms", args.batch_wait_ms, lo=0, hi=60_000)
    if args.max_queue is None:
        args.max_queue = args.clients
    _checks.count("--max-queue", args.max_queue, hi=100_000)
    if "flux-dev" in args.models and not args.device.startswith("cuda") and sum(args.blocks) > CPU_FLUX_BLOCKS:
        raise ValueError(f"--models flux-dev on {args.device}: {sum(args.blocks)} FLUX.1-dev-size blocks would "
                         "take hours per request; use a GPU, or --blocks 1 1 --sizes 64 for a smoke run")
    if args.out is not None and args.out.exists() and not args.out.is_dir():
        raise ValueError(f"--out {args.out} is a file; name a folder (it is created if missing)")


# ---------------------------------------------------------------------------------------------- the models
def flux_dev_pipeline(blocks=FLUX_DEV_BLOCKS, device="cuda", quantize: bool = True, seed: int = 0):
    """The FLUX.1-dev-size ``FluxPipeline`` of the module doc, on ``device`` in bf16; returns (pipe, info).
    ``quantize=False`` keeps the transformer's random bf16 linears."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from diffusers.utils import logging as dlogging
    from flux_step import random_quantized
    from quantize_flux import FLUX_DEV
    from tiny_models import tiny_text_encoders

    t0 = time.perf_counter()
    torch.manual_seed(seed)
    verbosity = dlogging.get_verbosity()
    dlogging.set_verbosity_error()  # .to(bf16) warns that no module asked to stay fp32, which is the case
    try:
        with torch.device(device):
            transformer = FluxTransformer2DModel(num_layers=blocks[0], num_single_layers=blocks[1], **FLUX_DEV)
        transformer = transformer.to(torch.bfloat16).eval()
        # FLUX.1's VAE config (black-forest-labs/FLUX.1-dev, vae/config.json), random weights
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
            latent_channels=16, norm_num_groups=32, sample_size=1024, use_quant_conv=False,
            use_post_quant_conv=False, shift_factor=0.1159, scaling_factor=0.3611,
        ).to(device, torch.bfloat16).eval()
    finally:
        dlogging.set_verbosity(verbosity)
    info = dict(blocks=list(blocks), transformer_params=sum(p.numel() for p in transformer.parameters()))
    info["quantized_layers"] = random_quantized(transformer) if quantize else 0
    info["transformer_gb"] = sum(t.numel() * t.element_size() for t in transformer.state_dict().values()) / 1e9
    text = tiny_text_encoders(clip_width=FLUX_DEV["pooled_projection_dim"], t5_width=FLUX_DEV["joint_attention_dim"])
    for key in ("text_encoder", "text_encoder_2"):
        text[key] = text[key].to(device, torch.bfloat16)
    # FLUX.1-dev's scheduler config: the shift grows with the image's token count
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, transformer=transformer, **text)
    pipe.set_progress_bar_config(disable=True)
    info.update(vae_params=sum(p.numel() for p in vae.parameters()),
                text_encoder_params=sum(p.numel() for k in ("text_encoder", "text_encoder_2")
                                        for p in text[k].parameters()),
                build_s=time.perf_counter() - t0)
    return pipe, info


def recording(engine):
    """``engine`` as an engine that also records each pipeline call: (images, seconds). Its only caller is the
    worker thread, so the list needs no lock."""
    from svdquant.serve import Engine

    class RecordingEngine(Engine):
        def __init__(self, real: Engine):
            super().__init__(real.pipe, real.model_id, real.device, real.loras)
            self.calls: list[tuple[int, float]] = []

        def generate(self, settings, prompts, seeds):
            t0 = time.perf_counter()
            images = super().generate(settings, prompts, seeds)  # PIL images: the device has finished
            self.calls.append((len(seeds), time.perf_counter() - t0))
            return images

    return RecordingEngine(engine)


# ---------------------------------------------------------------------------------------------- the clients
def drive(base: str, bodies: list[list[dict]], timeout: float = REQUEST_TIMEOUT_S) -> dict:
    """In the client process: one client per list of request bodies, each sending its bodies one after the
    other. Returns each request's (client, sent at, seconds, status, images) and the decoded size of the
    first image answered."""
    return asyncio.run(_drive(base, bodies, timeout))


async def _drive(base, bodies, timeout):
    import httpx
    from PIL import Image

    records, first_size = [], None
    t0 = time.perf_counter()
    limits = httpx.Limits(max_connections=len(bodies), max_keepalive_connections=len(bodies))
    async with httpx.AsyncClient(base_url=base, timeout=timeout, limits=limits) as client:
        async def one_client(i, mine):
            nonlocal first_size
            for body in mine:
                sent = time.perf_counter()
                try:
                    r = await client.post("/v1/images/generations", json=body)
                    status, data = r.status_code, (r.json().get("data", []) if r.status_code == 200 else [])
                except httpx.HTTPError as e:
                    status, data = type(e).__name__, []
                took = time.perf_counter() - sent
                if data and first_size is None:
                    im = Image.open(io.BytesIO(base64.b64decode(data[0]["b64_json"])))
                    first_size = [im.width, im.height, im.format]
                records.append(dict(client=i, sent=sent - t0, seconds=took, status=status, images=len(data)))

        await asyncio.gather(*(one_client(i, mine) for i, mine in enumerate(bodies)))
    return dict(records=records, first_image=first_size)


def scrape_metrics(base: str) -> dict:
    """The server's /metrics, as the figures the table cross-checks."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    m = {}
    for fam in text_string_to_metric_families(httpx.get(f"{base}/metrics", timeout=30).text):
        for s in fam.samples:
            m[s.name + (":" + s.labels["kind"] if "kind" in s.labels else "")] = s.value
    return dict(images_total=m["svdquant_images_total"], batches=m["svdquant_batch_images_count"],
                batch_images=m["svdquant_batch_images_sum"], queue_depth_max=m["svdquant_queue_depth_max"],
                latency_count=m["svdquant_request_latency_seconds_count"],
                errors={k.split(":", 1)[1]: v for k, v in m.items() if k.startswith("svdquant_errors_total:")})


# ---------------------------------------------------------------------------------------------- one server
def percentile(xs: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default); None for no samples."""
    if not xs:
        return None
    xs = sorted(xs)
    k = (len(xs) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def measure(engine, clients_pool, *, model: str, size: tuple[int, int] | None, steps: int, max_batch: int,
            batch_wait_ms: int, clients: int, requests: int, max_queue: int, output_format: str,
            seed: int) -> dict:
    """Start a server with these settings on ``engine``, drive it, stop it; one result row."""
    from svdquant.serve import create_app, serving

    prompt = "cat" if engine.tiny else PROMPT
    bodies = [[dict(prompt=prompt, n=1, seed=seed + 1000 * c + r, num_inference_steps=steps,
                    output_format=output_format, **({"size": "%dx%d" % size} if size else {}))
               for r in range(requests)] for c in range(clients)]
    app = create_app(engine, max_queue=max_queue, max_batch=max_batch, batch_wait_ms=batch_wait_ms)
    engine.calls.clear()
    with serving(app) as base:
        got = clients_pool.submit(drive, base, bodies).result()
        metrics = scrape_metrics(base)
    recs = got["records"]
    ok = [r for r in recs if r["status"] == 200]
    lat = [r["seconds"] for r in ok]
    wall = max((r["sent"] + r["seconds"] for r in recs), default=0.0) - min((r["sent"] for r in recs), default=0.0)
    images = sum(r["images"] for r in ok)
    status: dict[str, int] = {}
    for r in recs:
        status[str(r["status"])] = status.get(str(r["status"]), 0) + 1
    batches: dict[str, int] = {}
    for n, _ in engine.calls:
        batches[str(n)] = batches.get(str(n), 0) + 1
    pipeline_s = sum(s for _, s in engine.calls)
    w, h = size or engine.default_size
    return dict(
        model=model, size=f"{w}x{h}", steps=steps, max_batch=max_batch, batch_wait_ms=batch_wait_ms,
        max_queue=max_queue, clients=clients, requests=len(recs), ok=len(ok), http_429=status.get("429", 0),
        failed=len(recs) - len(ok) - status.get("429", 0), status=status, images=images, wall_s=wall,
        images_per_s=images / wall if wall > 0 else None,
        latency_s=dict(p50=percentile(lat, 50), p95=percentile(lat, 95), max=max(lat, default=None),
                       mean=sum(lat) / len(lat) if lat else None),
        batches=dict(sorted(batches.items(), key=lambda kv: int(kv[0]))),
        mean_batch=sum(n for n, _ in engine.calls) / len(engine.calls) if engine.calls else None,
        pipeline_s=pipeline_s, pipeline_s_per_image=pipeline_s / images if images else None,
        first_image=got["first_image"], metrics=metrics,
    )


def warm_up(engine, size, batch_sizes) -> float:
    """One 1-step pipeline call per batch size, outside any server: kernels compile here, not in a timing."""
    from svdquant.serve.schema import GenerationRequest

    req = GenerationRequest(prompt="cat" if engine.tiny else PROMPT, num_inference_steps=1,
                            **({"size": "%dx%d" % size} if size else {}))
    settings = engine.settings(req)
    t0 = time.perf_counter()
    for b in sorted(set(batch_sizes)):
        engine.generate(settings, [req.prompt] * b, list(range(b)))
    engine.calls.clear()
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------- report
def table(results: list[dict]) -> str:
    rows = ["| model | size | steps | max batch | images/s | vs batch 1 | p50 s | p95 s | max s | batches formed "
            "(size: count) | 429 | failed |", "|" + " --- |" * 12]
    base = {}
    for r in results:
        key = (r["model"], r["size"], r["steps"])
        if r["max_batch"] == 1:
            base[key] = r["images_per_s"]
        ratio = (r["images_per_s"] / base[key]) if base.get(key) and r["images_per_s"] else None
        lat = r["latency_s"]
        cells = [r["model"], r["size"], r["steps"], r["max_batch"], _fmt(r["images_per_s"], 2),
                 "–" if r["max_batch"] == 1 or ratio is None else f"{ratio:.2f}×",
                 _fmt(lat["p50"], 3), _fmt(lat["p95"], 3), _fmt(lat["max"], 3),
                 ", ".join(f"{k}: {v}" for k, v in r["batches"].items()) or "–", r["http_429"], r["failed"]]
        rows.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(rows)


def _fmt(x, digits):
    return "–" if x is None else f"{x:.{digits}f}"


def commit() -> str | None:
    if os.environ.get("SVDQUANT_COMMIT"):
        return os.environ["SVDQUANT_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


# ---------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    args = parse_args(argv)
    import concurrent.futures
    import multiprocessing

    import torch

    from svdquant.serve import Engine, load_engine

    t_start = time.perf_counter()
    cuda = args.device.startswith("cuda")
    out = dict(device=torch.cuda.get_device_name(args.device) if cuda else "cpu", torch=torch.__version__,
               commit=commit(), argv=sys.argv[1:] if argv is None else list(argv), models={}, warm_up_s={},
               results=[])
    print(f"serve benchmark on {out['device']}: {', '.join(args.models)}; {args.clients} clients; "
          f"max-batch 1 vs {args.max_batch} (wait {args.batch_wait_ms} ms)", flush=True)

    def save():  # after every server, so a run cut short keeps what it measured
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "serve.json").write_text(json.dumps(out, indent=1))

    def run(engine, model, size, steps, requests):
        took = warm_up(engine, size, (1, args.max_batch))
        name = f"{model} {'%dx%d' % (size or engine.default_size)}"
        out["warm_up_s"][name] = took
        print(f"  {name}: warm-up {took:.1f} s", flush=True)
        for mb in (1, args.max_batch):
            r = measure(engine, pool, model=model, size=size, steps=steps, max_batch=mb,
                        batch_wait_ms=args.batch_wait_ms, clients=args.clients, requests=requests,
                        max_queue=args.max_queue, output_format=args.output_format, seed=0)
            out["results"].append(r)
            save()
            print(f"    max-batch {mb}: {r['ok']}/{r['requests']} ok, {_fmt(r['images_per_s'], 2)} images/s, "
                  f"p50 {_fmt(r['latency_s']['p50'], 3)} s, batches {r['batches']}", flush=True)

    # spawn: a fresh interpreter that imports neither torch nor the model; it only speaks HTTP
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        if "tiny" in args.models:
            t0 = time.perf_counter()
            dtype = torch.bfloat16 if cuda else torch.float32   # what `svdquant serve` picks for the device
            engine = recording(load_engine("tiny", args.device, dtype))
            out["models"]["tiny"] = dict(load_s=time.perf_counter() - t0, dtype=str(dtype).removeprefix("torch."))
            run(engine, "tiny", None, args.tiny_steps, args.requests or default_requests(None, args.quick))
            del engine
        if "flux-dev" in args.models:
            pipe, info = flux_dev_pipeline(tuple(args.blocks), args.device)
            out["models"]["flux-dev"] = info
            if cuda:  # built in fp32, then cast: a peak that serving never reaches
                info["build_peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 1e9
                torch.cuda.reset_peak_memory_stats()
            print(f"  flux-dev: {info['blocks']} blocks, {info['quantized_layers']} int4 layers, "
                  f"{info['transformer_gb']:.2f} GB, built in {info['build_s']:.1f} s", flush=True)
            engine = recording(Engine(pipe, FLUX_MODEL_ID, args.device))
            for side in args.sizes:
                run(engine, "flux-dev", (side, side), args.steps, args.requests or default_requests(side, args.quick))
    if cuda:
        out["serving_peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 1e9
    out["wall_s"] = time.perf_counter() - t_start
    save()
    md = table(out["results"])
    print(md)
    print(f"total {out['wall_s']:.0f} s", flush=True)
    if args.out is not None:
        (args.out / "serve.md").write_text(md + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
