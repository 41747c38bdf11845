"""Fashion-MNIST (Zalando, MIT): 70,000 real 28x28 grey product photos in 10 classes, from local IDX files."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from fedlight.data.base import Dataset, DatasetSplits
from fedlight.hookspecs import hookimpl

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
LABELS = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
HOW_TO_GET = (
    "install the Debian package (apt-get install dataset-fashion-mnist, files in /usr/share/datasets/fashion-mnist/), "
    "or set data.dataset.init_args.root to a folder holding the original IDX files "
    "(train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], t10k-...), "
    "or set download: true to fetch them with torchvision where you are online"
)


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (optionally gzipped) as a uint8 array: magic 0x00 0x00 0x08 ndim, big-endian dims, then data."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        data = fh.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file (magic {data[:4].hex()})")
    ndim = data[3]
    offset = 4 + 4 * ndim
    if len(data) < offset:
        raise ValueError(f"{path}: header says {ndim} dimensions but the file ends after {len(data)} bytes")
    dims = struct.unpack_from(f">{ndim}I", data, 4)
    expected = int(np.prod(dims)) if dims else 0
    if len(data) - offset != expected:
        raise ValueError(f"{path}: header says {dims} ({expected} bytes) but {len(data) - offset} bytes follow")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims)


def _find(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx")):
        if (folder / name).exists():
            return folder / name
    return None


def find_idx_dir(root: str | os.PathLike | None) -> Path | None:
    """The first folder holding all four IDX files: ``root``, its ``FashionMNIST/raw`` (torchvision layout), the Debian path."""
    candidates = [Path(root).expanduser(), Path(root).expanduser() / "FashionMNIST" / "raw"] if root else []
    candidates.append(DEBIAN_DIR)
    for folder in candidates:
        if all(_find(folder, stem) for pair in FILES.values() for stem in pair):
            return folder
    return None


def _subset(labels: np.ndarray, limit: int | None, seed: int) -> np.ndarray:
    """A seeded class-stratified subset of at most ``limit`` indices (all of them when None), sorted."""
    if limit is None or limit >= len(labels):
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    per = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]
    take = np.concatenate(
        [p[: limit // len(classes) + (1 if i < limit % len(classes) else 0)] for i, p in enumerate(per)]
    )
    return np.sort(take)


class FashionMNIST(Dataset):
    """Fashion-MNIST product photos (10 classes, 28x28 grey, [0, 1]); train/test are the official splits.

    Looks in ``root`` (a folder of the original IDX files, gzipped or not, or torchvision's layout),
    then the Debian package's ``/usr/share/datasets/fashion-mnist``; with ``download: true`` and no
    local copy it asks torchvision to fetch the files into ``root`` (only where you are online).
    ``max_train`` / ``max_val`` take seeded class-stratified subsets to keep CPU runs small.
    """

    name = "fashion_mnist"
    example_args: ClassVar[dict[str, Any]] = {"max_train": 200, "max_val": 100}

    def __init__(
        self,
        root: str | None = None,
        max_train: int | None = None,
        max_val: int | None = None,
        seed: int = 0,
        download: bool = False,
    ) -> None:
        for field, value in (("max_train", max_train), ("max_val", max_val)):
            if value is not None and value < 10:
                raise ValueError(f"fashion_mnist {field} must be >= 10 (one example per class), got {value}")
        self.root, self.max_train, self.max_val, self.seed, self.download = root, max_train, max_val, seed, download

    def locate(self) -> Path:
        folder = find_idx_dir(self.root)
        if folder is None and self.download:
            from torchvision.datasets import FashionMNIST as TorchvisionFashionMNIST

            target = Path(self.root or Path.home() / ".cache" / "fedlight" / "data").expanduser()
            TorchvisionFashionMNIST(str(target), train=True, download=True)
            TorchvisionFashionMNIST(str(target), train=False, download=True)
            folder = find_idx_dir(target)
        if folder is None:
            where = f"{self.root} nor {DEBIAN_DIR}" if self.root else str(DEBIAN_DIR)
            raise FileNotFoundError(f"Fashion-MNIST IDX files not found in {where}; {HOW_TO_GET}")
        return folder

    def load(self) -> DatasetSplits:
        folder = self.locate()
        splits = {}
        for split, (img_stem, lab_stem) in FILES.items():
            img_path, lab_path = _find(folder, img_stem), _find(folder, lab_stem)
            assert img_path is not None and lab_path is not None, "locate() returns a folder holding all four files"
            images, labels = read_idx(img_path), read_idx(lab_path)
            if images.ndim != 3 or labels.shape != (images.shape[0],):
                raise ValueError(f"{folder}: {split} images {images.shape} and labels {labels.shape} do not pair up")
            limit = self.max_train if split == "train" else self.max_val
            keep = _subset(labels, limit, self.seed)
            tensor = torch.from_numpy(images[keep].astype(np.float32) / 255.0).unsqueeze(1)
            splits[split] = [{"image": tensor[i], "label": int(labels[k])} for i, k in enumerate(keep)]
        return DatasetSplits(train=splits["train"], val=splits["test"], label_names=list(LABELS))


@hookimpl
def fedlight_datasets() -> list[type]:
    return [FashionMNIST]
