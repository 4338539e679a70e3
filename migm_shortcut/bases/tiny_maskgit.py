"""A small class-conditional MaskGIT, trained from scratch by this project (the default base).

Sequence = [class slot, L image tokens]. A bidirectional pre-norm transformer reads it; its final
LayerNorm output is the feature f. The head is weight-tied to the token embedding plus a
per-position bias, as in the reference MaskGIT. The class slot takes `num_classes` (the null class)
with probability `label_dropout` during training, which gives classifier-free guidance its
unconditional branch.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import attention
from ..tokenizer import VQTokenizer
from .contract import MaskedBase


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(attention(*self.qkv(x).chunk(3, dim=-1), self.heads))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyMaskGIT(MaskedBase):
    def __init__(self, tokenizer: VQTokenizer, *, num_classes: int, depth: int, width: int, heads: int,
                 mlp_ratio: float = 4.0, label_dropout: float = 0.1):
        super().__init__()
        self.tokenizer = tokenizer.requires_grad_(False)  # frozen; part of the checkpoint so it is self-contained
        self.grid = tokenizer.grid
        self.num_tokens = self.grid[0] * self.grid[1]
        self.codebook_size = tokenizer.codebook_size
        self.mask_id = self.codebook_size
        self.num_classes = num_classes
        self.null_class = num_classes
        self.seq_len = self.num_tokens + 1
        self.dim = width
        self.label_dropout = label_dropout

        self.tok_emb = nn.Embedding(self.codebook_size + 1, width)  # + the mask token
        self.cls_emb = nn.Embedding(num_classes + 1, width)  # + the null class
        self.pos_emb = nn.Parameter(torch.randn(self.seq_len, width) * 0.02)
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.bias = nn.Parameter(torch.zeros(self.num_tokens, self.codebook_size))
        self.register_buffer("_image_positions", torch.arange(1, self.seq_len), persistent=False)
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.trunc_normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    @property
    def image_positions(self) -> torch.Tensor:
        return self._image_positions

    def features(self, tokens: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.cls_emb(cond)[:, None], self.tok_emb(tokens)], dim=1) + self.pos_emb
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def head(self, f: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        bias = self.bias if positions is None else self.bias[positions]
        w = self.tok_emb.weight[: self.codebook_size]
        return self.image_features(f, positions) @ w.T.to(f.dtype) + bias.to(f.dtype)

    def embed_tokens(self, ids: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        pos = self.pos_emb[1:]
        return self.tok_emb(ids) + (pos if positions is None else pos[positions])

    def uncond(self, cond: torch.Tensor) -> torch.Tensor:
        return torch.full_like(cond, self.null_class)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.tokenizer.decode(tokens)

    def transformer_parameters(self) -> int:
        return sum(p.numel() for n, p in self.named_parameters() if not n.startswith("tokenizer."))

    def loss(self, codes: torch.Tensor, labels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """MaskGIT training loss: mask a cosine-distributed fraction of tokens, predict them (CE)."""
        B, L = codes.shape
        dev = codes.device
        u = torch.rand(B, 1, device=dev, generator=generator)
        num_masked = torch.ceil(torch.cos(u * math.pi / 2) * L).clamp(min=1)
        rank = torch.rand(B, L, device=dev, generator=generator).argsort(dim=1).argsort(dim=1)
        masked = rank < num_masked
        drop = torch.rand(B, device=dev, generator=generator) < self.label_dropout
        cond = torch.where(drop, torch.full_like(labels, self.null_class), labels)
        logits = self.head(self.features(torch.where(masked, self.mask_id, codes), cond))
        return F.cross_entropy(logits[masked], codes[masked])
