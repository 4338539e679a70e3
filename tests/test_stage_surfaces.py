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


def test_compile_without_a_cpp_compiler_stops_before_any_work_naming_the_key(tmp_path, monkeypatch):
    import shutil

    import yaml

    from stages import common

    raw = yaml.safe_load(open(REPO / "profiles" / "smoke.yaml"))
    raw["sample"]["compile"] = True
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CXX", raising=False)
    if shutil.which("g++"):
        assert common.params().sample.compile  # a compiler is here: nothing to say
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setattr(common.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="sample.compile = true: torch.compile on a CPU builds C"):
        common.params()
