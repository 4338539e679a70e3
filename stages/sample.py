"""Stage `sample`: every sampler configuration of the grid in params.yaml writes its samples.

    python -m stages.sample                         # the whole grid (what `dvc repro` runs)
    python -m stages.sample --worker 0 --workers 2  # one shard of the grid, e.g. on one GPU worker

Each configuration gets a folder data/samples/<name>/ with its tokens and labels (the class, or the
index of the eval prompt), a grid of decoded samples of the first classes (prompts) and info.json. Images are not stored: `evaluate` decodes the
tokens batch by batch (50k samples at 512 px would be 39 GB of pixels per configuration). Latency is
timed on the sampling itself, batch by batch at `sample.batch_size`: warm-up batches dropped (they
also absorb `sample.compile`'s compilation), median of the rest, per image, with and without the
decoder; a last partial batch is sampled but not timed. On a CPU each of `sample.threads` threads
samples a slice of every batch (`generate_on_cores`), so a latency is the wall time of the whole batch.
Folders appear whole (written under a temporary name, then renamed) and carry a fingerprint of
everything that made them (configuration, sampling rule, models): a rerun skips the folders that
are already right, so a killed or sharded run resumes, and `dvc repro` after workers filled the
folders only checks them.
"""

import argparse
import hashlib
import shutil
import time

import numpy as np
import torch
from tqdm import tqdm

from migm_shortcut.bases import load_base
from migm_shortcut.config import SamplerSetting
from migm_shortcut.hardware import hardware_identity
from migm_shortcut.images import save_grid, to_uint8
from migm_shortcut.metrics import measure_latency
from migm_shortcut.sample_folders import fingerprint, is_up_to_date, remove_other_folders
from migm_shortcut.sampling import (Extrapolate, FeatureSource, Learned, Reuse, fixed_threads, generate_on_cores,
                                    sampling_autocast)
from migm_shortcut.schedules import SamplingRule
from migm_shortcut.shortcut import load_shortcut

from .base import MODEL as BASE_MODEL
from .common import DATA, decode_batch, device, params, stage_run, write_json
from .tokenizer import prompt_conditions
from .train_shortcut import MODEL as SHORTCUT_MODEL

OUT = DATA / "samples"


def feature_source(kind: str, base, shortcut) -> FeatureSource:
    """A fresh source per call: some keep state across the steps of one run (extrapolation)."""
    return {"vanilla": FeatureSource, "reuse": Reuse, "extrapolate": Extrapolate,
            "shortcut": lambda: Learned(shortcut, base)}[kind]()


def conditions(p, base) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels [n], conditions [n, ...]) of the samples, the same for every configuration. A label is
    the class of a class-conditional base, or the index of the eval prompt of a text-to-image one
    (sample i gets class or prompt i mod their number)."""
    if not p.is_text_to_image:
        labels = torch.arange(p.sample.num_samples) % base.num_classes
        return labels, labels
    prompts = prompt_conditions(base, "eval")
    labels = torch.arange(p.sample.num_samples) % len(prompts)
    return labels, prompts[labels]


def grid_samples(labels: torch.Tensor, classes: int = 10, per_class: int = 10) -> torch.Tensor:
    """Indices of the samples a grid shows: up to `per_class` of each of the first `classes` classes."""
    return torch.cat([torch.nonzero(labels == c)[:per_class, 0] for c in range(classes)])


def grid_images(images: torch.Tensor, largest: int = 128) -> torch.Tensor:
    """Decoded images -> uint8, shrunk (area) to at most `largest` pixels a side: a grid stays a glance."""
    if images.shape[-1] > largest:
        images = torch.nn.functional.interpolate(images.float(), size=(largest, largest), mode="area")
    return to_uint8(images).cpu()


def run_setting(setting: SamplerSetting, p, base, shortcut, dev, decoder_ms: float, fp: str,
                labels: torch.Tensor, cond: torch.Tensor) -> dict:
    rule, s = SamplingRule.of(p.sampling, setting.steps), p.sample
    def sample(ids: range):
        # A compiled forward is not called from several threads at once: no slicing then.
        return generate_on_cores(s.threads, base, rule, cond[ids.start : ids.stop].to(dev), list(ids), s.seed,
                                 slice_batch=not s.compile, budget=setting.budget,
                                 source=lambda: feature_source(setting.sampler, base, shortcut),
                                 autocast_dtype=sampling_autocast(dev))

    # The timed repeats are the sampling itself: batch after batch of the same size, the first
    # `warmup_batches` untimed (their samples are kept all the same).
    batches = iter(range(first, min(first + s.batch_size, s.num_samples)) for first in range(0, s.num_samples, s.batch_size))
    tokens, bar = [], tqdm(total=s.num_samples, desc=setting.name, unit="img", leave=False)

    def next_batch():
        ids = next(batches)
        tokens.append(sample(ids).tokens.cpu())
        bar.update(len(ids))

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    start = time.perf_counter()
    latency = measure_latency(next_batch, warmup=s.warmup_batches, repeats=s.num_samples // s.batch_size - s.warmup_batches,
                              batch_size=s.batch_size, device=dev)
    if s.num_samples % s.batch_size:
        next_batch()
    seconds = time.perf_counter() - start
    bar.close()
    tokens = torch.cat(tokens)

    folder = OUT / setting.name
    tmp = OUT / f".{setting.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    np.savez(tmp / "samples.npz", tokens=tokens.numpy().astype(np.int32), labels=labels.numpy())
    shown = grid_samples(labels)
    shown_images = [grid_images(base.decode(t.to(dev))) for t in tokens[shown].split(decode_batch(p))]
    save_grid(torch.cat(shown_images), labels[shown], tmp / "grid.png")
    info = {**setting.model_dump(), "name": setting.name, "num_samples": s.num_samples, "seconds": seconds,
            "base_calls": setting.budget, "feature_source_calls": setting.steps - setting.budget,
            "latency_ms": latency["median_ms_per_image"], "latency_p10_ms": latency["p10"],
            "latency_p90_ms": latency["p90"], "latency_repeats": latency["repeats"], "latency_batch_size": s.batch_size,
            **hardware_identity(dev, s.threads),
            "latency_with_decoder_ms": latency["median_ms_per_image"] + decoder_ms, "device": str(dev),
            "peak_gpu_memory_mb": torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else None,
            "fingerprint": fp}
    write_json(tmp / "info.json", info)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return info


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", type=int, default=0)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--only", nargs="*", help="configuration names to run (default: all of this worker's)")
    args = parser.parse_args(argv)
    if not 0 <= args.worker < args.workers:
        parser.error(f"--worker must be in [0, --workers={args.workers})")
    p, dev = params(), device()
    settings = p.sample.settings()[args.worker :: args.workers]
    if args.only:
        if unknown := set(args.only) - {s.name for s in p.sample.settings()}:
            parser.error(f"unknown configurations {sorted(unknown)}")
        settings = [s for s in settings if s.name in args.only]
    worker = {"worker": args.worker, "workers": args.workers}
    with stage_run(p, "sample", params={**p.sample.model_dump(), **worker}) as run:
        sample_grid(p, settings, dev, run, whole_grid=args.workers == 1 and not args.only)


def sample_grid(p, settings: list[SamplerSetting], dev, run, *, whole_grid: bool) -> None:
    """Sample the settings whose folders are not already right; `whole_grid`: also drop the folders
    of configurations no longer in the grid."""
    base = load_base(BASE_MODEL, dev)
    if p.sample.compile:
        base.compile_features()
    shortcut_id = hashlib.sha256(SHORTCUT_MODEL.read_bytes()).hexdigest()[:16] if SHORTCUT_MODEL.is_file() else None
    labels, cond = conditions(p, base)
    prompts = cond if p.is_text_to_image else None
    prints = {s.name: fingerprint(s, SamplingRule.of(p.sampling, s.steps), p.sample, base.base_id, shortcut_id,
                                  prompts) for s in settings}
    todo = [s for s in settings if not is_up_to_date(OUT / s.name, prints[s.name])]
    if whole_grid:
        remove_other_folders(OUT, {s.name for s in settings})
    print(f"sample: {len(settings) - len(todo)} of {len(settings)} configurations already done")
    run.log_metrics({"configurations": len(settings), "configurations_sampled": len(todo)})
    if not todo:
        return
    needs_shortcut = any(s.sampler == "shortcut" for s in todo)
    shortcut = load_shortcut(SHORTCUT_MODEL, base.base_id).to(dev) if needs_shortcut else None
    codes = torch.zeros(min(p.sample.batch_size, decode_batch(p)), base.num_tokens, dtype=torch.long, device=dev)
    with fixed_threads(p.sample.threads):
        decoder = measure_latency(lambda: base.decode(codes), warmup=1, repeats=3, batch_size=len(codes), device=dev)
    for setting in todo:
        info = run_setting(setting, p, base, shortcut, dev, decoder["median_ms_per_image"],
                           prints[setting.name], labels, cond)
        print(f"sample {info['name']}: {info['latency_ms']:.2f} ms/image, {info['seconds']:.0f} s for {info['num_samples']}")


if __name__ == "__main__":
    main()
