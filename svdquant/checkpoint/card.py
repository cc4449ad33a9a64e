"""The model card (README.md) of a checkpoint: ``save_quantized(..., model_card=True)``.

The Hugging Face Hub reads the YAML front matter: ``base_model`` + ``base_model_relation: quantized``
link the checkpoint to the model it came from, ``library_name`` / ``pipeline_tag`` say how it runs,
``license`` repeats the base model's (a quantized model is a derivative: its license follows the base).
The body holds what a user needs to choose it: the recipe, the ranks, the quality figures of the
quantization report and the GPUs its layers run on.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from pathlib import Path
from typing import Any

PIPELINE_TAG = "text-to-image"  # the image models (FLUX, SD3, PixArt-Σ, SANA, Qwen-Image, Z-Image, SDXL)


def pipeline_tag(meta: dict[str, Any]) -> str:
    """The Hub task of the pipeline the checkpoint runs in: video for Wan (image-to-video where its transformer reads
    the image: Wan 2.1's CLIP image tokens, ``image_dim``, or Wan 2.2's latent channels, 36 in), image-to-image for
    the edit models' bases (the transformer is FLUX.1's or Qwen-Image's, so only the base's name says so)."""
    config = meta.get("model_config") or {}
    if meta.get("model_class") == "WanTransformer3DModel":
        i2v = config.get("image_dim") is not None or config.get("in_channels") == 36
        return "image-to-video" if i2v else "text-to-video"
    base = meta.get("base")
    # a hub repository's name only: a local path's folders say nothing of the model (/data/credit/flux)
    if base and not meta.get("base_is_local") and re.search(r"kontext|edit", base.rsplit("/", 1)[-1], re.I):
        return "image-to-image"
    return PIPELINE_TAG


def base_license(base: str | None, base_is_local: bool, folder: Path | None = None) -> str | None:
    """The base model's license from its README front matter: a local folder's, or a hub id's README if it
    is in the hub cache or a network exists; ``None`` when unknown (nothing is guessed)."""
    if not base:
        return None
    readme = None
    if base_is_local:
        root = (folder / base) if folder is not None and not Path(base).is_absolute() else Path(base)
        readme = root / "README.md"
    elif re.fullmatch(r"[\w.-]+/[\w.-]+", base):
        try:
            from huggingface_hub import hf_hub_download

            readme = Path(hf_hub_download(base, "README.md"))
        except Exception:  # offline, not cached, gated: the license stays unknown
            return None
    if readme is None or not readme.is_file():
        return None
    m = re.match(r"---\s*\n(.*?)\n---", readme.read_text(encoding="utf-8", errors="replace")[:20000], re.S)
    lic = re.search(r"^license:\s*['\"]?([\w.+-]+)['\"]?\s*$", m.group(1), re.M) if m else None
    return lic.group(1) if lic else None


def _yaml(front: dict[str, Any]) -> str:
    # JSON scalars and flow lists are valid YAML: no YAML library needed to write it
    return "---\n" + "".join(f"{k}: {json.dumps(v)}\n" for k, v in front.items() if v is not None) + "---\n"


def render(meta: dict[str, Any], license: str | None = None) -> str:
    """README.md text for a checkpoint's metadata (``svdquant.json``; its ``report`` gives the figures)."""
    recipe = meta.get("recipe") or {}
    layers = meta["layers"]
    experts = meta.get("experts") or {}  # a two-expert pipeline's second transformer
    every_layer = [*layers.values(), *(cfg for e in experts.values() for cfg in e["layers"].values())]
    base = meta.get("base")
    hub_base = base if base and not meta.get("base_is_local") and "/" in base else None
    front = {
        "base_model": hub_base,
        "base_model_relation": "quantized" if hub_base else None,
        "library_name": "diffusers",
        "pipeline_tag": pipeline_tag(meta),
        "license": license,
        "tags": ["svdquant", "quantized", *([f"{recipe['name']}"] if recipe.get("name") else [])],
    }
    name = recipe.get("name", "custom")
    lines = [_yaml(front), f"# {meta['model_class']}, svdquant `{name}`", ""]
    lines.append(f"Quantized with svdquant {meta.get('svdquant_version', '')} from "
                 f"{f'`{base}`' if base else 'an unrecorded base model'}: {len(layers)} quantized layers, "
                 + "".join(f"and the second expert `{n}` (the low-noise steps; `transformer` runs the high-noise "
                           f"ones) with {len(e['layers'])}, " for n, e in experts.items())
                 + f"checkpoint format version {meta['format_version']}.")
    lines += ["", "## Recipe", "", "| setting | value |", "| --- | --- |"]
    for k in ("weights", "activations", "group_size", "rank", "method", "iterations", "svd"):
        if k in recipe:
            lines.append(f"| {k} | `{recipe[k]}` |")
    ranks = sorted({cfg.get("rank", 0) for cfg in every_layer})
    lines.append(f"| ranks used | {', '.join(map(str, ranks))} |")

    report = meta.get("report")
    lines += ["", "## Quality (from the quantization report)", ""]
    if report and report.get("rows"):
        rows = report["rows"]
        errs = [r["rel_error"] for r in rows]
        naive = [r["rel_error_naive"] for r in rows]
        worst = max(rows, key=lambda r: r["rel_error"])
        sqnr = statistics.median(-20 * math.log10(max(e, 1e-12)) for e in errs)
        lines += [
            "Relative output error of each quantized layer group on calibration inputs (lower is better); "
            "*naive* is plain quantization without the low-rank branch and smoothing.", "",
            "| figure | value |", "| --- | --- |",
            f"| layer groups quantized | {len(rows)} |",
            f"| layers kept 16-bit | {len(report.get('skipped') or [])} |",
            f"| median relative error | {statistics.median(errs):.4f} (naive {statistics.median(naive):.4f}) |",
            f"| mean relative error | {statistics.fmean(errs):.4f} (naive {statistics.fmean(naive):.4f}) |",
            f"| worst group | {worst['rel_error']:.4f} (`{worst['names'][0]}`) |",
            f"| median SQNR | {sqnr:.1f} dB |",
            f"| calibration snapshots | {report.get('snapshots', 0)} |",
            f"| quantization time | {report.get('seconds_total', 0):.0f} s |",
        ]
    else:
        lines.append("No quantization report was saved with this checkpoint (pass `report=` to `save_quantized`).")

    encoders = meta.get("text_encoders") or {}
    if encoders:
        figures = (report or {}).get("text_encoder_rows") or []
        lines += ["", "## Text encoders", "", "Quantized weight-only (no calibration) and stored with the transformer; "
                  "embeddings, norms and the layers after the blocks stay 16-bit.", "",
                  "| encoder | class | layers | format | median / worst weight error |",
                  "| --- | --- | --- | --- | --- |"]
        for name, te in encoders.items():
            errs = sorted(r["rel_error"] for r in figures if r["names"][0].startswith(name + "."))
            fmts = ", ".join(sorted({f"W{c['weights']} A16 g{c.get('group_size')}" for c in te["layers"].values()}))
            err = f"{statistics.median(errs):.4f} / {errs[-1]:.4f}" if errs else "not recorded"
            lines.append(f"| `{name}` | {te['model_class']} | {len(te['layers'])} | {fmts} | {err} |")
        lines += ["", "On a GPU the INT4 weight-only layers run the W4A16 kernel for up to 16 tokens; a text encoder "
                  "reads 77 (CLIP) to 512 (T5) tokens, so they run the torch reference: each weight is dequantized "
                  "to 16-bit for its matmul, one layer at a time."]
    lines += _gpu_table(every_layer)
    lines += ["", "Any other device (or `SVDQUANT_REFERENCE=1`) runs the torch reference: correct, slower.",
              "", "## Use", "", "```python", "import svdquant", "",
              "pipe = svdquant.load_pipeline(None, \"THIS_FOLDER_OR_REPO\", device=\"cuda\")",
              "image = pipe(\"a red fox in the snow\").images[0]", "```", ""]
    return "\n".join(lines)


def _gpu_table(layers: list[dict[str, Any]]) -> list[str]:
    """The card's GPUs section: per layer kind, how many and what runs them."""
    from ..ops import gpu_support

    lines = ["", "## GPUs", "", "| layers | count | runs as |", "| --- | --- | --- |"]
    kinds: dict[tuple, int] = {}
    for cfg in layers:
        key = (cfg["weights"], cfg.get("activations"))
        kinds[key] = kinds.get(key, 0) + 1
    for (w, a), n in sorted(kinds.items(), key=lambda kv: -kv[1]):
        lines.append(f"| W{w} A{a or '16'} | {n} | {gpu_support(w, a)} |")
    return lines
