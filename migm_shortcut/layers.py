"""What the models share, so that no model imports another: the rotary embedding of LLaDA (the
DiMOO base and the DiMOO shortcut variant) and the context a rotary base hands its shortcut."""

from dataclasses import dataclass

import torch


@dataclass
class ShortcutContext:
    """What a rotary base (DiMOO) adds to the shortcut's inputs, row by row (B rows of features).

    The prompt tokens are cross-attention keys beside the new tokens (the reference shortcut sees
    the whole prefix before the image in the conditional branch only: `prompt_valid` is False for
    the unconditional rows and for padding).
    """

    positions: torch.Tensor  # [B, S] rotary position of each feature position
    valid: torch.Tensor  # [B, S] False at prompt padding: no key for self-attention, no loss
    image_index: torch.Tensor  # [L] index of each image token in the feature sequence
    prompt: torch.Tensor  # [B, P, D] frozen base embeddings of the prompt tokens
    prompt_index: torch.Tensor  # [P] their indices in the feature sequence
    prompt_valid: torch.Tensor  # [B, P]
    rope_theta: float


def rotate(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary embedding in LLaDA's rotate-half layout, in float32: x [B, h, T, d], positions [B, T].

    Shared by the DiMOO base (bases/dimoo.py) and the DiMOO shortcut variant."""
    d = x.shape[-1]
    inv_freq = 1.0 / theta ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d)
    angles = positions.float()[:, None, :, None] * inv_freq
    angles = torch.cat([angles, angles], -1)
    x1, x2 = x.float().chunk(2, dim=-1)
    return (x.float() * angles.cos() + torch.cat([-x2, x1], -1) * angles.sin()).to(x.dtype)
