"""A tiny training or extraction that saves its state as it goes, run as a subprocess by test_resume.

    python tests/resume_job.py base|shortcut|extract FOLDER [MINUTES]

FOLDER holds the trajectory store, the saved training state (`JOB-state.pt`), the result
(`JOB.pt`) and `JOB-started`, touched at the first logged update. Each run prints `performed N`:
the updates (or samples) it did itself. MINUTES: work between saves (default 0: every update)."""

import sys
from pathlib import Path

import torch
from tiny_models import make_base, make_shortcut

from migm_shortcut.extract import extract, open_store
from migm_shortcut.schedules import SamplingRule
from migm_shortcut.store import PairDataset
from migm_shortcut.train_base import train_base
from migm_shortcut.train_shortcut import train_shortcut
from migm_shortcut.training import TrainingState

RULE = SamplingRule(steps=4, cfg=1.0, tau=4.5)
BASE_STEPS, SHORTCUT_STEPS, SAMPLES = 150, 120, 12


def new_store(folder: str, base):
    return open_store(f"{folder}/store.zarr", base, RULE, num_samples=SAMPLES, dtype="float32", unit_size=1, seed=3,
                      num_classes=10)


def run(job: str, folder: str, minutes: float) -> int:
    """Do the job (resuming what a killed run left); returns the updates or samples done here."""
    base = make_base()
    state = TrainingState(f"{folder}/{job}-state.pt", {"job": job}, minutes)
    started = Path(f"{folder}/{job}-started")
    if job == "extract":
        return extract(new_store(folder, base), base, RULE, batch_size=1, progress=False)["samples_written"]
    if job == "base":
        codes = torch.randint(base.codebook_size, (64, base.num_tokens), generator=torch.Generator().manual_seed(0))
        base.requires_grad_(True)
        base.tokenizer.requires_grad_(False)
        train_base(base, codes, torch.arange(64) % 10, codes[:8], torch.arange(8) % 10, steps=BASE_STEPS,
                   batch_size=8, lr=1e-3, warmup=10, weight_decay=0.05, seed=0, device=torch.device("cpu"),
                   log=lambda *_: started.touch(), progress=False, state=state)
        model, steps = base, BASE_STEPS
    else:
        shortcut = make_shortcut().requires_grad_(True)
        model = train_shortcut(shortcut, base, PairDataset(f"{folder}/store.zarr"), steps=SHORTCUT_STEPS, batch_size=8,
                               lr=1e-3, lr_decay_at=90, weight_decay=0.01, ema_decay=0.9, ema_warmup=20, grad_clip=1.0,
                               num_workers=0, seed=0, device=torch.device("cpu"), pairs_per_trajectory=4,
                               optimizer_kind="muon",  # the default's: its two parts' state resumes
                               log=lambda *_: started.touch(), progress=False, state=state)
        steps = SHORTCUT_STEPS
    torch.save(model.state_dict(), f"{folder}/{job}.pt")
    state.remove()
    return steps - state.start


if __name__ == "__main__":
    torch.set_num_threads(1)  # deterministic, and fastest for tiny models
    job, folder, *minutes = sys.argv[1:]
    print(f"performed {run(job, folder, float(minutes[0]) if minutes else 0.0)}", flush=True)
