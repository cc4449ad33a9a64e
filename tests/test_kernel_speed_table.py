"""benchmarks/kernel_speed.py's table (the GPU run writes it): its ratios from a known row."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))


def test_the_table_gives_eager_and_graph_ratios_against_bf16():
    """Known answer: BF16 0.300 ms eager, 0.240 in a graph; ours 0.200 eager, 0.150 in a graph: 1.50× and 1.60×;
    the GEMM 0.12 against FP8's 0.1 ms, 0.833×, in two launches (one launch beside it); a row without the launch
    A/B (Triton's GEMM) says so; a failed shape keeps its row with the error."""
    import kernel_speed as ks

    row = dict(m=4608, k=3072, n=3072, bf16=0.3, fp8_mm=0.1, fp8_mm_quant=0.25, int_mm=0.15, ours_speed_r32=0.2,
               ours_speed_r0=0.16, ours_memory_r32=0.25, act=0.05, gemm=0.12, expand=0.01, gemm_tops=1000.0,
               bf16_graph=0.24, ours_graph=0.15)
    split = dict(row, gemm_launches=2, gemm_split=0.12, gemm_graph=0.11, gemm_one_launch=0.13,
                 gemm_one_launch_graph=0.125)
    text = ks.markdown([split, dict(m=1, k=2, n=3, error="RuntimeError: out of memory"), row], "header")
    lines = text.splitlines()
    assert lines[0] == "header" and "graphs: ours/BF16" in lines[2]
    cells = [c.strip() for c in lines[4].strip("|").split("|")]
    assert cells[7] == "1.50×" and cells[10] == "+25.0%" and cells[12] == "1.20×"
    assert cells[-4] == "0.240 / 0.150" and cells[-3] == "1.60×" and cells[-2] == "0.833×"
    assert cells[-1] == "2: 0.1200 (0.1100) / 0.1300 (0.1250)"
    assert lines[5] == "| 1 | 2 | 3 | error: RuntimeError: out of memory |"
    assert lines[6].endswith("| 0.833× | – |")
