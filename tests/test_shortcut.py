"""The shortcut model (SPEC section 4) and the small training helpers (EMA, finiteness, validation)."""

import numpy as np
import pytest
import torch
from tiny_models import SHORTCUT_SPEC, make_base, make_shortcut, one_thread  # noqa: F401 (autouse fixture)

from migm_shortcut.schedules import reveal_counts
from migm_shortcut.layers import attention
from migm_shortcut.shortcut import Attention, Shortcut, ShortcutSpec
from migm_shortcut.store import PairDataset, TrajectoryStore
from migm_shortcut.train_shortcut import validate_shortcut
from migm_shortcut.training import EMA, check_finite

B, S, L, D = 3, 50, 49, 32  # tiny base: 7x7 image tokens + class slot, width 32
ABLATIONS = [dict(), dict(cross_attention=False), dict(time_embedding=False),
             dict(cross_attention=False, time_embedding=False)]  # fmt: skip


def inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(B, S, D, generator=g)
    new_embed = torch.randn(B, L, D, generator=g)
    new_mask = torch.rand(B, L, generator=g) < 0.2
    new_mask[:, 0] = True  # every row has at least one new token unless a test clears it
    ratio = torch.tensor([0.9, 0.5, 0.1])
    return f, new_embed, new_mask, ratio


@pytest.mark.parametrize("ablation", ABLATIONS)
def test_untrained_shortcut_is_reuse(ablation):
    shortcut = Shortcut(ShortcutSpec(**SHORTCUT_SPEC, **ablation)).eval()
    f, new_embed, new_mask, ratio = inputs()
    with torch.no_grad():
        out = shortcut(f, new_embed, new_mask, ratio)
    assert torch.equal(out, f)


@pytest.mark.parametrize("ablation", ABLATIONS)
def test_output_shape_and_update(ablation):
    shortcut = make_shortcut(**ablation)
    f, new_embed, new_mask, ratio = inputs()
    with torch.no_grad():
        out = shortcut(f, new_embed, new_mask, ratio)
    assert out.shape == (B, S, D) and out.dtype == f.dtype
    assert torch.isfinite(out).all()
    assert (out - f).abs().mean() > 1e-3  # a trained-like shortcut moves the feature


def test_row_without_new_tokens_is_finite_and_ignores_embeddings():
    shortcut = make_shortcut()
    f, new_embed, new_mask, ratio = inputs()
    new_mask[0] = False
    with torch.no_grad():
        out = shortcut(f, new_embed, new_mask, ratio)
        other = shortcut(f, new_embed + torch.randn_like(new_embed), new_mask, ratio)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[0], other[0], rtol=0, atol=1e-6)  # nothing new: embeddings unused
    assert not torch.allclose(out[1], other[1])  # rows with new tokens do use them
    # all rows empty (e.g. a batch of steps that committed nothing) is finite as well
    with torch.no_grad():
        empty = shortcut(f, new_embed, torch.zeros_like(new_mask), ratio)
    assert torch.isfinite(empty).all()


def test_cross_attention_sees_only_new_tokens():
    shortcut = make_shortcut()
    f, new_embed, new_mask, ratio = inputs()
    noise = torch.randn_like(new_embed)
    with torch.no_grad():
        out = shortcut(f, new_embed, new_mask, ratio)
        old_changed = shortcut(f, torch.where(new_mask[..., None], new_embed, noise), new_mask, ratio)
        new_changed = shortcut(f, torch.where(new_mask[..., None], noise, new_embed), new_mask, ratio)
    torch.testing.assert_close(out, old_changed, rtol=0, atol=1e-5)
    assert not torch.allclose(out, new_changed)


@pytest.mark.parametrize("keys", [1, 3, 16])  # heads x keys <= width: the keys carry the projections
def test_attention_over_few_keys_is_the_same_attention(keys):
    torch.manual_seed(0)
    attn = Attention(D, heads=2)
    x, context = torch.randn(B, S, D), torch.randn(B, keys, D)
    with torch.no_grad():
        k, v = attn.kv(context).chunk(2, dim=-1)
        expected = attn.proj(attention(attn.q(x), k, v, 2))
        torch.testing.assert_close(attn(x, context), expected)


def test_cross_heads_split_the_cross_attention_alone():
    """cross_heads: the cross-attention's heads, the self-attention's stay `heads`; unset (older
    checkpoints' specs), the cross-attention has `heads`. The split changes what the step gives."""
    block = make_shortcut(heads=1, cross_heads=4).blocks[0]
    assert block.cross["attn"].heads == 4 and block.self_attn.heads == 1
    assert make_shortcut(heads=1).blocks[0].cross["attn"].heads == 1
    f, new_embed, new_mask, ratio = inputs()
    with torch.no_grad():
        one, four = (make_shortcut(heads=1, cross_heads=h)(f, new_embed, new_mask, ratio) for h in (1, 4))
    assert not torch.allclose(one, four, atol=1e-4)
    with pytest.raises(ValueError, match="cross_heads=3 must divide the bottleneck width 16"):
        Shortcut(ShortcutSpec(**{**SHORTCUT_SPEC, "cross_heads": 3}))


def test_ffn_ratios_size_the_ffns_before_and_after_the_self_attention():
    """Unset (older checkpoints' specs): the SPEC's 4x GELU FFNs, DiMOO's 6x SwiGLU."""
    block = make_shortcut(ffn_ratios=(2, 8)).blocks[0]  # width 16
    assert block.cross["ffn"][1].out_features == 32 and block.ffn[1].out_features == 128
    spec_sizes = make_shortcut().blocks[0]
    assert spec_sizes.cross["ffn"][1].out_features == spec_sizes.ffn[1].out_features == 64
    dimoo = Shortcut(ShortcutSpec(**{**SHORTCUT_SPEC, "variant": "dimoo"})).blocks[0]
    assert dimoo.cross["ffn"].up.out_features == dimoo.ffn.up.out_features == 96


@pytest.mark.parametrize("cross_heads", [None, 4])  # 4 heads x 3 keys: still the few-keys path
def test_gathered_new_tokens_give_what_the_masked_ones_give(cross_heads):
    """The sampler hands the shortcut only the new tokens (few keys); training, all L under a mask."""
    shortcut = make_shortcut(cross_heads=cross_heads)
    f, new_embed, _, ratio = inputs()
    g = torch.Generator().manual_seed(0)
    positions = torch.stack([torch.randperm(L, generator=g)[:3] for _ in range(B)])
    new_mask = torch.zeros(B, L, dtype=torch.bool).scatter(1, positions, True)
    gathered = new_embed.gather(1, positions[..., None].expand(-1, -1, D))
    with torch.no_grad():
        torch.testing.assert_close(shortcut(f, gathered, None, ratio, new_positions=positions),
                                   shortcut(f, new_embed, new_mask, ratio), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("blocks", [1, 2])
@pytest.mark.parametrize("ablation", ABLATIONS)
def test_predicting_some_positions_keeps_the_others(blocks, ablation):
    """at: the positions the sampler reads. Those are what the whole step gives; the rest keep f."""
    shortcut = make_shortcut(blocks=blocks, **ablation)
    f, new_embed, new_mask, ratio = inputs()
    g = torch.Generator().manual_seed(1)
    at = torch.stack([torch.randperm(S, generator=g)[:20] for _ in range(B)])
    wanted = torch.zeros(B, S, dtype=torch.bool).scatter(1, at, True)[..., None]
    with torch.no_grad():
        every = shortcut(f, new_embed, new_mask, ratio)
        some = shortcut(f, new_embed, new_mask, ratio, at=at)
    torch.testing.assert_close(some, torch.where(wanted, every, f), rtol=1e-5, atol=1e-5)
    assert not torch.equal(every, f)  # the step changes what it predicts: the check can fail


def test_samples_are_independent_of_their_batch():
    shortcut = make_shortcut()
    f, new_embed, new_mask, ratio = inputs()
    with torch.no_grad():
        whole = shortcut(f, new_embed, new_mask, ratio)
        alone = shortcut(f[1:2], new_embed[1:2], new_mask[1:2], ratio[1:2])
    torch.testing.assert_close(alone[0], whole[1], rtol=1e-5, atol=1e-5)


def test_ablation_switches_remove_their_input():
    f, new_embed, new_mask, ratio = inputs()
    other_embed, other_mask, other_ratio = torch.randn_like(new_embed), torch.rand(B, L) < 0.5, ratio.flip(0)
    full = make_shortcut()
    no_cross = make_shortcut(cross_attention=False)
    no_time = make_shortcut(time_embedding=False)
    assert no_cross.down_new is None and all(b.cross is None for b in no_cross.blocks)
    assert no_time.time is None
    assert sum(p.numel() for p in no_cross.parameters()) < sum(p.numel() for p in full.parameters())
    with torch.no_grad():
        # no cross-attention: the new tokens do not matter
        torch.testing.assert_close(no_cross(f, new_embed, new_mask, ratio), no_cross(f, other_embed, other_mask, ratio))
        # no time embedding: the mask ratio does not matter
        torch.testing.assert_close(no_time(f, new_embed, new_mask, ratio), no_time(f, new_embed, new_mask, other_ratio))
        # the full model depends on both
        base_out = full(f, new_embed, new_mask, ratio)
        assert not torch.allclose(base_out, full(f, other_embed, new_mask, ratio))
        assert not torch.allclose(base_out, full(f, new_embed, new_mask, other_ratio))


def test_heads_must_divide_the_bottleneck():
    with pytest.raises(ValueError, match="heads"):
        Shortcut(ShortcutSpec(dim=32, bottleneck_ratio=2, heads=3))


def test_untrained_shortcut_learns_from_the_start():
    # zero output projection: the first gradient reaches it, so training can leave "reuse"
    shortcut = Shortcut(ShortcutSpec(**SHORTCUT_SPEC)).train()
    f, new_embed, new_mask, ratio = inputs()
    target = f + torch.randn_like(f) * 0.1
    (shortcut(f, new_embed, new_mask, ratio) - target).pow(2).mean().backward()
    assert shortcut.up.weight.grad.abs().sum() > 0 and shortcut.up.bias.grad.abs().sum() > 0


# EMA and finiteness


def test_ema_copies_during_warmup_then_averages():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    ema = EMA(model, decay=0.9, warmup=2)
    assert ema.model is not model and not any(p.requires_grad for p in ema.model.parameters())
    assert not ema.model.training

    def perturb():
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model[1].num_batches_tracked += 3

    for step in (1, 2):  # warm-up: a plain copy
        perturb()
        ema.update(model, step)
        for a, b in zip(ema.model.state_dict().values(), model.state_dict().values()):
            assert torch.equal(a, b)

    before = {k: v.clone() for k, v in ema.model.state_dict().items()}
    perturb()
    live = {k: v.clone() for k, v in model.state_dict().items()}
    ema.update(model, 3)
    for k, v in ema.model.state_dict().items():
        if v.is_floating_point():
            torch.testing.assert_close(v, 0.9 * before[k] + 0.1 * live[k])
            if not torch.equal(before[k], live[k]):
                assert not torch.equal(v, live[k])
        else:  # counters are copied, not averaged
            assert torch.equal(v, live[k])
    # the live model is untouched by the average
    for k, v in model.state_dict().items():
        assert torch.equal(v, live[k])


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_check_finite_raises(value):
    with pytest.raises(FloatingPointError, match="update 17"):
        check_finite(torch.tensor(value), 17, "shortcut")


def test_check_finite_accepts_finite():
    check_finite(torch.tensor(3.5), 1, "shortcut")
    check_finite(torch.tensor(0.0), 1, "base")


# validation on a tiny store


def tiny_store(url: str, steps: int = 4, n: int = 4) -> dict:
    rng = np.random.default_rng(0)
    counts = reveal_counts(steps, L)
    order = np.stack([rng.permutation(np.repeat(np.arange(steps), counts)) for _ in range(n)])
    data = {
        "features": np.cumsum(rng.normal(size=(n, 2, steps, S, D)), axis=2).astype(np.float32),
        "tokens": rng.integers(0, 16, size=(n, L)),
        "order": order,
        "labels": np.arange(n) % 10,
    }
    store = TrajectoryStore.create_or_open(url, meta={"test": True}, num_samples=n, steps=steps, seq_len=S, dim=D,
                                           num_tokens=L, dtype="float32", unit_size=2)
    for unit in range(store.num_units):
        rows = store.unit_range(unit)
        store.write_unit(unit, **{k: v[rows.start : rows.stop] for k, v in data.items()})
    return data


def test_validate_untrained_shortcut_matches_reuse(tmp_path):
    base = make_base()
    data = tiny_store(str(tmp_path / "val.zarr"))
    val_set = PairDataset(str(tmp_path / "val.zarr"))
    rows = validate_shortcut(Shortcut(ShortcutSpec(**SHORTCUT_SPEC)), base, val_set, device=torch.device("cpu"),
                             batch_size=5)
    assert [r["step"] for r in rows] == [0, 1, 2]
    for r in rows:
        assert r["mse_ratio"] == 1.0
        assert r["mse"] == r["reuse_mse"] and r["cosine"] == r["reuse_cosine"]
        # the reuse baseline, by hand: mean over positions still masked in state s+1, both branches
        s = r["step"]
        f = data["features"]
        err = ((f[:, :, s] - f[:, :, s + 1]) ** 2).mean(-1)[:, :, 1:]  # [n, 2, L] image positions
        keep = np.broadcast_to((data["order"] > s)[:, None], err.shape)
        assert r["reuse_mse"] == pytest.approx(err[keep].mean(), rel=1e-5)

    trained_like = validate_shortcut(make_shortcut(), base, val_set, device=torch.device("cpu"))
    assert all(r["mse_ratio"] != 1.0 for r in trained_like)
    assert [r["reuse_mse"] for r in trained_like] == pytest.approx([r["reuse_mse"] for r in rows])
