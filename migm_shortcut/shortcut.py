"""The MIGM-Shortcut model (SPEC section 4): the MaskGIT variant, and the DiMOO variant.

    f_next = f + Out(adaLN_t(Block(Down(f), Down'(embed(new tokens)))))

The block works at the bottleneck width D/k: cross-attention from the feature stream to the tokens
committed at the previous step (what changed), an FFN, self-attention, another FFN. The
cross-attention may have more heads than the self-attention (`cross_heads`): one head averages a
step's few new tokens into one vector, several keep them apart. The mask ratio of the state being
predicted is the time input (t = 1000 r, sinusoidal, MLP, adaptive LayerNorm).
The output projection starts at zero, so an untrained shortcut is exactly the "reuse" baseline and
training learns only the feature's change over the step.

The frozen base embeddings of the new tokens are computed by the caller (`base.embed_tokens`): the
shortcut never holds the base's tables, so they are neither trained nor saved twice.

The DiMOO variant (`ShortcutSpec(variant="dimoo")`, SPEC sections 4 and 9) has LLaDA-style blocks
(RMSNorm, rotary attention without biases, SwiGLU) and needs a `ShortcutContext` from the base:
the rotary positions of the feature sequence, and the prompt tokens, which join the new tokens as
cross-attention keys in the conditional branch.
"""

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from .checkpoint import load_model
from .layers import RMSNorm, ShortcutContext, attention, flat_index, rows_at, swiglu


@dataclass(frozen=True)
class ShortcutSpec:
    dim: int  # D of the base features
    bottleneck_ratio: int = 2
    blocks: int = 1
    heads: int = 4
    cross_heads: int | None = None  # heads of the cross-attention to the new tokens; None: `heads`
    # Hidden width of the FFN (before, after) the self-attention, in multiples of the width; None:
    # the variant's own (MaskGIT's GELU FFNs 4x, the SPEC's; DiMOO's SwiGLU 6x, the reference's).
    ffn_ratios: tuple[int, int] | None = None
    cross_attention: bool = True
    time_embedding: bool = True
    variant: str = "maskgit"  # or "dimoo": LLaDA-style blocks with rotary positions (needs a ShortcutContext)

    @classmethod
    def of(cls, config, dim: int, variant: str) -> "ShortcutSpec":
        """The spec params.yaml's `shortcut` section gives a shortcut for a base of width `dim`
        whose features call for `variant` (its `shortcut_variant`)."""
        return cls(dim=dim, bottleneck_ratio=config.bottleneck_ratio, blocks=config.blocks, heads=config.heads,
                   cross_heads=config.cross_heads, ffn_ratios=config.ffn_ratios,
                   cross_attention=config.cross_attention, time_embedding=config.time_embedding,
                   variant=variant)

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown shortcut variant {self.variant!r}; known: {', '.join(VARIANTS)}")

    def to_dict(self) -> dict:
        return asdict(self)


VARIANTS = ("maskgit", "dimoo")


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, bias: bool = True):
        super().__init__()
        self.heads = heads
        self.q, self.kv, self.proj = nn.Linear(dim, dim, bias), nn.Linear(dim, 2 * dim, bias), nn.Linear(dim, dim, bias)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None,
                rope: tuple[torch.Tensor, torch.Tensor, float] | None = None) -> torch.Tensor:
        """rope: (query positions [B, S], key positions [B, T], theta) for rotary attention."""
        k, v = self.kv(context).chunk(2, dim=-1)
        if mask is None and rope is None and self.heads * k.shape[1] <= x.shape[-1]:
            return self._over_few_keys(x, k, v)
        return self.proj(attention(self.q(x), k, v, self.heads, mask, rope))

    def _over_few_keys(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The same attention when heads x keys <= width (the few tokens a sampling step commits).

        Each head's query and output projections move onto its keys and values: q_h . k =
        x . (Wq_h^T k) + bq_h . k, and Wo_h (a v) = a (Wo_h v). Nothing is then projected at the S
        query positions, and the softmax runs over the key axis with the S positions innermost:
        torch's CPU softmax is slow over a short last axis (BENCHMARKS.md, section 1)."""
        B, T, D = k.shape
        h = self.heads
        w = D // h
        k = k.view(B, T, h, w) * w**-0.5
        q_bias = k.new_zeros(D) if self.q.bias is None else self.q.bias  # no tensor made per call
        out_bias = k.new_zeros(D) if self.proj.bias is None else self.proj.bias  # when biased
        keys = torch.einsum("bthw,hwd->bhtd", k, self.q.weight.view(h, w, D)).reshape(B, h * T, D)
        key_bias = torch.einsum("bthw,hw->bht", k, q_bias.view(h, w)).reshape(B, h * T, 1)
        values = torch.einsum("bthw,dhw->bhtd", v.view(B, T, h, w), self.proj.weight.view(D, h, w))
        scores = torch.baddbmm(key_bias, keys, x.transpose(1, 2)).view(B, h, T, -1)  # [B, h, T, S]
        weights = scores.softmax(2).view(B, h * T, -1).transpose(1, 2)
        return torch.baddbmm(out_bias, weights, values.reshape(B, h * T, D))


def ffn(dim: int, ratio: int = 4) -> nn.Module:
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, ratio * dim), nn.GELU(), nn.Linear(ratio * dim, dim))


class SwiGLU(nn.Module):
    """LLaDA's pre-norm FFN. Hidden 6x the width: the reference keeps the base's 12288 at width 2048."""

    def __init__(self, dim: int, ratio: int = 6):
        super().__init__()
        hidden = ratio * dim
        self.norm = RMSNorm(dim)
        self.gate, self.up = nn.Linear(dim, hidden, False), nn.Linear(dim, hidden, False)
        self.down = nn.Linear(hidden, dim, False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return swiglu(self.norm(x), self.gate, self.up, self.down)


class ShortcutBlock(nn.Module):
    """Pre-norm residual: [cross-attention to new tokens, FFN,] self-attention, FFN, sized by `spec`.

    The DiMOO variant (`llada`): RMSNorm, SwiGLU, no biases, rotary attention; as in the reference,
    the cross-attention norm also normalises the keys (they are raw token embeddings there).
    """

    def __init__(self, dim: int, spec: ShortcutSpec):
        super().__init__()
        llada = self.llada = spec.variant == "dimoo"
        norm = RMSNorm if llada else nn.LayerNorm
        make_ffn = SwiGLU if llada else ffn
        before, after = spec.ffn_ratios or ((6, 6) if llada else (4, 4))
        cross = dict(norm=norm(dim), attn=Attention(dim, spec.cross_heads or spec.heads, not llada),
                     ffn=make_ffn(dim, before))
        self.cross = nn.ModuleDict(cross) if spec.cross_attention else None
        self.self_norm, self.self_attn = norm(dim), Attention(dim, spec.heads, not llada)
        self.ffn = make_ffn(dim, after)

    def forward(self, x: torch.Tensor, new: torch.Tensor, new_mask: torch.Tensor | None,
                context: ShortcutContext | None = None, key_positions: torch.Tensor | None = None,
                at: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, S, d] -> [B, S, d], or [B, P, d] at the positions `at` [B, P] alone: every position
        is still a self-attention key, but only those are queries, and only they take the last FFN."""
        cross_rope = self_rope = self_mask = None
        if context is not None:
            cross_rope = (context.positions, key_positions, context.rope_theta)
            query_positions = context.positions if at is None else context.positions.gather(1, at)
            self_rope = (query_positions, context.positions, context.rope_theta)
            self_mask = context.valid[:, None, None, :]
        if self.cross is not None:
            kv = self.cross.norm(new) if self.llada else new
            if new_mask is None:  # every key is a new token (the sampler gathers them)
                x = x + self.cross.attn(self.cross.norm(x), kv, None, cross_rope)
            else:
                # A row with no new token would attend to nothing (NaN): let it see all, zero the result.
                has_new = new_mask.any(1)
                keys = (new_mask | ~has_new[:, None])[:, None, None, :]
                gate = has_new[:, None, None].to(x.dtype)
                x = x + self.cross.attn(self.cross.norm(x), kv, keys, cross_rope) * gate
            x = x + self.cross.ffn(x)
        h = self.self_norm(x)
        queries = h
        if at is not None:
            x, queries = rows_at(x, at), rows_at(h, at)
        x = x + self.self_attn(queries, h, self_mask, self_rope)
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
        for key in ("heads", "cross_heads"):
            if d % (getattr(spec, key) or 1):
                raise ValueError(f"shortcut.{key}={getattr(spec, key)} must divide the bottleneck width {d}")
        llada = spec.variant == "dimoo"
        self.down = nn.Linear(D, d)
        self.down_new = nn.Linear(D, d) if spec.cross_attention else None
        self.blocks = nn.ModuleList(ShortcutBlock(d, spec) for _ in range(spec.blocks))
        norm = RMSNorm(d, affine=not spec.time_embedding) if llada else None
        self.norm = norm or nn.LayerNorm(d, elementwise_affine=not spec.time_embedding)
        self.time = nn.Sequential(nn.Linear(256, d), nn.SiLU(), nn.Linear(d, 2 * d)) if spec.time_embedding else None
        self.up = nn.Linear(d, D)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        if self.time is not None:  # start from a plain LayerNorm: scale = shift = 0
            nn.init.zeros_(self.time[-1].weight)
            nn.init.zeros_(self.time[-1].bias)

    def forward(self, f: torch.Tensor, new_embed: torch.Tensor, new_mask: torch.Tensor | None,
                mask_ratio: torch.Tensor, context: ShortcutContext | None = None,
                new_positions: torch.Tensor | None = None, at: torch.Tensor | None = None) -> torch.Tensor:
        """f [B, S, D]; new_embed [B, R, D]: base embeddings of R image tokens, at image token
        indices `new_positions` [B, R] (None: R = L, all in order); new_mask [B, R] marks those
        committed at the previous step (None: all of them are, as when the sampler gathers just
        the new tokens); mask_ratio [B] of the state predicted; context: required by the DiMOO
        variant, refused by the MaskGIT one.

        at [B, P]: the feature positions to predict, the same number in every row (None: all S).
        The others keep f: the sampler reads only the positions still masked, which are also the
        only ones MaskGIT's loss trains (`train_shortcut.shortcut_step` keeps f at the rest too),
        so the last half of the block runs on P of the S positions."""
        if (context is not None) != (self.spec.variant == "dimoo"):
            raise ValueError(f"shortcut variant {self.spec.variant!r} "
                             f"{'needs' if context is None else 'takes no'} base context (rotary positions, prompt)")
        x = self.down(f)
        new = self.down_new(new_embed) if self.down_new is not None else None
        key_positions = None
        if context is not None:  # keys = prompt tokens, then the image tokens, at their own positions
            if new is not None:
                new = torch.cat([self.down_new(context.prompt.to(new_embed.dtype)), new], 1)
            image = context.image_index if new_positions is None else context.image_index[new_positions]
            image = image.expand(len(f), -1)
            if new_mask is None:
                new_mask = torch.ones_like(image, dtype=torch.bool)
            new_mask = torch.cat([context.prompt_valid, new_mask], 1)
            key_index = torch.cat([context.prompt_index.expand(len(f), -1), image], 1)
            key_positions = context.positions.gather(1, key_index)
        for i, block in enumerate(self.blocks):  # every position feeds the next block's keys
            x = block(x, new, new_mask, context, key_positions, at if i == len(self.blocks) - 1 else None)
        x = self.norm(x)
        if self.time is not None:
            scale, shift = self.time(timestep_embedding(1000 * mask_ratio)).chunk(2, dim=-1)
            x = x * (1 + scale[:, None]) + shift[:, None]
        if at is None:
            return f + self.up(x)
        B, S, D = f.shape  # each position at most once in a row: the update lands on its own f
        update = self.up(x).flatten(0, 1).to(f.dtype)
        return f.reshape(B * S, D).index_add(0, flat_index(at, S), update).view(B, S, D)


def compiled(shortcut: Shortcut) -> nn.Module:
    """The shortcut under torch.compile, shapes dynamic: the number of new tokens changes from step
    to step and one graph serves every count. A step of this small model is mostly element-wise
    work (norms, activations, residuals) that compilation fuses (BENCHMARKS.md, section 1)."""
    return torch.compile(shortcut, dynamic=True)


def load_shortcut(path: str | Path, base_id: str) -> Shortcut:
    """The trained shortcut of `path`; refused when it was trained on another base's features."""
    model, config = load_model(path, lambda c: Shortcut(ShortcutSpec(**c["spec"])))
    if config["base_id"] != base_id:
        raise ValueError(f"{path} was trained on base {config['base_id']}, not {base_id}: rerun train_shortcut")
    return model
