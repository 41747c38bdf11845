"""Real handwritten digits bundled with scikit-learn (UCI optdigits, 1,797 8x8 images)."""

from __future__ import annotations

import torch

from fedlight.data.base import Dataset, DatasetSplits, digit_image_splits
from fedlight.hookspecs import hookimpl


class SklearnDigits(Dataset):
    """Handwritten digits 0-9 from scikit-learn, as 1x8x8 float images in [0, 1]; no download."""

    name = "digits"
    example_args = {"val_fraction": 0.5}

    def __init__(self, val_fraction: float = 0.2, seed: int = 0) -> None:
        self.val_fraction = val_fraction
        self.seed = seed

    def load(self) -> DatasetSplits:
        from sklearn.datasets import load_digits

        bunch = load_digits()
        images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
        labels = [int(y) for y in bunch.target]
        return digit_image_splits(images, labels, self.val_fraction, self.seed)


@hookimpl
def fedlight_datasets() -> list[type]:
    return [SklearnDigits]
