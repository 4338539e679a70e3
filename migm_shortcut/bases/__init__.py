"""The base registry: a checkpoint's config names its base kind, and `load_base` rebuilds it.

A new base (the published MaskGIT, Lumina-DiMOO) registers a builder here: a function from the
checkpoint config to an (unloaded) `MaskedBase`. Nothing else in the project changes.
"""

from collections.abc import Callable
from pathlib import Path

import torch

from ..checkpoint import load_checkpoint, load_state_strict, save_checkpoint
from ..tokenizer import VQTokenizer
from .contract import MaskedBase
from .dimoo import build_dimoo
from .maskgit import build_maskgit_imagenet
from .tiny_maskgit import TinyMaskGIT


def _build_tiny_maskgit(config: dict) -> MaskedBase:
    return TinyMaskGIT(VQTokenizer(**config["tokenizer"]), num_classes=config["num_classes"], **config["model"])


BASES: dict[str, Callable[[dict], MaskedBase]] = {"tiny-maskgit": _build_tiny_maskgit, "maskgit-imagenet": build_maskgit_imagenet,
                                                  "dimoo": build_dimoo}


def build_base(config: dict) -> MaskedBase:
    kind = config.get("kind")
    if kind not in BASES:
        raise ValueError(f"unknown base kind {kind!r}; registered: {', '.join(BASES)}")
    base = BASES[kind](config)
    base._base_id = f"{kind}:{config.get('hash', 'untrained')}"
    return base


def save_base(base: MaskedBase, path: str | Path, config: dict) -> Path:
    return save_checkpoint(path, base.state_dict(), config)


def load_base(path: str | Path, device: str | torch.device = "cpu") -> MaskedBase:
    """Rebuild a base from its checkpoint, in eval mode and frozen."""
    state, config = load_checkpoint(path)
    base = build_base(config)
    load_state_strict(base, state, str(path))
    return base.to(device).eval().requires_grad_(False)


__all__ = ["BASES", "MaskedBase", "build_base", "load_base", "save_base"]
