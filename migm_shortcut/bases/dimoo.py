"""Lumina-DiMOO (text to image) behind the MaskedBase contract, loaded through `transformers`.

Written from a reading of the published code (files listed in tests/dimoo_manifest.py); nothing is
copied. The backbone is LLaDA: a bidirectional Llama (RMSNorm, rotary attention, SwiGLU, no biases,
untied output projection). Module and parameter *names* follow the published `LLaDAModelLM`
(`model.transformer.{wte, blocks.{i}.*, ln_f, ff_out}`), so its `model.safetensors` (or sharded
index) loads by name, strictly.

Sequence of one row (SPEC section 9; `code_start` = P + 2):

    [pad...] prompt ids | BOA BOI | rows x (cols image tokens, NEWLINE) | EOI EOA

The condition is the tokenized prompt template (system/user text) left-padded to P ids with
`pad_id`. Padding is excluded from attention and the rotary positions count real tokens only, so
every real position computes exactly what the published unpadded forward computes. Image code c is
token `IMAGE_OFFSET + c`; the contract's tokens are codes 0..K-1 with mask_id = K, mapped to the
published MASK id inside. The unconditional branch is the published "<uncondition>" prompt,
tokenized by the caller (`uncond_prompt`); cond and uncond rows of one batch are independent rows.
"""

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import PretrainedConfig

from ..checkpoint import load_state_strict
from ..layers import RMSNorm, ShortcutContext, attention, swiglu
from .contract import MaskedBase

# Token map (published config.py SPECIAL_TOKENS; SPEC section 9).
MASK = 126336
NEWLINE = 126084
IMAGE_OFFSET = 126356
CODEBOOK = 8192
BOA, EOA, BOI, EOI = 126354, 126355, 126349, 126350
UNCONDITION = 126351  # inside the unconditional prompt template
PAD = 126081  # LLaDA's pad/eos id, used when config.json names none
PATCH = 16  # the VQ model downsamples by 16
SYSTEM_PROMPT = "Generate an image according to the text prompt."  # the published text-to-image system prompt


class LLaDAConfig(PretrainedConfig):
    """The published config.json fields the forward depends on (LLaDA-8B values as defaults)."""

    model_type = "llada"

    def __init__(self, d_model=4096, n_heads=32, n_kv_heads=None, n_layers=32, mlp_ratio=4, mlp_hidden_size=None,
                 vocab_size=126464, embedding_size=None, rope_theta=500000.0, rms_norm_eps=1e-5, **kwargs):
        self.d_model, self.n_heads, self.n_kv_heads, self.n_layers = d_model, n_heads, n_kv_heads, n_layers
        self.mlp_ratio, self.mlp_hidden_size = mlp_ratio, mlp_hidden_size
        self.vocab_size, self.embedding_size = vocab_size, embedding_size
        self.rope_theta, self.rms_norm_eps = rope_theta, rms_norm_eps
        super().__init__(**kwargs)

    # What the published code could switch on but DiMOO does not: refuse rather than compute wrong.
    FIXED = {"block_type": "llama", "layer_norm_type": "rms", "activation_type": "silu", "include_bias": False,
             "include_qkv_bias": False, "weight_tying": False, "rope": True, "alibi": False,
             "input_emb_norm": False, "scale_logits": False, "attention_layer_norm": False}

    def check(self, source: str) -> None:
        wrong = [f"{k}={getattr(self, k)!r} (expected {v!r})" for k, v in self.FIXED.items()
                 if getattr(self, k, v) != v]
        if wrong:
            raise ValueError(f"{source}: unsupported LLaDA config: {', '.join(wrong)}")
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise ValueError(f"{source}: d_model={self.d_model} needs an even head size over n_heads={self.n_heads}")

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def hidden(self) -> int:
        return self.mlp_hidden_size or self.mlp_ratio * self.d_model

    @property
    def vocab(self) -> int:
        return self.embedding_size or self.vocab_size


class LLaDALlamaBlock(nn.Module):
    def __init__(self, cfg: LLaDAConfig):
        super().__init__()
        D, hd = cfg.d_model, cfg.d_model // cfg.n_heads
        self.cfg = cfg
        self.attn_norm, self.ff_norm = RMSNorm(D, cfg.rms_norm_eps), RMSNorm(D, cfg.rms_norm_eps)
        self.q_proj = nn.Linear(D, D, bias=False)
        self.k_proj = nn.Linear(D, cfg.kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(D, cfg.kv_heads * hd, bias=False)
        self.attn_out = nn.Linear(D, D, bias=False)
        self.ff_proj = nn.Linear(D, cfg.hidden, bias=False)  # SwiGLU gate
        self.up_proj = nn.Linear(D, cfg.hidden, bias=False)
        self.ff_out = nn.Linear(cfg.hidden, D, bias=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        xn = self.attn_norm(x)
        y = attention(self.q_proj(xn), self.k_proj(xn), self.v_proj(xn), self.cfg.n_heads,  # bidirectional
                      keys[:, None, None, :], (positions, positions, self.cfg.rope_theta))
        x = x + self.attn_out(y)
        return x + swiglu(self.ff_norm(x), self.ff_proj, self.up_proj, self.ff_out)


class LLaDAModelLM(nn.Module):
    """The published LLaDAModelLM's parameters (names and shapes) and forward up to the last norm."""

    def __init__(self, cfg: LLaDAConfig):
        super().__init__()
        self.config = cfg
        self.model = nn.Module()
        self.model.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.vocab, cfg.d_model),
            blocks=nn.ModuleList(LLaDALlamaBlock(cfg) for _ in range(cfg.n_layers)),
            ln_f=RMSNorm(cfg.d_model, cfg.rms_norm_eps),
            ff_out=nn.Linear(cfg.d_model, cfg.vocab, bias=False),
        ))  # fmt: skip

    def forward(self, ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """ids [B, T], valid [B, T] (False: padding) -> hidden state after ln_f [B, T, D]."""
        t = self.model.transformer
        positions = (valid.long().cumsum(1) - 1).clamp(min=0)  # padding does not shift positions
        x = t.wte(ids)
        for block in t.blocks:
            x = block(x, positions, valid)
        return t.ln_f(x)


def read_state(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of `model.safetensors` or of the shards a `model.safetensors.index.json` lists."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{folder}: neither model.safetensors nor model.safetensors.index.json (download "
                                "Alpha-VLLM/Lumina-DiMOO from Hugging Face into this folder)")
    state = {}
    for name in files:
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name}: shard listed in the index is missing")
        state.update(load_file(folder / name))
    return state


class LuminaDiMOO(MaskedBase):
    """Lumina-DiMOO text-to-image as a MaskedBase; conditions are left-padded prompt ids [B, P].

    decoder: a callable mapping codes [B, rows, cols] to images [B, 3, H, W] in [0, 1] (`VQDecoder`
    wraps the published one); `decode` needs it, nothing else does.
    """

    shortcut_variant = "dimoo"

    def __init__(self, llada: LLaDAModelLM, *, image_size: int = 1024, prompt_len: int, uncond_prompt: Sequence[int],
                 decoder: Callable[[torch.Tensor], torch.Tensor] | None = None, source: str = "config"):
        super().__init__()
        cfg = llada.config
        cfg.check(source)
        if image_size % PATCH:
            raise ValueError(f"image_size={image_size} must be a multiple of {PATCH} (the VQ downsampling)")
        if cfg.vocab < IMAGE_OFFSET + CODEBOOK:
            raise ValueError(f"{source}: vocabulary {cfg.vocab} does not hold image codes {IMAGE_OFFSET}..{IMAGE_OFFSET + CODEBOOK - 1}")
        if not 0 < len(uncond_prompt) <= prompt_len:
            raise ValueError(f"the unconditional prompt ({len(uncond_prompt)} ids) must fit prompt_len={prompt_len}")
        side = image_size // PATCH
        self.grid = (side, side)
        self.num_tokens, self.codebook_size, self.mask_id, self.dim = side * side, CODEBOOK, CODEBOOK, cfg.d_model
        self.prompt_len, self.image_size, self.uncond_prompt = prompt_len, image_size, list(uncond_prompt)
        self.pad_id = PAD if cfg.pad_token_id is None else cfg.pad_token_id
        self.llada = llada
        self.decoder = decoder
        code_start = prompt_len + 2
        image = code_start + torch.arange(side)[:, None] * (side + 1) + torch.arange(side)[None]
        self.seq_len = code_start + side * (side + 1) + 2
        self.register_buffer("_image_positions", image.flatten(), persistent=False)
        # The image segment around the tokens: markers and row separators (filled per batch).
        segment = torch.full((self.seq_len - prompt_len,), NEWLINE)
        segment[:2] = torch.tensor([BOA, BOI])
        segment[-2:] = torch.tensor([EOI, EOA])
        self.register_buffer("_segment", segment, persistent=False)
        self.register_buffer("_uncond", self.pad_prompts([list(uncond_prompt)])[0], persistent=False)

    @property
    def image_positions(self) -> torch.Tensor:
        return self._image_positions

    def config(self) -> dict:
        """The builder config that rebuilds this (unloaded) module from the project's checkpoint."""
        dtype = next(self.llada.parameters()).dtype
        return {"kind": "dimoo", "llada": self.llada.config.to_diff_dict(), "dtype": str(dtype).removeprefix("torch."),
                "image_size": self.image_size, "prompt_len": self.prompt_len, "uncond_prompt": self.uncond_prompt}

    def transformer_parameters(self) -> int:
        return sum(p.numel() for p in self.llada.parameters())

    def pad_prompts(self, prompts: Sequence[Sequence[int]]) -> torch.Tensor:
        """Tokenized prompts (lists of ids) -> the condition tensor [B, P], left-padded."""
        if too_long := [len(p) for p in prompts if not 0 < len(p) <= self.prompt_len]:
            raise ValueError(f"prompts of {too_long} ids do not fit prompt_len={self.prompt_len}")
        return torch.tensor([[self.pad_id] * (self.prompt_len - len(p)) + list(p) for p in prompts])

    def _sequence(self, tokens: torch.Tensor, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if cond.ndim != 2 or cond.shape[1] != self.prompt_len:
            raise ValueError(f"conditions must be prompt ids [B, {self.prompt_len}], got {tuple(cond.shape)}")
        ids = torch.cat([cond, self._segment.expand(len(cond), -1)], 1)
        ids[:, self.image_positions] = torch.where(tokens == self.mask_id, MASK, tokens + IMAGE_OFFSET)
        valid = torch.ones_like(ids, dtype=torch.bool)
        # Left padding: the padded prefix, up to the first real prompt id.
        valid[:, : self.prompt_len] = (cond != self.pad_id).long().cummax(1).values.bool()
        return ids, valid

    def features(self, tokens: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.llada(*self._sequence(tokens, cond))

    def head(self, f: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        w = self.llada.model.transformer.ff_out.weight[IMAGE_OFFSET : IMAGE_OFFSET + CODEBOOK]
        return self.image_features(f, positions) @ w.T.to(f.dtype)

    def embed_tokens(self, ids: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Rotary base: no position table (the DiMOO shortcut rotates keys at their positions)."""
        return self.llada.model.transformer.wte(torch.where(ids == self.mask_id, MASK, ids + IMAGE_OFFSET))

    def uncond(self, cond: torch.Tensor) -> torch.Tensor:
        return self._uncond.expand(len(cond), -1).clone()

    def shortcut_context(self, cond: torch.Tensor) -> ShortcutContext:
        """Rotary positions and the prompt keys for the DiMOO shortcut variant.

        The prompt keys are the whole prefix before the image (prompt, BOA, BOI), as in the
        reference shortcut, and only for conditional rows (a row equal to the unconditional prompt
        sees none)."""
        ids, valid = self._sequence(torch.full((len(cond), self.num_tokens), self.mask_id, device=cond.device), cond)
        prefix = torch.arange(self.prompt_len + 2, device=cond.device)
        conditional = (cond != self._uncond).any(1, keepdim=True)
        return ShortcutContext(
            positions=(valid.long().cumsum(1) - 1).clamp(min=0), valid=valid, image_index=self.image_positions,
            prompt=self.llada.model.transformer.wte(ids[:, prefix]), prompt_index=prefix,
            prompt_valid=valid[:, prefix] & conditional, rope_theta=self.llada.config.rope_theta,
        )  # fmt: skip

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.decoder is None:
            raise ValueError("no VQ decoder given: pass decoder= (codes [B, rows, cols] -> images in [0, 1])")
        codes = tokens.clamp(0, self.codebook_size - 1).view(-1, *self.grid)
        return self.decoder(codes).float().clamp(0, 1)


class VQDecoder:
    """The published VQ model as `decoder`: image codes [B, rows, cols] -> images [B, 3, H, W] in [0, 1].

    It is a diffusers `VQModel` in `<folder>/vqvae` (Alpha-VLLM/Lumina-DiMOO's own folder), decoded
    as the published `utils/image_utils.decode_vq_to_image` does: code indices (without the
    vocabulary offset) looked up in the codebook, no re-quantization, output already in [0, 1]
    (its image processor does not normalise). A plain callable, not a module: the base's state
    dict (and so the project checkpoint) holds only the transformer; the decoder follows the
    device of the codes it is given."""

    def __init__(self, folder: str | Path):
        try:
            from diffusers import VQModel
        except ImportError as err:
            raise ImportError("decoding Lumina-DiMOO images needs diffusers (`pip install diffusers`): "
                              "its VQ model is a diffusers VQModel") from err
        if not (Path(folder) / "vqvae").is_dir():
            raise FileNotFoundError(f"{Path(folder) / 'vqvae'} is missing (download Alpha-VLLM/Lumina-DiMOO into {folder})")
        self.vq = VQModel.from_pretrained(str(folder), subfolder="vqvae").eval().requires_grad_(False)
        scale = 2 ** (len(self.vq.config.block_out_channels) - 1)
        if scale != PATCH:
            raise ValueError(f"{folder}/vqvae downsamples by {scale}, not {PATCH}: not Lumina-DiMOO's VQ model")

    @torch.no_grad()
    def __call__(self, codes: torch.Tensor) -> torch.Tensor:
        vq = self.vq.to(codes.device)
        b, rows, cols = codes.shape
        return vq.decode(codes.long(), force_not_quantize=True, shape=(b, rows, cols, vq.config.latent_channels)).sample


def load_dimoo(path: str | Path, *, image_size: int = 1024, prompt_len: int, uncond_prompt: Sequence[int],
               decoder: Callable[[torch.Tensor], torch.Tensor] | None = None,
               device: str | torch.device = "cpu") -> LuminaDiMOO:
    """The published weights from a local folder (config.json + model.safetensors or a sharded
    index), strictly: every missing, unexpected or misshapen tensor is named. Eval mode, frozen."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path / 'config.json'} is missing (download Alpha-VLLM/Lumina-DiMOO into {path})")
    cfg = LLaDAConfig.from_pretrained(path)
    cfg.check(str(path / "config.json"))
    state = read_state(path)
    dtype = next(iter(state.values())).dtype
    with torch.device("meta"):  # no memory (nor random init) for weights about to be replaced
        llada = LLaDAModelLM(cfg).to(dtype)
    load_state_strict(llada.to_empty(device="cpu"), state, str(path))
    base = LuminaDiMOO(llada, image_size=image_size, prompt_len=prompt_len, uncond_prompt=uncond_prompt,
                       decoder=decoder, source=str(path / "config.json"))
    return base.to(device).eval().requires_grad_(False)


def prompt_text(prompt: str | None) -> str:
    """The published text-to-image template around a prompt; None: the unconditional one."""
    return f"<system>{SYSTEM_PROMPT}</system><user>{'<uncondition>' if prompt is None else prompt}</user>"


def tokenize_prompts(folder: str | Path, prompts: Sequence[str]) -> tuple[list[list[int]], list[int]]:
    """(ids of each prompt's template, ids of the unconditional template), tokenized by the
    checkpoint's own text tokenizer as the published code calls it (its default special tokens,
    no truncation, no padding)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    ids = tokenizer([prompt_text(p) for p in prompts], truncation=False, padding=False)["input_ids"]
    return [list(x) for x in ids], list(tokenizer(prompt_text(None), truncation=False, padding=False)["input_ids"])


_CONFIG_KEYS = {"kind", "hash", "path", "llada", "dtype", "image_size", "prompt_len", "uncond_prompt", "vq"}


def build_dimoo(config: dict) -> LuminaDiMOO:
    """Registry builder. With config["path"] (a local folder): the published weights, loaded. With
    config["llada"] (the project's checkpoint, written by `config()`): the architecture unloaded,
    on uninitialised memory that `load_base` fills. With "vq" (the folder holding vqvae/, usually
    the published one) the published VQ decoder too."""
    if unknown := sorted(set(config) - _CONFIG_KEYS):
        raise ValueError(f"dimoo config: unknown keys {unknown}; known: {sorted(_CONFIG_KEYS)}")
    options = dict(image_size=config.get("image_size", 1024), prompt_len=config["prompt_len"],
                   uncond_prompt=config["uncond_prompt"], decoder=VQDecoder(config["vq"]) if "vq" in config else None)
    if "path" in config:
        return load_dimoo(config["path"], **options)
    with torch.device("meta"):  # no memory (nor random init) for weights about to be loaded
        llada = LLaDAModelLM(LLaDAConfig(**config["llada"])).to(getattr(torch, config.get("dtype", "float32")))
    return LuminaDiMOO(llada.to_empty(device="cpu"), source="the base checkpoint's llada config", **options)
