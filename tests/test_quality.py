"""``svdquant.quality``: the offline Fréchet distance, class accuracy, the shipped CIFAR-10 classifier
and its reference statistics, ``optional_metrics``, and one end-to-end check that the shipped trained
tiny FLUX model draws images the shipped classifier recognises (and a random-weight one does not).

End-to-end figures (CPU, torch 2.13, shipped assets; 2 images per class, 4 Euler steps, noise seed 0,
the same noise for both models; guidance 2.0 for the trained model, 1.0 for the random one, whose
conditioning means nothing anyway, to halve its cost):

| model                        | class accuracy (seed 0) | seeds 0-2   | bound  | Fréchet distance to test set |
| ---------------------------- | ----------------------- | ----------- | ------ | ---------------------------- |
| trained (``default()``)      | 0.90                    | 0.60 - 0.90 | >= 0.5 | 23.5 (seeds 0-2: 23.5 - 28.0) |
| random (``random(seed=0)``)  | 0.05                    | 0.05 - 0.10 | <= 0.3 | 68.1 (seeds 0-2: 66.9 - 68.1) |

Chance is 0.10. With 10 steps, guidance 2 the trained model gets 0.95; the random one 0.05.
"""

from __future__ import annotations

import importlib.machinery
import math
import os
import socket
import sys
import types

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the suite may download

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from safetensors import safe_open  # noqa: E402

from svdquant.quality import (  # noqa: E402
    CifarNet,
    class_accuracy,
    feature_stats,
    features,
    frechet_distance,
    load_classifier,
    optional_metrics,
    reference_stats,
)
from svdquant.quality.classifier import ASSET_DIR, accuracy  # noqa: E402


def _spd(d: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    return scale * (a @ a.T / d + 0.1 * torch.eye(d, dtype=torch.float64))


def _mu(d: int, seed: int) -> torch.Tensor:
    return torch.randn(d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _reference_fd(mu1, s1, mu2, s2) -> float:
    """Independent of the implementation: tr((Σ1Σ2)^½) as the sum of square roots of the (real, >= 0)
    eigenvalues of the non-symmetric product Σ1Σ2, from a general eigendecomposition."""
    ev = torch.linalg.eigvals(s1 @ s2)
    assert ev.imag.abs().max() < 1e-8 * ev.real.abs().max()
    tr_sqrt = ev.real.clamp_min(0).sqrt().sum()
    return float((mu1 - mu2).square().sum() + s1.trace() + s2.trace() - 2 * tr_sqrt)


# ---------------------------------------------------------------------------------------------
# frechet_distance / feature_stats
# ---------------------------------------------------------------------------------------------

def test_frechet_identical_stats_is_zero():
    mu, s = _mu(32, 0), _spd(32, 1)
    assert abs(frechet_distance(mu, s, mu, s)) < 1e-6
    # float32 inputs (as reference_stats' file stores them) are computed in float64 too
    assert abs(frechet_distance(mu.float(), s.float(), mu.float(), s.float())) < 1e-6


def test_frechet_diagonal_closed_form():
    g = torch.Generator().manual_seed(3)
    d = 12
    mu1, mu2 = torch.randn(d, generator=g, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64) + 1
    a, b = torch.rand(d, generator=g, dtype=torch.float64) * 4 + 0.01, torch.rand(d, generator=g, dtype=torch.float64)
    expected = float((mu1 - mu2).square().sum() + (a.sqrt() - b.sqrt()).square().sum())
    got = frechet_distance(mu1, torch.diag(a), mu2, torch.diag(b))
    assert got == pytest.approx(expected, rel=1e-10, abs=1e-10)
    assert expected > 1.0  # not a trivial case
    # 1-d: (m1 - m2)^2 + (s1 - s2)^2 for standard deviations s1, s2
    one = frechet_distance(torch.tensor([1.0]), torch.tensor([[4.0]]), torch.tensor([-2.0]), torch.tensor([[9.0]]))
    assert one == pytest.approx(9.0 + 1.0, rel=1e-12)


def test_frechet_symmetric_and_matches_independent_reference():
    d = 24
    for seed in range(3):
        mu1, mu2 = _mu(d, 10 + seed), _mu(d, 20 + seed)
        s1, s2 = _spd(d, 30 + seed, scale=2.0), _spd(d, 40 + seed, scale=0.5)
        fd12 = frechet_distance(mu1, s1, mu2, s2)
        fd21 = frechet_distance(mu2, s2, mu1, s1)
        assert fd12 == pytest.approx(fd21, rel=1e-9)
        ref = _reference_fd(mu1, s1, mu2, s2)
        assert fd12 == pytest.approx(ref, rel=1e-8)
        # the covariance part alone is non-trivial (not just the mean term)
        assert frechet_distance(mu1, s1, mu1, s2) > 0.1


def test_frechet_rank_deficient_covariances():
    """Fewer samples than dimensions (as with 20 generated images and 256 features): singular
    covariances; the distance stays finite, ~0 against itself, non-negative otherwise."""
    g = torch.Generator().manual_seed(5)
    fa, fb = torch.randn(10, 64, generator=g), torch.randn(10, 64, generator=g) * 2 + 0.5
    ma, sa = feature_stats(fa)
    mb, sb = feature_stats(fb)
    assert torch.linalg.matrix_rank(sa) <= 9
    assert abs(frechet_distance(ma, sa, ma, sa)) < 1e-6 * float(sa.trace())
    fd = frechet_distance(ma, sa, mb, sb)
    assert math.isfinite(fd) and fd > 0
    assert fd == pytest.approx(frechet_distance(mb, sb, ma, sa), rel=1e-8)
    assert fd == pytest.approx(_reference_fd(ma, sa, mb, sb), rel=1e-6)


def test_feature_stats_matches_torch_cov():
    f = torch.randn(50, 7, generator=torch.Generator().manual_seed(0)) * 3 + 1
    mu, sigma = feature_stats(f)
    assert mu.dtype == sigma.dtype == torch.float64
    assert mu.shape == (7,) and sigma.shape == (7, 7)
    torch.testing.assert_close(mu, f.double().mean(0))
    torch.testing.assert_close(sigma, torch.cov(f.double().T))


# ---------------------------------------------------------------------------------------------
# class_accuracy / accuracy with a hand-made classifier
# ---------------------------------------------------------------------------------------------

class _PixelClassifier(nn.Module):
    """Predicts the class written in pixel [0, 0, 0] (as class / 10)."""

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, images):
        pred = (images[:, 0, 0, 0] * 10).round().long()
        return torch.nn.functional.one_hot(pred, 10).float() + self.dummy


def _images_for(preds: torch.Tensor) -> torch.Tensor:
    x = torch.zeros(len(preds), 3, 2, 2)
    x[:, 0, 0, 0] = preds.float() / 10
    return x


def test_class_accuracy_known_predictions():
    # class 0: 3 images, 2 right; class 1: 2 images, 0 right; class 2: 1 image, 1 right;
    # class 3: 4 images, 1 right; classes 4-9 absent (NaN)
    labels = [0, 0, 0, 1, 1, 2, 3, 3, 3, 3]
    preds = torch.tensor([0, 0, 5, 2, 0, 2, 3, 1, 1, 9])
    overall, per = class_accuracy(_PixelClassifier(), _images_for(preds), labels)
    assert overall == pytest.approx(4 / 10)
    assert len(per) == 10
    assert per[:4] == pytest.approx([2 / 3, 0.0, 1.0, 0.25])
    assert all(math.isnan(p) for p in per[4:])
    assert accuracy(_PixelClassifier(), _images_for(preds), torch.tensor(labels)) == pytest.approx(0.4)


def test_class_accuracy_batches_beyond_500():
    """Predictions from more than one internal batch of 500 stay aligned with their labels."""
    n = 1203
    labels = torch.arange(n) % 10
    preds = labels.clone()
    wrong = torch.arange(n) % 7 == 0  # 172 wrong, spread over all batches
    preds[wrong] = (labels[wrong] + 1) % 10
    overall, per = class_accuracy(_PixelClassifier(), _images_for(preds), labels)
    assert overall == pytest.approx(1 - int(wrong.sum()) / n)
    for c in range(10):
        m = labels == c
        assert per[c] == pytest.approx(1 - float(wrong[m].float().mean()))
    assert accuracy(_PixelClassifier(), _images_for(preds), labels, batch=100) == pytest.approx(overall)


# ---------------------------------------------------------------------------------------------
# the shipped classifier and its reference statistics
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def classifier() -> CifarNet:
    return load_classifier()


def test_shipped_classifier_fp16_file_loads_as_fp32(classifier):
    with safe_open(str(ASSET_DIR / "classifier.safetensors"), "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert "F16" in dtypes and "F32" not in dtypes  # shipped in fp16
    assert all(p.dtype == torch.float32 for p in classifier.parameters())
    assert not classifier.training  # eval: BatchNorm running statistics
    n = sum(p.numel() for p in classifier.parameters())
    assert 1.4e6 < n < 1.8e6  # "1.6M parameters"
    x = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    logits = classifier(x)
    feats = features(classifier, x)
    assert logits.shape == (6, 10) and torch.isfinite(logits).all()
    assert feats.shape == (6, 256) and feats.dtype == torch.float32 and torch.isfinite(feats).all()
    assert feats.abs().sum() > 0
    # eval mode: one image's output does not depend on its batch
    torch.testing.assert_close(features(classifier, x[:1]), feats[:1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(features(classifier, x, batch=4), feats, rtol=1e-4, atol=1e-4)


def test_load_classifier_missing_folder(tmp_path):
    missing = tmp_path / "no-such-classifier"
    with pytest.raises(FileNotFoundError, match=str(missing).replace("\\", "\\\\")):
        load_classifier(missing)


def test_classifier_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    net = CifarNet(width=8).eval()
    net.save(tmp_path / "c", {"note": "test"})
    back = load_classifier(tmp_path / "c")
    assert back.width == 8
    x = torch.rand(3, 3, 32, 32)
    torch.testing.assert_close(back(x), net(x))


def test_reference_stats(tmp_path):
    mu, sigma = reference_stats()
    assert mu.shape == (256,) and sigma.shape == (256, 256)
    assert mu.dtype == sigma.dtype == torch.float64
    assert torch.isfinite(mu).all() and torch.isfinite(sigma).all()
    torch.testing.assert_close(sigma, sigma.T, rtol=0, atol=1e-6 * float(sigma.abs().max()))
    ev = torch.linalg.eigvalsh(sigma)
    assert ev.min() > -1e-5 * ev.max()  # PSD up to float32 storage round-off
    assert float(sigma.trace()) > 0
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-6 * float(sigma.trace())
    with pytest.raises(FileNotFoundError):
        reference_stats(tmp_path / "missing.safetensors")


# ---------------------------------------------------------------------------------------------
# optional_metrics: never downloads
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def no_network(monkeypatch):
    """Record (and refuse) every attempt to open a connection."""
    attempts = []

    def refuse(self, address, *a, **k):
        attempts.append(address)
        raise OSError(f"test: network access to {address} refused")

    def refuse_lookup(host, *a, **k):
        attempts.append(host)
        raise socket.gaierror(f"test: name lookup of {host} refused")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse_lookup)
    return attempts


def _fake_lpips(monkeypatch, cls):
    mod = types.ModuleType("lpips")
    mod.__spec__ = importlib.machinery.ModuleSpec("lpips", None)
    mod.LPIPS = cls
    monkeypatch.setitem(sys.modules, "lpips", mod)


def test_optional_metrics_without_packages(monkeypatch, no_network):
    real_find_spec = importlib.util.find_spec
    absent = {"lpips", "torch_fidelity"}
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in absent else real_find_spec(name, *a))
    imgs = torch.rand(2, 3, 32, 32)
    out = optional_metrics(imgs, imgs)
    assert set(out) == {"lpips", "fid", "image_reward"}
    assert all(isinstance(v, str) and v.startswith("skipped") for v in out.values())
    assert "not installed" in out["lpips"]
    assert no_network == []


def test_optional_metrics_lpips_present(monkeypatch, no_network, tmp_path):
    """With an (offline-ready) lpips package it returns the number; when its constructor fails
    (weights missing offline) it returns a note instead of raising."""

    class Working(nn.Module):
        def __init__(self, net="alex", verbose=True, pretrained=True):
            super().__init__()

        def forward(self, a, b):
            assert a.min() >= -1 and a.max() <= 1
            return (a - b).abs().mean((1, 2, 3), keepdim=True)

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # the AlexNet weights lpips needs are "cached"
    cached = tmp_path / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"")
    _fake_lpips(monkeypatch, Working)
    a, b = torch.zeros(2, 3, 32, 32), torch.full((2, 3, 32, 32), 0.25)
    assert optional_metrics(a, b)["lpips"] == pytest.approx(0.5)

    class Broken:
        def __init__(self, **_):
            raise RuntimeError("weights not found")

    _fake_lpips(monkeypatch, Broken)
    out = optional_metrics(a, b)
    assert out["lpips"].startswith("skipped") and "weights not found" in out["lpips"]
    assert no_network == []


def test_optional_metrics_does_not_download_lpips_backbone(monkeypatch, no_network, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # empty hub cache

    class LikeRealLpips(nn.Module):
        """What lpips.LPIPS(pretrained=True) does: fetch the torchvision AlexNet weights."""

        def __init__(self, net="alex", verbose=True, pretrained=True):
            super().__init__()
            torch.hub.load_state_dict_from_url("https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
                                               progress=False)

    _fake_lpips(monkeypatch, LikeRealLpips)
    imgs = torch.rand(1, 3, 32, 32)
    out = optional_metrics(imgs, imgs)
    assert out["lpips"].startswith("skipped")
    assert no_network == [], f"optional_metrics tried to connect to {no_network}"


# ---------------------------------------------------------------------------------------------
# end to end: the shipped trained model draws what the shipped classifier recognises
# ---------------------------------------------------------------------------------------------

PER_CLASS, STEPS, SEED = 2, 4, 0


@pytest.fixture(scope="module")
def samples():
    from svdquant.pipelines.tiny import TinyFluxPipeline

    labels = torch.arange(10).repeat_interleave(PER_CLASS)
    noise = torch.randn(len(labels), 3, 32, 32, generator=torch.Generator().manual_seed(SEED))
    out = {}
    trained = TinyFluxPipeline.default()
    assert "trained" in trained.info.get("weights", "")  # the shipped weights, not the random fallback
    for name, pipe, guidance in (("trained", trained, 2.0), ("random", TinyFluxPipeline.random(seed=0), 1.0)):
        imgs = pipe(class_labels=labels, latents=noise, num_inference_steps=STEPS, guidance_scale=guidance,
                    output_type="pt").images
        assert imgs.shape == (len(labels), 3, 32, 32) and torch.isfinite(imgs).all()
        out[name] = imgs
    return labels, out


def test_trained_model_samples_are_recognised(samples, classifier):
    labels, imgs = samples
    acc, per = class_accuracy(classifier, imgs["trained"], labels)
    # measured 0.90 (seed 0; 0.60-0.90 over noise seeds 0-2); chance is 0.10
    assert acc >= 0.5, (acc, per)
    assert sum(p > 0 for p in per) >= 6  # recognised across classes, not one class drawn everywhere


def test_random_model_samples_are_not_recognised(samples, classifier):
    labels, imgs = samples
    acc, _ = class_accuracy(classifier, imgs["random"], labels)
    # measured 0.05 (seed 0; 0.05-0.10 over noise seeds 0-2)
    assert acc <= 0.3, acc


def test_trained_model_closer_to_cifar10_in_feature_space(samples, classifier):
    """The offline Fréchet distance to the CIFAR-10 test statistics ranks the trained model first."""
    _, imgs = samples
    mu_ref, sigma_ref = reference_stats()
    fd = {k: frechet_distance(*feature_stats(features(classifier, v)), mu_ref, sigma_ref) for k, v in imgs.items()}
    # measured (seed 0): trained 23.5, random 68.1 (ratio 0.35; 0.42 at worst over seeds 0-2)
    assert fd["trained"] < 0.6 * fd["random"], fd
