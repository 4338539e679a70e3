"""The tiny base's training: MaskGIT's loss (cosine masking, label dropout, loss on masked tokens)
and the loop that trains it."""

import math

import pytest
import torch
import torch.nn.functional as F
from tiny_models import TINY_BASE, one_thread  # noqa: F401 (autouse fixture)

from migm_shortcut.bases import build_base
from migm_shortcut.train_base import base_val_loss, train_base


@pytest.fixture
def base():
    torch.manual_seed(0)
    return build_base(TINY_BASE)


def loss_inputs(base, codes, labels, seed=0) -> tuple[torch.Tensor, ...]:
    """(loss, the tokens and classes the model saw, its logits) of one call of `base.loss`."""
    seen, features = {}, base.features

    def recorded(tokens, cond):
        seen["tokens"], seen["cond"] = tokens, cond
        seen["logits"] = base.head(f := features(tokens, cond))
        return f

    base.features = recorded
    try:
        loss = base.loss(codes, labels, generator=torch.Generator().manual_seed(seed))
    finally:
        del base.features
    return loss, seen["tokens"], seen["cond"], seen["logits"]


def random_codes(base, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(base.codebook_size, (n, base.num_tokens), generator=g)
    return codes, torch.arange(n) % base.num_classes


def test_masked_fraction_follows_the_cosine_schedule(base):
    codes, labels = random_codes(base, 4000)
    with torch.no_grad():
        _, tokens, _, _ = loss_inputs(base, codes, labels)
    L = base.num_tokens
    counts = (tokens == base.mask_id).sum(1)
    fraction = counts / L
    # ceil(cos(pi u / 2) L) of L positions for u ~ U(0, 1), at least one
    u = (torch.arange(100_000) + 0.5) / 100_000
    expected = (torch.ceil(torch.cos(u * math.pi / 2) * L).clamp(min=1) / L)
    assert fraction.mean().item() == pytest.approx(expected.mean().item(), abs=0.01)  # ~2/pi
    assert fraction.median().item() == pytest.approx(expected.median().item(), abs=0.03)
    assert counts.min() >= 1 and counts.max() == L
    unmasked = tokens != base.mask_id  # the rest keep their codes
    assert torch.equal(tokens[unmasked], codes[unmasked])


def test_labels_drop_to_the_null_class_at_the_dropout_rate(base):
    codes, labels = random_codes(base, 4000)
    with torch.no_grad():
        _, _, cond, _ = loss_inputs(base, codes, labels)
    dropped = cond == base.null_class
    rate = TINY_BASE["model"]["label_dropout"]
    assert dropped.float().mean().item() == pytest.approx(rate, abs=0.015)
    assert torch.equal(cond[~dropped], labels[~dropped])


def test_loss_is_the_cross_entropy_of_the_masked_positions_only(base):
    codes, labels = random_codes(base, 8)
    with torch.no_grad():
        loss, tokens, _, logits = loss_inputs(base, codes, labels)
    masked = tokens == base.mask_id
    assert 0 < masked.sum() < masked.numel()
    torch.testing.assert_close(loss, F.cross_entropy(logits[masked], codes[masked]))


def test_training_lowers_the_validation_loss(base):
    # Images of 4 of the 16 codes: a pattern a few updates pick up.
    g = torch.Generator().manual_seed(2)
    labels = torch.arange(200) % base.num_classes
    codes = torch.randint(4, (200, base.num_tokens), generator=g)
    before = base_val_loss(base, codes[160:], labels[160:], seed=0, device=torch.device("cpu"))
    logged = []
    val = train_base(base, codes[:160], labels[:160], codes[160:], labels[160:], steps=40,
                     batch_size=16, lr=1e-2, warmup=3, weight_decay=0.0, seed=0,
                     device=torch.device("cpu"), log_every=15, progress=False,
                     log=lambda step, stats: logged.append((step, sorted(stats))))
    assert val["val_loss"] < 0.7 * before  # from log 16 = 2.8 towards log 4 = 1.4
    assert logged == [(15, ["loss", "lr"]), (30, ["loss", "lr"]), (40, ["loss", "lr"]),
                      (40, ["val_loss"])]  # every log_every updates, the last, then validation
    assert not base.training  # left in eval mode for what follows
