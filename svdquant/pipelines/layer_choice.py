"""Which quantized layers run as one 16-bit cuBLAS linear instead (``svdquant.optimize``'s layer choice).

The INT8 path pays an activation pass and a GEMM tiled for thousands of tokens; where a layer reads few tokens
(FLUX's and Qwen-Image's text stream: 146-512) or is narrow (the SDXL UNet: 640-1280 wide), cuBLAS's 16-bit GEMM
of the dequantized weight is faster (``benchmarks/layer_costs.py``: 0.3-0.5x there on an H200, 0.9-1.2x at
FLUX's image-stream shapes). At the first call of an optimized pipeline, one eager forward records the rows each
quantized layer (or stacked q/k/v) reads; each distinct shape is then timed both ways on this GPU, GPU time only
(CUDA-graph replays, as the optimized step runs), and a layer goes 16-bit where that is faster by more than
:data:`MARGIN`. It costs 2 bytes per weight for those layers (:class:`svdquant.ops.runners.DenseRunner`) and
is exact to the layer minus its activation rounding. Decided once, at the first call's shapes. The timings are a
table per GPU kept on disk (:func:`cost_file`), so a shape is timed once per machine; ``svdquant info`` shows the
table's decisions for a checkpoint's layers; delete the file to measure again.
"""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..modules import FusedSVDQLinear, SVDQLinear, stacks
from ..ops.reference import gelu_columns

MARGIN = 0.95  # 16-bit only when at least 5 % faster: the quantized layer holds less memory
_costs: dict | None = None  # "GPU|kind|M|K|N|formats|mode|dtype" -> [quantized ms, 16-bit ms]


def cost_file() -> Path:
    """Where the measured table is kept between processes: ``$SVDQUANT_CACHE``, else ``$XDG_CACHE_HOME/svdquant``
    or ``~/.cache/svdquant``, file ``layer_costs.json`` (one table for every GPU: the GPU's name is in each key)."""
    root = os.environ.get("SVDQUANT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "svdquant")
    return Path(root) / "layer_costs.json"


def load_costs() -> dict:
    """The measured table (empty if there is none or it cannot be read: it is only a cache)."""
    try:
        table = json.loads(cost_file().read_text())
        return {k: v for k, v in table.items() if isinstance(v, list) and len(v) == 2} if isinstance(table, dict) else {}
    except (OSError, ValueError):
        return {}


def _save_costs(table: dict) -> None:
    path = cost_file()
    try:  # a temporary file renamed into place: a reader never sees half a table
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(table, indent=0, sort_keys=True))
        os.replace(tmp, path)
    except OSError:  # a read-only home: the choice still holds for this process
        pass


def decision(entry) -> bool:
    """16-bit for a table entry ``[quantized ms, 16-bit ms]``."""
    return entry[1] < MARGIN * entry[0]


def graph_ms(fn, reps: int = 10, inner: int = 10) -> float:
    """GPU milliseconds of one ``fn()``: ``inner`` calls captured in one CUDA graph, replayed ``reps`` times
    (median), so host launch overhead does not count: what a compiled, graph-captured step pays."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(inner):
            fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / inner)
    return statistics.median(times)


def _candidates(model: nn.Module) -> list[nn.Module]:
    """The modules that run a quantized GEMM: stacked q/k/v, and quantized-activation layers that run alone."""
    fused = stacks(model)
    members = {id(x) for f in fused for x in f.members}
    alone = [m for m in model.modules() if isinstance(m, SVDQLinear) and m.activations is not None
             and id(m) not in members]
    return fused + alone


def record_rows(model: nn.Module, forward, args, kwargs) -> dict:
    """{module: (rows it read, their dtype)} over one forward (the largest call, if one runs more than once)."""
    rows: dict = {}
    handles = []
    for m in _candidates(model):
        def pre(mod, inputs):
            x = inputs[0]
            rows[mod] = (max(rows.get(mod, (0,))[0], x.numel() // x.shape[-1]), x.dtype)
        handles.append(m.register_forward_pre_hook(pre))
    try:
        # eager: hooks inside compiled blocks would be traced into them, one graph per block instance, until
        # dynamo's recompile limit sends the rest of the blocks to eager for good (seen: a FLUX step 114 -> 170 ms)
        with torch.no_grad(), torch.compiler.set_stance("force_eager"):
            forward(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return rows


def key(gpu: str, rows: int, k: int, n: int, weights: str, activations: str, mode: str, dtype) -> str:
    return "|".join(map(str, (gpu, rows, k, n, weights, activations, mode, str(dtype).removeprefix("torch."))))


def _gelu_from(m) -> int | None:
    """Where the layer's input GELU starts (an MLP's, moved into its down projection by svdquant.fuse), or None."""
    return None if isinstance(m, FusedSVDQLinear) else m.input_gelu_from


def _key(m, rows: int, dtype) -> str:
    first = m.members[0] if isinstance(m, FusedSVDQLinear) else m
    mode = "memory" if first.weight_mode == "memory" else "speed"
    if _gelu_from(m) is not None:  # both paths then pay the GELU: the INT8 one in its activation pass
        mode += "+gelu"
    if getattr(getattr(m, "_runner", None), "sm90", False):  # the CUTLASS GEMM: tables timed with Triton's differ
        mode += "+cutlass"
    if getattr(getattr(m, "_runner", None), "parts", None) is not None:  # a memory-mode stack: one GEMM since
        mode += "+stacked"  # 2026-12-05 (its members in turn before, which older tables timed under "memory")
    return key(torch.cuda.get_device_name(first.device), rows, m.in_features, m.out_features, first.weights,
               first.activations, mode, dtype)


def choose_layers(model: nn.Module, forward, args, kwargs) -> dict:
    """Time and apply the choice (see the module doc); returns what was decided, for the optimize report."""
    global _costs
    if _costs is None:
        _costs = load_costs()
    measured = False
    decided = {"dense_layers": 0, "quantized_layers": 0, "shapes": [], "table": str(cost_file())}
    for m, (rows, dtype) in record_rows(model, forward, args, kwargs).items():
        k = _key(m, rows, dtype)
        if k not in _costs:
            measured = True
            first = m.members[0] if isinstance(m, FusedSVDQLinear) else m
            x = torch.randn(rows, m.in_features, device=first.device, dtype=dtype)
            w = torch.randn(m.out_features, m.in_features, device=first.device, dtype=dtype)
            b = torch.zeros(m.out_features, device=first.device, dtype=dtype)
            g = _gelu_from(m)
            with torch.no_grad():  # the 16-bit path as the layer would run it: its input GELU first
                _costs[k] = [graph_ms(lambda: m(x)), graph_ms(
                    lambda: F.linear(gelu_columns(x, None, g) if g is not None else x, w, b))]
            del x, w, b
        q_ms, d_ms = _costs[k]
        dense = decision(_costs[k])
        layers = list(m.members) if isinstance(m, FusedSVDQLinear) else [m]
        for layer in layers:
            layer.set_compute("dense" if dense else "quantized")
        decided["dense_layers" if dense else "quantized_layers"] += len(layers)
        shape = dict(rows=rows, k=m.in_features, n=m.out_features, quantized_ms=round(q_ms, 4),
                     dense_ms=round(d_ms, 4), dense=dense)
        if shape not in decided["shapes"]:
            decided["shapes"].append(shape)
    if measured:
        _save_costs(_costs)
    return decided
