"""``svdquant info``: what a checkpoint holds, and what svdquant.optimize measured for its layer shapes."""

from __future__ import annotations

import json
from pathlib import Path


def validate_info(args) -> None:
    pass  # cmd_info reads and checks the checkpoint before printing anything


def cmd_info(args) -> None:
    from ..checkpoint import check_tensor_file, read_metadata, recorded_base, tensor_file_of

    meta = read_metadata(args.checkpoint)
    tensor_file = tensor_file_of(args.checkpoint)
    check_tensor_file(tensor_file)  # a truncated or damaged file is reported, not described as healthy
    if args.json:  # machine-readable: the JSON alone, so it can be piped
        print(json.dumps(meta, indent=1))
        return
    layers = meta["layers"]
    kinds: dict[str, int] = {}
    for cfg in layers.values():
        key = f"W{cfg['weights']}A{cfg['activations'] or '16'} rank {cfg['rank']}"
        kinds[key] = kinds.get(key, 0) + 1
    recipe = meta.get("recipe") or {}
    base = recorded_base(args.checkpoint, meta)
    missing = " (missing: pass --base to generate / compare)" if meta.get("base_is_local") and not Path(base).exists() else ""
    print(f"checkpoint   {args.checkpoint}")
    print(f"model        {meta['model_class']}")
    print(f"base         {base}{missing}")
    print(f"recipe       {recipe.get('name')} ({recipe.get('method')}, group {recipe.get('group_size')}, "
          f"rank {recipe.get('rank')}, svd {recipe.get('svd')})")
    if meta.get("source") == "nunchaku":
        print("format       Nunchaku single-file INT4 (imported on load; svdquant convert nunchaku writes a checkpoint)")
    else:
        print(f"format       version {meta['format_version']}, written by svdquant {meta['svdquant_version']}")
    print(f"size         {tensor_file.stat().st_size / 1e9:.3f} GB")
    print(f"layers       {len(layers)} quantized")
    for k, v in sorted(kinds.items()):
        print(f"  {v:5d} × {k}")
    for name, expert in (meta.get("experts") or {}).items():
        f = Path(tensor_file).with_name(f"{name}.safetensors")
        check_tensor_file(f)
        print(f"{name:12s} {expert['model_class']} (second expert: the low-noise steps): {len(expert['layers'])} "
              f"layers quantized, {f.stat().st_size / 1e9:.3f} GB")
    for name, te in (meta.get("text_encoders") or {}).items():
        f = Path(tensor_file).with_name(f"{name}.safetensors")
        check_tensor_file(f)
        w = {cfg["weights"] for cfg in te["layers"].values()}
        print(f"{name:12s} {te['model_class']}: {len(te['layers'])} layers {'/'.join(sorted(w))} weight-only, "
              f"{f.stat().st_size / 1e9:.3f} GB")
    rep = meta.get("report")
    if rep:
        print(f"quantized in {rep['seconds_total']:.1f} s from {rep['snapshots']} snapshots; "
              f"kept 16-bit: {len(rep['skipped'])} layers")
    _print_layer_choice(layers)


def _print_layer_choice(layers: dict) -> None:
    """What svdquant.optimize's measured table (kept per GPU on this machine) says about these layers' shapes."""
    from ..pipelines.layer_choice import cost_file, decision, load_costs

    # by input width and formats: a stacked q/k/v's rows are the sum of its layers'
    inputs = {(c["in_features"], c["weights"], c["activations"]) for c in layers.values() if c.get("activations")}
    rows = []
    for k, entry in sorted(load_costs().items()):
        gpu, m, kk, n, w, a, mode, dtype = k.split("|")
        if (int(kk), w, a) in inputs:
            rows.append(f"  {gpu}: {m} rows × {kk} → {n} ({mode}, {dtype}): INT8 path {entry[0]:.4f} ms, 16-bit "
                        f"{entry[1]:.4f} ms → {'16-bit' if decision(entry) else 'INT8 path'}")
    if rows:
        print(f"on CUDA      svdquant.optimize runs a layer as a 16-bit GEMM where the table measured on this machine "
              f"says so ({cost_file()}):")
        print("\n".join(rows))
    else:
        print("on CUDA      svdquant.optimize times each layer shape at the first call on the GPU at hand and runs it "
              "as a 16-bit GEMM where cuBLAS is faster (nothing measured on this machine yet)")
