"""Training and extraction killed at a random moment (kill -9, or SIGTERM) and rerun end exactly as
an uninterrupted run, redoing only what was lost (tests/resume_job.py runs each as a subprocess)."""

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from resume_job import BASE_STEPS, SAMPLES, SHORTCUT_STEPS

from migm_shortcut.store import PairDataset, TrajectoryBatchSampler, TrajectoryStore
from migm_shortcut.training import TrainingState

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
STEPS = {"base": BASE_STEPS, "shortcut": SHORTCUT_STEPS, "extract": SAMPLES}


def start(job: str, folder: Path, minutes: float = 0.0) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "tests" / "resume_job.py"), job, str(folder), str(minutes)],
                            env=ENV, stdout=subprocess.PIPE, text=True)


def performed(proc: subprocess.Popen) -> int:
    """Updates (or samples) the finished job did itself."""
    out = proc.communicate()[0]
    assert proc.returncode == 0, out
    return int(out.split("performed ")[1])


def interrupt(proc: subprocess.Popen, started: Path, sig: int = signal.SIGKILL) -> None:
    """Send `sig` at a random moment after `started` appears (the first saved state or unit)."""
    while not started.exists():
        assert proc.poll() is None, "the job ended before its first save"
        time.sleep(0.01)
    delay = random.uniform(0, 0.3)
    time.sleep(delay)
    assert proc.poll() is None, f"the job ended within {delay:.2f} s of its first save: make it longer"
    proc.send_signal(sig)
    proc.wait()


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """Uninterrupted runs: the store, then the base and the shortcut trained."""
    folder = tmp_path_factory.mktemp("reference")
    for job in ("extract", "base", "shortcut"):
        assert performed(start(job, folder)) == STEPS[job]
    return folder


@pytest.mark.parametrize("job", ["base", "shortcut"])
def test_killed_training_resumes_to_the_same_weights(job, reference, tmp_path):
    shutil.copytree(reference / "store.zarr", tmp_path / "store.zarr")
    proc = start(job, tmp_path)
    interrupt(proc, tmp_path / f"{job}-state.pt")
    assert proc.returncode == -signal.SIGKILL and not (tmp_path / f"{job}.pt").exists()
    assert performed(start(job, tmp_path)) < STEPS[job]  # resumed, not restarted
    assert not (tmp_path / f"{job}-state.pt").exists()  # removed once the result is written
    torch.testing.assert_close(torch.load(tmp_path / f"{job}.pt"), torch.load(reference / f"{job}.pt"))


def test_sigterm_saves_the_state_and_ends_the_run(reference, tmp_path):
    proc = start("base", tmp_path, minutes=100)  # no save falls due: only SIGTERM makes one
    interrupt(proc, tmp_path / "base-started", signal.SIGTERM)
    assert proc.returncode == -signal.SIGTERM
    done = torch.load(tmp_path / "base-state.pt", weights_only=True)["step"]
    assert performed(start("base", tmp_path)) == BASE_STEPS - done
    torch.testing.assert_close(torch.load(tmp_path / "base.pt"), torch.load(reference / "base.pt"))


def test_killed_extraction_resumes_to_the_same_store(reference, tmp_path):
    proc = start("extract", tmp_path)
    interrupt(proc, tmp_path / "store.zarr" / "unit_done" / "c" / "0")
    assert performed(start("extract", tmp_path)) < SAMPLES
    ours, theirs = (TrajectoryStore.open(str(f / "store.zarr")) for f in (tmp_path, reference))
    for name in ("features", "tokens", "order", "labels"):
        np.testing.assert_array_equal(getattr(ours, name)[:], getattr(theirs, name)[:], err_msg=name)


def test_state_of_other_params_is_ignored(tmp_path, capsys):
    model = torch.nn.Linear(2, 2)
    saved = TrainingState(tmp_path / "state.pt", {"lr": 1.0}, minutes=0)
    saved.resume(model=model)
    for _ in saved.updates(3):
        pass
    other = torch.nn.Linear(2, 2)
    assert TrainingState(tmp_path / "state.pt", {"lr": 2.0}, minutes=0).resume(model=other) == 0
    assert "other params" in capsys.readouterr().out
    assert not torch.equal(other.weight, model.weight)
    assert TrainingState(tmp_path / "state.pt", {"lr": 1.0}, minutes=0).resume(model=other) == 3
    assert torch.equal(other.weight, model.weight)


def test_sampler_skips_to_where_a_run_stopped(tmp_path):
    """A resumed sampler yields the batches an uninterrupted one yields next, also across epochs."""
    from test_store import create, fill, trajectories

    fill(create(tmp_path / "s.zarr"), trajectories(), [0, 1, 2])
    dataset = PairDataset(str(tmp_path / "s.zarr"))

    def batches(skip: int, count: int) -> list[list[int]]:
        sampler, out = TrajectoryBatchSampler(dataset, 4, 2, seed=5, skip=skip), []
        while len(out) < count:
            out += list(sampler)
        return out[:count]

    assert len(TrajectoryBatchSampler(dataset, 4, 2)) == 5  # so 7 skips a whole epoch and then some
    assert batches(7, 6) == batches(0, 13)[7:]
