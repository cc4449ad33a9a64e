"""Labelled image grids for comparisons (PIL only)."""

from __future__ import annotations

from typing import Sequence

import torch
from PIL import Image, ImageDraw, ImageFont


def to_pil(img: torch.Tensor) -> list[Image.Image]:
    """``[B, 3, H, W]`` in [0, 1] -> PIL images."""
    arr = (img.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype("uint8")
    return [Image.fromarray(a) for a in arr]


def grid(rows: Sequence[tuple[str, Sequence[Image.Image]]], scale: int = 1, col_labels: Sequence[str] = (),
         row_notes: Sequence[str] = ()) -> Image.Image:
    """One row per variant, its label on the left; images upscaled ``scale``× (nearest) for small models.
    ``row_notes``: a line of text under each row (e.g. its PSNR against the reference row)."""
    font = ImageFont.load_default()
    cell_w = max(im.width for _, ims in rows for im in ims) * scale
    cell_h = max(im.height for _, ims in rows for im in ims) * scale
    label_w = 8 + max(int(font.getlength(label)) for label, _ in rows)
    top = 16 if col_labels else 0
    n_cols = max(len(ims) for _, ims in rows)
    pad = 2
    note_h = 14 if row_notes else 0
    row_h = cell_h + note_h + pad
    canvas = Image.new("RGB", (label_w + n_cols * (cell_w + pad), top + len(rows) * row_h), "white")
    draw = ImageDraw.Draw(canvas)
    for j, text in enumerate(col_labels):
        draw.text((label_w + j * (cell_w + pad) + 2, 2), text[: max(1, cell_w // 6)], fill="black", font=font)
    for i, (label, ims) in enumerate(rows):
        y = top + i * row_h
        draw.text((4, y + cell_h // 2 - 6), label, fill="black", font=font)
        if i < len(row_notes):
            draw.text((label_w + 2, y + cell_h + 1), row_notes[i], fill="black", font=font)
        for j, im in enumerate(ims):
            if scale != 1:
                im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
            canvas.paste(im, (label_w + j * (cell_w + pad), y))
    return canvas
