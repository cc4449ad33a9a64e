"""What a batched calibration call adds in activations: one FLUX.1-dev block's forward (double and single) at 1024² in
BF16, one prompt against ``--batch`` prompts, on the CPU (each measurement in a fresh process: its peak resident
memory above the block's weights and inputs, ``getrusage``'s ``ru_maxrss``).

    python benchmarks/calibration_memory.py --out OUT            # FLUX.1-dev's widths, batches 1 and 4
    python benchmarks/calibration_memory.py --quick              # tiny widths: the plumbing

``Calibration.batch_size`` defaults to 4 on a GPU (svdquant/calibration/config.py): this is the check that four
prompts' activations fit the margin ``resident_blocks`` keeps for a forward (4 GB + 4 blocks).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

FLUX = dict(width=3072, heads=24, img=4096, txt=512)
TINY = dict(width=64, heads=2, img=64, txt=8)


def one(kind: str, batch: int, width: int, heads: int, img: int, txt: int) -> dict:
    """The block's forward in this process: peak RSS above the weights and inputs, in GB."""
    import torch
    from diffusers.models.embeddings import FluxPosEmbed
    from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock

    torch.set_grad_enabled(False)
    torch.manual_seed(0)
    cls = FluxTransformerBlock if kind == "double" else FluxSingleTransformerBlock
    with torch.device("meta"):
        block = cls(width, heads, width // heads)
    block = block.to_empty(device="cpu").to(torch.bfloat16)  # filled in place: no fp32 copy raises the baseline
    for p in block.parameters():
        p.data.normal_(0, 0.02)
    side = int(img ** 0.5)
    grid = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(side * 1.0), torch.arange(side * 1.0),
                                      indexing="ij"), -1).reshape(-1, 3)
    d = width // heads
    rope = FluxPosEmbed(10000, [d - 2 * (d * 7 // 16), d * 7 // 16, d * 7 // 16])(torch.cat([torch.zeros(txt, 3), grid]))
    h = torch.randn(batch, img, width, dtype=torch.bfloat16)
    e = torch.randn(batch, txt, width, dtype=torch.bfloat16)
    temb = torch.randn(batch, width, dtype=torch.bfloat16)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    block(hidden_states=h, encoder_hidden_states=e, temb=temb, image_rotary_emb=rope)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return dict(block=kind, batch=batch, transient_gb=round((peak - base) * 1024 / 1e9, 3),  # ru_maxrss is in KiB
                seconds=round(time.perf_counter() - t0, 1))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=4, help="prompts per call, against one")
    ap.add_argument("--quick", action="store_true", help="tiny widths (the plumbing)")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--one", nargs=2, metavar=("KIND", "BATCH"), help=argparse.SUPPRESS)  # a child process
    args = ap.parse_args(argv)
    dims = TINY if args.quick else FLUX
    if args.one:
        print(json.dumps(one(args.one[0], int(args.one[1]), **dims)))
        return None
    rows = []
    for kind in ("double", "single"):
        for batch in (1, args.batch):
            r = subprocess.run([sys.executable, __file__, "--one", kind, str(batch)] + (["--quick"] if args.quick else []),
                               capture_output=True, text=True, check=True)
            rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    res = dict(dims=dims, rows=rows)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "calibration_memory.json").write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
