"""Tiny random models shared by the sampler, shortcut and extraction tests (CPU, seconds).

Imported by the tests as a plain module (`from tiny_models import ...`); not a test file itself.
"""

import pytest
import torch

from migm_shortcut.bases import build_base
from migm_shortcut.shortcut import Shortcut, ShortcutSpec

TINY_BASE = {
    "kind": "tiny-maskgit",
    "tokenizer": dict(codebook_size=16, code_dim=8, hidden=16, channels=1, ema_decay=0.99, image_size=28),
    "num_classes": 10,
    "model": dict(depth=2, width=32, heads=4, mlp_ratio=2.0, label_dropout=0.1),
}
SHORTCUT_SPEC = dict(dim=32, bottleneck_ratio=2, heads=2)


def make_base(seed: int = 0):
    torch.manual_seed(seed)
    return build_base(TINY_BASE).eval().requires_grad_(False)


def make_shortcut(seed: int = 1, **spec) -> Shortcut:
    """A shortcut whose update is not zero: its output projection (and adaLN) start at zero, so an
    untrained one would equal the reuse baseline."""
    torch.manual_seed(seed)
    shortcut = Shortcut(ShortcutSpec(**{**SHORTCUT_SPEC, **spec}))
    with torch.no_grad():
        shortcut.up.weight.copy_(torch.randn_like(shortcut.up.weight) * 0.1)
        shortcut.up.bias.copy_(torch.randn_like(shortcut.up.bias) * 0.1)
        if shortcut.time is not None:
            shortcut.time[-1].weight.copy_(torch.randn_like(shortcut.time[-1].weight) * 0.1)
    return shortcut.eval().requires_grad_(False)



@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run ~50x faster on one intra-op thread than on two contended ones; restored after.
    A test module that imports this fixture gets it automatically (autouse)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
