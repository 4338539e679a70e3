"""Shared fixtures: the smoke pipeline run once by `dvc repro` and once by the Prefect flow."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
sys.path.insert(0, str(REPO))  # flows/ and stages/ import from the checkout

from migm_shortcut import telemetry  # noqa: E402

telemetry.switch_off()


def run(cmd: list[str], cwd: Path, check: bool = True, pin_root: bool = True) -> subprocess.CompletedProcess:
    """Run a command in a test project; `pin_root` points MIGM_ROOT there (off: the stages find it)."""
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "MIGM_ROOT": str(cwd), "DVC_NO_ANALYTICS": "1"}
    for key in ("MLFLOW_TRACKING_URI", "MIGM_PIPELINE_RUN") + (() if pin_root else ("MIGM_ROOT",)):
        env.pop(key, None)
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if check and out.returncode:
        raise AssertionError(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out


def fresh_copy(root: Path) -> Path:
    """A clone-like copy of the repository (tracked and new files, no data), on the smoke profile."""
    files = run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], REPO).stdout.split()
    for f in files:
        if (REPO / f).is_file() and not f.startswith("data/"):
            (root / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / f, root / f)
    run(["git", "init", "-q"], root)
    run(["git", "add", "-A"], root)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "copy"], root)
    run([sys.executable, "-m", "stages.cli", "profile", "smoke"], root)
    return root


@pytest.fixture(scope="session")
def project(tmp_path_factory) -> Path:
    """The smoke pipeline run by `dvc repro` in a fresh copy."""
    root = fresh_copy(tmp_path_factory.mktemp("project"))
    run(["dvc", "repro"], root)
    return root


@pytest.fixture(scope="session")
def flow_project(project, tmp_path_factory) -> Path:
    """The DVC run's project with its trajectories and samples deleted, then completed by the Prefect
    pipeline flow with two workers (Prefect's test harness): extraction and sampling run as shards.

    It starts from the same trained base, because training on a multi-threaded CPU is not bitwise
    reproducible across processes; from there, everything the two workers make must equal the
    one-worker run's."""
    from prefect.testing.utilities import prefect_test_harness

    from flows.pipeline import pipeline

    root = tmp_path_factory.mktemp("flow") / "project"
    # Keep .dvc/cache: DVC reruns a stage whose outputs are "not in cache", which would retrain the base.
    shutil.copytree(project, root, ignore=shutil.ignore_patterns("tmp", "mlruns.db*", ".migm"))
    for artifact in ("trajectories.zarr", "samples"):
        shutil.rmtree(root / "data" / artifact)
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.delenv("MIGM_PIPELINE_RUN", raising=False)
        mp.setenv("MIGM_ROOT", str(root))
        with prefect_test_harness(server_startup_timeout=90):
            pipeline(project=str(root), workers=2)
    return root
