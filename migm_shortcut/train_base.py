"""Training loop of the base MaskGIT (the model's loss lives with the model)."""

import math

import torch
from tqdm import tqdm

from .training import Log, TrainingState, autocast, check_finite


def train_base(base, codes: torch.Tensor, labels: torch.Tensor, val_codes: torch.Tensor, val_labels: torch.Tensor, *,
               steps: int, batch_size: int, lr: float, warmup: int, weight_decay: float, seed: int,
               device: torch.device, log: Log | None = None, log_every: int = 25, progress: bool = True,
               state: TrainingState | None = None) -> dict:
    """MaskGIT training: AdamW, linear warm-up then cosine decay. Returns final validation loss.

    state: where the run is saved now and then, and resumed from."""
    gen = torch.Generator().manual_seed(seed)
    params = [p for n, p in base.named_parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(warmup, 1)) * 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0))))
    state = state or TrainingState()
    start = state.resume(model=base, optimizer=opt, schedule=sched, generator=gen)
    base.train()
    base.tokenizer.eval()
    bar = tqdm(state.updates(steps), desc="base", initial=start, total=steps, disable=not progress, leave=False)
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
