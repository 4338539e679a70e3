"""Stage `train_shortcut`: train the shortcut on the stored trajectories, validate it per step.

    python -m stages.train_shortcut                          # what `dvc repro` runs
    torchrun --nproc_per_node 8 -m stages.train_shortcut     # data-parallel, same global batch

Under torchrun rank 0 alone validates, saves the checkpoint and logs.
"""

import contextlib
import time
from pathlib import Path

import torch

from migm_shortcut import distributed
from migm_shortcut.bases import load_base
from migm_shortcut.checkpoint import save_model
from migm_shortcut.schedules import SamplingRule
from migm_shortcut.shortcut import Shortcut, ShortcutSpec
from migm_shortcut.shortcut_model import register_shortcut, registered_name
from migm_shortcut.store import PairDataset, TrajectoryStore
from migm_shortcut.train_shortcut import (measure_placements, rollout_budgets, train_shortcut, validate_rollout,
                                          validate_shortcut, validation_summary)
from migm_shortcut.training import TrainingState

from .common import (BASE, PLACEMENT, SHORTCUT, SHORTCUT_METRICS, device, params, project_root, stage_args,
                     training_run, write_json)

OUT = SHORTCUT.parent
RESUME = Path(".migm") / "resume" / "train_shortcut.pt"  # outside DVC's outputs, which a rerun deletes first


def main(argv=None) -> None:
    stage_args(__doc__, argv)
    p, dev = params(), distributed.setup() or device()
    s = p.shortcut
    base = load_base(BASE, dev)
    url = p.extract.store
    store = TrajectoryStore.open(url)
    if store.meta["base_id"] != base.base_id:
        raise SystemExit(f"error: {url} holds trajectories of {store.meta['base_id']}, not {base.base_id}: rerun extract")
    # The last num_val trajectories are held out for validation.
    num_train = store.num_samples - p.extract.num_val
    train_set = PairDataset(url, range(num_train), unroll=s.unroll, memory_limit=s.memory_limit)
    val_set = PairDataset(url, range(num_train, store.num_samples))
    spec = ShortcutSpec.of(s, base.dim, base.shortcut_variant)
    rule = SamplingRule.of(p.sampling, store.steps)
    # The grid's budgets at the stored N, where the rollout can follow the true trajectory.
    budgets = rollout_budgets(p.sample.shortcut, store.steps)
    fingerprint = {"params": s.model_dump(exclude={"checkpoint_minutes"}), "store": store.meta, "num_train": num_train}
    torch.manual_seed(s.seed)  # the same initial weights in every run, on every rank
    main_rank = distributed.is_main()  # it alone logs, validates and saves
    with training_run(p, "shortcut", params=s.model_dump()) if main_rank else contextlib.nullcontext() as curve:
        state = TrainingState(RESUME, fingerprint, s.checkpoint_minutes, curve.points if curve else None)
        model = train_shortcut(Shortcut(spec), base, train_set, steps=s.steps, batch_size=s.batch_size, lr=s.lr,
                               lr_decay_at=s.lr_decay_at, weight_decay=s.weight_decay, ema_decay=s.ema_decay,
                               ema_warmup=s.ema_warmup, grad_clip=s.grad_clip, num_workers=s.num_workers, seed=s.seed,
                               pairs_per_trajectory=s.pairs_per_trajectory, kl_weight=s.kl_weight,
                               kl_temperature=s.kl_temperature, rule=rule, loss_weighting=s.loss_weighting,
                               optimizer_kind=s.optimizer, device=dev, log=curve, state=state)
        if not main_rank:
            return
        per_step = validate_shortcut(model, base, val_set, device=dev)
        rollout = validate_rollout(model, base, store, range(num_train, store.num_samples), rule, budgets, device=dev)
        start = time.perf_counter()
        placement = measure_placements(model, base, store, range(num_train, store.num_samples), p.sampling,
                                       p.sample.shortcut, dev)
        placement_seconds = time.perf_counter() - start
        save_model(SHORTCUT, model, {"kind": "shortcut", "spec": spec.to_dict(), "base_id": base.base_id,
                                     "trained_on_steps": store.steps, "updates": s.steps})
        size = sum(t.numel() for t in model.parameters())
        metrics = {**validation_summary(per_step, rollout, size, base.transformer_parameters()),
                   "final_loss": curve.points[-1]["loss"], "placement_seconds": placement_seconds}
        write_json(SHORTCUT_METRICS, metrics)
        write_json(OUT / "val_per_step.json", per_step)
        write_json(OUT / "rollout.json", rollout)
        write_json(PLACEMENT, placement)
        curve.run.log(s.steps, metrics)
        curve.run.log_artifacts([OUT / "val_per_step.json", OUT / "rollout.json", PLACEMENT])
        # The real project's base, not a `dvc exp run` copy's, which is deleted after the run.
        register_shortcut(curve.run, registered_name(p.tracking.experiment), SHORTCUT, base,
                          project_root() / BASE, rule, min(budgets, default=store.steps), metrics)
        state.remove()
    print(f"shortcut: val MSE / reuse MSE {metrics['val_mse_ratio_mean']:.2f} mean, {metrics['val_mse_ratio_last']:.2f} last step, "
          f"{metrics['val_mse_ratio_max']:.2f} worst; {metrics['parameter_fraction_of_base']:.1%} of the base's parameters")
    for steps, placed in placement.items():
        for budget, b in placed["budgets"].items():
            print(f"shortcut: N={steps} B={budget}: learned refreshes {b['learned']} ({placed['criterion']} "
                  f"{b['learned_error']:.4g}), uniform {b['uniform']} ({b['uniform_error']:.4g})")
    for budget in budgets:
        print(f"shortcut: chained rollout at B={budget}: MSE / reuse MSE {metrics[f'rollout_mse_ratio_B{budget}']:.2f}, "
              f"KL / reuse KL {metrics[f'rollout_kl_ratio_B{budget}']:.2f}")


if __name__ == "__main__":
    main()
