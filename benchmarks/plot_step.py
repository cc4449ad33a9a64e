"""A FLUX.1-dev step as a picture: svdquant's step split by kernel class, beside the alternatives timed with it.

    python benchmarks/plot_step.py          # benchmarks/results/flux-step-h100.json -> docs/flux-step-h100.png
    python benchmarks/plot_step.py --results R.json --out fig.png

The results file holds the figures BENCHMARKS.md reports for one ``benchmarks/flux_step.py`` process:
``{"title": ..., "rows": {label: {"ms": step ms, "classes": {class: ms}}}}``, ``classes`` only where the step was
profiled (``--profile``: the GPU time of each kernel class, from the profiler). One bar per row, its length the
timed step; a profiled row is drawn as its classes, whose sum can differ from the step timed without the profiler
by a few per cent (a mark shows the timed figure). Needs matplotlib (in ``.[dev]``).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))  # run as a script or imported by the tests

from plot_cli import figure, run, save  # noqa: E402

# flux_step.py's kernel classes (its CLASSES and "elementwise / rest"), in the order drawn
CLASS_COLORS = {"INT8 GEMM (CUTLASS)": "#2a7ab9", "INT8 GEMM (Triton)": "#5b9bd0", "attention": "#7fb77e",
                "activation pass": "#e39b3b", "elementwise / rest": "#c8c8c8", "adaLN W4A16": "#9d6fb5",
                "other GEMM (cuBLAS)": "#6f6f6f", "expand (memory mode)": "#d9a7a7"}
PLAIN = "#b0b0b0"
SLACK = 0.1  # a profiled row's classes may sum to within 10 % of its timed step


def _positive(x) -> bool:
    return not isinstance(x, bool) and isinstance(x, (int, float)) and x > 0


def check(rows) -> dict:
    """``rows`` as drawn; anything but labels mapping to a positive ``ms`` and, where given, known classes of
    positive ms that add up to within :data:`SLACK` of it, is refused."""
    if not isinstance(rows, dict) or not rows:
        raise ValueError('"rows" must map labels to figures, e.g. {"BF16 eager": {"ms": 180.5}}')
    for label, row in rows.items():
        if not isinstance(row, dict) or not _positive(row.get("ms")):
            raise ValueError(f"{label}: needs a positive step time, {{\"ms\": ...}}")
        classes = row.get("classes", {})
        if not isinstance(classes, dict):
            raise ValueError(f"{label}: classes must map flux_step.py's kernel classes to ms")
        unknown = set(classes) - set(CLASS_COLORS)
        if unknown:
            raise ValueError(f"{label}: unknown classes {sorted(unknown)}; flux_step.py's: {list(CLASS_COLORS)}")
        bad = {k: v for k, v in classes.items() if not _positive(v)}
        if bad:
            raise ValueError(f"{label}: class times must be positive numbers, got {bad}")
        if classes and abs(sum(classes.values()) - row["ms"]) > SLACK * row["ms"]:
            raise ValueError(f"{label}: its classes sum to {sum(classes.values()):.2f} ms, more than "
                             f"{SLACK:.0%} off its timed {row['ms']} ms")
    return rows


def plot(results: dict, out: Path) -> Path:
    rows = check(results["rows"])
    fig, ax = figure(8, 0.55 * len(rows) + 2.1)
    drawn = set()
    for y, (label, row) in enumerate(rows.items()):
        classes = row.get("classes")
        if classes:
            left = 0.0
            for cls in CLASS_COLORS:  # one order for every row: a class keeps its place
                if cls in classes:
                    ax.barh(y, classes[cls], 0.6, left=left, color=CLASS_COLORS[cls],
                            label=None if cls in drawn else cls)
                    left += classes[cls]
                    drawn.add(cls)
            ax.plot([row["ms"]] * 2, [y - 0.38, y + 0.38], color="black", linewidth=1.2)
        else:
            ax.barh(y, row["ms"], 0.6, color=PLAIN)
        end = max(row["ms"], sum((classes or {}).values()))
        ax.text(end + 1.5, y, f"{row['ms']:.1f} ms", va="center", fontsize=8)
    ax.set_yticks(range(len(rows)), list(rows))
    ax.invert_yaxis()
    ax.set_xlim(0, max(max(r["ms"], sum(r.get("classes", {}).values())) for r in rows.values()) * 1.15)
    ax.set_xlabel("ms per step (lower is faster); the mark: the step timed without the profiler", fontsize=8)
    ax.set_title(results.get("title", "A FLUX.1-dev step"), fontsize=9)
    if drawn:
        fig.legend(loc="lower center", ncol=min(len(drawn), 5), fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return save(fig, out)


def main(argv=None) -> Path:
    results = ROOT / "benchmarks" / "results" / "flux-step-h100.json"
    return run(__doc__, argv, results, ROOT / "docs" / "flux-step-h100.png", "rows", check, plot)


if __name__ == "__main__":
    print(main(), file=sys.stderr)
