"""Train the CIFAR-10 classifier used for the offline Fréchet distance and class accuracy.

    python training/train_classifier.py --data ../shared/data/cifar10-jpeg.tar.gz --out OUT/classifier
    python training/train_classifier.py --data DATA --out /tmp/c --device cpu --max-steps 3   # smoke test

SGD with Nesterov momentum and a one-cycle learning rate, label smoothing 0.1, random crops
(pad 4) and flips, bf16 autocast on CUDA. Stops after ``--epochs`` or ``--minutes``.
Writes ``classifier.safetensors``, ``config.json`` (with the test accuracy) and
``cifar10-test-stats.safetensors`` (mean and covariance of the classifier's features on the 10,000
test images: the reference of the offline Fréchet distance). ``--stats-only`` recomputes just that
file for an existing classifier folder.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cifar10 import load  # noqa: E402

from svdquant.quality.classifier import CifarNet, accuracy, load_classifier  # noqa: E402
from svdquant.quality.metrics import feature_stats, features  # noqa: E402


def write_test_stats(model: CifarNet, xt: torch.Tensor, out: Path) -> None:
    """The fp16 classifier as shipped (reloaded from ``out``) on the test set, stats in float32."""
    shipped = load_classifier(out, device=next(model.parameters()).device)
    mu, sigma = feature_stats(features(shipped, xt.float() / 255))
    save_file({"mu": mu.float().contiguous(), "sigma": sigma.float().contiguous()},
              str(out / "cifar10-test-stats.safetensors"))


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random crop with 4-pixel reflection padding and horizontal flips, on the batch's device."""
    b = x.shape[0]
    x = F.pad(x, (4, 4, 4, 4), mode="reflect")
    i = torch.randint(0, 9, (b,), generator=gen, device="cpu")
    j = torch.randint(0, 9, (b,), generator=gen, device="cpu")
    rows = (i[:, None] + torch.arange(32)).to(x.device)
    cols = (j[:, None] + torch.arange(32)).to(x.device)
    x = x[torch.arange(b, device=x.device)[:, None, None, None], torch.arange(3, device=x.device)[None, :, None, None],
          rows[:, None, :, None], cols[:, None, None, :]]
    flip = (torch.rand(b, generator=gen) < 0.5).to(x.device)
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="cifar10-jpeg.tar.gz or its extracted folder")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--cache", type=Path, default=Path(".data"))
    ap.add_argument("--epochs", type=int, default=24)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--lr", type=float, default=0.2)
    ap.add_argument("--minutes", type=float, default=3.0)
    ap.add_argument("--max-steps", type=int, default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stats-only", action="store_true", help="only (re)write --out's test-set feature statistics")
    args = ap.parse_args(argv)
    t0 = time.time()
    dev = torch.device(args.device)
    xt, yt = load(args.data, "test", args.cache)
    if args.stats_only:
        write_test_stats(load_classifier(args.out, device=dev), xt.to(dev), args.out)
        print(f"wrote {args.out / 'cifar10-test-stats.safetensors'}")
        return
    x, y = load(args.data, "train", args.cache)
    print(f"data: {len(x)} train, {len(xt)} test, {time.time() - t0:.1f} s", flush=True)
    x = x.to(dev)
    y = y.to(dev)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    model = CifarNet().to(dev).to(memory_format=torch.channels_last)
    if args.batch_size > len(x):
        ap.error(f"--batch-size {args.batch_size} is larger than the {len(x)} training images")
    steps_per_epoch = len(x) // args.batch_size
    total = args.max_steps or args.epochs * steps_per_epoch
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=total, pct_start=0.25)
    step, deadline = 0, t0 + 60 * args.minutes
    model.train()
    while step < total and time.time() < deadline:
        perm = torch.randperm(len(x), generator=gen).to(dev)
        for k in range(steps_per_epoch):
            idx = perm[k * args.batch_size:(k + 1) * args.batch_size]
            imgs = augment(x[idx].float() / 255, gen).contiguous(memory_format=torch.channels_last)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
                loss = F.cross_entropy(model(imgs), y[idx], label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if step % steps_per_epoch == 0 or step == total:
                print(f"step {step}/{total} loss {loss.item():.3f} {time.time() - t0:.0f} s", flush=True)
            if step >= total or time.time() > deadline:
                break
    model.eval()
    acc = accuracy(model, xt.float() / 255, yt)
    print(f"test accuracy {acc:.4f} after {step} steps, {time.time() - t0:.0f} s", flush=True)
    # shipped in fp16 (3.3 MB); load_classifier upcasts to fp32
    model.half().save(args.out, {"test_accuracy": acc, "steps": step, "epochs": step / steps_per_epoch,
                                 "params": sum(p.numel() for p in model.parameters()), "dtype": "float16"})
    write_test_stats(model, xt.to(dev), args.out)


if __name__ == "__main__":
    main()
