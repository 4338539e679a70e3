"""A small convolutional VQ-VAE: images -> a grid of discrete codes (downsampling 4, 28x28 -> 7x7).

The quantizer uses the recipe that survived on MNIST (STACK_NOTES): an EMA codebook (no codebook
gradient) initialised from encoder outputs, restarts of dead codes, a linear decoder output that is
clamped only when decoding. A sigmoid output with a random codebook collapsed to 1-3 codes.
"""

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .data import to_float


class ResBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.ReLU(), nn.Conv2d(width, width // 2, 3, padding=1), nn.ReLU(), nn.Conv2d(width // 2, width, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class EMAQuantizer(nn.Module):
    """Nearest-neighbour quantizer whose codebook is an EMA of the encoder outputs assigned to it."""

    def __init__(self, codebook_size: int, code_dim: int, decay: float, dead_threshold: float = 0.5):
        super().__init__()
        self.decay, self.dead_threshold = decay, dead_threshold
        self.register_buffer("codebook", torch.randn(codebook_size, code_dim))
        self.register_buffer("ema_count", torch.ones(codebook_size))
        self.register_buffer("ema_sum", self.codebook.clone())
        # A buffer, not a Python flag, so that a loaded checkpoint is not re-initialised.
        self.register_buffer("initialized", torch.tensor(False))

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """z [N, D] -> code index [N]."""
        dist = z.pow(2).sum(1, keepdim=True) - 2 * z @ self.codebook.T + self.codebook.pow(2).sum(1)
        return dist.argmin(1)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """z [B, D, h, w] -> (straight-through quantized z, codes [B, h*w], commitment MSE)."""
        b, d, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, d)
        if self.training:
            self._update(flat.detach())
        codes = self.nearest(flat.detach())
        q = self.codebook[codes].view(b, h, w, d).permute(0, 3, 1, 2)
        commit = F.mse_loss(z, q.detach())
        return z + (q - z).detach(), codes.view(b, h * w), commit

    @torch.no_grad()
    def _update(self, flat: torch.Tensor) -> None:
        k = len(self.codebook)
        if not self.initialized:
            self.codebook.copy_(flat[_sample(len(flat), k, flat.device)])
            self.ema_sum.copy_(self.codebook)
            self.ema_count.fill_(1.0)
            self.initialized.fill_(True)
        onehot = F.one_hot(self.nearest(flat), k).type_as(flat)
        self.ema_count.mul_(self.decay).add_(onehot.sum(0), alpha=1 - self.decay)
        self.ema_sum.mul_(self.decay).add_(onehot.T @ flat, alpha=1 - self.decay)
        # Laplace smoothing keeps rarely used codes from dividing by ~0.
        n = self.ema_count.sum()
        count = (self.ema_count + 1e-5) / (n + k * 1e-5) * n
        self.codebook.copy_(self.ema_sum / count.unsqueeze(1))
        # Codes that (almost) no longer win any vector never move again: restart them on live data.
        dead = self.ema_count < self.dead_threshold
        if dead.any():
            fresh = flat[_sample(len(flat), int(dead.sum()), flat.device)]
            self.codebook[dead] = fresh
            self.ema_sum[dead] = fresh
            self.ema_count[dead] = 1.0


def _sample(n: int, k: int, device: torch.device) -> torch.Tensor:
    """k indices into range(n), without replacement when possible."""
    return torch.randperm(n, device=device)[:k] if k <= n else torch.randint(n, (k,), device=device)


class VQTokenizer(nn.Module):
    downsample = 4

    def __init__(
        self,
        *,
        codebook_size: int = 256,
        code_dim: int = 32,
        hidden: int = 64,
        channels: int = 1,
        ema_decay: float = 0.99,
        image_size: int = 28,
    ):
        super().__init__()
        if image_size % self.downsample:
            raise ValueError(f"image_size {image_size} must be divisible by {self.downsample}")
        self.codebook_size, self.image_size, self.channels = codebook_size, image_size, channels
        # Half width at the 14x14 level: those layers cost the most time per parameter on a CPU.
        self.encoder = nn.Sequential(
            nn.Conv2d(channels, hidden // 2, 4, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(hidden // 2, hidden, 4, stride=2, padding=1),
            ResBlock(hidden),
            ResBlock(hidden),
            nn.ReLU(),
            nn.Conv2d(hidden, code_dim, 1),
        )
        self.quantizer = EMAQuantizer(codebook_size, code_dim, ema_decay)
        self.decoder = nn.Sequential(
            nn.Conv2d(code_dim, hidden, 3, padding=1),
            ResBlock(hidden),
            ResBlock(hidden),
            nn.ReLU(),
            nn.ConvTranspose2d(hidden, hidden // 2, 4, stride=2, padding=1),
            nn.ReLU(),
            nn.ConvTranspose2d(hidden // 2, channels, 4, stride=2, padding=1),
        )

    @property
    def grid(self) -> tuple[int, int]:
        side = self.image_size // self.downsample
        return side, side

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x in [0, 1] -> (unclamped reconstruction, codes [B, h*w], commitment loss)."""
        q, codes, commit = self.quantizer(self.encoder(x))
        return self.decoder(q), codes, commit

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images [B, C, H, W] in [0, 1] -> codes [B, h*w] (row-major)."""
        z = self.encoder(x)
        return self.quantizer.nearest(z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])).view(len(x), -1)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes [B, h*w] -> images [B, C, H, W] in [0, 1]."""
        h, w = self.grid
        q = self.quantizer.codebook[codes].view(len(codes), h, w, -1).permute(0, 3, 1, 2)
        return self.decoder(q).clamp(0, 1)


def fit_tokenizer(
    model: VQTokenizer,
    train_images: torch.Tensor,
    val_images: torch.Tensor,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    beta: float = 0.25,
    log: Callable[[int, dict], None] | None = None,
    log_every: int = 50,
    progress: bool = True,
) -> dict:
    """Train on uint8 images; return val metrics (mse, codebook usage, perplexity)."""
    # The quantizer's initialisation and restarts draw from the global generator.
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    model.train()
    order, pos = torch.randperm(len(train_images), generator=gen), 0
    bar = tqdm(range(1, steps + 1), desc="tokenizer", disable=not progress, leave=False)
    for step in bar:
        if pos + batch_size > len(order):  # a new epoch
            order, pos = torch.randperm(len(train_images), generator=gen), 0
        x = to_float(train_images[order[pos : pos + batch_size]])
        pos += batch_size
        recon, codes, commit = model(x)
        mse = F.mse_loss(recon, x)
        loss = mse + beta * commit
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % log_every == 0 or step == steps:
            stats = {"loss": loss.item(), "mse": mse.item(), "batch_usage": codes.unique().numel() / model.codebook_size}
            bar.set_postfix(mse=f"{stats['mse']:.4f}", used=f"{stats['batch_usage']:.2f}")
            if log:
                log(step, stats)
    metrics = evaluate_tokenizer(model, val_images, batch_size=500)
    if log:
        log(steps, {f"val_{k}": v for k, v in metrics.items()})
    return metrics


@torch.no_grad()
def evaluate_tokenizer(model: VQTokenizer, images: torch.Tensor, batch_size: int = 500) -> dict:
    """Reconstruction MSE (pixels in [0, 1]), fraction of codes used and code perplexity."""
    was_training = model.training
    model.eval()
    sq_err, counts = 0.0, torch.zeros(model.codebook_size)
    for chunk in images.split(batch_size):
        x = to_float(chunk)
        codes = model.encode(x)
        sq_err += (model.decode(codes) - x).pow(2).sum().item()
        counts += torch.bincount(codes.flatten(), minlength=model.codebook_size).float()
    model.train(was_training)
    p = counts / counts.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum().item()
    return {"mse": sq_err / images.numel(), "usage": (counts > 0).float().mean().item(), "perplexity": math.exp(entropy)}


@torch.no_grad()
def encode_dataset(model: VQTokenizer, images: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """uint8 images [n, C, H, W] -> codes LongTensor [n, h*w]."""
    was_training = model.training
    model.eval()
    codes = torch.cat([model.encode(to_float(chunk)) for chunk in images.split(batch_size)])
    model.train(was_training)
    return codes


def tokenizer_config(tokenizer, image_size: int, channels: int) -> dict:
    """The VQTokenizer arguments (its checkpoint's "model") of params.yaml's `tokenizer` section."""
    t = tokenizer
    return dict(codebook_size=t.codebook_size, code_dim=t.code_dim, hidden=t.hidden, channels=channels,
                ema_decay=t.ema_decay, image_size=image_size)
