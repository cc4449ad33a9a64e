"""What ``quantize`` returns and shows: :class:`QuantReport` (one :class:`LayerRow` per quantized group, the
layers kept 16-bit, the time per stage; ``print(report)`` for a table) and the progress bar's text."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

from ..recipes import QuantConfig


@dataclass
class LayerRow:
    """One quantized group: its layers' full names in the model, the formats, what the search chose, the errors."""

    names: list[str]
    weights: str
    activations: str | None
    shape: tuple[int, int]     # (sum of out_features, in_features)
    rank: int
    alpha: float
    beta: float
    iterations: int
    rel_error_naive: float
    rel_error: float
    seconds: float
    rel_error_rtn: float = float("nan")  # with the residual rounded to nearest: differs from rel_error with GPTQ

    @classmethod
    def of_group(cls, names: list[str], recipe: QuantConfig, rep) -> "LayerRow":
        """The row of a group quantized with ``recipe``, from the algorithm's report ``rep``."""
        return cls(names, recipe.weights, recipe.activations, rep.shape, rep.rank, rep.alpha, rep.beta,
                   rep.iterations, rep.rel_error_naive, rep.rel_error, rep.seconds, rep.rel_error_rtn)

    @classmethod
    def of_weight(cls, name: str, recipe: QuantConfig, rep) -> "LayerRow":
        """The row of one text encoder linear quantized weight-only: its errors are the weight's own."""
        return cls([name], recipe.weights, None, rep.shape, 0, 0.0, 0.0, 0, rep.rel_error_naive, rep.rel_error,
                   rep.seconds)


@dataclass
class QuantReport:
    """What ``quantize`` did: one row per quantized group, the layers left 16-bit, the time taken."""

    recipe: dict
    model: str
    rows: list[LayerRow] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (name, class)
    snapshots: int = 0
    # streaming a model with stacks of blocks to a GPU: whether the snapshots (block inputs) stayed on the GPU from
    # the first block to the last (else each crossed for every block call); None when nothing streamed
    snapshots_on_device: bool | None = None
    seconds_calibration: float = 0.0
    seconds_total: float = 0.0
    peak_memory_gb: float | None = None
    # text encoders quantized weight-only (quantize(..., text_encoders=True)): one row per linear, whose
    # errors are the weight's own (no calibration), and per encoder its class and sizes
    text_encoder_rows: list[LayerRow] = field(default_factory=list)
    text_encoders: dict[str, dict] = field(default_factory=dict)
    # seconds per stage, summed over the run: calibration (and its transfers, when streaming), pin memory,
    # transfers, replays, and per group setup, smoothing search, refinement, assemble, build modules; text
    # encoders. Disjoint, so they add up to at most seconds_total, except on a GPU, where each block's replays
    # (and its transfers) run during the previous block's search and "waiting for replays" is what it did not hide,
    # and where groups quantized at once (workers > 1) add up their own times; "groups at once (wall)" is the wall
    # time of those blocks' groups (not of a stack's first block, nor of a group run again after running out of memory)
    stages: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return asdict(self)

    def __str__(self) -> str:
        lines = []
        if self.rows or not self.text_encoders:
            where = {None: "", True: " (held on the device)", False: " (crossing for every block)"}[
                self.snapshots_on_device]
            lines.append(f"svdquant: {self.model} with recipe {self.recipe['name']!r}: {len(self.rows)} groups "
                         f"quantized, {len(self.skipped)} layers kept 16-bit, {self.snapshots} snapshots{where}, "
                         f"{self.seconds_total:.1f} s (calibration {self.seconds_calibration:.1f} s)"
                         + (f", peak GPU memory {self.peak_memory_gb:.1f} GB" if self.peak_memory_gb else ""))
            w = max([len(short_names(r.names)) for r in self.rows] + [5])
            gptq = bool(self.recipe.get("gptq"))  # one more column: what GPTQ gained over rounding to nearest
            lines.append(f"{'layer':{w}s}  {'format':10s} {'shape':>13s} {'rank':>4s} {'naive':>7s} {'error':>7s} "
                         f"{'SQNR':>6s}" + (f" {'GPTQ':>7s}" if gptq else ""))
            for r in self.rows:
                fmt = f"W{r.weights}A{r.activations or '16'}"
                sq = -20 * math.log10(max(r.rel_error, 1e-12))
                gain = 20 * math.log10(max(r.rel_error_rtn, 1e-12) / max(r.rel_error, 1e-12)) if gptq else 0.0
                lines.append(f"{short_names(r.names):{w}s}  {fmt:10s} {str(r.shape[0]) + 'x' + str(r.shape[1]):>13s} "
                             f"{r.rank:4d} {r.rel_error_naive:7.4f} {r.rel_error:7.4f} {sq:5.1f}dB"
                             + (f" {gain:+5.2f}dB" if gptq else ""))
            lines += self._stage_lines()
            if self.skipped:
                lines.append("kept 16-bit: " + ", ".join(n for n, _ in self.skipped))
        for name, te in self.text_encoders.items():
            errs = sorted(r.rel_error for r in self.text_encoder_rows if r.names[0].startswith(name + "."))
            lines.append(f"{name} ({te['class']}): {te['layers']} linears {te['weights']} weight-only, group "
                         f"{te['group_size']}, {te['kept']} other linears kept 16-bit; weight error median "
                         f"{statistics.median(errs):.4f}, worst {errs[-1]:.4f}; {_size(te['bytes_16bit'])} -> "
                         f"{_size(te['bytes_quantized'])}")
        return "\n".join(lines)

    def _stage_lines(self) -> list[str]:
        """Where the time went: seconds and share of the total per stage (the profile of issue 16)."""
        if not self.stages:
            return []
        total = max(self.seconds_total, 1e-9)
        lines = [f"{'stage':22s} {'seconds':>8s} {'share':>6s}"]
        for stage, seconds in self.stages.items():
            lines.append(f"{stage:22s} {seconds:8.2f} {100 * seconds / total:5.1f}%")
        rest = self.seconds_total - sum(self.stages.values())
        overlapped = False
        if "waiting for replays" in self.stages:  # replays overlapped the search: the stages add up to more
            lines.append("(replays and their transfers ran during the previous block's search)")
            overlapped = True
        if "groups at once (wall)" in self.stages:
            lines.append("(setup, search, refinement, GPTQ and assemble add up the groups quantized at once; "
                         "'groups at once (wall)' is the wall time of those groups)")
            overlapped = True
        if not overlapped:
            lines.append(f"{'other (hooks, Python)':22s} {rest:8.2f} {100 * rest / total:5.1f}%")
        return lines


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.2f} MB"


def short_names(names: list[str]) -> str:
    """A group's names for the table and the bar: the first in full, the others after it by their last part
    where they share its parent (``blocks.0.attn.to_q+to_k+to_v``)."""
    if len(names) == 1:
        return names[0]
    head = names[0].rsplit(".", 1)[0]
    return names[0] + "+" + "+".join(n.rsplit(".", 1)[-1] if n.startswith(head) else n for n in names[1:])


def progress_postfix(block: str, index: int, n_blocks: int, group: str | None = None,
                     gpu_bytes: int | None = None, gpu_cap: int | None = None) -> str:
    """What the quantize bar shows after its count and ETA: the block (1-based ``index`` of ``n_blocks``),
    how many blocks remain after it, the group being quantized and, on a GPU, the memory in use (of the
    cap, when one is set)."""
    parts = [f"block {index}/{n_blocks} {block}", f"{n_blocks - index} left"]
    if group:
        parts.append(group)
    if gpu_bytes is not None:
        parts.append(f"GPU {gpu_bytes / 1e9:.1f}" + (f"/{gpu_cap / 1e9:.1f}" if gpu_cap else "") + " GB")
    return ", ".join(parts)
