"""Trajectory extraction: run the vanilla sampler and record every step's features into Zarr.

Sample i is generated for class i mod C (or, for a text-to-image base, prompt i of the given padded
prompt ids) with its own seeded generator, so the store's content does
not depend on how the work is split. The store is cut into units (whole shards); a worker takes the
units `worker, worker + W, ...` that are not yet marked done, and marks each one only after all of
its samples are written: a killed run redoes at most the unit it was in.
"""

import time

import torch
from tqdm import tqdm

from .bases.contract import MaskedBase
from .sampling import SAMPLER_VERSION, generate_on_cores, sampling_autocast
from .schedules import SamplingRule
from .store import TrajectoryStore, remove_store


def labels_for(indices: range, num_classes: int) -> torch.Tensor:
    return torch.tensor(list(indices)) % num_classes


def open_store(url: str, base: MaskedBase, rule: SamplingRule, *, num_samples: int, dtype: str, unit_size: int,
               seed: int, num_classes: int, prompt_len: int | None = None) -> TrajectoryStore:
    """Create the store or reopen it to resume; create it once before starting parallel workers.

    prompt_len: store prompts of that many (padded) token ids as conditions instead of class ids."""
    meta = {"base_id": base.base_id, "rule": vars(rule), "seed": seed, "num_classes": num_classes,
            "sampler": SAMPLER_VERSION}
    return TrajectoryStore.create_or_open(
        url, meta=meta, num_samples=num_samples, steps=rule.steps, seq_len=base.seq_len, dim=base.dim,
        num_tokens=base.num_tokens, dtype=dtype, unit_size=unit_size, cond_len=prompt_len,
    )  # fmt: skip


def open_or_replace_store(url: str, base: MaskedBase, rule: SamplingRule, **options) -> TrajectoryStore:
    """`open_store` on a store that is a pipeline's output: one made by another base, rule or
    layout is deleted and created anew instead of refused. `options`: `open_store`'s."""
    try:
        return open_store(url, base, rule, **options)
    except ValueError as err:
        print(f"extract: {err}; starting a new store")
        remove_store(url)
        return open_store(url, base, rule, **options)


def extract(store: TrajectoryStore, base: MaskedBase, rule: SamplingRule, *, batch_size: int, worker: int = 0,
            num_workers: int = 1, device: torch.device = torch.device("cpu"), progress: bool = True,
            prompts: torch.Tensor | None = None, cores: int = 1) -> dict:
    """Fill this worker's pending units; return what was done and how fast.

    prompts [num_samples, P]: the padded prompt ids of a text-to-image base (sample i gets row i).
    cores: on a CPU, the CPU threads that sample slices of each batch side by side (`generate_on_cores`)."""
    seed, num_classes = store.meta["seed"], store.meta["num_classes"]
    units = store.pending_units(worker, num_workers)
    todo = sum(len(store.unit_range(u)) for u in units)
    bar = tqdm(total=todo, desc=f"extract w{worker}", unit="sample", disable=not progress, leave=False)
    start = time.perf_counter()
    for unit in units:
        samples = store.unit_range(unit)
        for first in range(samples.start, samples.stop, batch_size):
            ids = range(first, min(first + batch_size, samples.stop))
            labels = labels_for(ids, num_classes) if prompts is None else prompts[ids.start : ids.stop]
            out = generate_on_cores(cores, base, rule, labels.to(device), list(ids), seed, record=True,
                                    autocast_dtype=sampling_autocast(device))
            store.write_batch(first, out.features.numpy(), out.tokens.cpu(), out.order.cpu(), labels)
            bar.update(len(ids))
        store.mark_done(unit)
    bar.close()
    seconds = time.perf_counter() - start
    return {"samples_written": todo, "units_written": len(units), "seconds": seconds,
            "samples_per_second": todo / seconds if todo else 0.0}


def merge_stats(parts: list[dict]) -> dict:
    """The stats of workers that ran side by side (e.g. torchrun ranks): work adds up, time is the slowest's."""
    written, seconds = sum(s["samples_written"] for s in parts), max(s["seconds"] for s in parts)
    return {"samples_written": written, "units_written": sum(s["units_written"] for s in parts), "seconds": seconds,
            "samples_per_second": written / seconds if written else 0.0}


def store_metrics(stats: dict, *, num_samples: int, store_bytes: int, workers: int) -> dict:
    """The metrics of a complete store: its size, this run's `stats` (of `extract` or `merge_stats`)
    and the write rate, the store's megabytes in the share of samples this run wrote per second."""
    megabytes, written = store_bytes / 2**20, stats["samples_written"]
    rate = megabytes * written / num_samples / stats["seconds"] if written else 0.0
    return {"num_samples": num_samples, "store_megabytes": megabytes, **stats,
            "write_megabytes_per_second": rate, "workers": workers}
