"""Each stage's MLflow run is open while the stage works: FAILED when it raises, with the standard
source tags and system metrics while it runs."""

import shutil
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT, MLFLOW_SOURCE_NAME, MLFLOW_SOURCE_TYPE

from migm_shortcut import tracking
from migm_shortcut.config import load_params
from stages import common, evaluate, extract, sample

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def project_dir(tmp_path_factory) -> Path:
    """One for the module: each new MLflow store takes seconds to create its tables."""
    root = tmp_path_factory.mktemp("stage_runs")
    shutil.copy(REPO / "profiles" / "smoke.yaml", root / "params.yaml")
    return root


@pytest.fixture
def stage_dir(project_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project folder on the smoke profile with no data: any stage fails on its first input."""
    monkeypatch.chdir(project_dir)
    monkeypatch.setenv("MIGM_ROOT", str(project_dir))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MIGM_PIPELINE_RUN", raising=False)
    return project_dir


def runs_of(root: Path) -> dict:
    client = MlflowClient(tracking_uri=tracking.tracking_uri(root))
    experiment = client.get_experiment_by_name(load_params(root / "params.yaml").tracking.experiment)
    return {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}


@pytest.mark.parametrize("stage", [extract, sample, evaluate], ids=lambda m: m.__name__)
def test_a_stage_that_raises_leaves_a_failed_run_with_source_tags(stage, stage_dir):
    with pytest.raises(FileNotFoundError, match="model.safetensors"):  # no base checkpoint here
        stage.main([])
    name = stage.__name__.split(".")[-1]
    run = runs_of(stage_dir)[name]
    assert run.info.status == "FAILED"
    assert {MLFLOW_GIT_COMMIT, MLFLOW_SOURCE_NAME, MLFLOW_SOURCE_TYPE} <= set(run.data.tags)


def test_a_stage_run_lasts_as_long_as_its_work_and_logs_system_metrics(stage_dir, monkeypatch):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.1")
    with common.stage_run(load_params("params.yaml"), "work"):
        time.sleep(0.5)
    info = runs_of(stage_dir)["work"]
    assert info.info.status == "FINISHED"
    assert info.info.end_time - info.info.start_time >= 500
    assert "system/cpu_utilization_percentage" in info.data.metrics


def test_without_psutil_system_metrics_are_off_with_a_message(stage_dir, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "psutil", None)  # `import psutil` now raises ImportError
    with common.stage_run(load_params("params.yaml"), "quick"):
        pass
    assert runs_of(stage_dir)["quick"].info.status == "FINISHED"
    assert "psutil is not installed" in capsys.readouterr().err
