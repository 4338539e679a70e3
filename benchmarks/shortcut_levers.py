"""Shortcut training levers on one trajectory store: teacher-forced and chained-rollout error
against reuse, one short training per setting, all in one run (BENCHMARKS.md, section 4).

    python benchmarks/shortcut_levers.py                     # the store and base in data/ (after make run)
    python benchmarks/shortcut_levers.py --runs '[{"name": "mse"}, {"name": "kl1", "kl_weight": 1.0}]'
    python benchmarks/shortcut_levers.py --runs '[{"name": "bottleneck2", "bottleneck_ratio": 2}]'
    python benchmarks/shortcut_levers.py --runs '[{"name": "ffn", "ffn_ratios": [2, 8], "cross_heads": 4}]'

Each setting trains the profile's shortcut, any `shortcut` key replaced by the run's (`seed` too),
for `--updates` updates (the lr drops at 3/4 of them, params' EMA decay from a quarter of them), on
one thread, the training split held in memory as the stage holds it, and prints one JSON line:
training seconds, the teacher-forced MSE ratio and the rollout MSE and KL ratios at every budget
of the grid at the store's N.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from migm_shortcut.bases import load_base  # noqa: E402
from migm_shortcut.config import ShortcutConfig, load_params  # noqa: E402
from migm_shortcut.schedules import SamplingRule  # noqa: E402
from migm_shortcut.shortcut import Shortcut, ShortcutSpec  # noqa: E402
from migm_shortcut.store import PairDataset, TrajectoryStore  # noqa: E402
from migm_shortcut.train_shortcut import (rollout_budgets, rollout_summary, train_shortcut,  # noqa: E402
                                          validate_rollout, validate_shortcut)

DEFAULT_RUNS = [{"name": "mse"}, {"name": "kl0.1", "kl_weight": 0.1}, {"name": "kl1", "kl_weight": 1.0},
                {"name": "unroll2", "unroll": 2}]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="data/base/model.safetensors")
    parser.add_argument("--store", help="default: params' extract.store")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--runs", default=json.dumps(DEFAULT_RUNS),
                        help="JSON list of {name, num_train, and any shortcut key}; a key left out takes "
                             "params' value")
    parser.add_argument("--updates", type=int, help="default: shortcut.steps")
    args = parser.parse_args()
    torch.set_num_threads(1)
    p = load_params(args.params)
    s, dev = p.shortcut, torch.device("cpu")
    url = args.store or p.extract.store
    updates = args.updates or s.steps
    base, store = load_base(args.base, dev), TrajectoryStore.open(url)
    rule = SamplingRule.of(p.sampling, store.steps)
    budgets = rollout_budgets(p.sample.shortcut, store.steps)
    num_train = store.num_samples - p.extract.num_val
    val = PairDataset(url, range(num_train, store.num_samples))
    train_sets = {}  # by (unroll, trajectories): each read once
    runs = json.loads(args.runs)
    configs = [ShortcutConfig.model_validate({**s.model_dump(), **{k: v for k, v in run.items()
                                                                   if k not in ("name", "num_train")}})
               for run in runs]  # every run checked before any trains: an unknown key is an error
    for run, cfg in zip(runs, configs):
        split = cfg.unroll, run.get("num_train", num_train)  # fewer: is data the limit?
        if split not in train_sets:
            train_sets[split] = PairDataset(url, range(split[1]), unroll=split[0],
                                            memory_limit=cfg.memory_limit)
        start = time.time()
        torch.manual_seed(cfg.seed)  # a run's `seed`: the spread of training alone, on one store
        model = train_shortcut(
            Shortcut(ShortcutSpec.of(cfg, base.dim, base.shortcut_variant)), base, train_sets[split],
            steps=updates, batch_size=cfg.batch_size, lr=cfg.lr, lr_decay_at=updates * 3 // 4,
            weight_decay=cfg.weight_decay, ema_decay=cfg.ema_decay, ema_warmup=updates // 4,
            grad_clip=cfg.grad_clip, num_workers=0, seed=cfg.seed,
            pairs_per_trajectory=cfg.pairs_per_trajectory, kl_weight=cfg.kl_weight,
            kl_temperature=cfg.kl_temperature, rule=rule, loss_weighting=cfg.loss_weighting,
            optimizer_kind=cfg.optimizer, device=dev, progress=False)
        seconds = time.time() - start
        per_step = validate_shortcut(model, base, val, device=dev)
        rollout = validate_rollout(model, base, store, range(num_train, store.num_samples), rule, budgets, device=dev)
        print(json.dumps({"run": run, "updates": updates, "train_s": round(seconds),
                          "parameters": sum(t.numel() for t in model.parameters()),
                          "val_mse_ratio_mean": sum(r["mse_ratio"] for r in per_step) / len(per_step),
                          **rollout_summary(rollout)}), flush=True)


if __name__ == "__main__":
    main()
