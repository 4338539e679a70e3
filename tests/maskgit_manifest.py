"""The published MaskGIT ImageNet checkpoint layout, written down from reading the source.

Source read (valeoai/Maskgit-pytorch, the MaskTransformer version, commit 32062fa8659c):
- Network/transformer.py: MaskTransformer (tok_emb, pos_emb, first_layer, transformer.layers[i] =
  [PreNorm(Attention(nn.MultiheadAttention)), PreNorm(FeedForward)], last_layer, bias).
- Trainer/vit.py: get_network (hidden 768, codebook 1024, depth 24, heads 16, mlp 3072, dropout
  0.1; img_size // 16 tokens per side), sample (class ids shifted by codebook + 1, drop id
  codebook + 1 + nclass, mask id 1024, CFG/Gumbel rule), VQGAN from `vqgan_folder/last.ckpt`["state_dict"].
- Trainer/trainer.py: save_network writes {'iter', 'global_epoch', 'model_state_dict',
  'optimizer_state_dict'} (the model unwrapped from DDP: no 'module.' prefix).
- download_models.py: files pretrained_maskgit/MaskGIT/MaskGIT_ImageNet_{256,512}.pth and
  pretrained_maskgit/VQGAN/{last.ckpt,model.yaml} on the Hugging Face repo llvictorll/Maskgit-pytorch.
- Network/Taming/models/vqgan.py (VQModel: encoder, decoder, quantize = VectorQuantizer2,
  quant_conv, post_quant_conv; decode_code looks codes up with 256 channels),
  Network/Taming/modules/diffusionmodules/model.py (Decoder, ResnetBlock, AttnBlock, Upsample;
  GroupNorm(32, eps 1e-6); temb_ch = 0, so no temb_proj), Network/Taming/modules/vqvae/quantize.py
  (VectorQuantizer2.embedding; no `used` buffer without remap).
- README.md: 174.161M transformer parameters, 72.142M VQGAN; the VQGAN is taming's ImageNet f16
  1024 model. Its model.yaml is not in the repository; the decoder sizes below (ch 128, ch_mult
  1,1,2,2,4, 2 res blocks, attention at resolution 16, z 256, embed 256) are taming's
  vqgan_imagenet_f16_1024 config (also written out in lokiwizard/awesome_tokenizer
  vae/maskgit/models/config.py) and agree with decode_code's hard-coded 256 channels.

Nothing here comes from the implementation under test: tests compare it with the module's state dict.
Shape rules are functions of the sizes (hidden, depth, heads, mlp, codebook, tokens, classes);
"{i}" in a key stands for each transformer layer 0..depth-1. `heads` changes no shape: the state
dict cannot tell 8 heads from 16 (Trainer/vit.py uses 16).
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class Sizes:
    hidden: int = 768
    depth: int = 24
    heads: int = 16
    mlp: int = 3072
    codebook: int = 1024
    tokens: int = 256  # image tokens: (img_size // 16) ** 2, 256 at 256px, 1024 at 512px
    classes: int = 1000

    @property
    def vocab(self) -> int:  # codebook + mask token + classes + dropped-class token
        return self.codebook + 1 + self.classes + 1


TRANSFORMER = {
    "tok_emb.weight": lambda s: (s.vocab, s.hidden),
    "pos_emb": lambda s: (1, s.tokens + 1, s.hidden),  # image tokens, then the class slot
    # first_layer = [LayerNorm(eps 1e-12), Dropout, Linear, GELU, LayerNorm(eps 1e-12), Dropout, Linear]
    "first_layer.0.weight": lambda s: (s.hidden,),
    "first_layer.0.bias": lambda s: (s.hidden,),
    "first_layer.2.weight": lambda s: (s.hidden, s.hidden),
    "first_layer.2.bias": lambda s: (s.hidden,),
    "first_layer.4.weight": lambda s: (s.hidden,),
    "first_layer.4.bias": lambda s: (s.hidden,),
    "first_layer.6.weight": lambda s: (s.hidden, s.hidden),
    "first_layer.6.bias": lambda s: (s.hidden,),
    # transformer.layers[i] = [PreNorm(LayerNorm, MultiheadAttention), PreNorm(LayerNorm, FFN)]
    "transformer.layers.{i}.0.norm.weight": lambda s: (s.hidden,),
    "transformer.layers.{i}.0.norm.bias": lambda s: (s.hidden,),
    "transformer.layers.{i}.0.fn.mha.in_proj_weight": lambda s: (3 * s.hidden, s.hidden),  # q, k, v stacked
    "transformer.layers.{i}.0.fn.mha.in_proj_bias": lambda s: (3 * s.hidden,),
    "transformer.layers.{i}.0.fn.mha.out_proj.weight": lambda s: (s.hidden, s.hidden),
    "transformer.layers.{i}.0.fn.mha.out_proj.bias": lambda s: (s.hidden,),
    "transformer.layers.{i}.1.norm.weight": lambda s: (s.hidden,),
    "transformer.layers.{i}.1.norm.bias": lambda s: (s.hidden,),
    # FeedForward.net = [Linear, GELU, Dropout, Linear, Dropout]
    "transformer.layers.{i}.1.fn.net.0.weight": lambda s: (s.mlp, s.hidden),
    "transformer.layers.{i}.1.fn.net.0.bias": lambda s: (s.mlp,),
    "transformer.layers.{i}.1.fn.net.3.weight": lambda s: (s.hidden, s.mlp),
    "transformer.layers.{i}.1.fn.net.3.bias": lambda s: (s.hidden,),
    # last_layer = [LayerNorm(eps 1e-12), Dropout, Linear, GELU, LayerNorm(eps 1e-12)]; its output is f
    "last_layer.0.weight": lambda s: (s.hidden,),
    "last_layer.0.bias": lambda s: (s.hidden,),
    "last_layer.2.weight": lambda s: (s.hidden, s.hidden),
    "last_layer.2.bias": lambda s: (s.hidden,),
    "last_layer.4.weight": lambda s: (s.hidden,),
    "last_layer.4.bias": lambda s: (s.hidden,),
    # logits = x @ tok_emb.weight.T + bias, then sliced to [:tokens, :codebook + 1]
    "bias": lambda s: (s.tokens + 1, s.vocab),
}

PUBLISHED_TRANSFORMER_PARAMETERS = 174_161_000  # README, rounded to 1k (256px: 256 tokens)


def transformer_keys(s: Sizes) -> dict[str, tuple[int, ...]]:
    """The transformer checkpoint's 'model_state_dict': key -> shape, at sizes s."""
    out = {}
    for pattern, rule in TRANSFORMER.items():
        for i in range(s.depth) if "{i}" in pattern else [None]:
            out[pattern.format(i=i)] = tuple(rule(s))
    return out


@dataclass(frozen=True)
class VQSizes:
    """taming Decoder/VQModel sizes (model.yaml: embed_dim, n_embed, ddconfig)."""

    codebook: int = 1024  # n_embed
    embed_dim: int = 256
    z_channels: int = 256
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    resolution: int = 256
    out_ch: int = 3


def _norm(prefix: str, c: int) -> dict:
    return {f"{prefix}.weight": (c,), f"{prefix}.bias": (c,)}


def _conv(prefix: str, cout: int, cin: int, k: int) -> dict:
    return {f"{prefix}.weight": (cout, cin, k, k), f"{prefix}.bias": (cout,)}


def _resnet(prefix: str, cin: int, cout: int) -> dict:
    out = {**_norm(f"{prefix}.norm1", cin), **_conv(f"{prefix}.conv1", cout, cin, 3),
           **_norm(f"{prefix}.norm2", cout), **_conv(f"{prefix}.conv2", cout, cout, 3)}
    if cin != cout:  # conv_shortcut is False in the Decoder: a 1x1 nin_shortcut
        out.update(_conv(f"{prefix}.nin_shortcut", cout, cin, 1))
    return out


def _attn(prefix: str, c: int) -> dict:
    out = _norm(f"{prefix}.norm", c)
    for name in ("q", "k", "v", "proj_out"):
        out.update(_conv(f"{prefix}.{name}", c, c, 1))
    return out


def vqgan_decoder_keys(v: VQSizes) -> dict[str, tuple[int, ...]]:
    """The VQGAN keys decoding needs (Lightning 'state_dict'), at sizes v.

    Rules (Decoder.__init__): levels i = len(ch_mult)-1 .. 0 from the lowest resolution up; the
    lowest works at ch * ch_mult[-1] channels and resolution // 2**(levels-1) (the *config*
    resolution, whatever the image size); level i has num_res_blocks + 1 ResnetBlocks to
    ch * ch_mult[i] channels, one AttnBlock after each when its resolution is in attn_resolutions,
    and (i != 0) an Upsample conv that doubles the resolution.
    """
    levels = len(v.ch_mult)
    c = v.ch * v.ch_mult[-1]
    res = v.resolution // 2 ** (levels - 1)
    out = {"quantize.embedding.weight": (v.codebook, v.embed_dim), **_conv("post_quant_conv", v.z_channels, v.embed_dim, 1),
           **_conv("decoder.conv_in", c, v.z_channels, 3), **_resnet("decoder.mid.block_1", c, c),
           **_attn("decoder.mid.attn_1", c), **_resnet("decoder.mid.block_2", c, c)}
    for i in reversed(range(levels)):
        cout = v.ch * v.ch_mult[i]
        for j in range(v.num_res_blocks + 1):
            out.update(_resnet(f"decoder.up.{i}.block.{j}", c, cout))
            c = cout
            if res in v.attn_resolutions:
                out.update(_attn(f"decoder.up.{i}.attn.{j}", c))
        if i != 0:
            out.update(_conv(f"decoder.up.{i}.upsample.conv", c, c, 3))
            res *= 2
    out.update(_norm("decoder.norm_out", c))
    out.update(_conv("decoder.conv_out", v.out_ch, c, 3))
    return out


# Prefixes of the VQGAN checkpoint that decoding does not use (encoder side and training losses:
# LPIPS + discriminator). The adapter drops exactly these; any other unknown key is an error.
VQGAN_IGNORED_PREFIXES = ("encoder.", "quant_conv.", "loss.")
