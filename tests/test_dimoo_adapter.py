"""The Lumina-DiMOO adapter, on a tiny random LLaDA written in the published checkpoint layout.

The files are made from the manifest (tests/dimoo_manifest.py, written from the published source),
not from the adapter; the reference forward below is written from the state dict alone.
"""

import json
import math
import sys

import pytest
import torch
import torch.nn.functional as F
from dimoo_manifest import CODEBOOK, PAD, SPECIAL_TOKENS, Sizes, checkpoint_keys, image_segment
from safetensors.torch import save_file
from tiny_models import one_thread  # noqa: F401 (autouse fixture)

from migm_shortcut.bases import build_base
from migm_shortcut.bases import dimoo
from migm_shortcut.bases.published import load_published
from migm_shortcut.config import BaseConfig
from migm_shortcut.extract import extract, open_store
from migm_shortcut.sampling import Learned, generate
from migm_shortcut.schedules import SamplingRule, cosine_reveal_counts
from migm_shortcut.shortcut import Shortcut, ShortcutSpec
from migm_shortcut.store import PairDataset
from migm_shortcut.train_shortcut import train_shortcut, validate_shortcut

TINY = Sizes(d_model=32, n_heads=4, n_kv_heads=2, n_layers=2, mlp_hidden_size=48)
IMAGE_SIZE, SIDE, PROMPT_LEN = 64, 4, 6  # 64 // 16 = 4 x 4 image tokens
UNCOND = [11, SPECIAL_TOKENS["uncondition"], 12]  # stands for the tokenized "<uncondition>" template
PROMPTS = [[5, 6, 7, 8, 9], [20, 21, 22], [30, 31, 32, 33, 34, 35], [40, 41]]
RULE = SamplingRule(steps=4, cfg=4.0, tau=1.0, schedule="cosine", ramp=False)  # DiMOO's rule (SPEC 9)
LOAD = dict(image_size=IMAGE_SIZE, prompt_len=PROMPT_LEN, uncond_prompt=UNCOND)


def random_state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, shape in checkpoint_keys(TINY).items():
        x = torch.randn(shape, generator=g)
        out[k] = 1 + 0.1 * x if len(shape) == 1 else x / math.sqrt(shape[1])
    return out


def write_published(folder, state, shards: int = 1):
    """config.json + model.safetensors, or shards + model.safetensors.index.json (as from_pretrained writes)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(TINY.config_json()))
    if shards == 1:
        save_file(state, folder / "model.safetensors")
        return folder
    keys, weight_map = sorted(state), {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = keys[i::shards]
        save_file({k: state[k] for k in part}, folder / name)
        weight_map.update(dict.fromkeys(part, name))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


@pytest.fixture(scope="module")
def state():
    return random_state(0)


@pytest.fixture(scope="module")
def folder(state, tmp_path_factory):
    return write_published(tmp_path_factory.mktemp("dimoo") / "Lumina-DiMOO", state)


@pytest.fixture(scope="module")
def base(folder):
    return dimoo.load_dimoo(folder, **LOAD)


def shapes(module) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


# --- the manifest and the module agree


def test_manifest_matches_published_size():
    with torch.device("meta"):
        model = dimoo.LLaDAModelLM(dimoo.LLaDAConfig(**Sizes().config_json()))
    assert shapes(model) == checkpoint_keys(Sizes())
    assert 7.5e9 < sum(p.numel() for p in model.parameters()) < 8.5e9  # "about 8B"
    assert (dimoo.MASK, dimoo.NEWLINE, dimoo.IMAGE_OFFSET, dimoo.CODEBOOK, dimoo.PAD) == (
        SPECIAL_TOKENS["mask_token"], SPECIAL_TOKENS["newline_token"], SPECIAL_TOKENS["image_token_offset"], CODEBOOK, PAD)
    assert (dimoo.BOA, dimoo.EOA, dimoo.BOI, dimoo.EOI) == tuple(
        SPECIAL_TOKENS[k] for k in ("answer_start", "answer_end", "boi", "eoi"))


def test_manifest_matches_tiny_and_loads(base, state):
    assert shapes(base.llada) == checkpoint_keys(TINY)
    for k, x in base.llada.state_dict().items():
        assert torch.equal(x, state[k]), k
    assert not base.training and not any(p.requires_grad for p in base.parameters())
    assert (base.num_tokens, base.dim, base.grid) == (SIDE * SIDE, TINY.d_model, (SIDE, SIDE))
    assert base.seq_len == PROMPT_LEN + len(image_segment(SIDE, SIDE))


def test_sharded_checkpoint_loads(state, tmp_path):
    sharded = dimoo.load_dimoo(write_published(tmp_path / "sharded", state, shards=3), **LOAD)
    for k, x in sharded.llada.state_dict().items():
        assert torch.equal(x, state[k]), k


# --- the forward is the published one, padding or not


def reference_hidden(sd: dict, ids: torch.Tensor) -> torch.Tensor:
    """The published LLaDA forward of one unpadded sequence [T] up to ln_f, from the state dict."""
    p, T = "model.transformer", len(ids)
    hd = TINY.d_model // TINY.n_heads

    def rms(x, w):
        return sd[w] * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + TINY.rms_norm_eps))

    inv = 1.0 / TINY.rope_theta ** (torch.arange(0, hd, 2).float() / hd)
    ang = torch.arange(T).float()[:, None] * inv
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()

    def rot(x):  # [h, T, hd]
        return x * cos + torch.cat([-x[..., hd // 2 :], x[..., : hd // 2]], -1) * sin

    x = sd[f"{p}.wte.weight"][ids]
    for i in range(TINY.n_layers):
        b = f"{p}.blocks.{i}"
        h = rms(x, f"{b}.attn_norm.weight")
        q = (h @ sd[f"{b}.q_proj.weight"].T).view(T, TINY.n_heads, hd).transpose(0, 1)
        k = (h @ sd[f"{b}.k_proj.weight"].T).view(T, TINY.n_kv_heads, hd).transpose(0, 1)
        v = (h @ sd[f"{b}.v_proj.weight"].T).view(T, TINY.n_kv_heads, hd).transpose(0, 1)
        rep = TINY.n_heads // TINY.n_kv_heads
        k, v = rot(k).repeat_interleave(rep, 0), v.repeat_interleave(rep, 0)
        att = torch.softmax(rot(q) @ k.transpose(1, 2) / math.sqrt(hd), -1) @ v
        x = x + att.transpose(0, 1).reshape(T, -1) @ sd[f"{b}.attn_out.weight"].T
        h = rms(x, f"{b}.ff_norm.weight")
        x = x + (F.silu(h @ sd[f"{b}.ff_proj.weight"].T) * (h @ sd[f"{b}.up_proj.weight"].T)) @ sd[f"{b}.ff_out.weight"].T
    return rms(x, f"{p}.ln_f.weight")


def test_features_head_and_embedding_match_published_forward(base, state):
    g = torch.Generator().manual_seed(0)
    L = SIDE * SIDE
    tokens = torch.randint(0, CODEBOOK, (4, L), generator=g)
    tokens[torch.rand(4, L, generator=g) < 0.5] = base.mask_id
    cond = base.pad_prompts(PROMPTS)
    assert cond.shape == (4, PROMPT_LEN) and cond[1, :3].tolist() == [PAD] * 3  # left padding
    with torch.no_grad():
        f = base.features(tokens, cond)
        logits = base.head(f)
    assert f.shape == (4, base.seq_len, TINY.d_model)
    # the head is affine: the sampler guides features before it (sampling.guided)
    with torch.no_grad():
        torch.testing.assert_close(base.head(3 * f[:2] - 2 * f[2:]), 3 * logits[:2] - 2 * logits[2:],
                                   rtol=1e-4, atol=1e-4)
    ff_out = state["model.transformer.ff_out.weight"]
    for row, prompt in enumerate(PROMPTS):
        segment = torch.tensor(image_segment(SIDE, SIDE))
        codes = torch.where(tokens[row] == base.mask_id, SPECIAL_TOKENS["mask_token"], tokens[row] + dimoo.IMAGE_OFFSET)
        code_start = len(prompt) + 2
        image = code_start + torch.arange(SIDE)[:, None] * (SIDE + 1) + torch.arange(SIDE)
        ids = torch.cat([torch.tensor(prompt), segment])
        ids[image.flatten()] = codes
        ref = reference_hidden(state, ids)  # the published, unpadded sequence
        pad = PROMPT_LEN - len(prompt)
        torch.testing.assert_close(f[row, pad:], ref, rtol=1e-4, atol=1e-4)
        ref_logits = (ref @ ff_out.T)[image.flatten(), -CODEBOOK:]  # the reference takes the last 8192
        torch.testing.assert_close(logits[row], ref_logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(base.embed_tokens(tokens), state["model.transformer.wte.weight"][
        torch.where(tokens == base.mask_id, SPECIAL_TOKENS["mask_token"], tokens + dimoo.IMAGE_OFFSET)])
    with pytest.raises(ValueError, match="prompt ids"):
        base.features(tokens, cond[:, 1:])


def test_uncond_and_shortcut_context(base):
    cond = base.pad_prompts(PROMPTS[:2])
    both = torch.cat([cond, base.uncond(cond)])
    assert both[2].tolist() == [PAD] * (PROMPT_LEN - len(UNCOND)) + UNCOND
    ctx = base.shortcut_context(both)
    prefix = PROMPT_LEN + 2  # prompt, BOA, BOI: the reference's visible prefix
    assert ctx.prompt.shape == (4, prefix, TINY.d_model) and ctx.rope_theta == TINY.rope_theta
    assert ctx.prompt_valid[0].tolist() == [False] + [True] * (prefix - 1)  # one pad in a 5-id prompt
    assert not ctx.prompt_valid[2:].any()  # the unconditional branch sees no prompt
    assert ctx.positions[1].tolist()[: PROMPT_LEN + 1] == [0, 0, 0, 0, 1, 2, 3]  # pads do not count
    assert torch.equal(ctx.image_index, base.image_positions)


def test_cosine_schedule():
    for steps, L in [(64, 4096), (4, 16), (15, 256)]:
        counts = cosine_reveal_counts(steps, L)
        masked = [L - sum(counts[: s + 1]) for s in range(steps)]
        want = [max(1, math.floor(L * math.cos(math.pi / 2 * (s + 1) / steps))) for s in range(steps - 1)] + [0]
        assert masked == want and min(counts) >= 0
    with pytest.raises(ValueError, match="schedule"):
        SamplingRule(steps=4, schedule="linear")


# --- the project's sampler, extraction and training on this base


def dimoo_shortcut(seed: int = 2) -> Shortcut:
    torch.manual_seed(seed)
    shortcut = Shortcut(ShortcutSpec(dim=TINY.d_model, bottleneck_ratio=2, heads=2, variant="dimoo")).eval()
    with torch.no_grad():
        shortcut.up.weight.normal_(0, 0.1)  # a non-zero update (an untrained one is "reuse")
    return shortcut


def test_shortcut_predicting_some_positions_keeps_the_others(base):
    """at [B, P]: the rotary variant's queries keep their own positions; the others keep f."""
    shortcut = dimoo_shortcut()
    cond = base.pad_prompts(PROMPTS[:3])
    both = torch.cat([cond, base.uncond(cond)])
    g = torch.Generator().manual_seed(0)
    L = base.num_tokens
    tokens = torch.randint(0, base.codebook_size, (6, L), generator=g)
    new_positions = torch.stack([torch.randperm(L, generator=g)[:3] for _ in range(6)])
    at = base.image_positions[torch.stack([torch.randperm(L, generator=g)[: L // 2] for _ in range(6)])]
    with torch.no_grad():
        f = base.features(tokens, both)
        args = (f, base.embed_tokens(tokens.gather(1, new_positions), new_positions), None, torch.full((6,), 0.5))
        every = shortcut(*args, context=base.shortcut_context(both), new_positions=new_positions)
        some = shortcut(*args, context=base.shortcut_context(both), new_positions=new_positions, at=at)
    wanted = torch.zeros(6, f.shape[1], 1, dtype=torch.bool).scatter(1, at[..., None], True)
    torch.testing.assert_close(some, torch.where(wanted, every, f), rtol=1e-5, atol=1e-5)
    assert not torch.equal(every, f)


def test_generate_vanilla_and_shortcut(base):
    cond = base.pad_prompts(PROMPTS[:3])
    vanilla = generate(base, RULE, cond, [0, 1, 2], seed=5, record=True)
    assert vanilla.tokens.shape == (3, SIDE * SIDE) and (vanilla.tokens < CODEBOOK).all()
    assert vanilla.features.shape == (3, 2, RULE.steps, base.seq_len, TINY.d_model)
    shortcut = dimoo_shortcut()
    fast = generate(base, RULE, cond, [0, 1, 2], seed=5, budget=2, source=Learned(shortcut, base), record=True)
    assert (fast.tokens < CODEBOOK).all() and (fast.order >= 0).all()
    assert torch.equal(fast.features[:, :, 0], vanilla.features[:, :, 0])  # step 0 is a full step
    assert not torch.equal(fast.features[:, :, 1], vanilla.features[:, :, 1])  # step 1 is predicted
    same = generate(base, RULE, cond, [0, 1, 2], seed=5, budget=RULE.steps, source=Learned(shortcut, base))
    assert torch.equal(same.tokens, vanilla.tokens)
    maskgit_variant = Shortcut(ShortcutSpec(dim=TINY.d_model, heads=2))
    with pytest.raises(ValueError, match="takes no base context"):
        generate(base, RULE, cond, [0, 1, 2], seed=5, budget=2, source=Learned(maskgit_variant, base))


def test_extract_and_train_shortcut(base, tmp_path):
    url = str(tmp_path / "traj.zarr")
    prompts = base.pad_prompts(PROMPTS)
    store = open_store(url, base, RULE, num_samples=4, dtype="float32", unit_size=2, seed=0, num_classes=0,
                       prompt_len=PROMPT_LEN)
    extract(store, base, RULE, batch_size=2, progress=False, prompts=prompts)
    assert store.is_complete() and store.labels.shape == (4, PROMPT_LEN)
    assert torch.equal(torch.from_numpy(store.labels[:]), prompts)
    again = generate(base, RULE, prompts[2:], [2, 3], seed=0)
    assert torch.equal(torch.from_numpy(store.tokens[2:]).long(), again.tokens)
    train_set, val_set = PairDataset(url, range(3)), PairDataset(url, range(3, 4))
    assert torch.equal(train_set[0]["cond"], prompts[0])
    log = []
    model = train_shortcut(Shortcut(ShortcutSpec(dim=TINY.d_model, heads=2, variant="dimoo")), base, train_set,
                           steps=2, batch_size=6, lr=1e-3, lr_decay_at=1, weight_decay=0.01, ema_decay=0.9,
                           ema_warmup=0, grad_clip=1.0, num_workers=0, seed=0, device=torch.device("cpu"),
                           pairs_per_trajectory=6, log=lambda step, stats: log.append(stats), log_every=1,
                           progress=False)  # fmt: skip
    assert len(log) == 2 and all(math.isfinite(s["loss"]) for s in log)
    per_step = validate_shortcut(model, base, val_set, device=torch.device("cpu"))
    assert len(per_step) == RULE.steps - 1 and all(math.isfinite(r["mse"]) for r in per_step)


# --- the registry, and failures that name what is wrong


def test_registry_builder(folder, base):
    built = build_base({"kind": "dimoo", "path": str(folder), "hash": "abc", **LOAD})
    assert built.base_id == "dimoo:abc"
    tokens = torch.full((1, SIDE * SIDE), base.mask_id)
    cond = base.pad_prompts(PROMPTS[:1])
    torch.testing.assert_close(built.features(tokens, cond), base.features(tokens, cond))
    with pytest.raises(ValueError, match="unknown keys.*prompt_length"):
        build_base({"kind": "dimoo", "path": str(folder), "prompt_length": 6})


def test_published_base_is_checked_against_params(folder, state):
    sizes = dict(depth=TINY.n_layers, width=TINY.d_model, heads=TINY.n_heads,
                 mlp_ratio=TINY.mlp_hidden_size / TINY.d_model)
    published = {"files": {"model": str(folder)}, "prompt_len": PROMPT_LEN}
    base, extra = load_published(BaseConfig(name="dimoo", published=published, **sizes), IMAGE_SIZE, UNCOND)
    assert extra == {"vq": str(folder)} and base.uncond_prompt == UNCOND
    wrong = BaseConfig(name="dimoo", published=published, **{**sizes, "depth": 3, "heads": 8})
    with pytest.raises(ValueError, match=rf"{folder}/config.json does not match params.yaml: "
                                         r"base.depth=3 \(config.json: 2\), base.heads=8 \(config.json: 4\)$"):
        load_published(wrong, IMAGE_SIZE, UNCOND)


@pytest.mark.parametrize("key, change", [
    ("model.transformer.blocks.1.up_proj.weight", "missing"),
    ("model.transformer.blocks.0.k_proj.weight", "misshapen"),
    ("model.transformer.blocks.0.q_proj.bias", "unexpected"),
])  # fmt: skip
def test_bad_tensor_is_named(state, tmp_path, key, change):
    bad = dict(state)
    if change == "missing":
        del bad[key]
    elif change == "misshapen":
        bad[key] = torch.zeros(bad[key].shape[0] + 1, *bad[key].shape[1:])
    else:
        bad[key] = torch.zeros(TINY.d_model)
    folder = write_published(tmp_path / "bad", bad)
    with pytest.raises(ValueError, match=rf"{folder}.*{change if change != 'misshapen' else ''}.*{key}"):
        dimoo.load_dimoo(folder, **LOAD)


def test_unsupported_config_and_missing_files_are_named(state, tmp_path):
    folder = write_published(tmp_path / "tied", state)
    (folder / "config.json").write_text(json.dumps({**TINY.config_json(), "weight_tying": True}))
    with pytest.raises(ValueError, match="weight_tying=True"):
        dimoo.load_dimoo(folder, **LOAD)
    (folder / "model.safetensors").unlink()
    (folder / "config.json").write_text(json.dumps(TINY.config_json()))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        dimoo.load_dimoo(folder, **LOAD)


# --- the VQ decoder: a tiny random diffusers VQModel, saved as the published folder holds it


def write_vq_model(folder, blocks: int = 5):
    """`<folder>/vqvae`: a VQModel laid out as Lumina-DiMOO's (codebook lookup, upsampling by
    2**(blocks - 1)), random and tiny."""
    from diffusers import VQModel

    torch.manual_seed(0)
    vq = VQModel(block_out_channels=(8,) * blocks, latent_channels=4, norm_num_groups=4,
                 down_block_types=("DownEncoderBlock2D",) * blocks,
                 up_block_types=("UpDecoderBlock2D",) * blocks,
                 num_vq_embeddings=CODEBOOK, lookup_from_codebook=True)
    vq.save_pretrained(folder / "vqvae")
    return vq.eval()


def test_vq_decoder_decodes_as_the_published_code_does(folder, tmp_path):
    vq = write_vq_model(tmp_path / "vq")
    built = build_base({"kind": "dimoo", "path": str(folder), "vq": str(tmp_path / "vq"), **LOAD})
    assert "decoder" not in "".join(built.state_dict())  # the checkpoint holds the transformer only
    tokens = torch.randint(0, CODEBOOK, (2, SIDE * SIDE))
    images = built.decode(tokens)
    # the published decode_vq_to_image: the codes looked up in the codebook (no re-quantization)
    with torch.no_grad():
        quant = vq.quantize.embedding(tokens.view(2, SIDE, SIDE)).permute(0, 3, 1, 2)
        expected = vq.decoder(vq.post_quant_conv(quant)).clamp(0, 1)
    assert images.shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE)
    torch.testing.assert_close(images, expected)


def test_vq_decoder_names_what_is_missing_or_wrong(monkeypatch, tmp_path):
    with pytest.raises(FileNotFoundError, match="elsewhere/vqvae is missing"):
        dimoo.VQDecoder(tmp_path / "elsewhere")
    write_vq_model(tmp_path / "small", blocks=4)
    with pytest.raises(ValueError, match="downsamples by 8, not 16"):
        dimoo.VQDecoder(tmp_path / "small")
    monkeypatch.setitem(sys.modules, "diffusers", None)  # not installed
    with pytest.raises(ImportError, match="needs diffusers"):
        dimoo.VQDecoder(tmp_path / "small")
