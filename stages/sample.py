"""Stage `sample`: every sampler configuration of the grid in params.yaml writes its samples.

    python -m stages.sample                         # the whole grid (what `dvc repro` runs)
    python -m stages.sample --worker 0 --workers 2  # one shard of the grid, e.g. on one GPU worker

Each configuration gets a folder data/samples/<name>/ (`migm_shortcut.sample_folders`): its tokens
and labels, a grid of decoded samples of the first classes (prompts) and info.json. Images are not
stored: `evaluate` decodes the tokens batch by batch (50k samples at 512 px would be 39 GB of pixels
per configuration). Latency is timed on the sampling itself, batch by batch at `sample.batch_size`
(`migm_shortcut.latency`): warm-up batches dropped, the median of the rest, per image, with and
without the decoder; the configurations' timed batches run in rounds, so a drift in the
machine's speed reaches them alike. A folder carries a fingerprint of everything that made it: a
rerun skips the folders that are already right, so a killed or sharded run resumes, and `dvc
repro` after workers filled the folders only checks them.
"""

import argparse
import hashlib

import torch
from tqdm import tqdm

from migm_shortcut.bases import load_base
from migm_shortcut.config import SamplerSetting
from migm_shortcut.hardware import hardware_identity
from migm_shortcut.images import grid_images, grid_samples
from migm_shortcut.latency import decoder_latency, sample_settings
from migm_shortcut.placement import refresh_plan
from migm_shortcut.sample_folders import (fingerprint, is_up_to_date, remove_other_folders, sample_conditions,
                                          sample_info, write_sample_folder)
from migm_shortcut.samplers import SHORTCUT as SHORTCUT_SAMPLER
from migm_shortcut.schedules import SamplingRule
from migm_shortcut.shortcut import compiled, load_shortcut

from .common import (BASE, PLACEMENT, SAMPLES, SHORTCUT, decode_batch, device, params, prompt_conditions,
                     stage_run)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", type=int, default=0)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--only", nargs="*", help="configuration names to run (default: all of this worker's)")
    args = parser.parse_args(argv)
    if not 0 <= args.worker < args.workers:
        parser.error(f"--worker must be in [0, --workers={args.workers})")
    p, dev = params(), device()
    s = p.sample
    settings = s.settings()[args.worker :: args.workers]
    if args.only:
        if unknown := set(args.only) - {setting.name for setting in s.settings()}:
            parser.error(f"unknown configurations {sorted(unknown)}")
        settings = [setting for setting in settings if setting.name in args.only]
    worker = {"worker": args.worker, "workers": args.workers}
    with stage_run(p, "sample", params={**s.model_dump(), **worker}) as run:
        sample_grid(p, settings, dev, run, whole_grid=args.workers == 1 and not args.only)


def sample_grid(p, settings: list[SamplerSetting], dev, run, *, whole_grid: bool) -> None:
    """Sample the settings whose folders are not already right; `whole_grid`: also drop the folders
    of configurations no longer in the grid."""
    s = p.sample
    base = load_base(BASE, dev)
    if s.compile:
        base.compile_features()
    shortcut_id = hashlib.sha256(SHORTCUT.read_bytes()).hexdigest()[:16] if SHORTCUT.is_file() else None
    prompts = prompt_conditions(base, "eval") if p.is_text_to_image else None
    labels, cond = sample_conditions(s.num_samples, torch.arange(base.num_classes) if prompts is None else prompts)
    rules = {setting.name: SamplingRule.of(p.sampling, setting.steps) for setting in settings}
    plans = {setting.name: refresh_plan(setting, PLACEMENT) for setting in settings}
    prints = {setting.name: fingerprint(setting, rules[setting.name], s, base.base_id, shortcut_id,
                                        plans[setting.name], prompts) for setting in settings}
    todo = [setting for setting in settings if not is_up_to_date(SAMPLES / setting.name, prints[setting.name])]
    if whole_grid:
        remove_other_folders(SAMPLES, {setting.name for setting in settings})
    print(f"sample: {len(settings) - len(todo)} of {len(settings)} configurations already done")
    run.log_metrics({"configurations": len(settings), "configurations_sampled": len(todo)})
    if not todo:
        return
    needs_shortcut = any(setting.sampler == SHORTCUT_SAMPLER for setting in todo)
    shortcut = load_shortcut(SHORTCUT, base.base_id).to(dev) if needs_shortcut else None
    if shortcut is not None and s.compile:
        shortcut = compiled(shortcut)
    codes = torch.zeros(min(s.batch_size, decode_batch(p)), base.num_tokens, dtype=torch.long, device=dev)
    decoder_ms = decoder_latency(base.decode, codes, threads=s.threads, device=dev)
    shown = grid_samples(labels)
    with tqdm(total=len(todo) * s.num_samples, desc="sample", unit="img", leave=False) as bar:
        configurations = [(setting, rules[setting.name], plans[setting.name]) for setting in todo]
        for setting, timed in sample_settings(configurations, s, base, shortcut, cond, dev, progress=bar.update):
            grid = torch.cat([grid_images(base.decode(t.to(dev))) for t in timed.tokens[shown].split(decode_batch(p))])
            info = sample_info(setting, plans[setting.name], s.num_samples, prints[setting.name],
                               **timed.record(decoder_ms), **hardware_identity(dev, s.threads), device=str(dev))
            write_sample_folder(SAMPLES / setting.name, timed.tokens, labels, grid, labels[shown], info)
            print(f"sample {setting.name}: {info['latency_ms']:.2f} ms/image, {info['seconds']:.0f} s for "
                  f"{s.num_samples}")


if __name__ == "__main__":
    main()
