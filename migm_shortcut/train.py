"""Training loops for the base MaskGIT and the shortcut, sharing the small helpers they need.

(The tokenizer and the domain classifier train in their own modules: each is one short loop.)
"""

import copy
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from .bases.contract import MaskedBase
from .shortcut import Shortcut
from .store import PairDataset, TrajectoryBatchSampler, pair_masks

Log = Callable[[int, dict], None]


class EMA:
    """Exponential moving average of a model's weights, for the checkpoint.

    The average starts after `warmup` updates (before that it copies the weights): early weights
    are noise, and with a decay sized to the run (1 - 1/decay ~ a tenth of the updates) the average
    then covers the part of training worth keeping.
    """

    def __init__(self, model: torch.nn.Module, decay: float, warmup: int):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.warmup = decay, warmup

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        decay = 0.0 if step <= self.warmup else self.decay
        for ema, live in zip(self.model.state_dict().values(), model.state_dict().values()):
            if ema.is_floating_point():
                ema.lerp_(live, 1 - decay)
            else:
                ema.copy_(live)


def check_finite(loss: torch.Tensor, step: int, what: str) -> None:
    if not torch.isfinite(loss):
        raise FloatingPointError(f"{what}: loss became {loss.item()} at update {step}; lower the lr or check the data")


def autocast(device: torch.device):
    """bf16 autocast on GPU; plain fp32 on CPU (no bf16 matmul units on these CPUs)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def train_base(base, codes: torch.Tensor, labels: torch.Tensor, val_codes: torch.Tensor, val_labels: torch.Tensor, *,
               steps: int, batch_size: int, lr: float, warmup: int, weight_decay: float, seed: int,
               device: torch.device, log: Log | None = None, log_every: int = 25, progress: bool = True) -> dict:
    """MaskGIT training: AdamW, linear warm-up then cosine decay. Returns final validation loss."""
    gen = torch.Generator().manual_seed(seed)
    params = [p for n, p in base.named_parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(warmup, 1)) * 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0))))
    base.train()
    base.tokenizer.eval()
    bar = tqdm(range(1, steps + 1), desc="base", disable=not progress, leave=False)
    for step in bar:
        index = torch.randint(len(codes), (batch_size,), generator=gen)
        with autocast(device):
            loss = base.loss(codes[index].to(device), labels[index].to(device), generator=gen)
        check_finite(loss, step, "base")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % log_every == 0 or step == steps:
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if log:
                log(step, {"loss": loss.item(), "lr": sched.get_last_lr()[0]})
    base.eval()
    val = {"val_loss": base_val_loss(base, val_codes, val_labels, seed=seed, device=device)}
    if log:
        log(steps, val)
    return val


@torch.no_grad()
def base_val_loss(base, codes: torch.Tensor, labels: torch.Tensor, *, seed: int, device: torch.device,
                  batch_size: int = 500) -> float:
    gen = torch.Generator().manual_seed(seed + 1)  # fixed masks: comparable across runs
    losses = [base.loss(c.to(device), y.to(device), generator=gen).item() * len(c)
              for c, y in zip(codes.split(batch_size), labels.split(batch_size))]
    return sum(losses) / len(codes)


def _loss_mask(base: MaskedBase, next_masked: torch.Tensor) -> torch.Tensor:
    """Feature positions [B, S] whose loss counts: image positions still masked in the next state."""
    mask = torch.zeros(len(next_masked), base.seq_len, dtype=torch.bool, device=next_masked.device)
    mask[:, base.image_positions] = next_masked
    return mask


def shortcut_step(shortcut: Shortcut, base: MaskedBase, feature, tokens, order, step):
    """One shortcut prediction of f_{step+1} from f_step, as the sampler makes it.

    Returns the prediction and the loss mask (positions still masked in state step+1)."""
    new_mask, next_masked, next_ratio = pair_masks(order, step)
    # In the sampler the current tokens hold the committed ids at new positions; the true final
    # tokens hold the same ids there, so the embedding the shortcut sees is identical.
    pred = shortcut(feature, base.embed_tokens(tokens), new_mask, next_ratio)
    return pred, _loss_mask(base, next_masked)


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    err = (pred.float() - target.float()).pow(2).mean(-1)
    return (err * mask).sum() / mask.sum().clamp(min=1)


def _batches(loader: DataLoader):
    while True:  # epochs without end; the loop counts updates, not epochs
        yield from loader


def train_shortcut(shortcut: Shortcut, base: MaskedBase, train_set: PairDataset, *, steps: int, batch_size: int,
                   lr: float, lr_decay_at: int, weight_decay: float, ema_decay: float, ema_warmup: int,
                   grad_clip: float, num_workers: int, seed: int, device: torch.device, pairs_per_trajectory: int = 16,
                   log: Log | None = None, log_every: int = 25, progress: bool = True) -> Shortcut:
    """Train the shortcut on stored trajectories (base frozen); return the EMA weights.

    With `train_set.unroll` = k > 1 each example chains k shortcut steps from a true f_s, feeding
    the model its own predictions and the true tokens, with the loss on every step: the model
    learns to correct the drift it meets when shortcut steps chain at inference.
    """
    torch.manual_seed(seed)
    base.requires_grad_(False)
    shortcut.to(device).train()
    opt = torch.optim.AdamW(shortcut.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 if s < lr_decay_at else 0.1)
    ema = EMA(shortcut, ema_decay, ema_warmup)
    sampler = TrajectoryBatchSampler(train_set, batch_size, pairs_per_trajectory, seed)
    loader = DataLoader(train_set, batch_sampler=sampler, num_workers=num_workers, persistent_workers=num_workers > 0)
    batches = _batches(loader)
    bar = tqdm(range(1, steps + 1), desc="shortcut", disable=not progress, leave=False)
    for update in bar:
        batch = {k: v.to(device, non_blocking=True) for k, v in next(batches).items()}
        x, loss = batch["feature"], 0.0
        with autocast(device):
            for j in range(train_set.unroll):
                x, mask = shortcut_step(shortcut, base, x, batch["tokens"], batch["order"], batch["step"] + j)
                loss = loss + masked_mse(x, batch["targets"][:, j], mask) / train_set.unroll
        check_finite(loss, update, "shortcut")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(shortcut.parameters(), grad_clip)
        opt.step()
        sched.step()
        ema.update(shortcut, update)
        if update % log_every == 0 or update == steps:
            bar.set_postfix(loss=f"{loss.item():.4f}")
            if log:
                log(update, {"loss": loss.item(), "lr": sched.get_last_lr()[0]})
    return ema.model


@torch.no_grad()
def validate_shortcut(shortcut: Shortcut, base: MaskedBase, val_set: PairDataset, *, device: torch.device,
                      batch_size: int = 256) -> list[dict]:
    """Per step s: MSE and cosine of the shortcut's f_{s+1} against the truth, beside "reuse f_s".

    Teacher-forced (true f_s), on positions still masked in state s+1, over held-out trajectories.
    """
    shortcut.eval()
    steps = val_set.pairs_per_branch
    sums = torch.zeros(steps, 5, dtype=torch.float64)  # mse, reuse mse, cos, reuse cos, positions
    loader = DataLoader(val_set, batch_size=batch_size)  # in order: consecutive pairs share a trajectory
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        pred, mask = shortcut_step(shortcut, base, batch["feature"], batch["tokens"], batch["order"], batch["step"])
        target = batch["targets"][:, 0]
        rows = [
            (pred - target).pow(2).mean(-1), (batch["feature"] - target).pow(2).mean(-1),
            F.cosine_similarity(pred, target, dim=-1), F.cosine_similarity(batch["feature"], target, dim=-1),
        ]  # fmt: skip
        per_item = torch.stack([(r * mask).sum(1) for r in rows] + [mask.sum(1).float()], 1).double().cpu()
        sums.index_add_(0, batch["step"].cpu(), per_item)
    n = sums[:, 4].clamp(min=1)
    return [
        {"step": s, "mse": sums[s, 0].item() / n[s].item(), "reuse_mse": sums[s, 1].item() / n[s].item(),
         "cosine": sums[s, 2].item() / n[s].item(), "reuse_cosine": sums[s, 3].item() / n[s].item(),
         "mse_ratio": sums[s, 0].item() / max(sums[s, 1].item(), 1e-30)}
        for s in range(steps)
    ]  # fmt: skip
