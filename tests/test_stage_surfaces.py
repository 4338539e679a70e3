"""What a user meets before any work: every stage answers --help without working."""

import subprocess
import sys
from pathlib import Path

import pytest

from stages.cli import STAGES

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("stage", STAGES)
def test_stage_help_answers_without_working(stage, tmp_path):
    # An empty folder: a stage that started working would fail at once on the missing params.yaml.
    out = subprocess.run([sys.executable, "-m", "stages.cli", "stage", stage, "--help"], cwd=tmp_path,
                         capture_output=True, text=True, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"usage: migm stage {stage}") and f"Stage `{stage}`" in out.stdout
    assert not any(tmp_path.iterdir())  # nothing written
