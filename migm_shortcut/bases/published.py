"""A published base (Lumina-DiMOO, the published MaskGIT) read from its files and checked against
the architecture params.yaml gives it (`base` section): a mismatch is a ValueError that names the
params keys and the file, before anything is saved."""

from collections.abc import Sequence

from ..config import BaseConfig
from .contract import MaskedBase
from .maskgit import load_maskgit_imagenet


def load_published(b: BaseConfig, image_size: int,
                   uncond_prompt: Sequence[int] | None = None) -> tuple[MaskedBase, dict]:
    """The published base of `b.published.files` and what its checkpoint config adds.

    image_size: data.image_size; uncond_prompt: the unconditional template's ids (DiMOO only)."""
    files = b.published.files
    if b.name == "dimoo":
        from .dimoo import load_dimoo  # imports transformers: only for a DiMOO base

        base = load_dimoo(files["model"], image_size=image_size, prompt_len=b.published.prompt_len,
                          uncond_prompt=uncond_prompt)
        cfg = base.llada.config
        found = {"depth": cfg.n_layers, "width": cfg.d_model, "heads": cfg.n_heads,
                 "mlp_ratio": cfg.hidden / cfg.d_model}
        wrong = [f"base.{k}={getattr(b, k)} (config.json: {v})"
                 for k, v in found.items() if getattr(b, k) != v]
        if wrong:
            raise ValueError(f"{files['model']}/config.json does not match params.yaml: "
                             f"{', '.join(wrong)}")
        # the decoder stays a diffusers model read from the published folder
        return base, {"vq": files["model"]}
    try:
        base = load_maskgit_imagenet(
            files["transformer"], files["vqgan"], image_size, vqgan_yaml=files.get("vqgan_yaml"),
            hidden_dim=b.width, depth=b.depth, heads=b.heads, mlp_dim=round(b.width * b.mlp_ratio),
            codebook_size=b.published.codebook_size, num_classes=b.published.num_classes)
    except ValueError as err:  # a misfit tensor names itself; add the params keys behind its shape
        raise ValueError(f"{err}\n(the expected shapes come from base.depth/width/heads/mlp_ratio, "
                         "base.published.codebook_size/num_classes and data.image_size)") from err
    return base, {}
