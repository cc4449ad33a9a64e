"""A small CIFAR-10 classifier: the offline stand-in for Inception in FID, and a judge of class accuracy.

A ResNet-9-style network at half width (1.6M parameters), trained by
``training/train_classifier.py`` and shipped in the package. ``features`` returns the 256-d
penultimate activations used for the Fréchet distance; ``logits`` the class scores.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "cifar10-classifier"
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)


def _block(cin, cout, pool=False):
    layers = [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class Residual(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.body = nn.Sequential(_block(c, c), _block(c, c))

    def forward(self, x):
        return x + self.body(x)


class CifarNet(nn.Module):
    def __init__(self, width: int = 32, num_classes: int = 10):
        super().__init__()
        w = width
        self.net = nn.Sequential(
            _block(3, w), _block(w, 2 * w, pool=True), Residual(2 * w),
            _block(2 * w, 4 * w, pool=True), _block(4 * w, 8 * w, pool=True), Residual(8 * w),
            nn.AdaptiveMaxPool2d(1), nn.Flatten(),
        )
        self.fc = nn.Linear(8 * w, num_classes)
        self.width = width

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, 32, 32]`` in [0, 1] -> normalized input."""
        mean = torch.tensor(MEAN, device=images.device).view(1, 3, 1, 1)
        std = torch.tensor(STD, device=images.device).view(1, 3, 1, 1)
        return (images.float() - mean) / std

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(images))

    def save(self, path: str | Path, info: dict | None = None) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()},
                  str(path / "classifier.safetensors"))
        (path / "config.json").write_text(json.dumps({"width": self.width, **(info or {})}, indent=1))


def load_classifier(path: str | Path | None = None, device="cpu") -> CifarNet:
    """The classifier saved at ``path`` (default: the one shipped in the package)."""
    path = Path(path) if path is not None else ASSET_DIR
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise FileNotFoundError(f"no classifier at {path} (train one with training/train_classifier.py)")
    cfg = json.loads(cfg_file.read_text())
    model = CifarNet(cfg.get("width", 32))
    model.load_state_dict(load_file(str(path / "classifier.safetensors")))
    return model.to(device).eval()


def accuracy(model: CifarNet, images: torch.Tensor, labels: torch.Tensor, batch: int = 500) -> float:
    """Top-1 accuracy on ``images`` in [0, 1]."""
    correct = 0
    with torch.no_grad():
        for i in range(0, len(images), batch):
            x = images[i:i + batch].to(next(model.parameters()).device)
            correct += int((model(x).argmax(1).cpu() == labels[i:i + batch]).sum())
    return correct / len(images)

