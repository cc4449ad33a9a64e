"""What the pictures' scripts (``plot_e2e.py``, ``plot_quantize.py``, ``plot_step.py``) share: a results file
read and checked in full before anything is drawn, one-line errors, and the figure saved where asked."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Callable


def figure(width: float, height: float):
    """``(fig, ax)`` of a new figure on matplotlib's file backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height), dpi=120)


def save(fig, out: Path) -> Path:
    """``fig`` written to ``out`` (its folder made) and closed."""
    import matplotlib.pyplot as plt

    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def run(doc: str, argv, results: Path, out: Path, key: str, check: Callable, plot: Callable) -> Path:
    """The command line of a picture's script: ``--results`` (default ``results``), a JSON object whose ``key``
    ``check`` accepts (it raises ValueError otherwise), drawn by ``plot(results, out)`` to ``--out``."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", type=Path, default=results)
    ap.add_argument("--out", type=Path, default=out)
    args = ap.parse_args(argv)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        ap.error("needs matplotlib: pip install matplotlib (or pip install -e '.[dev]')")
    try:
        loaded = json.loads(args.results.read_text())
        if not isinstance(loaded, dict) or key not in loaded:
            raise ValueError(f'no "{key}" in it')
        check(loaded[key])  # every figure checked before anything is drawn
    except (OSError, ValueError) as e:
        ap.error(f"{args.results}: {e}")
    try:
        return plot(loaded, args.out)
    except OSError as e:
        ap.error(f"{args.out}: {e}")
