"""CIFAR-10 from the JPEG tarball (``train/<class>/NNNN.jpg``, ``test/<class>/NNNN.jpg``) into uint8 tensors.

    images, labels = load("path/to/cifar10-jpeg.tar.gz", "train", cache_dir=".data")

Decodes with PIL in a process pool and caches ``<cache_dir>/cifar10-<split>-<source hash>.npz``, so later
runs (and resumed training chunks) start in a second. Class indices follow
``svdquant.pipelines.CIFAR10_CLASSES``.
"""

from __future__ import annotations

import io
import hashlib
import os
import tarfile
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch

from svdquant.pipelines import CIFAR10_CLASSES


def _decode(blob: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(blob)).convert("RGB"), dtype=np.uint8)


def _members(path: Path, split: str):
    """(label, jpeg bytes) for every image of a split, from a .tar.gz or an extracted folder."""
    out = []
    if path.is_dir():
        for label, name in enumerate(CIFAR10_CLASSES):
            for f in sorted((path / split / name).glob("*.jpg")):
                out.append((label, f.read_bytes()))
        return out
    with tarfile.open(path) as tar:
        for m in tar:
            parts = Path(m.name).parts
            if m.isfile() and m.name.endswith(".jpg") and split in parts:
                cls = parts[parts.index(split) + 1]
                out.append((CIFAR10_CLASSES.index(cls), tar.extractfile(m).read()))
    out.sort(key=lambda p: p[0])
    return out


def _source_key(path: Path) -> str:
    """Names the cache after the data it came from, so other data never reads a stale cache."""
    st = path.stat() if path.exists() else None
    key = f"{path.resolve()}|{st.st_size if st else 0}|{st.st_mtime_ns if st else 0}"
    return hashlib.sha1(key.encode()).hexdigest()[:10]


def load(path: str | os.PathLike, split: str = "train", cache_dir: str | os.PathLike | None = None,
         workers: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images uint8 [N, 3, 32, 32], labels int64 [N])``."""
    path = Path(path)
    cache = Path(cache_dir) / f"cifar10-{split}-{_source_key(path)}.npz" if cache_dir else None
    if cache is not None and cache.exists():
        z = np.load(cache)
        return torch.from_numpy(z["images"]), torch.from_numpy(z["labels"])
    if not path.exists():
        raise FileNotFoundError(f"no CIFAR-10 data at {path} (expected the .tar.gz or its extracted folder)")
    members = _members(path, split)
    if not members:
        raise ValueError(f"{path} holds no {split}/<class>/*.jpg images")
    with Pool(workers or min(16, os.cpu_count() or 1)) as pool:
        arrays = pool.map(_decode, [b for _, b in members], chunksize=256)
    images = np.stack(arrays).transpose(0, 3, 1, 2).copy()
    labels = np.array([lab for lab, _ in members], dtype=np.int64)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache, images=images, labels=labels)
    return torch.from_numpy(images), torch.from_numpy(labels)
