"""``svdquant demo``: the offline default job on the shipped tiny model."""

from __future__ import annotations

from pathlib import Path


def validate_demo(args) -> None:
    from .._tiny_facts import check_demo_args  # not pipelines.demo: no diffusers yet

    args.recipes = check_demo_args(args.output, args.recipes, args.steps, args.seed, args.overwrite,
                                   names=("-o", "--recipes", "--steps", "--seed"))


def cmd_demo(args) -> None:
    from ..pipelines.demo import run_demo

    out = Path(args.output)
    run_demo(out, [r.name for r in args.recipes], steps=args.steps, seed=args.seed, progress=True,
             overwrite=args.overwrite, log=print)
    print((out / "quality.md").read_text())
    print(f"wrote {out / 'compare.png'} and {out / 'quality.md'}; checkpoints in {out}/<recipe>/")
