"""The published PyTorch MaskGIT for ImageNet (valeoai/Maskgit-pytorch) behind the MaskedBase contract.

Written from a reading of that repository (the MaskTransformer version; see
tests/maskgit_manifest.py for the files read and the checkpoint layout, key by key). No code is
copied; module and parameter *names* follow the published ones so that its state dicts load
strictly (`load_state_strict`).

Transformer (`MaskGITImageNet.vit`, the checkpoint's 'model_state_dict'):
- Sequence = L image tokens, then one class slot (the class slot is *last*). Vocabulary of one
  shared table: codebook codes 0..K-1, the mask token K, classes at K+1+c, the dropped class at
  K+1+C (the unconditional branch).
- x = tok_emb(ids) + pos_emb; first_layer (LayerNorm, Linear, GELU, LayerNorm, Linear; eps 1e-12);
  `depth` pre-norm blocks (multi-head self-attention with a packed q/k/v projection, GELU MLP);
  last_layer (LayerNorm, Linear, GELU, LayerNorm). The feature f is last_layer's output.
- logits = f @ tok_emb.weight.T + bias (weights tied, a per-position bias over the whole
  vocabulary); the published model keeps image positions and codes 0..K (mask included); the
  contract's head returns codes 0..K-1 (the mask logit is dropped; see MASKGIT_NOTES.md).
- Dropout (0.1 in training) is left out: the base is only ever evaluated.

VQGAN (`MaskGITImageNet.vqgan`, the Lightning checkpoint's 'state_dict'): only what decoding needs
is built: the codebook (quantize.embedding), post_quant_conv and the taming Decoder. The encoder,
quant_conv and the training losses (LPIPS, discriminator) are dropped by prefix
(`VQGAN_IGNORED_PREFIXES`); any other key the model does not have is an error.

Loading: `load_maskgit_imagenet(transformer_path, vqgan_path, image_size)` reads the published
files with `torch.load(weights_only=True)`. Non-tensor objects a Lightning checkpoint pickles
beside the weights (callbacks keyed by class, hyper-parameter containers) are replaced by inert
stand-ins while unpickling: nothing from the file runs, and they are discarded.
"""

import hashlib
import math
import zipfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from torch import nn

from ..checkpoint import load_state_strict
from ..layers import attention
from .contract import MaskedBase

HF_REPO = "llvictorll/Maskgit-pytorch"  # where download_models.py fetches the published files
TRANSFORMER_FILE = "pretrained_maskgit/MaskGIT/MaskGIT_ImageNet_{image_size}.pth"
VQGAN_FILE = "pretrained_maskgit/VQGAN/last.ckpt"
VQGAN_IGNORED_PREFIXES = ("encoder.", "quant_conv.", "loss.")
PATCH = 16  # the VQGAN downsamples by 16: img_size // 16 tokens per side


# --------------------------------------------------------------------------- transformer


class _SelfAttention(nn.Module):
    """Multi-head self-attention stored as torch's nn.MultiheadAttention stores it (in_proj_weight
    = q, k, v stacked on dim 0; out_proj), computed with scaled_dot_product_attention."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        return self.out_proj(attention(*qkv.chunk(3, dim=-1), self.heads))


class _AttentionFn(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.mha = _SelfAttention(dim, heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mha(x)


class _FeedForwardFn(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        # Published indices: 0 Linear, 1 GELU, 2 Dropout, 3 Linear, 4 Dropout (dropout: identity here)
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Identity(), nn.Linear(hidden, dim), nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class _PreNorm(nn.Module):
    def __init__(self, dim: int, fn: nn.Module):
        super().__init__()
        self.norm = nn.LayerNorm(dim)  # default eps 1e-5, as published
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self.norm(x))


class _Encoder(nn.Module):
    def __init__(self, dim: int, depth: int, heads: int, mlp: int):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleList([_PreNorm(dim, _AttentionFn(dim, heads)), _PreNorm(dim, _FeedForwardFn(dim, mlp))])
            for _ in range(depth)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for attn, ff in self.layers:
            x = x + attn(x)
            x = x + ff(x)
        return x


class MaskGITTransformer(nn.Module):
    """The published MaskTransformer's parameters and forward, up to the feature (eval mode)."""

    def __init__(self, *, num_tokens: int, hidden_dim: int, depth: int, heads: int, mlp_dim: int,
                 codebook_size: int, num_classes: int):
        super().__init__()
        D, vocab = hidden_dim, codebook_size + 1 + num_classes + 1
        self.tok_emb = nn.Embedding(vocab, D)
        self.pos_emb = nn.Parameter(nn.init.trunc_normal_(torch.zeros(1, num_tokens + 1, D), std=0.02))
        eps = 1e-12
        # Published indices: 0 LN, 1 Dropout, 2 Linear, 3 GELU, 4 LN, 5 Dropout, 6 Linear
        self.first_layer = nn.Sequential(nn.LayerNorm(D, eps=eps), nn.Identity(), nn.Linear(D, D), nn.GELU(),
                                         nn.LayerNorm(D, eps=eps), nn.Identity(), nn.Linear(D, D))
        self.transformer = _Encoder(D, depth, heads, mlp_dim)
        # Published indices: 0 LN, 1 Dropout, 2 Linear, 3 GELU, 4 LN
        self.last_layer = nn.Sequential(nn.LayerNorm(D, eps=eps), nn.Identity(), nn.Linear(D, D), nn.GELU(),
                                        nn.LayerNorm(D, eps=eps))
        self.bias = nn.Parameter(torch.zeros(num_tokens + 1, vocab))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, L+1] (image tokens, class slot) -> the last_layer output [B, L+1, D]."""
        x = self.tok_emb(ids) + self.pos_emb
        return self.last_layer(self.transformer(self.first_layer(x)))


# --------------------------------------------------------------------------- VQGAN decoder


@dataclass(frozen=True)
class VQGANConfig:
    """The taming VQModel sizes decoding depends on (model.yaml: embed_dim, ddconfig).

    Defaults: taming's ImageNet f16 / 1024-code VQGAN that the published MaskGIT uses. `resolution`
    is the config's training resolution: it fixes where attention sits, whatever the image size.
    """

    embed_dim: int = 256
    z_channels: int = 256
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    resolution: int = 256
    out_ch: int = 3

    @classmethod
    def from_dict(cls, d: dict) -> "VQGANConfig":
        known = {f.name for f in fields(cls)}
        if unknown := sorted(set(d) - known):
            raise ValueError(f"unknown VQGAN config keys {unknown}; known: {sorted(known)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    @classmethod
    def from_yaml(cls, path: str | Path, codebook_size: int | None = None) -> "VQGANConfig":
        """Read the published model.yaml (model.params: embed_dim, n_embed, ddconfig)."""
        params = yaml.safe_load(Path(path).read_text())["model"]["params"]
        dd = params["ddconfig"]
        if codebook_size is not None and params["n_embed"] != codebook_size:
            raise ValueError(f"{path}: n_embed {params['n_embed']} != the transformer's codebook {codebook_size}")
        return cls(embed_dim=params["embed_dim"], z_channels=dd["z_channels"], ch=dd["ch"], ch_mult=tuple(dd["ch_mult"]),
                   num_res_blocks=dd["num_res_blocks"], attn_resolutions=tuple(dd["attn_resolutions"]),
                   resolution=dd["resolution"], out_ch=dd["out_ch"])

    @property
    def downsampling(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


def _group_norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, c, eps=1e-6)


class _ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1, self.conv1 = _group_norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = _group_norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class _AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1-conv projections."""

    def __init__(self, c: int):
        super().__init__()
        self.norm = _group_norm(c)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (p(h).flatten(2).transpose(1, 2)[:, None] for p in (self.q, self.k, self.v))  # [B, 1, HW, C]
        y = F.scaled_dot_product_attention(q, k, v)[:, 0].transpose(1, 2).reshape(B, C, H, W)
        return x + self.proj_out(y)


class _Upsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Decoder(nn.Module):
    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        levels = len(cfg.ch_mult)
        c = cfg.ch * cfg.ch_mult[-1]
        res = cfg.resolution // 2 ** (levels - 1)
        self.conv_in = nn.Conv2d(cfg.z_channels, c, 3, padding=1)
        self.mid = nn.Module()
        self.mid.block_1, self.mid.attn_1, self.mid.block_2 = _ResnetBlock(c, c), _AttnBlock(c), _ResnetBlock(c, c)
        up: list[nn.Module] = [None] * levels  # type: ignore[list-item]
        for i in reversed(range(levels)):  # lowest resolution first; stored by level index
            level = nn.Module()
            level.block, level.attn = nn.ModuleList(), nn.ModuleList()
            cout = cfg.ch * cfg.ch_mult[i]
            for _ in range(cfg.num_res_blocks + 1):
                level.block.append(_ResnetBlock(c, cout))
                c = cout
                if res in cfg.attn_resolutions:
                    level.attn.append(_AttnBlock(c))
            if i != 0:
                level.upsample = _Upsample(c)
                res *= 2
            up[i] = level
        self.up = nn.ModuleList(up)
        self.norm_out = _group_norm(c)
        self.conv_out = nn.Conv2d(c, cfg.out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for i in reversed(range(len(self.up))):
            level = self.up[i]
            for j, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[j](h)
            if i != 0:
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VQGANDecoder(nn.Module):
    """The decoding half of taming's VQModel: codebook lookup, post_quant_conv, Decoder."""

    def __init__(self, codebook_size: int, cfg: VQGANConfig):
        super().__init__()
        self.cfg = cfg
        self.quantize = nn.Module()
        self.quantize.embedding = nn.Embedding(codebook_size, cfg.embed_dim)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)
        self.decoder = _Decoder(cfg)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, h, w] -> images [B, out_ch, h*f, w*f] in about [-1, 1]."""
        z = self.quantize.embedding(codes).permute(0, 3, 1, 2)
        return self.decoder(self.post_quant_conv(z))


# --------------------------------------------------------------------------- the base


class MaskGITImageNet(MaskedBase):
    """The published class-conditional MaskGIT (transformer + VQGAN decoder) as a MaskedBase.

    Features cover S = L + 1 positions: the L image tokens, then the class slot (image_positions =
    0..L-1). A condition is a class id in [0, num_classes); `num_classes` is the dropped class.
    """

    SIZE_KEYS = ("image_size", "hidden_dim", "depth", "heads", "mlp_dim", "codebook_size", "num_classes")

    def __init__(self, *, image_size: int = 256, hidden_dim: int = 768, depth: int = 24, heads: int = 16,
                 mlp_dim: int = 3072, codebook_size: int = 1024, num_classes: int = 1000,
                 vqgan: VQGANConfig | dict | None = None):
        super().__init__()
        if image_size % PATCH:
            raise ValueError(f"image_size={image_size} must be a multiple of {PATCH} (the VQGAN downsampling)")
        if hidden_dim % heads:
            raise ValueError(f"hidden_dim={hidden_dim} must be divisible by heads={heads}")
        side = image_size // PATCH
        self.image_size = image_size
        self.grid = (side, side)
        self.num_tokens = side * side
        self.codebook_size = codebook_size
        self.mask_id = codebook_size
        self.num_classes = num_classes
        self.null_class = num_classes
        self.seq_len = self.num_tokens + 1
        self.dim = hidden_dim
        self.sizes = dict(image_size=image_size, hidden_dim=hidden_dim, depth=depth, heads=heads, mlp_dim=mlp_dim,
                          codebook_size=codebook_size, num_classes=num_classes)
        cfg = vqgan if isinstance(vqgan, VQGANConfig) else VQGANConfig.from_dict(vqgan or {})
        self.vit = MaskGITTransformer(num_tokens=self.num_tokens, hidden_dim=hidden_dim, depth=depth, heads=heads,
                                      mlp_dim=mlp_dim, codebook_size=codebook_size, num_classes=num_classes)
        self.vqgan = VQGANDecoder(codebook_size, cfg)
        self.register_buffer("_image_positions", torch.arange(self.num_tokens), persistent=False)

    def config(self) -> dict:
        """The builder config that rebuilds this (unloaded) module: for save_model / load_base."""
        vq = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self.vqgan.cfg).items()}
        return {"kind": "maskgit-imagenet", **self.sizes, "vqgan": vq}

    @property
    def image_positions(self) -> torch.Tensor:
        return self._image_positions

    def features(self, tokens: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        if bool(((cond < 0) | (cond > self.num_classes)).any()):
            raise ValueError(f"class ids must be in [0, {self.num_classes}] ({self.num_classes} = dropped class)")
        cls_ids = cond.view(-1, 1) + self.codebook_size + 1  # the dropped class lands on the drop id
        return self.vit(torch.cat([tokens, cls_ids], dim=1))

    def head(self, f: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        L, K = self.num_tokens, self.codebook_size
        w = self.vit.tok_emb.weight[:K].to(f.dtype)
        bias = self.vit.bias[:L, :K] if positions is None else self.vit.bias[positions, :K]
        return self.image_features(f, positions) @ w.T + bias.to(f.dtype)

    def embed_tokens(self, ids: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        pos = self.vit.pos_emb[0, : self.num_tokens]
        return self.vit.tok_emb(ids) + (pos if positions is None else pos[positions])

    def uncond(self, cond: torch.Tensor) -> torch.Tensor:
        return torch.full_like(cond, self.null_class)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        codes = tokens.clamp(0, self.codebook_size - 1).view(-1, *self.grid)
        return ((self.vqgan(codes).float().clamp(-1, 1) + 1) / 2)

    def transformer_parameters(self) -> int:
        return sum(p.numel() for p in self.vit.parameters())

    def load_published(self, transformer_state: dict[str, torch.Tensor], vqgan_state: dict[str, torch.Tensor],
                       transformer_source: str = "transformer", vqgan_source: str = "vqgan") -> None:
        """Load published state dicts (wrappers already stripped) strictly, naming any bad tensor."""
        pos = transformer_state.get("pos_emb")
        if pos is not None and pos.ndim == 3 and pos.shape[1] != self.seq_len:
            side = math.isqrt(pos.shape[1] - 1)
            raise ValueError(f"{transformer_source}: pos_emb: shape {tuple(pos.shape)} != expected "
                             f"{tuple(self.vit.pos_emb.shape)}: the checkpoint is for image_size={side * PATCH}, "
                             f"not {self.image_size}")
        load_state_strict(self.vit, transformer_state, transformer_source)
        kept = {k: v for k, v in vqgan_state.items() if not k.startswith(VQGAN_IGNORED_PREFIXES)}
        load_state_strict(self.vqgan, kept, vqgan_source)


# --------------------------------------------------------------------------- reading published files


class _Inert:
    """Stands in for a class or function a checkpoint names beside its tensors; it runs nothing."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state):
        self.state = state


def _torch_load(path: Path) -> object:
    """torch.load(weights_only=True); globals outside torch's allow-list become inert stand-ins."""
    is_zip = zipfile.is_zipfile(path)
    stubs = []
    if is_zip:
        for name in torch.serialization.get_unsafe_globals_in_checkpoint(str(path)):
            stubs.append((type(name.rsplit(".", 1)[-1], (_Inert,), {"__module__": __name__}), name))
    try:
        with torch.serialization.safe_globals(stubs):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except Exception as err:  # pickle.UnpicklingError, RuntimeError for damaged files, ...
        raise ValueError(
            f"{path}: cannot be read with torch.load(weights_only=True): {err}. If it is a legacy "
            "(non-zip) checkpoint that pickles other objects, re-save only its state dict once, "
            "e.g. torch.save(torch.load(p, weights_only=False)['state_dict'], p2), from a trusted copy"
        ) from err


def _state_dict(obj: object, path: Path) -> dict[str, torch.Tensor]:
    """Strip the known wrappers: {'model_state_dict': ...} (MaskGIT trainer), {'state_dict': ...}
    (Lightning), and 'module.' (DDP) / '_orig_mod.' (torch.compile) key prefixes."""
    if isinstance(obj, dict):
        for key in ("model_state_dict", "state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: no state dict found (expected tensors, or a dict holding them under "
                         "'model_state_dict' or 'state_dict')")
    out = {}
    for k, v in obj.items():
        for prefix in ("module.", "_orig_mod."):
            k = k.removeprefix(prefix)
        out[k] = v
    return out


def _require(path: Path, what: str, published_as: str) -> None:
    if not path.is_file():
        raise FileNotFoundError(
            f"{what} checkpoint {path} is missing: download {published_as} from the Hugging Face repo "
            f"{HF_REPO} (the script download_models.py of valeoai/Maskgit-pytorch fetches it) and put it at {path}"
        )


def read_published_state(path: str | Path, what: str, published_as: str) -> dict[str, torch.Tensor]:
    path = Path(path)
    _require(path, what, published_as)
    return _state_dict(_torch_load(path), path)


def file_digest(path: str | Path, length: int = 16) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()[:length]


def load_maskgit_imagenet(transformer_path: str | Path, vqgan_path: str | Path, image_size: int = 256, *,
                          vqgan_yaml: str | Path | None = None, vqgan: VQGANConfig | dict | None = None,
                          device: str | torch.device = "cpu", **sizes) -> MaskGITImageNet:
    """The published MaskGIT from its files, in eval mode and frozen.

    transformer_path: MaskGIT_ImageNet_{256,512}.pth; vqgan_path: VQGAN last.ckpt. The VQGAN sizes
    come from `vqgan` or from the published model.yaml (`vqgan_yaml`), else taming's f16/1024
    defaults. `sizes` override the transformer's (hidden_dim, depth, heads, ...; tests use tiny ones).
    """
    transformer_path, vqgan_path = Path(transformer_path), Path(vqgan_path)
    codebook = sizes.get("codebook_size", 1024)
    if vqgan_yaml is not None:
        if vqgan is not None:
            raise ValueError("give the VQGAN sizes either as `vqgan` or as `vqgan_yaml`, not both")
        if not Path(vqgan_yaml).is_file():
            raise FileNotFoundError(f"VQGAN config {vqgan_yaml} is missing: download "
                                    f"pretrained_maskgit/VQGAN/model.yaml from {HF_REPO} and put it at {vqgan_yaml}")
        vqgan = VQGANConfig.from_yaml(vqgan_yaml, codebook)
    files = [(transformer_path, "MaskGIT transformer", TRANSFORMER_FILE.format(image_size=image_size)),
             (vqgan_path, "VQGAN", VQGAN_FILE)]
    for args in files:  # both checked before anything is built or read
        _require(*args)
    base = MaskGITImageNet(image_size=image_size, vqgan=vqgan, **sizes)
    t_state, v_state = (read_published_state(*args) for args in files)
    base.load_published(t_state, v_state, str(transformer_path), str(vqgan_path))
    base._base_id = f"maskgit-imagenet-{image_size}:{file_digest(transformer_path)}"
    return base.to(device).eval().requires_grad_(False)


_CONFIG_KEYS = {"kind", "hash", "transformer_path", "vqgan_path", "vqgan_yaml", "vqgan", *MaskGITImageNet.SIZE_KEYS}


def build_maskgit_imagenet(config: dict) -> MaskGITImageNet:
    """Registry builder. With transformer_path and vqgan_path the published weights are loaded;
    without them the module is left unloaded, for load_base to fill from the project's safetensors."""
    if unknown := sorted(set(config) - _CONFIG_KEYS):
        raise ValueError(f"maskgit-imagenet config: unknown keys {unknown}; known: {sorted(_CONFIG_KEYS)}")
    sizes = {k: config[k] for k in MaskGITImageNet.SIZE_KEYS if k in config}
    paths = [config.get("transformer_path"), config.get("vqgan_path")]
    if all(p is None for p in paths):
        return MaskGITImageNet(vqgan=config.get("vqgan"), **sizes)
    if any(p is None for p in paths):
        raise ValueError("maskgit-imagenet config: give both transformer_path and vqgan_path (or neither)")
    return load_maskgit_imagenet(*paths, vqgan_yaml=config.get("vqgan_yaml"), vqgan=config.get("vqgan"), **sizes)
