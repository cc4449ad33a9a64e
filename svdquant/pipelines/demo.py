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
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Sequence

import torch

from .._cpu import single_thread_if_contended
from ..calibration import Calibration, record_inputs
from ..checkpoint import save_quantized
from ..images import grid, to_pil
from ..metrics import psnr, ssim
from ..quantize import quantize
from ..recipes import DEMO_VARIANTS
# what run_demo writes and its argument checks live apart: the command line checks before importing diffusers
from .._tiny_facts import OUTPUTS, check_demo_args  # noqa: F401
from .tiny import TINY_BASE, TinyFluxPipeline


def run_demo(out: str | Path = "svdquant-demo", recipes: Sequence[str] = DEMO_VARIANTS, *, steps: int = 6,
             seed: int = 0, calib_steps: int = 4, snapshots: int = 8, eval_tokens: int = 256, progress: bool = True,
             overwrite: bool = False, log=None) -> list[dict]:
    """Returns one row per variant: recipe, PSNR/SSIM against 16-bit, class accuracy, quantization seconds.

    The defaults keep the whole job under two minutes on a 2-core CPU (1 min 46 s measured): 6 Euler
    steps, 8 calibration snapshots, 256 tokens to score each smoothing candidate. On the CPU every
    quantized layer runs the torch reference, which is slower than a 16-bit layer.

    Everything is written to a temporary folder beside ``out`` and moved in at the end, so a failure
    or Ctrl-C leaves no half-written demo. ``overwrite`` replaces earlier demo outputs in ``out``
    (only the files and variant folders the demo writes). ``log(line)`` reports which variant runs
    (default: print when ``progress``).
    """
    recipes = check_demo_args(out, recipes, steps, seed, overwrite)
    log = log or (print if progress else (lambda line: None))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        with single_thread_if_contended() as threads:  # other jobs on the cores: one thread (svdquant/_cpu.py)
            if threads.single:
                log("other jobs are using the CPU cores: running on one thread")
            results = _run(stage, recipes, steps, seed, calib_steps, snapshots, eval_tokens, progress, log)
        out.mkdir(exist_ok=True)
        for item in sorted(stage.iterdir()):
            target = out / item.name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
            os.replace(item, target)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return results


def _run(out: Path, recipes, steps, seed, calib_steps, snapshots, eval_tokens, progress, log) -> list[dict]:
    from ..quality import class_accuracy, load_classifier

    base = TinyFluxPipeline.default()
    n = len(base.classes)
    labels = list(range(n))
    noise = base.noise(n, torch.Generator().manual_seed(seed))
    log(f"16-bit reference: sampling {n} images, {steps} steps")
    ref = base(class_labels=labels, latents=noise, num_inference_steps=steps, output_type="pt", progress=progress).images
    try:
        judge = load_classifier()
    except FileNotFoundError:
        judge = None
    acc_ref = class_accuracy(judge, ref, torch.tensor(labels))[0] if judge is not None else float("nan")
    rows = [("16-bit", to_pil(ref))]
    notes = ["reference: the PSNR below each row is against this one"]
    results = [dict(recipe="16-bit", psnr=float("inf"), ssim=1.0, accuracy=acc_ref, quantize_seconds=0.0)]
    # One pass through the pipeline records the transformer's inputs on the drawn calls; every variant then
    # calibrates on those (the same snapshots it would draw itself), not on a pipeline pass of its own.
    t0 = time.perf_counter()
    inputs = record_inputs(base, base.transformer, Calibration(steps=calib_steps, snapshots=snapshots, seed=seed),
                           progress=progress)
    shared = time.perf_counter() - t0
    for i, recipe in enumerate(recipes, 1):
        recipe = recipe.replace(eval_tokens=eval_tokens)
        log(f"{recipe.name}, {i} of {len(recipes)}: quantizing and sampling")
        pipe = copy.deepcopy(base)
        t0 = time.perf_counter()
        report = quantize(pipe.transformer, recipe, Calibration(inputs=inputs), progress=progress)
        secs = time.perf_counter() - t0 + shared  # what a quantization on its own takes: the pass included
        # the base is the shipped tiny model, by name: no copy of it is needed beside the checkpoints
        save_quantized(pipe.transformer, out / recipe.name, base=TINY_BASE, report=report)
        imgs = pipe(class_labels=labels, latents=noise, num_inference_steps=steps, output_type="pt",
                    progress=progress).images
        rows.append((recipe.name, to_pil(imgs)))
        p, s = float(psnr(imgs, ref).mean()), float(ssim(imgs, ref).mean())
        notes.append(f"PSNR {p:.2f} dB")
        acc = class_accuracy(judge, imgs, torch.tensor(labels))[0] if judge is not None else float("nan")
        results.append(dict(recipe=recipe.name, psnr=p, ssim=s, accuracy=acc, quantize_seconds=secs))
    grid(rows, scale=2, col_labels=base.classes, row_notes=notes).save(out / "compare.png")
    table = quality_table(results, base, steps, seed)
    (out / "quality.md").write_text(table + "\n")
    return results


def quality_table(results: list[dict], base: TinyFluxPipeline, steps: int, seed: int) -> str:
    lines = [f"Tiny FLUX model ({base.info.get('weights', 'weights unknown')}), one image per class, "
             f"{steps} Euler steps, seed {seed}; PSNR/SSIM against the 16-bit images from the same noise; "
             "class accuracy = the shipped CIFAR-10 classifier's on these 10 images (a smoke signal: "
             "`benchmarks/quality.py` measures it on many).", "",
             "| variant | PSNR (dB) | SSIM | class accuracy | quantize (s) |", "| --- | --- | --- | --- | --- |"]
    for r in results:
        lines.append(f"| {r['recipe']} | {r['psnr']:.2f} | {r['ssim']:.4f} | {r['accuracy']:.1f} | "
                     f"{r['quantize_seconds']:.1f} |")
    return "\n".join(lines)
