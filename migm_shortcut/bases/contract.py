"""The base-model contract (SPEC section 2): what the samplers and the shortcut need from a MIGM.

Any base (the tiny MaskGIT trained here, the published MaskGIT, Lumina-DiMOO) implements this class;
nothing else in the project knows which base it talks to.
"""

from abc import ABC, abstractmethod

import torch
from torch import nn

from ..layers import rows_at


class MaskedBase(nn.Module, ABC):
    """A masked image generation model split at its last hidden state.

    Shapes: B batch, L image tokens, S = sequence positions the features cover (image tokens plus
    condition slots: class slot, prompt, markers), D feature width, K image codebook size.
    `image_positions` maps image token i to its index in the S-long feature sequence.
    """

    num_tokens: int  # L
    codebook_size: int  # K
    mask_id: int
    seq_len: int  # S
    dim: int  # D
    grid: tuple[int, int]  # image token grid (rows, cols)
    shortcut_variant = "maskgit"  # the shortcut.ShortcutSpec variant that fits these features

    @property
    def image_positions(self) -> torch.Tensor:
        """Index of each image token inside the feature sequence, [L]."""
        raise NotImplementedError

    @abstractmethod
    def features(self, tokens: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """tokens [B, L] (mask_id where masked), cond [B, ...] -> last hidden state [B, S, D]."""

    @abstractmethod
    def head(self, f: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Features [B, S, D] -> logits over the image codebook [B, M, K] at image token indices
        `positions` [B, M] (None: all L in order). The sampler asks only for still-masked ones.

        Affine in f (a projection, plus a bias): the sampler guides the features of the two CFG
        branches before the head instead of their logits (`sampling.guided`), one head, not two."""

    @abstractmethod
    def embed_tokens(self, ids: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """The base's frozen embedding of image tokens `ids` [B, M] at image token indices
        `positions` [B, M] (None: ids cover all L in order) -> [B, M, D].

        MaskGIT adds its position table; bases with rotary positions return the token embedding
        alone (their shortcut applies RoPE at `image_positions`).
        """

    def image_features(self, f: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """The rows of features [B, S, D] at image token indices `positions` [B, M] -> [B, M, D]."""
        if positions is None:
            return f[:, self.image_positions]
        return rows_at(f, self.image_positions[positions])

    def shortcut_context(self, cond: torch.Tensor):
        """Extra shortcut inputs for a batch of conditions [B, ...] (both CFG branches), or None.

        Rotary bases (DiMOO) return a `layers.ShortcutContext` (positions, prompt embeddings);
        MaskGIT's absolute positions are already in `embed_tokens`, so it needs none."""
        return None

    @abstractmethod
    def uncond(self, cond: torch.Tensor) -> torch.Tensor:
        """The unconditional counterpart of a batch of conditions (null class, empty prompt)."""

    @abstractmethod
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Image tokens [B, L] -> images [B, C, H, W] in [0, 1]."""

    @property
    def base_id(self) -> str:
        """Identifies the architecture and weights; stored with trajectories and shortcuts."""
        return getattr(self, "_base_id", type(self).__name__)

    def compile_features(self) -> "MaskedBase":
        """torch.compile the heavy forward, `features`; the sampler loop around it stays eager.

        Compilation happens on the first call of each input shape (a sampling run's warm-up batch)."""
        self.features = torch.compile(self.features)
        return self
