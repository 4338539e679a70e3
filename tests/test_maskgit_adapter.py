"""The published MaskGIT ImageNet adapter, on tiny random checkpoints written in the published layout.

The checkpoint files are made from the manifest (tests/maskgit_manifest.py, written from the
published source), not from the adapter: the adapter must read what the published code writes.
"""

import math

import pytest
import torch
import torch.nn.functional as F
import yaml
from maskgit_manifest import (PUBLISHED_TRANSFORMER_PARAMETERS, VQGAN_IGNORED_PREFIXES, Sizes, VQSizes,
                              transformer_keys, vqgan_decoder_keys)
from tiny_models import one_thread  # noqa: F401 (autouse fixture)

from migm_shortcut.bases import build_base, load_base
from migm_shortcut.checkpoint import save_model
from migm_shortcut.bases.maskgit import MaskGITImageNet, VQGANConfig, load_maskgit_imagenet
from migm_shortcut.bases.published import load_published
from migm_shortcut.config import BaseConfig
from migm_shortcut.extract import extract, open_store
from migm_shortcut.sampling import Learned, generate
from migm_shortcut.schedules import SamplingRule
from migm_shortcut.shortcut import Shortcut, ShortcutSpec
from migm_shortcut.store import PairDataset
from migm_shortcut.train_shortcut import train_shortcut, validate_shortcut

TINY = Sizes(hidden=32, depth=2, heads=2, mlp=64, codebook=16, tokens=16, classes=10)
TINY_VQ = VQSizes(codebook=16, embed_dim=8, z_channels=8, ch=32, ch_mult=(1, 1, 2), num_res_blocks=1,
                  attn_resolutions=(4,), resolution=16)
IMAGE_SIZE = 64  # 64 // 16 = 4 tokens per side = TINY.tokens
SIZES = dict(hidden_dim=TINY.hidden, depth=TINY.depth, heads=TINY.heads, mlp_dim=TINY.mlp,
             codebook_size=TINY.codebook, num_classes=TINY.classes)
VQ = dict(embed_dim=TINY_VQ.embed_dim, z_channels=TINY_VQ.z_channels, ch=TINY_VQ.ch, ch_mult=list(TINY_VQ.ch_mult),
          num_res_blocks=TINY_VQ.num_res_blocks, attn_resolutions=list(TINY_VQ.attn_resolutions),
          resolution=TINY_VQ.resolution)
RULE = SamplingRule(steps=4, cfg=2.0, tau=4.5)

EXECUTED: list[str] = []  # what the stand-ins below would record if loading ever ran them


class FakeModelCheckpoint:
    """Plays the Lightning callback class a checkpoint keys its callback state by."""


class FakeHyperParameters:
    """Plays a pickled hyper-parameter container: loading must not run its code."""

    def __init__(self, **kw):
        self.kw = kw

    def __setstate__(self, state):
        EXECUTED.append("FakeHyperParameters.__setstate__")
        self.__dict__.update(state)


def random_state(shapes: dict[str, tuple], seed: int) -> dict[str, torch.Tensor]:
    """Random tensors of the manifest's shapes, scaled so that a forward pass stays well behaved."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, shape in shapes.items():
        x = torch.randn(shape, generator=g)
        if len(shape) == 1:  # norm scales about 1, biases about 0
            out[k] = 1 + 0.1 * x if k.endswith(".weight") else 0.02 * x  # 1-D ".weight" = a norm's
        elif len(shape) == 4:  # conv: keep activations of order 1
            out[k] = x / math.sqrt(math.prod(shape[1:]))
        else:
            out[k] = 0.02 * x if k != "quantize.embedding.weight" else x
    return out


def write_published(folder, transformer_state, vqgan_state, name="t"):
    """The two files as the published code writes them (Trainer.save_network; Lightning)."""
    t_path, v_path = folder / f"{name}.pth", folder / f"{name}_vqgan.ckpt"
    torch.save({"iter": 7, "global_epoch": 1, "model_state_dict": transformer_state,
                "optimizer_state_dict": {"state": {}, "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.96), "params": [0]}]}},
               t_path)  # fmt: skip
    torch.save({"epoch": 3, "global_step": 100, "pytorch-lightning_version": "1.0.8", "state_dict": vqgan_state,
                "callbacks": {FakeModelCheckpoint: {"best_model_score": torch.tensor(0.5), "best_model_path": "x.ckpt"}},
                "hyper_parameters": FakeHyperParameters(embed_dim=8), "optimizer_states": [{"state": {}}]},
               v_path)  # fmt: skip
    return t_path, v_path


@pytest.fixture(scope="module")
def states():
    t = random_state(transformer_keys(TINY), seed=0)
    v = random_state(vqgan_decoder_keys(TINY_VQ), seed=1)
    # what a taming checkpoint also holds, which decoding does not use
    v.update({"encoder.conv_in.weight": torch.randn(32, 3, 3, 3), "quant_conv.weight": torch.randn(8, 8, 1, 1),
              "loss.logvar": torch.zeros(()), "loss.discriminator.main.0.weight": torch.randn(4, 3, 4, 4)})
    return t, v


@pytest.fixture(scope="module")
def files(states, tmp_path_factory):
    return write_published(tmp_path_factory.mktemp("published"), *states)


@pytest.fixture(scope="module")
def base(files):
    return load_maskgit_imagenet(*files, image_size=IMAGE_SIZE, vqgan=VQ, **SIZES)


def shapes(module: torch.nn.Module) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


# --- the manifest and the module agree, at published and tiny sizes


@pytest.mark.parametrize("image_size", [256, 512])
def test_manifest_matches_published_size(image_size):
    with torch.device("meta"):  # no memory: shapes only
        model = MaskGITImageNet(image_size=image_size)
    sizes = Sizes(tokens=(image_size // 16) ** 2)
    assert shapes(model.vit) == transformer_keys(sizes)
    assert shapes(model.vqgan) == vqgan_decoder_keys(VQSizes())
    if image_size == 256:  # README: 174.161M transformer parameters
        assert round(model.transformer_parameters(), -3) == PUBLISHED_TRANSFORMER_PARAMETERS
    assert (model.num_tokens, model.seq_len, model.dim, model.mask_id) == (sizes.tokens, sizes.tokens + 1, 768, 1024)


def test_manifest_matches_tiny(base):
    assert shapes(base.vit) == transformer_keys(TINY)
    assert shapes(base.vqgan) == vqgan_decoder_keys(TINY_VQ)


# --- loading


def test_loads_published_layout(base, states):
    t, v = states
    for k, x in base.vit.state_dict().items():
        assert torch.equal(x, t[k]), k
    for k, x in base.vqgan.state_dict().items():
        assert torch.equal(x, v[k]), k
    assert not base.training and not any(p.requires_grad for p in base.parameters())
    assert base.base_id.startswith("maskgit-imagenet-64:")
    assert EXECUTED == []  # the pickled hyper-parameter object was replaced, never run


def reference_logits(sd: dict, tokens, labels, drop, heads: int) -> torch.Tensor:
    """The published MaskTransformer.forward, written functionally from its state dict."""
    K, C = TINY.codebook, TINY.classes
    cls = labels + K + 1
    cls[drop] = K + 1 + C
    x = sd["tok_emb.weight"][torch.cat([tokens, cls[:, None]], 1)] + sd["pos_emb"]

    def ln(x, p, eps):
        return F.layer_norm(x, x.shape[-1:], sd[f"{p}.weight"], sd[f"{p}.bias"], eps)

    def lin(x, p):
        return F.linear(x, sd[f"{p}.weight"], sd[f"{p}.bias"])

    x = lin(ln(F.gelu(lin(ln(x, "first_layer.0", 1e-12), "first_layer.2")), "first_layer.4", 1e-12), "first_layer.6")
    for i in range(TINY.depth):
        p = f"transformer.layers.{i}"
        mha = torch.nn.MultiheadAttention(TINY.hidden, heads, batch_first=True)
        mha.load_state_dict({k.removeprefix(f"{p}.0.fn.mha."): v for k, v in sd.items() if k.startswith(f"{p}.0.fn.mha.")})
        h = ln(x, f"{p}.0.norm", 1e-5)
        x = x + mha.eval()(h, h, h, need_weights=False)[0]
        x = x + lin(F.gelu(lin(ln(x, f"{p}.1.norm", 1e-5), f"{p}.1.fn.net.0")), f"{p}.1.fn.net.3")
    x = ln(F.gelu(lin(ln(x, "last_layer.0", 1e-12), "last_layer.2")), "last_layer.4", 1e-12)
    logits = x @ sd["tok_emb.weight"].T + sd["bias"]
    return logits[:, : TINY.tokens, : K + 1]


def test_features_and_head_match_published_forward(base, states):
    g = torch.Generator().manual_seed(0)
    L, K = TINY.tokens, TINY.codebook
    tokens = torch.randint(0, K, (4, L), generator=g)
    tokens[torch.rand(4, L, generator=g) < 0.5] = base.mask_id
    labels = torch.tensor([0, 3, 9, 5])
    drop = torch.tensor([False, False, True, True])
    cond = torch.where(drop, base.uncond(labels), labels)
    with torch.no_grad():
        f = base.features(tokens, cond)
        ref = reference_logits(states[0], tokens, labels, drop, TINY.heads)
        logits = base.head(f)
    assert f.shape == (4, L + 1, TINY.hidden) and torch.equal(base.image_positions, torch.arange(L))
    torch.testing.assert_close(logits, ref[..., :K], rtol=1e-4, atol=1e-5)
    # the head is affine: the sampler guides features before it (sampling.guided)
    with torch.no_grad():
        torch.testing.assert_close(base.head(3 * f[:2] - 2 * f[2:]), 3 * logits[:2] - 2 * logits[2:],
                                   rtol=1e-4, atol=1e-4)
    # f is last_layer's output: a LayerNorm with the checkpoint's scale and shift
    y = (f - states[0]["last_layer.4.bias"]) / states[0]["last_layer.4.weight"]
    torch.testing.assert_close(y.mean(-1), torch.zeros(4, L + 1), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.var(-1, unbiased=False), torch.ones(4, L + 1), atol=1e-4, rtol=0)
    emb = base.embed_tokens(tokens)
    torch.testing.assert_close(emb, states[0]["tok_emb.weight"][tokens] + states[0]["pos_emb"][0, :L])
    with pytest.raises(ValueError, match="class ids"):
        base.features(tokens, labels + 100)


def test_decode(base):
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, TINY.codebook, (2, TINY.tokens), generator=g)
    images = base.decode(tokens)
    side = 4 * 2 ** (len(TINY_VQ.ch_mult) - 1)
    assert images.shape == (2, 3, side, side) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1 and images.std() > 0
    assert not torch.equal(images[0], images[1])


# --- the project's sampler and shortcut on this base


def test_generate_vanilla_and_shortcut(base):
    labels = torch.tensor([1, 2, 7])
    vanilla = generate(base, RULE, labels, [0, 1, 2], seed=5, record=True)
    assert vanilla.tokens.shape == (3, TINY.tokens) and (vanilla.tokens < TINY.codebook).all()
    assert sorted(vanilla.order.unique().tolist()) == list(range(RULE.steps))
    assert vanilla.features.shape == (3, 2, RULE.steps, TINY.tokens + 1, TINY.hidden)
    torch.manual_seed(2)
    shortcut = Shortcut(ShortcutSpec(dim=TINY.hidden, bottleneck_ratio=2, heads=2)).eval()
    with torch.no_grad():
        shortcut.up.weight.normal_(0, 0.1)  # a non-zero update (an untrained one is "reuse")
    fast = generate(base, RULE, labels, [0, 1, 2], seed=5, budget=2, source=Learned(shortcut, base), record=True)
    assert (fast.tokens < TINY.codebook).all() and (fast.order >= 0).all()
    assert torch.equal(fast.features[:, :, 0], vanilla.features[:, :, 0])  # step 0 is a full step
    assert not torch.equal(fast.features[:, :, 1], vanilla.features[:, :, 1])  # step 1 is predicted
    same = generate(base, RULE, labels, [0, 1, 2], seed=5, budget=RULE.steps, source=Learned(shortcut, base))
    assert torch.equal(same.tokens, vanilla.tokens)
    assert base.decode(fast.tokens).shape[0] == 3


def test_extract_and_train_shortcut(base, tmp_path):
    url = str(tmp_path / "traj.zarr")
    store = open_store(url, base, RULE, num_samples=4, dtype="float32", unit_size=2, seed=0, num_classes=base.num_classes)
    stats = extract(store, base, RULE, batch_size=2, progress=False)
    assert stats["samples_written"] == 4 and store.is_complete()
    assert store.features.shape == (4, 2, RULE.steps, TINY.tokens + 1, TINY.hidden)
    train_set, val_set = PairDataset(url, range(3)), PairDataset(url, range(3, 4))
    log = []
    model = train_shortcut(Shortcut(ShortcutSpec(dim=TINY.hidden, heads=2)), base, train_set, steps=2, batch_size=6,
                           lr=1e-3, lr_decay_at=1, weight_decay=0.01, ema_decay=0.9, ema_warmup=0, grad_clip=1.0,
                           num_workers=0, seed=0, device=torch.device("cpu"), pairs_per_trajectory=6,
                           log=lambda step, stats: log.append(stats), log_every=1, progress=False)
    assert len(log) == 2 and all(math.isfinite(s["loss"]) for s in log)
    per_step = validate_shortcut(model, base, val_set, device=torch.device("cpu"))
    assert len(per_step) == RULE.steps - 1 and all(math.isfinite(r["mse"]) for r in per_step)


# --- the registry, and the project's own checkpoint format


def builder_config(t_path, v_path, **extra) -> dict:
    return {"kind": "maskgit-imagenet", "transformer_path": str(t_path), "vqgan_path": str(v_path),
            "image_size": IMAGE_SIZE, **SIZES, "vqgan": VQ, **extra}


def test_registry_builder_and_project_checkpoint(base, files, tmp_path):
    built = build_base(builder_config(*files, hash="abc"))
    assert built.base_id == "maskgit-imagenet:abc"
    for k, x in base.state_dict().items():
        assert torch.equal(built.state_dict()[k], x), k
    # save_model / load_base: the project's safetensors, rebuilt from config() (no published files needed)
    path = save_model(tmp_path / "base.safetensors", base, {**base.config(), "hash": "abc"})
    again = load_base(path)
    tokens = torch.full((2, TINY.tokens), base.mask_id)
    torch.testing.assert_close(again.features(tokens, torch.tensor([1, 10])), base.features(tokens, torch.tensor([1, 10])))
    with pytest.raises(ValueError, match="unknown keys.*depht"):
        build_base({**builder_config(*files), "depht": 3})
    with pytest.raises(ValueError, match="both transformer_path and vqgan_path"):
        build_base({k: v for k, v in builder_config(*files).items() if k != "vqgan_path"})


# --- failures name what is wrong


@pytest.mark.parametrize("which", ["transformer", "vqgan"])
def test_missing_file_is_named(files, tmp_path, which):
    t_path, v_path = files
    gone = tmp_path / ("MaskGIT_ImageNet_64.pth" if which == "transformer" else "last.ckpt")
    args = (gone, v_path) if which == "transformer" else (t_path, gone)
    published = "MaskGIT_ImageNet_64.pth" if which == "transformer" else "pretrained_maskgit/VQGAN/last.ckpt"
    with pytest.raises(FileNotFoundError, match=rf"{gone}.*missing.*{published}.*llvictorll/Maskgit-pytorch.*put it at"):
        load_maskgit_imagenet(*args, image_size=IMAGE_SIZE, vqgan=VQ, **SIZES)
    with pytest.raises(FileNotFoundError, match=str(gone)):
        build_base(builder_config(*args))


@pytest.mark.parametrize(
    "which, key, change",
    [
        ("transformer", "transformer.layers.1.1.fn.net.3.bias", "missing"),
        ("transformer", "last_layer.2.weight", "misshapen"),
        ("transformer", "first_layer.8.weight", "unexpected"),
        ("vqgan", "decoder.up.1.block.0.nin_shortcut.weight", "missing"),
        ("vqgan", "quantize.embedding.weight", "misshapen"),
        ("vqgan", "decoder.up.0.attn.0.q.weight", "unexpected"),  # attention where the config has none
    ],
)  # fmt: skip
def test_bad_tensor_is_named(states, tmp_path, which, key, change):
    t, v = (dict(s) for s in states)
    state = t if which == "transformer" else v
    if change == "missing":
        del state[key]
    elif change == "misshapen":
        state[key] = torch.zeros(state[key].shape[0] + 1, *state[key].shape[1:])
    else:
        state[key] = torch.zeros(3)
    t_path, v_path = write_published(tmp_path, t, v)
    bad = t_path if which == "transformer" else v_path
    with pytest.raises(ValueError, match=rf"{bad}.*{change if change != 'misshapen' else ''}.*{key}"):
        load_maskgit_imagenet(t_path, v_path, image_size=IMAGE_SIZE, vqgan=VQ, **SIZES)


def test_published_base_is_checked_against_params(files, tmp_path):
    dd = dict(double_z=False, z_channels=TINY_VQ.z_channels, resolution=TINY_VQ.resolution, in_channels=3, out_ch=3,
              ch=TINY_VQ.ch, ch_mult=list(TINY_VQ.ch_mult), num_res_blocks=TINY_VQ.num_res_blocks,
              attn_resolutions=list(TINY_VQ.attn_resolutions), dropout=0.0)
    vq_yaml = tmp_path / "model.yaml"
    vq_yaml.write_text(yaml.safe_dump({"model": {"params": {"embed_dim": TINY_VQ.embed_dim,
                                                            "n_embed": TINY.codebook, "ddconfig": dd}}}))
    paths = {"transformer": str(files[0]), "vqgan": str(files[1]), "vqgan_yaml": str(vq_yaml)}
    published = {"files": paths, "codebook_size": TINY.codebook, "num_classes": TINY.classes}
    sizes = dict(depth=TINY.depth, width=TINY.hidden, heads=TINY.heads, mlp_ratio=TINY.mlp / TINY.hidden)
    base, extra = load_published(BaseConfig(name="maskgit-imagenet", published=published, **sizes), IMAGE_SIZE)
    assert extra == {} and base.base_id.startswith(f"maskgit-imagenet-{IMAGE_SIZE}:")
    wrong = BaseConfig(name="maskgit-imagenet", published=published, **{**sizes, "mlp_ratio": 3.0})
    shape = r"fn.net.0.weight: shape \(64, 32\) != expected \(96, 32\)"
    with pytest.raises(ValueError, match=rf"(?s){files[0]}.*{shape}.*expected shapes come from base.depth/width"):
        load_published(wrong, IMAGE_SIZE)


def test_ignored_vqgan_prefixes_documented():
    from migm_shortcut.bases import maskgit

    assert maskgit.VQGAN_IGNORED_PREFIXES == VQGAN_IGNORED_PREFIXES


def test_wrong_image_size_is_named(files):
    with pytest.raises(ValueError, match=r"pos_emb.*image_size=64, not 128"):
        load_maskgit_imagenet(*files, image_size=128, vqgan=VQ, **SIZES)


def test_not_a_checkpoint_is_named(files, tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=str(junk)):
        load_maskgit_imagenet(junk, files[1], image_size=IMAGE_SIZE, vqgan=VQ, **SIZES)
    torch.save({"iter": 1}, junk)
    with pytest.raises(ValueError, match=rf"{junk}: no state dict"):
        load_maskgit_imagenet(junk, files[1], image_size=IMAGE_SIZE, vqgan=VQ, **SIZES)


def test_vqgan_config_from_yaml(tmp_path):
    yaml_text = """model:
  base_learning_rate: 4.5e-06
  target: taming.models.vqgan.VQModel
  params:
    embed_dim: 256
    n_embed: 1024
    ddconfig: {double_z: false, z_channels: 256, resolution: 256, in_channels: 3, out_ch: 3, ch: 128,
               ch_mult: [1, 1, 2, 2, 4], num_res_blocks: 2, attn_resolutions: [16], dropout: 0.0}
    lossconfig: {target: taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator}
"""
    (tmp_path / "model.yaml").write_text(yaml_text)
    assert VQGANConfig.from_yaml(tmp_path / "model.yaml", 1024) == VQGANConfig()
    with pytest.raises(ValueError, match="n_embed 1024"):
        VQGANConfig.from_yaml(tmp_path / "model.yaml", 16)
