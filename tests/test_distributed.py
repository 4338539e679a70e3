"""Data parallelism (torch.distributed, gloo): two CPU ranks give what one process gives.

The ranks run as spawned processes set up as torchrun would (RANK, WORLD_SIZE, ... in the
environment); they extract a store and train a shortcut on it, and the test compares with the
one-process results computed here.
"""

import os
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from tiny_models import make_base, make_shortcut, one_thread  # noqa: F401 (autouse fixture)

from migm_shortcut import distributed
from migm_shortcut.extract import extract, merge_stats, open_store
from migm_shortcut.schedules import SamplingRule
from migm_shortcut.store import PairDataset, TrajectoryBatchSampler, TrajectoryStore
from migm_shortcut.train_shortcut import train_shortcut

N, NUM, UNIT, SEED, WORLD = 4, 6, 2, 3, 2
RULE = SamplingRule(steps=N, cfg=1.0, tau=4.5)
# 12 pairs from 3 trajectories per global batch: the ranks' halves hold different numbers of loss positions.
TRAIN = dict(steps=4, batch_size=12, pairs_per_trajectory=4, lr=1e-2, lr_decay_at=3, weight_decay=0.01, ema_decay=0.5,
             ema_warmup=1, grad_clip=1.0, num_workers=0, seed=0, device=torch.device("cpu"), log_every=1, progress=False)


def new_store(url, base) -> TrajectoryStore:
    return open_store(str(url), base, RULE, num_samples=NUM, dtype="float32", unit_size=UNIT, seed=SEED, num_classes=10)


def train(url, shortcut_seed: int = 1) -> tuple[dict, list[float]]:
    """Train a shortcut on the store at url; return its EMA weights and the logged losses."""
    losses = []
    model = train_shortcut(make_shortcut(shortcut_seed).requires_grad_(True), make_base(), PairDataset(str(url)),
                           log=lambda step, stats: losses.append(stats["loss"]), **TRAIN)
    return model.state_dict(), losses


def comparable(state: dict) -> dict:
    """The weights without the attention key biases: softmax ignores them, so their gradient is
    rounding noise, which Adam scales up to lr-sized steps that differ as soon as the rounding does."""
    return {k: v[len(v) // 2 :] if k.endswith("kv.bias") else v for k, v in state.items()}


def rank_main(rank: int, port: int, out) -> None:
    """One rank, as stages.extract and stages.train_shortcut run under torchrun."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), MIGM_DEVICE="cpu")  # fmt: skip
    torch.set_num_threads(1)
    device = distributed.setup()
    base = make_base()
    with distributed.main_first():
        store = new_store(out / "two.zarr", base)
    own = extract(store, base, RULE, batch_size=2, worker=distributed.rank(), num_workers=distributed.world_size(),
                  device=device, progress=False)
    stats = merge_stats(distributed.gather(own))
    # Each rank starts from other weights: DDP must start both from rank 0's.
    ema, losses = train(out / "two.zarr", shortcut_seed=1 + rank)
    torch.save({"own": own, "stats": stats, "complete": store.is_complete(), "ema": ema, "losses": losses},
               out / f"rank{rank}.pt")
    distributed.cleanup()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> tuple[list[dict], Path]:
    """The two ranks' results and their store; the ranks are killed if they take longer than a minute."""
    out = tmp_path_factory.mktemp("ranks")
    ctx = mp.start_processes(rank_main, args=(free_port(), out), nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + 60
    try:
        while not ctx.join(timeout=1):  # raises when a rank failed, with its traceback
            assert time.monotonic() < deadline, "the ranks did not finish within 60 s"
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
            p.join()
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)], out / "two.zarr"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The store one process extracts."""
    url, base = tmp_path_factory.mktemp("one") / "one.zarr", make_base()
    extract(new_store(url, base), base, RULE, batch_size=2, progress=False)
    return url


def test_extraction_two_ranks_equal_one(ranks, reference):
    results, url = ranks
    assert [r["own"]["units_written"] for r in results] == [2, 1]  # units 0, 2 and unit 1
    for r in results:
        assert r["complete"] and r["stats"]["samples_written"] == NUM and r["stats"]["units_written"] == 3
    one, two = TrajectoryStore.open(str(reference)), TrajectoryStore.open(str(url))
    for name in ("features", "tokens", "order", "labels"):
        np.testing.assert_array_equal(getattr(two, name)[:], getattr(one, name)[:], err_msg=name)


def test_training_two_ranks_equal_one(ranks, reference):
    results, _ = ranks
    ema, losses = train(reference)
    for r in results:
        np.testing.assert_allclose(r["losses"], losses, rtol=1e-5)
        two = comparable(r["ema"])
        for key, value in comparable(ema).items():
            torch.testing.assert_close(two[key], value, rtol=0, atol=1e-5, msg=key)
    for key, value in results[0]["ema"].items():  # the EMA is the same on every rank
        assert torch.equal(results[1]["ema"][key], value), key


def test_sampler_ranks_split_every_global_batch(reference):
    data = PairDataset(str(reference))
    whole = list(TrajectoryBatchSampler(data, 12, 4, seed=5))
    parts = [list(TrajectoryBatchSampler(data, 12, 4, seed=5, rank=r, world_size=3)) for r in range(3)]
    assert len(whole) == 2 and [len(p) for p in parts] == [2, 2, 2]
    for i, batch in enumerate(whole):
        assert [len(p[i]) for p in parts] == [4, 4, 4]
        assert parts[0][i] + parts[1][i] + parts[2][i] == batch
    with pytest.raises(ValueError, match="world_size"):
        TrajectoryBatchSampler(data, 2, 4, rank=0, world_size=3)
    with pytest.raises(ValueError, match="whole cond/uncond pairs"):
        TrajectoryBatchSampler(data, 10, 4, rank=0, world_size=3)
