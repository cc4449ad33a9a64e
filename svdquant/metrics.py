"""Image quality against the 16-bit model's image from the same noise (torchmetrics underneath)."""

from __future__ import annotations

import torch
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure


def psnr(images: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of ``[B, 3, H, W]`` images in [0, 1]."""
    return peak_signal_noise_ratio(images.float(), reference.float(), data_range=1.0, reduction="none",
                                   dim=(1, 2, 3))


def ssim(images: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM (Gaussian window 11, σ 1.5) of ``[B, 3, H, W]`` images in [0, 1]."""
    return structural_similarity_index_measure(images.float(), reference.float(), data_range=1.0, reduction="none")
