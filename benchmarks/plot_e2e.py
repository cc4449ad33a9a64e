"""The end-to-end table as a picture: speed-up over diffusers' BF16 compiled per model and variant.

    python benchmarks/plot_e2e.py                                # benchmarks/results/e2e-h200.json -> docs/e2e-h200.png
    python benchmarks/plot_e2e.py --results R.json --out fig.png

The results file holds the figures BENCHMARKS.md reports (seconds per image, or per step for video), one row per
model: ``{"rows": {model: {variant: seconds}}}`` with ``bf16-compiled`` in every row: the alternative a user would
otherwise run (diffusers' regional compile; BF16 eager, where measured in the same run, is drawn too, below 1).
Needs matplotlib (in ``.[dev]``).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))  # run as a script or imported by the tests

from plot_cli import figure, run, save  # noqa: E402

VARIANTS = {"bf16": "BF16 eager (diffusers)", "bf16-compiled": "BF16 compiled", "fp8-torchao": "torchao FP8 compiled",
            "int4": "svdquant int4 (default path)"}
COLORS = {"bf16": "#b0b0b0", "bf16-compiled": "#6f6f6f", "fp8-torchao": "#e39b3b", "int4": "#2a7ab9"}


def speedups(rows) -> dict[str, dict[str, float]]:
    """``{model: {variant: bf16-compiled seconds / variant seconds}}``; anything but models mapping variants to
    positive seconds, with ``bf16-compiled`` in each, is refused."""
    if not isinstance(rows, dict) or not rows:
        raise ValueError('"rows" must map model names to their figures, e.g. {"FLUX.1-dev": {"bf16": 5.13, ...}}')
    out = {}
    for model, row in rows.items():
        if not isinstance(row, dict):
            raise ValueError(f"{model}: its figures must be {{variant: seconds}}, got {type(row).__name__}")
        if "bf16-compiled" not in row:
            raise ValueError(f"{model}: no bf16-compiled figure to compare with")
        unknown = set(row) - set(VARIANTS)
        if unknown:
            raise ValueError(f"{model}: unknown variants {sorted(unknown)}; known: {list(VARIANTS)}")
        bad = {v: s for v, s in row.items() if isinstance(s, bool) or not isinstance(s, (int, float)) or not s > 0}
        if bad:
            raise ValueError(f"{model}: seconds must be positive numbers, got {bad}")
        out[model] = {v: row["bf16-compiled"] / s for v, s in row.items()}
    return out


def plot(results: dict, out: Path) -> Path:
    ups = speedups(results["rows"])
    models = list(ups)
    fig, ax = figure(8, 0.6 * len(models) + 1.6)
    drawn = set()
    for m_i, model in enumerate(models):
        present = [v for v in VARIANTS if v in ups[model]]  # no gap where a variant was not measured
        height = 0.8 / len(present)
        for i, v in enumerate(present):
            y = m_i + (i - (len(present) - 1) / 2) * height
            x = ups[model][v]
            ax.barh(y, x, height, color=COLORS[v], label=None if v in drawn else VARIANTS[v])
            drawn.add(v)
            if v == "int4":
                ax.text(x + 0.01, y, f"{x:.2f}x", va="center", fontsize=7)
    ax.set_yticks(range(len(models)), models)
    ax.invert_yaxis()
    ax.axvline(1.0, color="black", linewidth=0.6)
    ax.set_xlim(0, max(max(u.values()) for u in ups.values()) * 1.1)
    ax.set_xlabel("speed-up over BF16 compiled (higher is faster)")
    ax.set_title("End to end on one H200, batch 1 (BENCHMARKS.md)", fontsize=10)
    handles, labels = ax.get_legend_handles_labels()
    order = [labels.index(VARIANTS[v]) for v in VARIANTS if VARIANTS[v] in labels]
    fig.legend([handles[i] for i in order], [labels[i] for i in order], loc="lower center", ncol=4, fontsize=7,
               frameon=False)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return save(fig, out)


def main(argv=None) -> Path:
    results = ROOT / "benchmarks" / "results" / "e2e-h200.json"
    return run(__doc__, argv, results, ROOT / "docs" / "e2e-h200.png", "rows", speedups, plot)


if __name__ == "__main__":
    print(main(), file=sys.stderr)
