"""The domain CNN classifier: class accuracy of samples, and (its penultimate layer) the cheap
feature extractor for a domain FID that runs in seconds on a CPU, unlike Inception-v3.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .data import Split, to_float


def _conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class DomainClassifier(nn.Module):
    def __init__(self, *, num_classes: int = 10, feature_dim: int = 128, channels: int = 1):
        super().__init__()
        self.body = nn.Sequential(
            _conv(channels, 32),
            nn.MaxPool2d(2),
            _conv(32, 64),
            nn.MaxPool2d(2),
            _conv(64, 128),
            nn.AdaptiveAvgPool2d(3),  # any input size gives the same feature layout
            nn.Flatten(),
            nn.Linear(128 * 9, feature_dim),
            nn.ReLU(),
        )
        self.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(feature_dim, num_classes))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Images [B, C, H, W] in [0, 1] -> penultimate features [B, feature_dim]."""
        return self.body(x * 2 - 1)  # centred input; BatchNorm takes care of the rest

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def random_shift(x: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Translate each image by its own random integer offset (zero fill): digits are not centred
    exactly the same way in generated samples."""
    b, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4)
    dy, dx = (torch.randint(0, 2 * max_shift + 1, (2, b, 1, 1), generator=gen))
    rows = (torch.arange(h).view(1, h, 1) + dy).expand(b, h, w)
    cols = (torch.arange(w).view(1, 1, w) + dx).expand(b, h, w)
    return padded[torch.arange(b).view(b, 1, 1), :, rows, cols].permute(0, 3, 1, 2)


def fit_classifier(
    model: DomainClassifier,
    train: Split,
    val: Split,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    max_shift: int = 2,
    log: Callable[[int, dict], None] | None = None,
    log_every: int = 50,
    progress: bool = True,
) -> dict:
    """Train with AdamW and a one-cycle schedule; return {"val_accuracy": ...}."""
    torch.manual_seed(seed)  # dropout draws from the global generator
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    model.train()
    order, pos = torch.randperm(len(train), generator=gen), 0
    bar = tqdm(range(1, steps + 1), desc="classifier", disable=not progress, leave=False)
    for step in bar:
        if pos + batch_size > len(order):  # a new epoch
            order, pos = torch.randperm(len(train), generator=gen), 0
        index = order[pos : pos + batch_size]
        pos += batch_size
        x = to_float(train.images[index])
        if max_shift:
            x = random_shift(x, max_shift, gen)
        logits = model(x)
        loss = F.cross_entropy(logits, train.labels[index])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % log_every == 0 or step == steps:
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if log:
                log(step, {"loss": loss.item(), "batch_accuracy": (logits.argmax(1) == train.labels[index]).float().mean().item()})
    metrics = {"val_accuracy": accuracy(model, val)}
    if log:
        log(steps, metrics)
    return metrics


@torch.no_grad()
def accuracy(model: DomainClassifier, split: Split, batch_size: int = 1000) -> float:
    was_training = model.training
    model.eval()
    correct = sum(
        (model(to_float(x)).argmax(1) == y).sum().item()
        for x, y in zip(split.images.split(batch_size), split.labels.split(batch_size))
    )
    model.train(was_training)
    return correct / len(split)
