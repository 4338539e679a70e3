"""Sample grids: one row per class, so a glance tells whether each class looks right."""

from pathlib import Path

import numpy as np
import torch
from PIL import Image


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] -> uint8 [n, C, H, W]."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)


def grid_samples(labels: torch.Tensor, classes: int = 10, per_class: int = 10) -> torch.Tensor:
    """Indices of the samples a grid shows: up to `per_class` of each of the first `classes` classes."""
    return torch.cat([torch.nonzero(labels == c)[:per_class, 0] for c in range(classes)])


def grid_images(images: torch.Tensor, largest: int = 128) -> torch.Tensor:
    """Decoded images in [0, 1] -> uint8, shrunk (area) to at most `largest` pixels a side: a grid
    stays a glance."""
    if images.shape[-1] > largest:
        images = torch.nn.functional.interpolate(images.float(), size=(largest, largest), mode="area")
    return to_uint8(images).cpu()


def save_grid(images: torch.Tensor, labels: torch.Tensor, path: str | Path, per_class: int = 10, scale: int = 2) -> Path:
    """uint8 images [n, C, H, W] -> PNG with row c holding the first `per_class` samples of class c."""
    images, labels = images.cpu(), labels.cpu()
    classes = sorted(set(labels.tolist()))
    C, H, W = images.shape[1:]
    pad = 2
    canvas = np.full((len(classes) * (H + pad) + pad, per_class * (W + pad) + pad, C), 255, np.uint8)
    for row, c in enumerate(classes):
        for col, img in enumerate(images[labels == c][:per_class]):
            y, x = pad + row * (H + pad), pad + col * (W + pad)
            canvas[y : y + H, x : x + W] = img.permute(1, 2, 0).numpy()
    picture = Image.fromarray(canvas[..., 0] if C == 1 else canvas)
    picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    picture.save(path)
    return path
