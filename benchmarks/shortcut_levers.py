"""Shortcut training levers on one trajectory store: teacher-forced and chained-rollout error
against reuse, one short training per setting, all in one run (BENCHMARKS.md, section 4).

    python benchmarks/shortcut_levers.py                     # the store and base in data/ (after make run)
    python benchmarks/shortcut_levers.py --runs '[{"name": "mse"}, {"name": "kl1", "kl_weight": 1.0}]'
    python benchmarks/shortcut_levers.py --runs '[{"name": "bottleneck2", "bottleneck_ratio": 2}]'

Each setting trains the profile's shortcut (its keys replaced by the run's) from params' seed or the run's `seed`
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
from migm_shortcut.config import load_params  # noqa: E402
from migm_shortcut.schedules import SamplingRule  # noqa: E402
from migm_shortcut.shortcut import Shortcut, ShortcutSpec  # noqa: E402
from migm_shortcut.store import PairDataset, TrajectoryStore  # noqa: E402
from migm_shortcut.train_shortcut import (rollout_budgets, rollout_summary, train_shortcut,  # noqa: E402
                                          validate_rollout, validate_shortcut)

ARCHITECTURE = ("bottleneck_ratio", "blocks", "heads")  # run keys that change the shortcut's size
DEFAULT_RUNS = [{"name": "mse"}, {"name": "kl0.1", "kl_weight": 0.1}, {"name": "kl1", "kl_weight": 1.0},
                {"name": "unroll2", "unroll": 2}]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="data/base/model.safetensors")
    parser.add_argument("--store", help="default: params' extract.store")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--runs", default=json.dumps(DEFAULT_RUNS),
                        help="JSON list of {name, kl_weight, unroll, loss_weighting, optimizer, lr, batch_size, "
                             "bottleneck_ratio, blocks, heads, num_train}; a key left out takes params' value")
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
    for run in json.loads(args.runs):
        split = run.get("unroll", 1), run.get("num_train", num_train)  # fewer: is data the limit?
        if split not in train_sets:
            train_sets[split] = PairDataset(url, range(split[1]), unroll=split[0], memory_limit=s.memory_limit)
        start = time.time()
        seed = run.get("seed", s.seed)  # the spread of training alone, on one store
        torch.manual_seed(seed)
        sizes = {k: run[k] for k in ARCHITECTURE if k in run}  # e.g. a wider bottleneck
        spec = ShortcutSpec.of(s.model_copy(update=sizes), base.dim, base.shortcut_variant)
        model = train_shortcut(
            Shortcut(spec), base, train_sets[split], steps=updates,
            batch_size=run.get("batch_size", s.batch_size), lr=run.get("lr", s.lr),
            lr_decay_at=updates * 3 // 4, weight_decay=s.weight_decay,
            ema_decay=s.ema_decay, ema_warmup=updates // 4, grad_clip=s.grad_clip, num_workers=0, seed=seed,
            pairs_per_trajectory=s.pairs_per_trajectory, kl_weight=run.get("kl_weight", 0.0),
            kl_temperature=run.get("kl_temperature", 1.0), rule=rule,
            loss_weighting=run.get("loss_weighting", "position"), optimizer_kind=run.get("optimizer", s.optimizer),
            device=dev, progress=False)
        seconds = time.time() - start
        per_step = validate_shortcut(model, base, val, device=dev)
        rollout = validate_rollout(model, base, store, range(num_train, store.num_samples), rule, budgets, device=dev)
        print(json.dumps({"run": run, "updates": updates, "train_s": round(seconds),
                          "parameters": sum(t.numel() for t in model.parameters()),
                          "val_mse_ratio_mean": sum(r["mse_ratio"] for r in per_step) / len(per_step),
                          **rollout_summary(rollout)}), flush=True)


if __name__ == "__main__":
    main()
