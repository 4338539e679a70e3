"""What the models share, so that no model imports another: multi-head attention and the rows of a
feature sequence at some positions (every base and the shortcut), LLaDA's RMS norm, SwiGLU and
rotary embedding (the DiMOO base and the DiMOO shortcut variant) and the context a rotary base
hands its shortcut."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


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


class RMSNorm(nn.Module):
    """LLaDA's RMS norm: normalised in float32, back in the input's dtype, then scaled by `weight`
    (no bias). affine=False: no weight, for a norm that something else scales (adaptive norm)."""

    def __init__(self, dim: int, eps: float = 1e-5, affine: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.float()
        y = (y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
        return y if self.weight is None else self.weight * y


def swiglu(x: torch.Tensor, gate: nn.Module, up: nn.Module, down: nn.Module) -> torch.Tensor:
    """LLaDA's FFN on (normed) x: down(silu(gate(x)) * up(x)). The projections stay the caller's
    modules, under the names its checkpoints use."""
    return down(F.silu(gate(x)) * up(x))


def rotate(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary embedding in LLaDA's rotate-half layout, in float32: x [B, h, T, d], positions [B, T].

    Shared by the DiMOO base (bases/dimoo.py) and the DiMOO shortcut variant."""
    d = x.shape[-1]
    inv_freq = 1.0 / theta ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d)
    angles = positions.float()[:, None, :, None] * inv_freq
    angles = torch.cat([angles, angles], -1)
    x1, x2 = x.float().chunk(2, dim=-1)
    return (x.float() * angles.cos() + torch.cat([-x2, x1], -1) * angles.sin()).to(x.dtype)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, mask: torch.Tensor | None = None,
              rope: tuple[torch.Tensor, torch.Tensor, float] | None = None) -> torch.Tensor:
    """Multi-head scaled dot-product attention of projected queries q [B, S, D] over keys and values
    k, v [B, T, D'] -> [B, S, D], before the output projection. D' = D, or fewer heads of the same
    width that groups of query heads share (LLaDA's grouped-query attention). mask: boolean, True
    where a query may attend [B or 1, 1 or heads, S or 1, T]; rope: (query positions [B, S], key
    positions [B, T], theta) for rotary attention."""
    B, S, D = q.shape
    width = D // heads
    q = q.view(B, S, heads, width).transpose(1, 2)
    k, v = (t.view(B, t.shape[1], -1, width).transpose(1, 2) for t in (k, v))
    if rope is not None:
        q, k = rotate(q, rope[0], rope[2]), rotate(k, rope[1], rope[2])
    if k.shape[1] != heads:
        k, v = k.repeat_interleave(heads // k.shape[1], dim=1), v.repeat_interleave(heads // v.shape[1], dim=1)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return y.transpose(1, 2).reshape(B, S, D)


def rows_at(x: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
    """x [B, S, d] at the positions at [B, P]: [B, P, d]. One row gather over the flattened batch:
    `gather` along dim 1 reads element by element, 6-11 times slower at a sampling step's shapes."""
    B, S, d = x.shape
    return x.reshape(B * S, d).index_select(0, flat_index(at, S)).view(B, -1, d)


def flat_index(at: torch.Tensor, S: int) -> torch.Tensor:
    """Positions at [B, P] in rows S long, as indices into the B * S rows of the flattened batch."""
    return (at + S * torch.arange(len(at), device=at.device)[:, None]).flatten()
