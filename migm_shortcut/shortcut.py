"""The MIGM-Shortcut model (SPEC section 4, MaskGIT variant).

    f_next = f + Out(adaLN_t(Block(Down(f), Down'(embed(new tokens)))))

The block works at the bottleneck width D/k: cross-attention from the feature stream to the tokens
committed at the previous step (what changed), an FFN, self-attention, another FFN. The mask ratio
of the state being predicted is the time input (t = 1000 r, sinusoidal, MLP, adaptive LayerNorm).
The output projection starts at zero, so an untrained shortcut is exactly the "reuse" baseline and
training learns only the feature's change over the step.

The frozen base embeddings of the new tokens are computed by the caller (`base.embed_tokens`): the
shortcut never holds the base's tables, so they are neither trained nor saved twice.
"""

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class ShortcutSpec:
    dim: int  # D of the base features
    bottleneck_ratio: int = 2
    blocks: int = 1
    heads: int = 4
    cross_attention: bool = True
    time_embedding: bool = True

    def to_dict(self) -> dict:
        return asdict(self)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q, self.kv, self.proj = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        B, S, D = x.shape
        h = self.heads
        q = self.q(x).view(B, S, h, D // h).transpose(1, 2)
        k, v = self.kv(context).view(B, -1, 2, h, D // h).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(y.transpose(1, 2).reshape(B, S, D))


def ffn(dim: int) -> nn.Module:
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))


class ShortcutBlock(nn.Module):
    """Pre-norm residual: [cross-attention to new tokens, FFN,] self-attention, FFN."""

    def __init__(self, dim: int, heads: int, cross_attention: bool):
        super().__init__()
        self.cross = nn.ModuleDict(dict(norm=nn.LayerNorm(dim), attn=Attention(dim, heads), ffn=ffn(dim))) if cross_attention else None
        self.self_norm, self.self_attn, self.ffn = nn.LayerNorm(dim), Attention(dim, heads), ffn(dim)

    def forward(self, x: torch.Tensor, new: torch.Tensor, new_mask: torch.Tensor) -> torch.Tensor:
        if self.cross is not None:
            # A row with no new token would attend to nothing (NaN): let it see all and zero the result.
            has_new = new_mask.any(1)
            keys = (new_mask | ~has_new[:, None])[:, None, None, :]
            x = x + self.cross.attn(self.cross.norm(x), new, keys) * has_new[:, None, None].to(x.dtype)
            x = x + self.cross.ffn(x)
        h = self.self_norm(x)
        x = x + self.self_attn(h, h)
        return x + self.ffn(x)


def timestep_embedding(t: torch.Tensor, dim: int = 256) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class Shortcut(nn.Module):
    def __init__(self, spec: ShortcutSpec):
        super().__init__()
        self.spec = spec
        D, d = spec.dim, spec.dim // spec.bottleneck_ratio
        if d % spec.heads:
            raise ValueError(f"shortcut.heads={spec.heads} must divide the bottleneck width {d}")
        self.down = nn.Linear(D, d)
        self.down_new = nn.Linear(D, d) if spec.cross_attention else None
        self.blocks = nn.ModuleList(ShortcutBlock(d, spec.heads, spec.cross_attention) for _ in range(spec.blocks))
        self.norm = nn.LayerNorm(d, elementwise_affine=not spec.time_embedding)
        self.time = nn.Sequential(nn.Linear(256, d), nn.SiLU(), nn.Linear(d, 2 * d)) if spec.time_embedding else None
        self.up = nn.Linear(d, D)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        if self.time is not None:  # start from a plain LayerNorm: scale = shift = 0
            nn.init.zeros_(self.time[-1].weight)
            nn.init.zeros_(self.time[-1].bias)

    def forward(self, f: torch.Tensor, new_embed: torch.Tensor, new_mask: torch.Tensor, mask_ratio: torch.Tensor) -> torch.Tensor:
        """f [B, S, D]; new_embed [B, L, D] (base embedding of the current tokens); new_mask [B, L]
        marks the tokens committed at the previous step; mask_ratio [B] of the state predicted."""
        x = self.down(f)
        new = self.down_new(new_embed) if self.down_new is not None else None
        for block in self.blocks:
            x = block(x, new, new_mask)
        x = self.norm(x)
        if self.time is not None:
            scale, shift = self.time(timestep_embedding(1000 * mask_ratio)).chunk(2, dim=-1)
            x = x * (1 + scale[:, None]) + shift[:, None]
        return f + self.up(x)
