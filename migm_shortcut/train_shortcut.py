"""Shortcut training on stored trajectories, and its per-step validation against "reuse"."""

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from . import distributed
from .bases.contract import MaskedBase
from .shortcut import Shortcut
from .store import PairDataset, TrajectoryBatchSampler, pair_masks
from .training import EMA, Log, TrainingState, autocast, check_finite


def _loss_mask(base: MaskedBase, next_masked: torch.Tensor) -> torch.Tensor:
    """Feature positions [B, S] whose loss counts: image positions still masked in the next state."""
    mask = torch.zeros(len(next_masked), base.seq_len, dtype=torch.bool, device=next_masked.device)
    mask[:, base.image_positions] = next_masked
    return mask


def branch_cond(base: MaskedBase, batch: dict) -> torch.Tensor:
    """Each item's condition as its CFG branch saw it: the stored one, or its unconditional form."""
    cond = batch["cond"]
    keep = (batch["branch"] == 0).view(-1, *[1] * (cond.ndim - 1))
    return torch.where(keep, cond, base.uncond(cond))


def shortcut_step(shortcut: Shortcut, base: MaskedBase, feature, tokens, order, step, cond=None):
    """One shortcut prediction of f_{step+1} from f_step, as the sampler makes it.

    cond: each item's branch condition (`branch_cond`), for bases that give the shortcut a context.
    Returns the prediction and the loss mask: positions still masked in state step+1 (MaskGIT), or
    every real position for context bases (DiMOO, SPEC section 9; prompt padding excluded)."""
    new_mask, next_masked, next_ratio = pair_masks(order, step)
    context = None if cond is None else base.shortcut_context(cond)
    # In the sampler the current tokens hold the committed ids at new positions; the true final
    # tokens hold the same ids there, so the embedding the shortcut sees is identical.
    pred = shortcut(feature, base.embed_tokens(tokens), new_mask, next_ratio, context=context)
    return pred, _loss_mask(base, next_masked) if context is None else context.valid


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
               count: torch.Tensor | None = None) -> torch.Tensor:
    """The squared error summed over `mask`'s positions, divided by `count` (default: their number)."""
    err = (pred.float() - target.float()).pow(2).mean(-1)
    return (err * mask).sum() / (mask.sum() if count is None else count).clamp(min=1)


def _batches(loader: DataLoader):
    while True:  # epochs without end; the loop counts updates, not epochs
        yield from loader


def train_shortcut(shortcut: Shortcut, base: MaskedBase, train_set: PairDataset, *, steps: int, batch_size: int,
                   lr: float, lr_decay_at: int, weight_decay: float, ema_decay: float, ema_warmup: int,
                   grad_clip: float, num_workers: int, seed: int, device: torch.device, pairs_per_trajectory: int = 16,
                   log: Log | None = None, log_every: int = 25, progress: bool = True,
                   state: TrainingState | None = None) -> Shortcut:
    """Train the shortcut on stored trajectories (base frozen); return the EMA weights.

    With `train_set.unroll` = k > 1 each example chains k shortcut steps from a true f_s, feeding
    the model its own predictions and the true tokens, with the loss on every step: the model
    learns to correct the drift it meets when shortcut steps chain at inference.

    Data-parallel when torch.distributed is initialised (`distributed.setup`): each rank trains on
    its slice of every global batch of `batch_size`, as one process would up to float rounding,
    and every rank returns the same EMA weights.

    state: where the run is saved now and then, and resumed from.
    """
    torch.manual_seed(seed)
    base.requires_grad_(False)
    shortcut.to(device).train()
    world = distributed.world_size()
    # DDP copies rank 0's weights to every rank here, and averages the ranks' gradients in backward.
    model = shortcut if world == 1 else DistributedDataParallel(
        shortcut, device_ids=[device.index] if device.type == "cuda" else None)
    opt = torch.optim.AdamW(shortcut.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 if s < lr_decay_at else 0.1)
    ema = EMA(shortcut, ema_decay, ema_warmup)
    state = state or TrainingState()
    start = state.resume(model=shortcut, optimizer=opt, schedule=sched, ema=ema.model)
    sampler = TrajectoryBatchSampler(train_set, batch_size, pairs_per_trajectory, seed, distributed.rank(), world,
                                     skip=start)  # one batch per update
    loader = DataLoader(train_set, batch_sampler=sampler, num_workers=num_workers, persistent_workers=num_workers > 0)
    batches = _batches(loader)
    bar = tqdm(state.updates(steps), desc="shortcut", initial=start, total=steps,
               disable=not progress or not distributed.is_main(), leave=False)
    for update in bar:
        batch = {k: v.to(device, non_blocking=True) for k, v in next(batches).items()}
        x, loss, cond = batch["feature"], 0.0, branch_cond(base, batch)
        with autocast(device):
            for j in range(train_set.unroll):
                x, mask = shortcut_step(model, base, x, batch["tokens"], batch["order"], batch["step"] + j, cond)
                # The global batch's mean: this rank's error sum over all ranks' positions, times
                # the world size that DDP's gradient average divides by again.
                count = distributed.all_sum(mask.sum())
                loss = loss + masked_mse(x, batch["targets"][:, j], mask, count) * world / train_set.unroll
        check_finite(loss, update, "shortcut")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(shortcut.parameters(), grad_clip)
        opt.step()
        sched.step()
        ema.update(shortcut, update)
        if update % log_every == 0 or update == steps:
            global_loss = distributed.all_sum(loss).item() / world  # every rank takes part
            bar.set_postfix(loss=f"{global_loss:.4f}")
            if log:
                log(update, {"loss": global_loss, "lr": sched.get_last_lr()[0]})
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
        pred, mask = shortcut_step(shortcut, base, batch["feature"], batch["tokens"], batch["order"], batch["step"],
                                   branch_cond(base, batch))
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
