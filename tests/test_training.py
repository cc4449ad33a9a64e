"""CPU smoke tests of ``training/``: the CIFAR-10 JPEG loader, ``train_classifier.py`` and
``train_tiny_flux.py`` (outputs, exact resume, ``--export`` / ``import_export``), on a fake tarball
built here in the layout of ``../shared/data/cifar10-jpeg.tar.gz`` (``train/<class>/NNNN.jpg``,
``test/<class>/NNNN.jpg``), so no data is needed.

Every fake image is a solid colour that encodes its split, class and index, so the tests can check
that each decoded image carries its own label.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
import tarfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the suite may download

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

TRAINING = Path(__file__).resolve().parent.parent / "training"
sys.path.insert(0, str(TRAINING))

import cifar10  # noqa: E402
import train_classifier  # noqa: E402
import train_tiny_flux  # noqa: E402

from svdquant.pipelines.tiny import CIFAR10_CLASSES, TinyFluxPipeline  # noqa: E402
from svdquant.quality import load_classifier  # noqa: E402

PER_CLASS = 2  # 20 images per split


def _colour(split: str, label: int, idx: int) -> tuple[int, int, int]:
    return 10 + 24 * label, 40 + 100 * idx, 60 if split == "train" else 190


def _decode_colour(img: torch.Tensor) -> tuple[int, int, str]:
    """(label, index, split) back from a decoded solid-colour image (JPEG is off by a few levels)."""
    r, g, b = (float(img[c].float().mean()) for c in range(3))
    return round((r - 10) / 24), round((g - 40) / 100), "train" if b < 125 else "test"


def _jpeg(rgb) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), rgb).save(buf, format="JPEG", quality=75)
    return buf.getvalue()


@pytest.fixture(scope="session")
def fake_data(tmp_path_factory):
    """``(tarball, extracted folder)`` of 2 images per class per split. The tarball lists its
    members in a shuffled order (as the real one does: train/bird/0338.jpg, train/bird/3899.jpg, ...)."""
    root = tmp_path_factory.mktemp("cifar")
    folder = root / "extracted"
    entries = []
    for split in ("train", "test"):
        for label, name in enumerate(CIFAR10_CLASSES):
            for idx in range(PER_CLASS):
                p = folder / split / name / f"{idx:04d}.jpg"
                p.parent.mkdir(parents=True, exist_ok=True)
                p.write_bytes(_jpeg(_colour(split, label, idx)))
                entries.append(p)
    order = np.random.default_rng(0).permutation(len(entries))
    tar_path = root / "cifar10-jpeg.tar.gz"
    with tarfile.open(tar_path, "w:gz") as tar:
        for i in order:
            tar.add(entries[i], arcname=str(entries[i].relative_to(folder)))
    return tar_path, folder


# ---------------------------------------------------------------------------------------------
# the loader
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("split", ["train", "test"])
def test_loader_tarball(fake_data, split):
    tar, _ = fake_data
    x, y = cifar10.load(tar, split, cache_dir=None, workers=2)
    n = PER_CLASS * len(CIFAR10_CLASSES)
    assert x.dtype == torch.uint8 and x.shape == (n, 3, 32, 32)
    assert y.dtype == torch.int64 and y.shape == (n,)
    assert y.min() >= 0 and y.max() <= 9
    assert torch.bincount(y, minlength=10).tolist() == [PER_CLASS] * 10
    decoded = [_decode_colour(img) for img in x]
    assert [d[0] for d in decoded] == y.tolist()  # each image carries its own label
    assert {d[2] for d in decoded} == {split}
    assert sorted((d[0], d[1]) for d in decoded) == [(c, i) for c in range(10) for i in range(PER_CLASS)]
    assert y.tolist() == sorted(y.tolist())  # grouped by class, in CIFAR10_CLASSES order


def test_loader_folder_and_cache(fake_data, tmp_path):
    tar, folder = fake_data
    xt, yt = cifar10.load(tar, "train", cache_dir=None, workers=1)
    xf, yf = cifar10.load(folder, "train", cache_dir=tmp_path / "cache", workers=1)
    assert xf.dtype == torch.uint8 and xf.shape == xt.shape
    assert yf.tolist() == yt.tolist()
    key = lambda x, y: sorted((int(lab), *_decode_colour(img)[:2]) for img, lab in zip(x, y))  # noqa: E731
    assert key(xf, yf) == key(xt, yt)
    assert [_decode_colour(img)[0] for img in xf] == yf.tolist()
    # the cache is written and read back unchanged
    assert len(list((tmp_path / "cache").glob("cifar10-train-*.npz"))) == 1
    xc, yc = cifar10.load(folder, "train", cache_dir=tmp_path / "cache")
    assert torch.equal(xc, xf) and torch.equal(yc, yf)


def test_loader_errors(fake_data, tmp_path):
    with pytest.raises(FileNotFoundError):
        cifar10.load(tmp_path / "missing.tar.gz", "train")
    with pytest.raises(ValueError, match="valid"):
        cifar10.load(fake_data[0], "valid")


# ---------------------------------------------------------------------------------------------
# train_classifier.py
# ---------------------------------------------------------------------------------------------

def _classifier_args(tar, out, cache, *extra):
    return ["--data", str(tar), "--out", str(out), "--cache", str(cache), "--device", "cpu", *extra]


def test_train_classifier_smoke(fake_data, tmp_path):
    out, cache = tmp_path / "clf", tmp_path / "cache"
    train_classifier.main(_classifier_args(fake_data[0], out, cache, "--max-steps", "3", "--batch-size", "8"))
    for f in ("classifier.safetensors", "config.json", "cifar10-test-stats.safetensors"):
        assert (out / f).is_file(), f
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["steps"] == 3 and cfg["dtype"] == "float16" and cfg["width"] == 32
    assert 0.0 <= cfg["test_accuracy"] <= 1.0
    with safe_open(str(out / "classifier.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16", "I64"}  # I64: BN batch counters
    model = load_classifier(out)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert torch.isfinite(model(torch.rand(2, 3, 32, 32))).all()
    stats = load_file(str(out / "cifar10-test-stats.safetensors"))
    assert stats["mu"].shape == (256,) and stats["sigma"].shape == (256, 256)
    assert torch.isfinite(stats["sigma"]).all()
    torch.testing.assert_close(stats["sigma"], stats["sigma"].T)
    # --stats-only recomputes the same statistics for the saved classifier
    (out / "cifar10-test-stats.safetensors").unlink()
    train_classifier.main(_classifier_args(fake_data[0], out, cache, "--stats-only"))
    again = load_file(str(out / "cifar10-test-stats.safetensors"))
    torch.testing.assert_close(again["mu"], stats["mu"])
    torch.testing.assert_close(again["sigma"], stats["sigma"])


def test_train_classifier_batch_larger_than_dataset(fake_data, tmp_path):
    args = _classifier_args(fake_data[0], tmp_path / "clf", tmp_path / "cache",
                            "--max-steps", "2", "--batch-size", "64", "--minutes", "0.01")
    try:
        train_classifier.main(args)
    except (ValueError, SystemExit):
        return  # a clear, immediate error is fine
    assert json.loads((tmp_path / "clf" / "config.json").read_text())["steps"] == 2


# ---------------------------------------------------------------------------------------------
# train_tiny_flux.py
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def flux_runs(fake_data, tmp_path_factory):
    """Three runs: 2 steps (``a``); ``a`` resumed to step 4 (``b``); 4 steps in one go with
    ``--export`` (``c``). The sample grid is drawn smaller (1 image per class, 2 steps) to keep
    the CPU time down; the rest of each run is the real script."""
    root = tmp_path_factory.mktemp("flux")
    cache = root / "cache"
    base = ["--data", str(fake_data[0]), "--cache", str(cache), "--device", "cpu", "--batch-size", "4",
            "--warmup", "1", "--lr", "1e-3"]
    real_grid = train_tiny_flux.sample_grid

    def small_grid(pipe, path, per_class=8, steps=20, guidance=2.0):
        return real_grid(pipe, path, per_class=1, steps=2, guidance=guidance)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_tiny_flux, "sample_grid", small_grid)
        train_tiny_flux.main(base + ["--out", str(root / "a"), "--max-steps", "2"])
        train_tiny_flux.main(base + ["--out", str(root / "b"), "--resume", str(root / "a"), "--max-steps", "4"])
        train_tiny_flux.main(base + ["--out", str(root / "c"), "--max-steps", "4", "--export", str(root / "export")])
    return root


def _losses(path: Path) -> list[tuple[int, float]]:
    with open(path) as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["step", "loss"]
    return [(int(s), float(v)) for s, v in rows[1:]]


def test_train_tiny_flux_outputs(flux_runs):
    for run, steps in (("a", 2), ("b", 4), ("c", 4)):
        out = flux_runs / run
        for f in ("state/model.safetensors", "state/ema.safetensors", "state/optimizer.pt", "state/step.json",
                  "state/loss.csv", "pipeline/pipeline.json", "loss.csv", "samples.png"):
            assert (out / f).is_file(), f"{run}/{f}"
        assert not (out / "state.tmp").exists()
        assert json.loads((out / "state" / "step.json").read_text())["step"] == steps
        losses = _losses(out / "loss.csv")
        assert [s for s, _ in losses] == list(range(1, steps + 1))
        assert all(0 < v < 10 for _, v in losses)
        assert Image.open(out / "samples.png").size[0] > 32
        pipe = TinyFluxPipeline.from_pretrained(out / "pipeline")
        assert pipe.guidance_scale == 2.0 and pipe.info["steps"] == steps
        for sub in ("transformer", "conditioner"):  # stored in bf16, as the package ships it
            with safe_open(str(out / "pipeline" / sub / "diffusion_pytorch_model.safetensors"), "pt") as f:
                assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}, sub


def test_train_tiny_flux_resume_is_exact(flux_runs):
    """2 steps, then resumed for 2 more == 4 steps in one go: weights, EMA, optimizer and loss log."""
    b, c, a = (flux_runs / r / "state" for r in ("b", "c", "a"))
    assert _losses(b / "loss.csv") == _losses(c / "loss.csv")
    assert _losses(flux_runs / "b" / "loss.csv") == _losses(flux_runs / "c" / "loss.csv")
    for f in ("model.safetensors", "ema.safetensors"):
        sb, sc, sa = load_file(str(b / f)), load_file(str(c / f)), load_file(str(a / f))
        assert sb.keys() == sc.keys()
        for k in sb:
            assert torch.equal(sb[k], sc[k]), f"{f}: {k}"
        # and the comparison is not vacuous: steps 3-4 changed the weights
        assert any(not torch.equal(sa[k], sc[k]) for k in sa), f
    ob = torch.load(b / "optimizer.pt", weights_only=False)["optimizer"]["state"]
    oc = torch.load(c / "optimizer.pt", weights_only=False)["optimizer"]["state"]
    assert ob.keys() == oc.keys()
    for i in ob:
        for k in ob[i]:
            assert torch.equal(ob[i][k], oc[i][k]), (i, k)


def test_train_tiny_flux_export_round_trip(flux_runs):
    export, out = flux_runs / "export", flux_runs / "c"
    shards = sorted(export.glob("tiny_flux_*.safetensors"))
    assert [p.name for p in shards] == ["tiny_flux_0.safetensors", "tiny_flux_1.safetensors"]
    assert all(p.stat().st_size < 16 * 2**20 for p in shards)  # "each under 16 MB"
    for f in ("tiny_flux.json", "loss.csv", "samples.png"):
        assert (export / f).is_file(), f
    assert _losses(export / "loss.csv") == _losses(out / "loss.csv")

    pipe = train_tiny_flux.import_export(export)
    ref = TinyFluxPipeline.from_pretrained(out / "pipeline")  # the same EMA weights, bf16
    for mine, theirs in ((pipe.transformer, ref.transformer), (pipe.conditioner, ref.conditioner)):
        sd_m, sd_t = mine.state_dict(), theirs.state_dict()
        assert sd_m.keys() == sd_t.keys()
        for k in sd_m:
            assert torch.equal(sd_m[k].float(), sd_t[k].float()), k
    assert pipe.classes == ref.classes and pipe.guidance_scale == ref.guidance_scale == 2.0
    assert pipe.transformer.config.num_single_layers == 6 and pipe.transformer.config.num_layers == 2
    imgs = pipe(class_labels=[0, 5], num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                output_type="pt").images
    assert imgs.shape == (2, 3, 32, 32) and torch.isfinite(imgs).all()
    assert imgs.min() >= 0 and imgs.max() <= 1 and imgs.std() > 0
    # the export is the EMA of the trained run, not the random initialisation
    init = TinyFluxPipeline.random(seed=0)
    assert any(not torch.equal(p.float(), q.to(torch.bfloat16).float())
               for p, q in zip(pipe.transformer.parameters(), init.transformer.parameters()))
