"""Stage `extract`: record vanilla trajectories of the base into the Zarr store (resumable, sharded).

    python -m stages.extract                         # all units (what `dvc repro` runs)
    python -m stages.extract --worker 1 --workers 2  # one of two workers filling the same store
    torchrun --nproc_per_node 8 -m stages.extract    # 8 ranks = 8 workers, one device each

Run `--create-only` once before starting several workers; each then fills its own units. Under
torchrun rank 0 creates the store, each rank is one worker, and rank 0 writes the metrics.
"""

import argparse

import torch

from migm_shortcut import distributed
from migm_shortcut.bases import load_base
from migm_shortcut.extract import extract, merge_stats, open_or_replace_store, store_metrics
from migm_shortcut.schedules import SamplingRule
from migm_shortcut.store import store_bytes

from .common import BASE, DATA, device, params, prompt_conditions, stage_run, write_json

METRICS = DATA / "extract" / "metrics.json"


def prepare_store(p, base):
    """Open the store to resume; a store made by another base or config is replaced (it is this stage's output)."""
    conditions = {"num_classes": 0, "prompt_len": base.prompt_len} if p.is_text_to_image else {"num_classes": base.num_classes}
    kwargs = dict(num_samples=p.extract.num_train + p.extract.num_val, dtype=p.extract.dtype,
                  unit_size=p.extract.unit_size, seed=p.extract.seed, **conditions)
    return open_or_replace_store(p.extract.store, base, SamplingRule.of(p.sampling), **kwargs)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", type=int, default=0)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--create-only", action="store_true")
    args = parser.parse_args(argv)
    if not 0 <= args.worker < args.workers:
        parser.error(f"--worker must be in [0, --workers={args.workers})")
    p, dev = params(), distributed.setup() or device()
    if distributed.world_size() > 1:
        if args.workers != 1:
            parser.error("under torchrun the ranks are the workers: drop --worker/--workers")
        args.worker, args.workers = distributed.rank(), distributed.world_size()
    worker = {"worker": args.worker, "workers": args.workers, "device": str(dev)}
    name = "extract" if args.workers == 1 else f"extract-worker-{args.worker}"  # one run per worker
    with stage_run(p, name, params={**p.extract.model_dump(), **worker}) as run:
        fill_store(p, args, dev, run)


def fill_store(p, args, dev, run) -> None:
    """Create or open the store and extract this worker's units; the main worker writes the metrics
    once the store is complete."""
    base = load_base(BASE, dev)
    with distributed.main_first():  # creating a store is not safe to race
        store = prepare_store(p, base)
    if args.create_only:
        return
    # Text to image: trajectory i gets train prompt i (params() checked there are enough); else class i mod C.
    prompts = prompt_conditions(base, "train")[: store.num_samples] if p.is_text_to_image else None
    stats = extract(store, base, SamplingRule.of(p.sampling), batch_size=p.extract.batch_size, worker=args.worker,
                    num_workers=args.workers, device=dev, prompts=prompts, cores=torch.get_num_threads())
    stats = merge_stats(distributed.gather(stats))  # waits for every rank: then all units are written
    if not distributed.is_main():
        return
    if not store.is_complete():  # one worker of several: its own numbers; the whole store's come last
        run.log_metrics(stats)
        print(f"extract: worker {args.worker} done; other workers' units are still pending")
        return
    if stats["samples_written"] == 0 and METRICS.is_file():
        print("extract: store complete; nothing to write (metrics of the run that wrote it kept)")
        return
    metrics = store_metrics(stats, num_samples=store.num_samples, store_bytes=store_bytes(p.extract.store),
                            workers=args.workers)
    write_json(METRICS, metrics)
    run.log_metrics(metrics)
    print(f"extract: {store.num_samples} trajectories, {metrics['store_megabytes']:.0f} MB, "
          f"{stats['samples_per_second']:.1f} samples/s this run")


if __name__ == "__main__":
    main()
