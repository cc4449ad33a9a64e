"""Train the tiny class-conditional FLUX model on CIFAR-10 (rectified flow), in resumable chunks.

    python training/train_tiny_flux.py --data DATA --out OUT/run --minutes 8          # first chunk
    python training/train_tiny_flux.py --data DATA --out OUT/run --resume PREV/run    # next chunks
    python training/train_tiny_flux.py --data DATA --out /tmp/r --device cpu --batch-size 8 --max-steps 3

Rectified flow (the FLUX objective): ``x_t = (1 − t)·x₀ + t·ε``, the model predicts ``v = ε − x₀``,
mean squared error. ``t`` is logit-normal (σ = 1: most samples at mid noise, as in SD3/FLUX
training). 10 % of labels are replaced by the null class (classifier-free guidance); images are
flipped at random. AdamW, linear warm-up, bf16 autocast on CUDA, gradient clipping at 1,
an EMA of the weights (decay 0.9995) that the samples and the saved pipeline use.

Each chunk writes to ``--out``: ``state/`` (model, EMA, optimizer, step, RNG: everything to resume
exactly), ``pipeline/`` (the EMA model in bf16, loadable with ``TinyFluxPipeline.from_pretrained``),
``loss.csv`` (all steps so far) and ``samples.png`` (one row per class, fixed noise).
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cifar10 import load  # noqa: E402

from svdquant.images import grid, to_pil  # noqa: E402
from svdquant.pipelines.tiny import CIFAR10_CLASSES, TinyFluxPipeline  # noqa: E402


def modules(pipe: TinyFluxPipeline) -> torch.nn.ModuleDict:
    return torch.nn.ModuleDict({"transformer": pipe.transformer, "conditioner": pipe.conditioner})


def save_state(out: Path, net, ema, opt, step: int, gen: torch.Generator, losses: list) -> None:
    tmp = out / "state.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()}, str(tmp / "model.safetensors"))
    save_file({k: v.detach().contiguous().cpu() for k, v in ema.state_dict().items()}, str(tmp / "ema.safetensors"))
    torch.save({"optimizer": opt.state_dict(), "rng_cpu": torch.get_rng_state(), "gen": gen.get_state(),
                "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
               tmp / "optimizer.pt")
    (tmp / "step.json").write_text(json.dumps({"step": step}))
    with open(tmp / "loss.csv", "w", newline="") as f:
        csv.writer(f).writerows([("step", "loss")] + losses)
    shutil.rmtree(out / "state", ignore_errors=True)
    tmp.rename(out / "state")


def load_state(src: Path, net, ema, opt, gen: torch.Generator):
    st = src / "state"
    net.load_state_dict(load_file(str(st / "model.safetensors")))
    ema.load_state_dict(load_file(str(st / "ema.safetensors")))
    extra = torch.load(st / "optimizer.pt", weights_only=False)  # our own file, written by save_state
    opt.load_state_dict(extra["optimizer"])
    torch.set_rng_state(extra["rng_cpu"])
    gen.set_state(extra["gen"])
    if extra["rng_cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(extra["rng_cuda"])
    with open(st / "loss.csv") as f:
        losses = [(int(r[0]), float(r[1])) for r in list(csv.reader(f))[1:]]
    return json.loads((st / "step.json").read_text())["step"], losses


@torch.no_grad()
def sample_grid(pipe: TinyFluxPipeline, path: Path, per_class: int = 8, steps: int = 20, guidance: float = 2.0):
    labels = [c for c in range(len(CIFAR10_CLASSES)) for _ in range(per_class)]
    noise = torch.randn(len(labels), 3, 32, 32, generator=torch.Generator().manual_seed(1234))
    imgs = pipe(class_labels=labels, latents=noise, num_inference_steps=steps, guidance_scale=guidance,
                output_type="pt").images
    pils = to_pil(imgs)
    rows = [(CIFAR10_CLASSES[c], pils[c * per_class:(c + 1) * per_class]) for c in range(len(CIFAR10_CLASSES))]
    grid(rows, scale=2).save(path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--resume", type=Path, help="a previous --out to continue from")
    ap.add_argument("--cache", type=Path, default=Path(".data"))
    ap.add_argument("--minutes", type=float, default=8.0)
    ap.add_argument("--max-steps", type=int)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--warmup", type=int, default=500)
    ap.add_argument("--ema", type=float, default=0.9995)
    ap.add_argument("--guidance", type=float, default=2.0, help="guidance scale of the sample grid and the saved pipeline")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--precision", choices=["bf16", "tf32"], default="bf16",
                    help="bf16 autocast, or fp32 with TF32 matmuls (H100 + torch 2.11: bf16 backward hit "
                         "CUBLAS_STATUS_EXECUTION_FAILED once, see training/README.md)")
    ap.add_argument("--export", type=Path, help="also write the EMA model as two bf16 shards + config, the "
                    "loss log and the samples here (small files: what a device call can bring back)")
    args = ap.parse_args(argv)
    t0 = time.time()
    dev = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.precision == "tf32"
    x, y = load(args.data, "train", args.cache)
    print(f"data: {len(x)} images, {time.time() - t0:.1f} s", flush=True)
    x, y = x.to(dev), y.to(dev)

    pipe = TinyFluxPipeline.random(seed=args.seed).to(dev)
    net = modules(pipe).train()
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    step, losses = 0, []
    if args.resume:
        step, losses = load_state(args.resume, net, ema, opt, gen)
        print(f"resumed at step {step}", flush=True)
    n_params = sum(p.numel() for p in pipe.transformer.parameters())
    null = len(CIFAR10_CLASSES)
    deadline = t0 + 60 * args.minutes
    last_print, seen = time.time(), 0
    while time.time() < deadline and (args.max_steps is None or step < args.max_steps):
        idx = torch.randint(0, len(x), (args.batch_size,), generator=gen).to(dev)
        x0 = x[idx].float() / 127.5 - 1
        flip = (torch.rand(args.batch_size, generator=gen) < 0.5).to(dev)
        x0 = torch.where(flip[:, None, None, None], x0.flip(3), x0)
        labels = torch.where((torch.rand(args.batch_size, generator=gen) < 0.1).to(dev), null, y[idx])
        t = torch.sigmoid(torch.randn(args.batch_size, generator=gen)).to(dev)
        eps = torch.randn(x0.shape, generator=gen).to(dev)
        xt = (1 - t)[:, None, None, None] * x0 + t[:, None, None, None] * eps
        for g_ in opt.param_groups:
            g_["lr"] = args.lr * min(1.0, (step + 1) / args.warmup)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda" and args.precision == "bf16"):
            v = pipe.velocity(xt, t, labels)
        loss = F.mse_loss(v.float(), eps - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            decay = min(args.ema, (1 + step) / (10 + step))
            torch._foreach_lerp_(list(ema.parameters()), list(net.parameters()), 1 - decay)
        step += 1
        seen += args.batch_size
        if step % 10 == 0 or step < 10:  # .item() syncs with the GPU: not every step
            losses.append((step, round(loss.item(), 5)))
        if time.time() - last_print > 30 or step <= 3:
            rate = seen / (time.time() - last_print)
            print(f"step {step} loss {loss.item():.4f} {rate:.0f} img/s "
                  f"({6 * n_params * 260 * rate / 1e12:.0f} TFLOP/s of matmul) {time.time() - t0:.0f} s", flush=True)
            last_print, seen = time.time(), 0
    args.out.mkdir(parents=True, exist_ok=True)
    save_state(args.out, net, ema, opt, step, gen, losses)
    with open(args.out / "loss.csv", "w", newline="") as f:
        csv.writer(f).writerows([("step", "loss")] + losses)
    # the EMA weights as a pipeline, in bf16 (what the package ships)
    out_pipe = TinyFluxPipeline(copy.deepcopy(ema["transformer"]), copy.deepcopy(ema["conditioner"]),
                                guidance_scale=args.guidance,
                                info={"weights": f"trained on CIFAR-10, {step} steps of batch {args.batch_size}",
                                      "steps": step, "batch_size": args.batch_size})
    out_pipe.to(dtype=torch.bfloat16).save_pretrained(args.out / "pipeline")
    out_pipe.to(dtype=torch.float32)
    sample_grid(out_pipe, args.out / "samples.png", guidance=args.guidance)
    if args.export:
        export(out_pipe, args.out, args.export)
    print(f"saved step {step} to {args.out}, {time.time() - t0:.0f} s", flush=True)


def export(pipe: TinyFluxPipeline, out: Path, dest: Path) -> None:
    """The EMA pipeline as two bf16 shards (each under 16 MB) + its configs; `import_export` rebuilds it."""
    dest.mkdir(parents=True, exist_ok=True)
    sd = {f"transformer.{k}": v for k, v in pipe.transformer.state_dict().items()}
    sd.update({f"conditioner.{k}": v for k, v in pipe.conditioner.state_dict().items()})
    sd = {k: v.detach().to(torch.bfloat16).contiguous().cpu() for k, v in sd.items()}
    keys = sorted(sd, key=lambda k: -sd[k].numel())
    shards = [{}, {}]
    sizes = [0, 0]
    for k in keys:  # greedy balance
        i = 0 if sizes[0] <= sizes[1] else 1
        shards[i][k] = sd[k]
        sizes[i] += sd[k].numel()
    for i, sh in enumerate(shards):
        save_file(sh, str(dest / f"tiny_flux_{i}.safetensors"))
    cfg = json.loads((out / "pipeline" / "pipeline.json").read_text())
    keep = lambda c: {k: v for k, v in dict(c).items() if not k.startswith("_")}  # noqa: E731
    cfg["transformer_config"] = keep(pipe.transformer.config)
    cfg["conditioner_config"] = keep(pipe.conditioner.config)
    (dest / "tiny_flux.json").write_text(json.dumps(cfg, indent=1, default=lambda o: list(o) if isinstance(o, tuple) else str(o)))
    shutil.copy(out / "loss.csv", dest / "loss.csv")
    shutil.copy(out / "samples.png", dest / "samples.png")


def import_export(src: Path) -> TinyFluxPipeline:
    """Rebuild the pipeline written by :func:`export`."""
    from diffusers import FluxTransformer2DModel

    from svdquant.pipelines.tiny import ClassConditioner

    cfg = json.loads((src / "tiny_flux.json").read_text())
    sd = {}
    for f in sorted(src.glob("tiny_flux_*.safetensors")):
        sd.update(load_file(str(f)))
    tr = FluxTransformer2DModel.from_config(cfg["transformer_config"])
    cond = ClassConditioner.from_config(cfg["conditioner_config"])
    tr.load_state_dict({k[len("transformer."):]: v.float() for k, v in sd.items() if k.startswith("transformer.")})
    cond.load_state_dict({k[len("conditioner."):]: v.float() for k, v in sd.items() if k.startswith("conditioner.")})
    return TinyFluxPipeline(tr.eval(), cond.eval(), cfg["classes"], cfg["image_size"], cfg["guidance_scale"],
                            cfg["num_inference_steps"], cfg.get("info"))


if __name__ == "__main__":
    main()
