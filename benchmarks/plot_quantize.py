"""The 57-block FLUX quantization's wall time as a picture: where each run's seconds went, beside the target.

    python benchmarks/plot_quantize.py       # benchmarks/results/quantize-flux-h100.json -> docs/quantize-flux-h100.png
    python benchmarks/plot_quantize.py --results R.json --out fig.png

The results file holds what ``benchmarks/quantize_flux.py`` wrote for each run (BENCHMARKS.md reports the same
figures): ``{"target_s": 60, "runs": {label: {"seconds_total": s, "stages": {...}}}}`` with the stages below. Each
run is one bar of the main thread's wall time: the calibration (with its transfers), the groups quantized at once,
the waits for the next block's replay, and the rest (a stack's first block, whose groups run one at a time, and
the landing of each block: its modules built, the block sent home). Under it, a thin bar: the replay thread's
busy time, which runs beside the groups. Needs matplotlib (in ``.[dev]``).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))  # run as a script or imported by the tests

from plot_cli import figure, run, save  # noqa: E402

STAGES = ("calibration", "calibration transfers", "groups at once (wall)", "waiting for replays", "replays")
SEGMENTS = {"calibration": "calibration (+ its transfers)", "groups": "groups at once",
            "waiting": "waiting for the next block's replay", "rest": "stacks' first blocks, landing blocks"}
COLORS = {"calibration": "#8c8c8c", "groups": "#2a7ab9", "waiting": "#e39b3b", "rest": "#c8c8c8",
          "replays": "#7fb77e"}


def segments(runs) -> dict[str, dict[str, float]]:
    """``{label: {segment: seconds}}`` of the main thread's wall time (the segments add up to the run's total) and
    the replay thread's ``replays``; anything but labels mapping to a positive total and every stage of
    :data:`STAGES` as a number of seconds no less than 0, adding up to no more than the total, is refused."""
    if not isinstance(runs, dict) or not runs:
        raise ValueError('"runs" must map labels to quantize_flux.py results, e.g. {"24 GB": {"seconds_total": '
                         '57.6, "stages": {...}}}')
    out = {}
    for label, run in runs.items():
        if not isinstance(run, dict) or not isinstance(run.get("stages"), dict):
            raise ValueError(f"{label}: needs seconds_total and stages, as quantize_flux.py writes them")
        total, st = run.get("seconds_total"), run["stages"]
        missing = [k for k in STAGES if k not in st]
        if missing:
            raise ValueError(f"{label}: stages {missing} are missing; quantize_flux.py reports {list(STAGES)}")
        bad = {k: st[k] for k in STAGES if isinstance(st[k], bool) or not isinstance(st[k], (int, float))
               or not st[k] >= 0}
        if bad or isinstance(total, bool) or not isinstance(total, (int, float)) or not total > 0:
            raise ValueError(f"{label}: seconds must be numbers, the stages >= 0 and the total > 0; got "
                             f"{bad or {'seconds_total': total}}")
        seg = {"calibration": st["calibration"] + st["calibration transfers"],
               "groups": st["groups at once (wall)"], "waiting": st["waiting for replays"]}
        rest = total - sum(seg.values())
        if rest < -0.01:
            raise ValueError(f"{label}: its main-thread stages add up to {total - rest:.2f} s, more than its "
                             f"total {total:.2f} s")
        out[label] = {**seg, "rest": max(rest, 0.0), "replays": st["replays"]}
    return out


def plot(results: dict, out: Path) -> Path:
    segs = segments(results["runs"])
    labels = list(segs)
    fig, ax = figure(9, 0.75 * len(labels) + 1.8)
    for i, label in enumerate(labels):
        left = 0.0
        for key, name in SEGMENTS.items():
            ax.barh(i - 0.1, segs[label][key], 0.5, left=left, color=COLORS[key], label=name if i == 0 else None)
            left += segs[label][key]
        ax.text(left + 0.5, i - 0.1, f"{left:.1f} s", va="center", fontsize=8)
        ax.barh(i + 0.28, segs[label]["replays"], 0.14, color=COLORS["replays"],
                label="replay thread, beside the groups" if i == 0 else None)
    target = results.get("target_s")
    if target is not None:
        ax.axvline(target, color="black", linewidth=0.8, linestyle="--")
        ax.text(target + 0.4, len(labels) - 0.55, f"target {target:g} s", fontsize=7)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, max(sum(v for k, v in s.items() if k != "replays") for s in segs.values()) * 1.12)
    ax.set_xlabel("seconds (lower is faster)")
    ax.set_title("The 57-block FLUX.1-dev-size quantization on one H100 (BENCHMARKS.md)", fontsize=10)
    fig.legend(loc="lower center", ncol=3, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    return save(fig, out)


def main(argv=None) -> Path:
    results = ROOT / "benchmarks" / "results" / "quantize-flux-h100.json"
    return run(__doc__, argv, results, ROOT / "docs" / "quantize-flux-h100.png", "runs", segments, plot)


if __name__ == "__main__":
    print(main(), file=sys.stderr)
