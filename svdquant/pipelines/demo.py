"""The offline default job: quantize the tiny model and compare it with its 16-bit self.

``svdquant demo`` (the README's main command) loads the tiny class-conditional FLUX
model shipped in the package (no download), quantizes a copy per variant, samples one
image per class from identical noise with each, and writes ``compare.png`` (a grid:
16-bit on top, one row per variant) and ``quality.md`` (PSNR and SSIM against the 16-bit
images). A variant is a recipe name, optionally with an ablation method:
``int4``, ``nvfp4``, ``w8a8``, ``nf4``, ``int4-naive``, ``int4-lorc``...
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Sequence

import torch

from ..calibration import Calibration
from ..checkpoint import save_quantized
from ..images import grid, to_pil
from ..metrics import psnr, ssim
from ..quantize import quantize
from ..recipes import DEMO_VARIANTS, get_recipe
from .tiny import TinyFluxPipeline


def run_demo(out: str | Path = "svdquant-demo", recipes: Sequence[str] = DEMO_VARIANTS, *, steps: int | None = None,
             seed: int = 0, calib_steps: int = 4, snapshots: int = 16, progress: bool = True,
             overwrite: bool = True) -> list[dict]:
    """Returns one row per variant: recipe, PSNR/SSIM against 16-bit, quantization seconds."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    base = TinyFluxPipeline.default()
    base_dir = out / "base"
    base.save_pretrained(base_dir)
    n = len(base.classes)
    labels = list(range(n))
    noise = base.noise(n, torch.Generator().manual_seed(seed))
    steps = steps or base.num_inference_steps
    ref = base(class_labels=labels, latents=noise, num_inference_steps=steps, output_type="pt", progress=progress).images
    rows = [("16-bit", to_pil(ref))]
    results = []
    for name in recipes:
        recipe = get_recipe(name)
        pipe = copy.deepcopy(base)
        t0 = time.perf_counter()
        report = quantize(pipe, recipe, Calibration(steps=calib_steps, snapshots=snapshots, seed=seed),
                          progress=progress)
        secs = time.perf_counter() - t0
        save_quantized(pipe.transformer, out / recipe.name, base=base_dir, report=report, overwrite=overwrite)
        imgs = pipe(class_labels=labels, latents=noise, num_inference_steps=steps, output_type="pt",
                    progress=progress).images
        rows.append((recipe.name, to_pil(imgs)))
        results.append(dict(recipe=recipe.name, psnr=float(psnr(imgs, ref).mean()), ssim=float(ssim(imgs, ref).mean()),
                            quantize_seconds=secs))
    grid(rows, scale=2, col_labels=base.classes).save(out / "compare.png")
    table = quality_table(results, base, steps, seed)
    (out / "quality.md").write_text(table + "\n")
    return results


def quality_table(results: list[dict], base: TinyFluxPipeline, steps: int, seed: int) -> str:
    lines = [f"Tiny FLUX model ({base.info.get('weights', 'weights unknown')}), one image per class, "
             f"{steps} Euler steps, seed {seed}; metrics against the 16-bit images from the same noise.", "",
             "| recipe | PSNR (dB) | SSIM | quantize (s) |", "| --- | --- | --- | --- |"]
    for r in results:
        lines.append(f"| {r['recipe']} | {r['psnr']:.2f} | {r['ssim']:.4f} | {r['quantize_seconds']:.1f} |")
    return "\n".join(lines)
