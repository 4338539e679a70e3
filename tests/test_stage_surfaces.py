"""What a user meets before any work: every stage answers --help without working."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from stages.cli import STAGES

REPO = Path(__file__).resolve().parent.parent


# Every stage's --help in one fresh process (each in its own would pay torch's and mlflow's imports
# nine times); `migm stage NAME --help` exits through argparse, caught and recorded per stage.
HELP_ALL = """
import contextlib, io, json, sys
from stages.cli import STAGES, main
answers = {}
for stage in STAGES:
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            main(["stage", stage, "--help"])
        code = "returned without exiting"
    except SystemExit as exit:
        code = exit.code
    except Exception as err:
        code = repr(err)
    answers[stage] = [code, out.getvalue()]
print(json.dumps(answers))
"""


@pytest.fixture(scope="module")
def help_answers(tmp_path_factory):
    # An empty folder: a stage that started working would fail at once on the missing params.yaml.
    folder = tmp_path_factory.mktemp("help")
    out = subprocess.run([sys.executable, "-c", HELP_ALL], cwd=folder, capture_output=True, text=True,
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}, timeout=300)
    assert out.returncode == 0, out.stderr
    return folder, json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("stage", STAGES)
def test_stage_help_answers_without_working(stage, help_answers):
    folder, answers = help_answers
    code, text = answers[stage]
    assert code == 0, code
    assert text.startswith(f"usage: migm stage {stage}") and f"Stage `{stage}`" in text
    assert not any(folder.iterdir())  # nothing written


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
