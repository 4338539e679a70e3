"""The base registry: a checkpoint's config names its base kind, and `load_base` rebuilds it.

A new base (the published MaskGIT, Lumina-DiMOO) registers a builder here: a function from the
checkpoint config to an (unloaded) `MaskedBase`. Nothing else in the project changes.
"""

from collections.abc import Callable
from pathlib import Path

import torch

from ..checkpoint import load_model
from ..tokenizer import VQTokenizer
from .contract import MaskedBase
from .maskgit import build_maskgit_imagenet
from .tiny_maskgit import TinyMaskGIT


def tiny_maskgit_config(base, tokenizer: dict, num_classes: int, depth: int | None = None) -> dict:
    """The checkpoint config of a tiny MaskGIT: params.yaml's `base` section, the tokenizer's config
    (`tokenizer.tokenizer_config`), the number of classes; `depth`: fewer layers than the section's."""
    model = dict(depth=depth or base.depth, width=base.width, heads=base.heads, mlp_ratio=base.mlp_ratio,
                 label_dropout=base.label_dropout)
    return {"kind": "tiny-maskgit", "tokenizer": tokenizer, "num_classes": num_classes, "model": model}


def _build_tiny_maskgit(config: dict) -> MaskedBase:
    return TinyMaskGIT(VQTokenizer(**config["tokenizer"]), num_classes=config["num_classes"], **config["model"])


def _build_dimoo(config: dict) -> MaskedBase:
    from .dimoo import build_dimoo  # imports transformers (half a second): only for a DiMOO base

    return build_dimoo(config)


BASES: dict[str, Callable[[dict], MaskedBase]] = {"tiny-maskgit": _build_tiny_maskgit, "maskgit-imagenet": build_maskgit_imagenet,
                                                  "dimoo": _build_dimoo}


def build_base(config: dict) -> MaskedBase:
    kind = config.get("kind")
    if kind not in BASES:
        raise ValueError(f"unknown base kind {kind!r}; registered: {', '.join(BASES)}")
    base = BASES[kind](config)
    base._base_id = f"{kind}:{config.get('hash', 'untrained')}"
    return base


def load_base(path: str | Path, device: str | torch.device = "cpu") -> MaskedBase:
    """Rebuild a base from its checkpoint (written by `checkpoint.save_model`), in eval mode and frozen."""
    return load_model(path, build_base)[0].to(device)


__all__ = ["BASES", "MaskedBase", "build_base", "load_base", "tiny_maskgit_config"]
