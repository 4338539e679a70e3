import json
import os

os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from migm_shortcut import tracking


@pytest.fixture
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    # Run from another directory: nothing may land in the working directory (DVC exp temp copy).
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    (tmp_path / "repo").mkdir()
    return tmp_path / "repo"


def test_tracking_uri(root: Path, monkeypatch: pytest.MonkeyPatch):
    assert tracking.tracking_uri(root) == f"sqlite:///{root.resolve()}/mlruns.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////elsewhere/x.db")
    assert tracking.tracking_uri(root) == "sqlite:////elsewhere/x.db"


def test_parent_children_and_curve(root: Path):
    state = root / ".mlflow_parent_run"
    kwargs = dict(params={"evaluate": {"bootstrap": 10}}, tags={"git_commit": "abc"}, state_file=state)
    parent = tracking.pipeline_run(root, "test-exp", "pipeline", key="abc-p1", **kwargs)
    assert tracking.pipeline_run(root, "test-exp", "pipeline", key="abc-p1", **kwargs) == parent
    other = tracking.pipeline_run(root, "test-exp", "pipeline", key="abc-p2", **kwargs)
    assert other != parent
    assert json.loads(state.read_text()) == {"abc-p1": parent, "abc-p2": other}

    samples = root / "samples.txt"
    samples.write_text("grid")
    children = {
        budget: tracking.child_run(
            root,
            parent,
            f"shortcut-B{budget}",
            params={"steps": 16, "budget": budget, "sampler": "shortcut"},
            metrics={"latency": 1.5 * budget, "fid": 60.0 - budget},
            artifacts=[samples],
            tags={"stage": "evaluate"},
        )
        for budget in (6, 8)
    }
    curve = tracking.child_run(root, parent, "train-shortcut", history=[{"step": s, "loss": 1.0 / (s + 1)} for s in range(5)])

    client = MlflowClient(tracking_uri=tracking.tracking_uri(root))
    experiment = client.get_experiment_by_name("test-exp")
    assert experiment.artifact_location == (root / "mlartifacts").resolve().as_uri()
    runs = client.search_runs([experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")
    by_id = {r.info.run_id: r for r in runs}
    assert set(by_id) == set(children.values()) | {curve}
    for budget, run_id in children.items():
        run = by_id[run_id]
        assert run.data.params == {"steps": "16", "budget": str(budget), "sampler": "shortcut"}
        assert run.data.metrics == {"latency": 1.5 * budget, "fid": 60.0 - budget}
        assert run.data.tags["stage"] == "evaluate"
        assert [a.path for a in client.list_artifacts(run_id)] == ["samples.txt"]
    assert client.get_run(parent).data.params == {"evaluate.bootstrap": "10"}
    assert [m.step for m in client.get_metric_history(curve, "loss")] == list(range(5))
    assert not any(Path.cwd().iterdir())  # no ./mlruns or ./mlflow.db in the working directory

    # A deleted parent is replaced, never restored or reused; the old run stays in the store.
    client.delete_run(other)
    replacement = tracking.pipeline_run(root, "test-exp", "pipeline", key="abc-p2", **kwargs)
    assert replacement != other and client.get_run(other).info.lifecycle_stage == "deleted"


def test_retry_on_locked_database(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(tracking.time, "sleep", lambda s: None)
    attempts = []

    def flaky() -> str:
        attempts.append(1)
        if len(attempts) < 3:
            raise RuntimeError("(sqlite3.OperationalError) database is locked")
        return "ok"

    assert tracking._retry(flaky) == "ok" and len(attempts) == 3

    def broken() -> None:
        attempts.append(1)
        raise ValueError("other")

    attempts.clear()
    with pytest.raises(ValueError):
        tracking._retry(broken)
    assert len(attempts) == 1  # only "database is locked" is retried


def test_stage_run_is_open_while_its_stage_works_and_fails_with_it(root: Path):
    parent = tracking.pipeline_run(root, "test-exp", "pipeline", params={}, tags={}, key="k",
                                   state_file=root / "parents.json")
    client = MlflowClient(tracking_uri=tracking.tracking_uri(root))
    with tracking.stage_run(root, parent, "train", params={"lr": 0.1}) as run:
        assert client.get_run(run.run_id).info.status == "RUNNING"
        for step in range(3):
            run.log(step, {"loss": 1.0 / (step + 1), "note": "skipped"})
        live = client.get_metric_history(run.run_id, "loss")
        assert [m.step for m in live] == [0, 1, 2]  # logged as it happens, before the stage ends
    finished = client.get_run(run.run_id).info
    assert finished.status == "FINISHED" and finished.end_time >= live[-1].timestamp
    assert client.get_run(run.run_id).data.params == {"lr": "0.1"}

    with pytest.raises(RuntimeError, match="boom"):
        with tracking.stage_run(root, parent, "broken") as failing:
            raise RuntimeError("boom")
    assert client.get_run(failing.run_id).info.status == "FAILED"
