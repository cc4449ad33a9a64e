"""Offline image-quality metrics for the tiny CIFAR-10 model.

* PSNR / SSIM against the 16-bit model's images from the same noise: :mod:`svdquant.metrics`.
* Fréchet distance between feature distributions of the shipped CIFAR-10 classifier (the offline
  stand-in for FID, whose Inception weights need a download): :func:`frechet_distance`, with the
  CIFAR-10 test set's statistics shipped beside the classifier (:func:`reference_stats`).
* The classifier's accuracy on generated images, overall and per class: :func:`class_accuracy`.
* LPIPS / FID / ImageReward through their usual packages only when those packages *and their
  weights* are already on the machine: :func:`optional_metrics` never downloads; it says what it skipped.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from safetensors.torch import load_file

from .classifier import ASSET_DIR, CifarNet


def feature_stats(feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and covariance (float64) of ``[N, D]`` features."""
    f = feats.double()
    mu = f.mean(0)
    c = f - mu
    return mu, c.T @ c / max(1, f.shape[0] - 1)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """``‖μ1−μ2‖² + tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^½)`` in float64.

    ``tr((Σ1 Σ2)^½)`` is the sum of the square roots of the eigenvalues of ``Σ1^½ Σ2 Σ1^½``,
    a symmetric PSD matrix, so it is computed with two symmetric eigendecompositions
    (clamping round-off negatives to 0) instead of a general matrix square root.
    """
    mu1, mu2, s1, s2 = (t.double() for t in (mu1, mu2, sigma1, sigma2))
    w, v = torch.linalg.eigh(s1)
    s1_half = (v * w.clamp_min(0).sqrt()) @ v.T
    m = s1_half @ s2 @ s1_half
    tr_sqrt = torch.linalg.eigvalsh((m + m.T) / 2).clamp_min(0).sqrt().sum()
    return float((mu1 - mu2).square().sum() + s1.trace() + s2.trace() - 2 * tr_sqrt)


@torch.no_grad()
def features(classifier: CifarNet, images: torch.Tensor, batch: int = 500) -> torch.Tensor:
    dev = next(classifier.parameters()).device
    return torch.cat([classifier.features(images[i:i + batch].to(dev)).float().cpu()
                      for i in range(0, len(images), batch)])


@torch.no_grad()
def class_accuracy(classifier: CifarNet, images: torch.Tensor, labels: torch.Tensor,
                   num_classes: int = 10) -> tuple[float, list[float]]:
    """Overall and per-class top-1 accuracy of the classifier on ``images`` in [0, 1]."""
    dev = next(classifier.parameters()).device
    pred = torch.cat([classifier(images[i:i + 500].to(dev)).argmax(1).cpu() for i in range(0, len(images), 500)])
    labels = torch.as_tensor(labels)
    per = [float((pred[labels == c] == c).float().mean()) if (labels == c).any() else float("nan")
           for c in range(num_classes)]
    return float((pred == labels).float().mean()), per


def reference_stats(path: str | Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The CIFAR-10 test set's classifier-feature mean and covariance, shipped with the classifier."""
    p = Path(path) if path is not None else ASSET_DIR / "cifar10-test-stats.safetensors"
    if not p.exists():
        raise FileNotFoundError(f"no reference statistics at {p}")
    t = load_file(str(p))
    return t["mu"].double(), t["sigma"].double()


def optional_metrics(images: torch.Tensor, reference: torch.Tensor) -> dict[str, object]:
    """LPIPS against the 16-bit images when ``lpips`` and its weights are installed; otherwise a note.

    FID (Inception) and ImageReward need weights from the internet on first use; they are reported
    as skipped unless already cached locally, since svdquant never downloads at run time.
    """
    out: dict[str, object] = {}
    if importlib.util.find_spec("lpips") is None:
        out["lpips"] = "skipped: the lpips package is not installed"
    else:
        # lpips builds on torchvision's AlexNet, which torch.hub would download: use it only if cached.
        alexnet = Path(torch.hub.get_dir()) / "checkpoints" / "alexnet-owt-7be5be79.pth"
        if not alexnet.exists():
            out["lpips"] = f"skipped: LPIPS needs torchvision's AlexNet weights at {alexnet} (svdquant never downloads)"
            return _other_metrics(out)
        try:
            import lpips  # noqa: F401

            net = lpips.LPIPS(net="alex", verbose=False, pretrained=True)
            with torch.no_grad():
                out["lpips"] = float(net(images * 2 - 1, reference * 2 - 1).mean())
        except Exception as e:  # weights missing offline, etc.
            out["lpips"] = f"skipped: {type(e).__name__}: {e}"
    return _other_metrics(out)


def _other_metrics(out: dict[str, object]) -> dict[str, object]:
    fid_ok = importlib.util.find_spec("torch_fidelity") is not None
    out["fid"] = ("skipped: needs Inception weights (torch-fidelity download); the classifier Fréchet distance "
                  "stands in for it offline") if not fid_ok else "skipped: Inception at 32×32 is not meaningful here"
    out["image_reward"] = ("skipped: ImageReward scores text-image alignment of captions; this model draws "
                           "class labels, and its weights need a download")
    return out
