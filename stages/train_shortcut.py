"""Stage `train_shortcut`: train the shortcut on the stored trajectories, validate it per step.

    python -m stages.train_shortcut                          # what `dvc repro` runs
    torchrun --nproc_per_node 8 -m stages.train_shortcut     # data-parallel, same global batch

Under torchrun rank 0 alone validates, saves the checkpoint and logs.
"""

import contextlib
from pathlib import Path

import torch

from migm_shortcut import distributed
from migm_shortcut.bases import load_base
from migm_shortcut.checkpoint import save_checkpoint
from migm_shortcut.shortcut import Shortcut, ShortcutSpec
from migm_shortcut.store import PairDataset, TrajectoryStore
from migm_shortcut.shortcut_model import register_shortcut, registered_name
from migm_shortcut.train_shortcut import rollout_summary, train_shortcut, validate_rollout, validate_shortcut
from migm_shortcut.training import TrainingState
from migm_shortcut.schedules import SamplingRule

from .base import MODEL as BASE_MODEL
from .common import DATA, device, params, project_root, stage_args, training_run, write_json

OUT = DATA / "shortcut"
MODEL = OUT / "model.safetensors"
METRICS = OUT / "metrics.json"
RESUME = Path(".migm") / "resume" / "train_shortcut.pt"  # outside DVC's outputs, which a rerun deletes first


def main(argv=None) -> None:
    stage_args(__doc__, argv)
    p, dev = params(), distributed.setup() or device()
    s = p.shortcut
    base = load_base(BASE_MODEL, dev)
    url = p.extract.store
    store = TrajectoryStore.open(url)
    if store.meta["base_id"] != base.base_id:
        raise SystemExit(f"error: {url} holds trajectories of {store.meta['base_id']}, not {base.base_id}: rerun extract")
    # The last num_val trajectories are held out for validation.
    num_train = store.num_samples - p.extract.num_val
    train_set = PairDataset(url, range(num_train), unroll=s.unroll)
    val_set = PairDataset(url, range(num_train, store.num_samples))
    spec = ShortcutSpec.of(s, base.dim, base.shortcut_variant)
    rule = SamplingRule.of(p.sampling, store.steps)
    # The grid's budgets at the stored N, where the rollout can follow the true trajectory.
    budgets = sorted({b for grid in p.sample.shortcut if grid.steps == store.steps for b in grid.budgets if b < store.steps})
    fingerprint = {"params": s.model_dump(exclude={"checkpoint_minutes"}), "store": store.meta, "num_train": num_train}
    torch.manual_seed(s.seed)  # the same initial weights in every run, on every rank
    main_rank = distributed.is_main()  # it alone logs, validates and saves
    with training_run(p, "shortcut", params=s.model_dump()) if main_rank else contextlib.nullcontext() as curve:
        state = TrainingState(RESUME, fingerprint, s.checkpoint_minutes, curve.points if curve else None)
        model = train_shortcut(Shortcut(spec), base, train_set, steps=s.steps, batch_size=s.batch_size, lr=s.lr,
                               lr_decay_at=s.lr_decay_at, weight_decay=s.weight_decay, ema_decay=s.ema_decay,
                               ema_warmup=s.ema_warmup, grad_clip=s.grad_clip, num_workers=s.num_workers, seed=s.seed,
                               pairs_per_trajectory=s.pairs_per_trajectory, kl_weight=s.kl_weight,
                               kl_temperature=s.kl_temperature, rule=rule, device=dev, log=curve, state=state)
        if not main_rank:
            return
        per_step = validate_shortcut(model, base, val_set, device=dev)
        rollout = validate_rollout(model, base, store, range(num_train, store.num_samples), rule, budgets, device=dev)
        save_checkpoint(MODEL, model.state_dict(), {"kind": "shortcut", "spec": spec.to_dict(), "base_id": base.base_id,
                                                    "trained_on_steps": store.steps, "updates": s.steps})
        ratios = [r["mse_ratio"] for r in per_step]
        size = sum(t.numel() for t in model.parameters())
        metrics = {"val_mse_ratio_mean": sum(ratios) / len(ratios), "val_mse_ratio_max": max(ratios),
                   "val_mse_ratio_last": ratios[-1],
                   "val_cosine_mean": sum(r["cosine"] for r in per_step) / len(per_step),
                   "val_reuse_cosine_mean": sum(r["reuse_cosine"] for r in per_step) / len(per_step),
                   "parameters": size, "parameter_fraction_of_base": size / base.transformer_parameters(),
                   "final_loss": curve.points[-1]["loss"], **rollout_summary(rollout)}
        write_json(METRICS, metrics)
        write_json(OUT / "val_per_step.json", per_step)
        write_json(OUT / "rollout.json", rollout)
        curve.run.log(s.steps, metrics)
        curve.run.log_artifacts([OUT / "val_per_step.json", OUT / "rollout.json"])
        # The real project's base, not a `dvc exp run` copy's, which is deleted after the run.
        register_shortcut(curve.run, registered_name(p.tracking.experiment), MODEL, base,
                          project_root() / BASE_MODEL, rule, min(budgets, default=store.steps), metrics)
        state.remove()
    print(f"shortcut: val MSE / reuse MSE {metrics['val_mse_ratio_mean']:.2f} mean, {metrics['val_mse_ratio_last']:.2f} last step, "
          f"{metrics['val_mse_ratio_max']:.2f} worst; {metrics['parameter_fraction_of_base']:.1%} of the base's parameters")
    for budget in budgets:
        print(f"shortcut: chained rollout at B={budget}: MSE / reuse MSE {metrics[f'rollout_mse_ratio_B{budget}']:.2f}, "
              f"KL / reuse KL {metrics[f'rollout_kl_ratio_B{budget}']:.2f}")


if __name__ == "__main__":
    main()
