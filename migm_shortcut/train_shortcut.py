"""Shortcut training on stored trajectories, and its validation against "reuse" and "extrapolate":
per step teacher-forced, and chained over each budget's shortcut steps as the sampler runs them."""

from dataclasses import replace
from typing import get_args

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from . import distributed
from .bases.contract import MaskedBase
from .config import LossWeighting, OptimizerKind
from .placement import placements
from .samplers import BASELINES, EXTRAPOLATE, REUSE, SHORTCUT
from .sampling import StepState, feature_source, generate, guided_logits, sampling_autocast
from .schedules import SamplingRule, refresh_steps
from .shortcut import Shortcut
from .store import PairDataset, TrajectoryBatchSampler, TrajectoryStore, pair_masks
from .training import EMA, Log, TrainingState, autocast, check_finite, optimizer


def loss_positions(base: MaskedBase, next_masked: torch.Tensor, context) -> torch.Tensor:
    """Feature positions [B, S] whose error counts in a pair: image positions still masked in the
    next state (`next_masked`, MaskGIT), or every real position for bases that give the shortcut
    a context (DiMOO, SPEC section 9; prompt padding excluded)."""
    if context is not None:
        return context.valid
    mask = torch.zeros(len(next_masked), base.seq_len, dtype=torch.bool, device=next_masked.device)
    mask[:, base.image_positions] = next_masked
    return mask


def branch_cond(base: MaskedBase, batch: dict) -> torch.Tensor:
    """Each item's condition as its CFG branch saw it: the stored one, or its unconditional form."""
    cond = batch["cond"]
    keep = (batch["branch"] == 0).view(-1, *[1] * (cond.ndim - 1))
    return torch.where(keep, cond, base.uncond(cond))


def shortcut_step(shortcut: Shortcut, base: MaskedBase, feature, tokens, order, step, cond=None):
    """One shortcut prediction of f_{step+1} from f_step, as the sampler makes it: predicted at the
    loss positions, f_step kept at the others (the sampler's `predicted_positions`).

    cond: each item's branch condition (`branch_cond`), for bases that give the shortcut a context.
    Returns the prediction and the loss mask (`loss_positions`)."""
    new_mask, next_masked, next_ratio = pair_masks(order, step)
    context = None if cond is None else base.shortcut_context(cond)
    # In the sampler the current tokens hold the committed ids at new positions; the true final
    # tokens hold the same ids there, so the embedding the shortcut sees is identical.
    pred = shortcut(feature, base.embed_tokens(tokens), new_mask, next_ratio, context=context)
    mask = loss_positions(base, next_masked, context)
    return torch.where(mask[..., None], pred, feature), mask


def masked_mean(values: torch.Tensor, mask: torch.Tensor, count: torch.Tensor | None = None) -> torch.Tensor:
    """`values` summed over `mask`'s positions, divided by `count` (default: their number)."""
    return (values * mask).sum() / (mask.sum() if count is None else count).clamp(min=1)


def squared_error(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per position: the mean squared error over the feature width, [..., S]."""
    return (pred.float() - target.float()).pow(2).mean(-1)


def distillation_kl(true_logits: torch.Tensor, pred_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Per position: T^2 KL(softmax(true / T) || softmax(pred / T)) over the last axis (SPEC section 5)."""
    p = torch.log_softmax(true_logits.float() / temperature, -1)
    q = torch.log_softmax(pred_logits.float() / temperature, -1)
    return temperature**2 * (p.exp() * (p - q)).sum(-1)


def cond_then_uncond(batch: dict) -> dict:
    """A batch of adjacent (cond, uncond) items (TrajectoryBatchSampler) reordered into the
    sampler's layout: all cond rows, then their uncond rows in the same order."""
    n = len(batch["branch"])
    perm = torch.arange(n).view(-1, 2).t().flatten()
    out = {k: v[perm.to(v.device)] for k, v in batch.items()}
    c, u = out["branch"].chunk(2)
    if n % 2 or (c != 0).any() or (u != 1).any() or not torch.equal(*out["step"].chunk(2)):
        raise ValueError("a training batch must hold both CFG branches of each (sample, step), side by side")
    return out


def shortcut_loss(model, base: MaskedBase, batch: dict, *, unroll: int, kl_weight: float = 0.0,
                  kl_temperature: float = 1.0, rule: SamplingRule | None = None,
                  step_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """The training loss of one batch in the sampler's layout (`cond_then_uncond`), and its terms.

    Chains `unroll` shortcut steps from the true f_s, each fed the previous prediction; every step
    adds MSE on its loss positions and, with kl_weight > 0, kl_weight times the distillation KL of
    the guided token distribution (the one sampling draws from) on the same image positions.
    step_scale [N - 1] (`reuse_error_per_step`): the MSE term is then each item's squared error in
    units of reuse's at its step, averaged over items, so that every step weighs the same.
    Means are over the global batch: a rank's sums over all ranks' positions, times the world size
    that DDP's gradient average divides by again."""
    world = distributed.world_size()
    x, cond, terms = batch["feature"], branch_cond(base, batch), {"mse": 0.0, "kl": 0.0}
    for j in range(unroll):
        step = batch["step"] + j
        x, mask = shortcut_step(model, base, x, batch["tokens"], batch["order"], step, cond)
        target = batch["targets"][:, j]
        if step_scale is None:
            mse = masked_mean(squared_error(x, target), mask, distributed.all_sum(mask.sum()))
        else:
            per_item = (squared_error(x, target) * mask).sum(1) / step_scale[step]
            mse = per_item.sum() / distributed.all_sum(torch.tensor(len(per_item), device=x.device))
        terms["mse"] = terms["mse"] + mse * world / unroll
        if kl_weight:
            pairs = step.chunk(2)[0] + 1  # the predicted feature's step
            kl = distillation_kl(guided_logits(base.head(target), rule, pairs), guided_logits(base.head(x), rule, pairs),
                                 kl_temperature)
            positions = mask.chunk(2)[0][:, base.image_positions]
            terms["kl"] = terms["kl"] + masked_mean(kl, positions, distributed.all_sum(positions.sum())) * world / unroll
    return terms["mse"] + kl_weight * terms["kl"], terms


@torch.no_grad()
def reuse_error_per_step(base: MaskedBase, pairs: PairDataset, *, device: torch.device,
                         batch_size: int = 256) -> torch.Tensor:
    """[N - 1] float32: at each step s, reuse's teacher-forced error (the squared change f_s ->
    f_{s+1} over an item's loss positions, summed) averaged over `pairs`' items, both branches.

    The scale of `shortcut_loss`'s step weighting. Late steps change the feature less (few
    positions are left to predict), so plain MSE lets the early steps dominate training, while
    the validation averages each step's error ratio to reuse's (`validation_summary`)."""
    sums = torch.zeros(pairs.pairs_per_branch, 2, dtype=torch.float64)  # error sum, items
    for batch in DataLoader(pairs, batch_size=batch_size):
        batch = {k: v.to(device) for k, v in batch.items()}
        _, next_masked, _ = pair_masks(batch["order"], batch["step"])
        mask = loss_positions(base, next_masked, base.shortcut_context(branch_cond(base, batch)))
        err = (squared_error(batch["feature"], batch["targets"][:, 0]) * mask).sum(1)
        sums.index_add_(0, batch["step"].cpu(), torch.stack([err.double().cpu(), torch.ones(len(err))], 1))
    if (sums[:, 1] == 0).any():
        raise ValueError("reuse_error_per_step needs every step among the pairs")
    return (sums[:, 0] / sums[:, 1]).clamp(min=1e-12).float().to(device)


SCALE_TRAJECTORIES = 100  # enough for each step's mean to a few percent; a few seconds of reads


def _forever(epochs):
    """The items of `epochs` (a loader or batch sampler) epoch after epoch: the loop counts
    updates, not epochs."""
    while True:
        yield from epochs


def train_shortcut(shortcut: Shortcut, base: MaskedBase, train_set: PairDataset, *, steps: int, batch_size: int,
                   lr: float, lr_decay_at: int, weight_decay: float, ema_decay: float, ema_warmup: int,
                   grad_clip: float, num_workers: int, seed: int, device: torch.device, pairs_per_trajectory: int = 16,
                   kl_weight: float = 0.0, kl_temperature: float = 1.0, rule: SamplingRule | None = None,
                   loss_weighting: LossWeighting = "position", optimizer_kind: OptimizerKind = "adamw",
                   log: Log | None = None, log_every: int = 25, progress: bool = True,
                   state: TrainingState | None = None) -> Shortcut:
    """Train the shortcut on stored trajectories (base frozen); return the EMA weights.

    With `train_set.unroll` = k > 1 each example chains k shortcut steps from a true f_s, feeding
    the model its own predictions and the true tokens, with the loss on every step: the model
    learns to correct the drift it meets when shortcut steps chain at inference.
    kl_weight > 0 adds the distillation KL on the guided distribution of `rule` (`shortcut_loss`).
    loss_weighting "step": each step's squared error in units of reuse's there, measured on the
    first `SCALE_TRAJECTORIES` training trajectories (`reuse_error_per_step`); "position": plain
    MSE over every loss position of the batch.
    optimizer_kind: "adamw", or "muon" (`training.MuonAdamW`), at the same lr and schedule.

    Data-parallel when torch.distributed is initialised (`distributed.setup`): each rank trains on
    its slice of every global batch of `batch_size`, as one process would up to float rounding,
    and every rank returns the same EMA weights.

    state: where the run is saved now and then, and resumed from.
    """
    if kl_weight and rule is None:
        raise ValueError("kl_weight > 0 needs the sampling rule (its guidance) as `rule`")
    if loss_weighting not in get_args(LossWeighting):
        raise ValueError(f"loss_weighting {loss_weighting!r}: one of {', '.join(get_args(LossWeighting))}")
    torch.manual_seed(seed)
    base.requires_grad_(False)
    step_scale = None
    if loss_weighting == "step":
        first = PairDataset(train_set.url, train_set.indices[:SCALE_TRAJECTORIES])
        step_scale = reuse_error_per_step(base, first, device=device)
    shortcut.to(device).train()
    world = distributed.world_size()
    # DDP copies rank 0's weights to every rank here, and averages the ranks' gradients in backward.
    model = shortcut if world == 1 else DistributedDataParallel(
        shortcut, device_ids=[device.index] if device.type == "cuda" else None)
    opt = optimizer(shortcut, optimizer_kind, lr, weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 if s < lr_decay_at else 0.1)
    ema = EMA(shortcut, ema_decay, ema_warmup)
    state = state or TrainingState()
    start = state.resume(model=shortcut, optimizer=opt, schedule=sched, ema=ema.model)
    sampler = TrajectoryBatchSampler(train_set, batch_size, pairs_per_trajectory, seed, distributed.rank(), world,
                                     skip=start)  # one batch per update
    if train_set.features is None:
        batches = _forever(DataLoader(train_set, batch_sampler=sampler, num_workers=num_workers,
                                      persistent_workers=num_workers > 0))
    else:  # held in memory: a batch is a few array copies, no loader process
        batches = map(train_set.batch, _forever(sampler))
    bar = tqdm(state.updates(steps), desc="shortcut", initial=start, total=steps,
               disable=not progress or not distributed.is_main(), leave=False)
    for update in bar:
        batch = cond_then_uncond({k: v.to(device, non_blocking=True) for k, v in next(batches).items()})
        with autocast(device):
            loss, terms = shortcut_loss(model, base, batch, unroll=train_set.unroll, kl_weight=kl_weight,
                                        kl_temperature=kl_temperature, rule=rule, step_scale=step_scale)
        check_finite(loss, update, "shortcut")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(shortcut.parameters(), grad_clip)
        opt.step()
        sched.step()
        ema.update(shortcut, update)
        if update % log_every == 0 or update == steps:
            stats = {k: distributed.all_sum(torch.as_tensor(v)).item() / world  # every rank takes part
                     for k, v in {"loss": loss, **terms}.items() if k != "kl" or kl_weight}
            bar.set_postfix(loss=f"{stats['loss']:.4f}")
            if log:
                log(update, {**stats, "lr": sched.get_last_lr()[0]})
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
            squared_error(pred, target), squared_error(batch["feature"], target),
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


ROLLOUT_SOURCES = (SHORTCUT, *BASELINES)


def stored_trajectories(store: TrajectoryStore, indices: range, base: MaskedBase, device: torch.device,
                        batch_size: int = 50):
    """Batches (true features [2n, N, S, D], tokens [2n, L], order [2n, L], conditions [2n, ...])
    of stored trajectories, in the sampler's layout: cond rows, then their uncond rows."""
    for start in range(0, len(indices), batch_size):
        reads = [store.read(i) for i in indices[start : start + batch_size]]
        true = torch.from_numpy(np.stack([r["features"] for r in reads])).float().to(device)  # [n, 2, N, S, D]
        tokens, order = (torch.from_numpy(np.stack([r[k] for r in reads])).long().to(device) for k in ("tokens", "order"))
        labels = torch.as_tensor(np.stack([r["labels"] for r in reads])).long().to(device)
        yield _sampler_layout(base, true, tokens, order, labels)


def sampled_trajectories(base: MaskedBase, rule: SamplingRule, labels: torch.Tensor, ids: range, seed: int,
                         device: torch.device, batch_size: int = 50):
    """`stored_trajectories`' batches for trajectories the vanilla sampler records now, at
    `rule.steps` (an N the store does not hold): sample ids[i] for condition labels[i], as
    extraction makes them (at the store's N and seed, the stored ones)."""
    for start in range(0, len(labels), batch_size):
        cond = labels[start : start + batch_size].to(device)
        out = generate(base, rule, cond, list(ids[start : start + len(cond)]), seed, record=True,
                       autocast_dtype=sampling_autocast(device))
        yield _sampler_layout(base, out.features.to(device), out.tokens, out.order, cond)


def _sampler_layout(base: MaskedBase, true, tokens, order, labels):
    return (torch.cat(true.unbind(1)), tokens.repeat(2, 1), order.repeat(2, 1),
            torch.cat([labels, base.uncond(labels)]))


def _error_sums(base: MaskedBase, rule: SamplingRule, step: int, pred, true, target, mask) -> torch.Tensor:
    """[squared error sum, loss positions, KL sum, image positions] of the predicted feature at
    `step` against the true one: MSE on the loss positions (both branches), and the KL of the guided
    token distribution, true (`target`: the true feature's guided logits) || predicted, on image
    positions still masked."""
    kl = distillation_kl(target, guided_logits(base.head(pred), rule, step))
    positions = mask.chunk(2)[0][:, base.image_positions]
    return torch.stack([x.double() for x in ((squared_error(pred, true) * mask).sum(), mask.sum(),
                                              (kl * positions).sum(), positions.sum())]).cpu()


@torch.no_grad()
def validate_rollout(shortcut: Shortcut, base: MaskedBase, store: TrajectoryStore, indices: range, rule: SamplingRule,
                     budgets: list[int], *, device: torch.device, batch_size: int = 50) -> list[dict]:
    """Chained rollout as the sampler runs it, at each budget B, on held-out trajectories.

    From each refresh step's true feature (`refresh_steps(N, B)`), every source chains over the
    following shortcut steps with the true committed tokens: the shortcut, "reuse" (keeps the
    refresh feature) and "extrapolate" (the sampler's first-order baseline). Every predicted step
    is compared to the true feature (`_error_sums`: MSE and KL).
    Returns rows {budget, step, source, mse, kl}: means over trajectories, per shortcut step."""
    shortcut.eval()
    sums = {}  # (budget, step, source) -> [squared error sum, positions, KL sum, image positions]
    for batch in stored_trajectories(store, indices, base, device, batch_size):
        for budget in budgets:
            _add_rollout(sums, budget, shortcut, base, rule, *batch)
    return [{"budget": b, "step": t, "source": source, "mse": (v[0] / v[1]).item(), "kl": (v[2] / v[3]).item()}
            for (b, t, source), v in sums.items()]


def _add_rollout(sums: dict, budget: int, shortcut, base, rule, true, tokens, order, cond) -> None:
    """One budget's chained rollout over a batch of trajectories, its error sums added to `sums`."""
    steps, full = true.shape[1], set(refresh_steps(true.shape[1], budget))
    baselines = {name: feature_source(name, base) for name in BASELINES}
    for t in range(steps):
        if t in full:
            for source in baselines.values():
                source.observe(t, true[:, t])
            prev = dict.fromkeys(ROLLOUT_SOURCES, true[:, t])
            continue
        prev[SHORTCUT], mask = shortcut_step(shortcut, base, prev[SHORTCUT], tokens, order, t - 1, cond)
        new_mask, masked, ratio = pair_masks(order, t - 1)
        new_positions = dense_positions(new_mask)
        state = StepState(t, steps, None, torch.where(order < t, tokens, base.mask_id),
                          tokens.gather(1, new_positions), new_positions, ratio, dense_positions(masked), cond)
        for name, source in baselines.items():
            prev[name] = source.predict(replace(state, prev_feature=prev[name]))
        target = guided_logits(base.head(true[:, t]), rule, t)
        for name in ROLLOUT_SOURCES:
            found = _error_sums(base, rule, t, prev[name], true[:, t], target, mask)
            sums[budget, t, name] = sums.get((budget, t, name), 0) + found


def dense_positions(mask: torch.Tensor) -> torch.Tensor:
    """The True positions of mask [B, L] as indices [B, n]: every row of a step has the same count
    (the schedule fixes it), as the sampler's index of masked positions has."""
    return mask.nonzero()[:, 1].view(len(mask), -1)


@torch.no_grad()
def rollout_errors(shortcut: Shortcut, base: MaskedBase, batches, rule: SamplingRule) -> dict[str, list[list[float]]]:
    """The error of every stretch of shortcut steps, for the learned placement
    (`schedules.learned_refresh_steps`): from each step s's true feature, the shortcut chains to the
    last step; error[s][t] (t > s) is the mean error at step t (`_error_sums`), 0 elsewhere.
    batches: `stored_trajectories` or `sampled_trajectories`. Returns {"mse": error, "kl": error}."""
    shortcut.eval()
    steps = rule.steps
    sums = torch.zeros(steps, steps, 4, dtype=torch.float64)
    for true, tokens, order, cond in batches:
        chains = {}  # start step s -> the shortcut's feature at the current step, chained from f_s
        for t in range(1, steps):
            chains[t - 1] = true[:, t - 1]
            target = guided_logits(base.head(true[:, t]), rule, t)  # once per step, for every chain
            for s, x in chains.items():
                chains[s], mask = shortcut_step(shortcut, base, x, tokens, order, t - 1, cond)
                sums[s, t] += _error_sums(base, rule, t, chains[s], true[:, t], target, mask)
    return {"mse": (sums[..., 0] / sums[..., 1].clamp(min=1)).tolist(),
            "kl": (sums[..., 2] / sums[..., 3].clamp(min=1)).tolist()}


def measure_placements(shortcut: Shortcut, base: MaskedBase, store: TrajectoryStore, indices: range, sampling,
                       grids: list, device: torch.device) -> dict:
    """{N: `placements`} at every N of the shortcut `grids` (params' sample.shortcut) with a learned
    placement, for its budgets, over the held-out samples `indices`: their stored trajectories at
    the stored N, their trajectories sampled now at another N. sampling: params' `sampling` section."""
    labels = torch.as_tensor(store.labels[indices.start : indices.stop])
    grids = [grid for grid in grids if grid.placement == "learned"]
    out = {}
    for steps in sorted({grid.steps for grid in grids}):
        rule = SamplingRule.of(sampling, steps)
        batches = (stored_trajectories(store, indices, base, device) if steps == store.steps else
                   sampled_trajectories(base, rule, labels, indices, store.meta["seed"], device))
        budgets = sorted({b for grid in grids if grid.steps == steps for b in grid.budgets})
        out[str(steps)] = placements(rollout_errors(shortcut, base, batches, rule), budgets)
    return out



def rollout_summary(rows: list[dict]) -> dict:
    """Per budget: the mean over its shortcut steps of each source's MSE and KL over reuse's."""
    out = {}
    for budget in sorted({r["budget"] for r in rows}):
        steps = {}
        for r in rows:
            if r["budget"] == budget:
                steps.setdefault(r["step"], {})[r["source"]] = r
        for name in (SHORTCUT, EXTRAPOLATE):
            for metric in ("mse", "kl"):
                ratios = [s[name][metric] / max(s[REUSE][metric], 1e-30) for s in steps.values()]
                prefix = "rollout" if name == SHORTCUT else f"rollout_{name}"
                out[f"{prefix}_{metric}_ratio_B{budget}"] = sum(ratios) / len(ratios)
    return out


def rollout_budgets(grids, steps: int) -> list[int]:
    """The budgets B < N of the sample grid's shortcut `grids` at the stored N = `steps`: where the
    chained rollout can follow the true trajectory."""
    return sorted({b for grid in grids if grid.steps == steps for b in grid.budgets if b < steps})


def validation_summary(per_step: list[dict], rollout: list[dict], parameters: int, base_parameters: int) -> dict:
    """The shortcut stage's metrics: per-step validation (`validate_shortcut`) averaged over the
    steps, the chained rollout's (`rollout_summary`), and the shortcut's size."""
    ratios = [r["mse_ratio"] for r in per_step]
    return {"val_mse_ratio_mean": sum(ratios) / len(ratios), "val_mse_ratio_max": max(ratios),
            "val_mse_ratio_last": ratios[-1],
            "val_cosine_mean": sum(r["cosine"] for r in per_step) / len(per_step),
            "val_reuse_cosine_mean": sum(r["reuse_cosine"] for r in per_step) / len(per_step),
            "parameters": parameters, "parameter_fraction_of_base": parameters / base_parameters,
            **rollout_summary(rollout)}
