"""The whole pipeline on the smoke profile through DVC, in a temporary copy of the repository."""

import json
import shutil
import sys

import mlflow.pyfunc
import numpy as np
import pytest
import yaml
from conftest import run
from mlflow import MlflowClient

from migm_shortcut.config import load_params

def test_pipeline_produces_the_artifacts(project):
    p = load_params(project / "params.yaml")
    report = json.loads((project / "data/report/metrics.json").read_text())
    for setting in p.sample.settings():
        row = report[setting.name]
        assert row["num_samples"] == p.sample.num_samples
        assert row["fid"] > 0 and row["latency_ms"] > 0 and 0 <= row["class_accuracy"] <= 1
        assert (project / "data/samples" / setting.name / "grid.png").is_file()
    assert report["summary"]["noise_floor_fid"] >= 0
    assert (project / "data/report/pareto.png").stat().st_size > 10_000
    assert "| vanilla | 8 steps |" in (project / "data/report/report.md").read_text()
    per_step = json.loads((project / "data/shortcut/val_per_step.json").read_text())
    assert [r["step"] for r in per_step] == list(range(p.sampling.steps - 1))
    rollout = json.loads((project / "data/shortcut/rollout.json").read_text())
    assert {r["budget"] for r in rollout} == {3, 4} and all(r["mse"] > 0 for r in rollout)  # smoke: N = 8, B = 3, 4
    assert json.loads((project / "data/shortcut/metrics.json").read_text())["rollout_mse_ratio_B3"] > 0


def test_second_repro_does_nothing_and_a_sample_key_reruns_only_sample_and_evaluate(project):
    assert "Data and pipelines are up to date" in run(["dvc", "status"], project).stdout
    params = yaml.safe_load((project / "params.yaml").read_text())
    original = (project / "params.yaml").read_text()
    try:
        params["sample"]["seed"] += 1
        (project / "params.yaml").write_text(yaml.safe_dump(params))
        stale = json.loads(run(["dvc", "status", "--json"], project).stdout)
        assert set(stale) == {"sample", "evaluate"}
        params["sampling"]["cfg"] = 2.0
        (project / "params.yaml").write_text(yaml.safe_dump(params))
        stale = json.loads(run(["dvc", "status", "--json"], project).stdout)
        # The rule's keys rerun extraction (then shortcut training, once the store has changed).
        assert set(stale) == {"extract", "sample", "evaluate"}
    finally:
        (project / "params.yaml").write_text(original)


def test_mlflow_lists_every_configuration_with_budget_latency_and_fid(project):
    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlruns.db'}")
    exp = client.get_experiment_by_name("migm-shortcut")
    runs = client.search_runs([exp.experiment_id], max_results=500)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1, "all stages of one `dvc repro` share one parent run"
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id}
    assert {"tokenizer", "classifier", "base", "extract", "shortcut", "evaluate"} <= set(children)
    p = load_params(project / "params.yaml")
    for setting in p.sample.settings():
        run_ = children[setting.name]
        assert run_.data.params["budget"] == str(setting.budget)
        assert run_.data.params["steps"] == str(setting.steps)
        assert run_.data.params["sampler"] == setting.sampler
        assert run_.data.metrics["fid"] > 0 and run_.data.metrics["latency_ms"] > 0
    # the training curve ends at the last update, on the loss the stage reports as final
    losses = client.get_metric_history(children["shortcut"].info.run_id, "loss")
    final_metrics = json.loads((project / "data/shortcut/metrics.json").read_text())
    final = final_metrics["final_loss"]
    assert max(m.step for m in losses) == p.shortcut.steps
    assert max(losses, key=lambda m: m.step).value == pytest.approx(final)
    artifacts = {a.path for a in client.list_artifacts(children["shortcut"].info.run_id, "model/artifacts")}
    assert "model/artifacts/model.safetensors" in artifacts
    version = client.search_model_versions(f"run_id = '{children['shortcut'].info.run_id}'")[0]
    assert float(version.tags["val_mse_ratio_mean"]) == pytest.approx(final_metrics["val_mse_ratio_mean"])
    headline = json.loads((project / "data/report/headline.json").read_text())
    assert float(version.tags["headline.reference_fid"]) == pytest.approx(headline["reference_fid"])
    # open while working: the sample run spans every configuration's timed sampling (a fast machine
    # samples the smoke grid in under a second, so a fixed floor would be flaky)
    sampling_ms = 1000 * sum(json.loads((project / "data/samples" / s.name / "info.json").read_text())["seconds"]
                             for s in p.sample.settings())
    floors = {"shortcut": 1000, "sample": sampling_ms, "evaluate": 1000}
    for name, floor in floors.items():
        run_ = children[name]
        assert run_.info.status == "FINISHED" and run_.info.end_time - run_.info.start_time > floor


def test_the_registered_shortcut_samples_through_mlflow(project, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project / 'mlruns.db'}")
    model = mlflow.pyfunc.load_model("models:/migm-shortcut-shortcut/latest")
    images = model.predict(np.arange(4), params={"decode": True})
    assert images.shape[0] == 4 and images.dtype == np.uint8


def test_corrupt_sample_set_fails_clearly_and_loses_nothing(project):
    victim = project / "data/samples/vanilla-N4/samples.npz"
    saved = victim.read_bytes()
    report_before = (project / "data/report/metrics.json").read_bytes()
    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlruns.db'}")
    exp = client.get_experiment_by_name("migm-shortcut")
    runs_before = len(client.search_runs([exp.experiment_id], max_results=500))
    try:
        victim.write_bytes(saved[: len(saved) // 2])
        out = run([sys.executable, "-m", "stages.evaluate"], project, check=False)
        assert out.returncode != 0
        assert "vanilla-N4" in out.stderr and "corrupt" in out.stderr
        assert (project / "data/report/metrics.json").read_bytes() == report_before
        runs = client.search_runs([exp.experiment_id], max_results=500, order_by=["attributes.start_time DESC"])
        assert len(runs) == runs_before + 1  # the stage's own run, FAILED; no configuration's run
        assert (runs[0].info.run_name, runs[0].info.status) == ("evaluate", "FAILED")
    finally:
        victim.write_bytes(saved)


def test_artifacts_travel_through_a_local_dvc_remote(project, tmp_path):
    """What a GPU worker on another machine does: clone, `dvc pull`, and every stage is up to date."""
    remote = tmp_path / "remote"
    run(["dvc", "remote", "add", "-f", "--local", "shared", str(remote)], project)
    run(["dvc", "push", "-r", "shared"], project)
    worker = tmp_path / "worker"
    # The worker's checkout: git-tracked files (dvc.lock, metrics JSON) but no cache and no artifacts.
    shutil.copytree(project, worker, ignore=shutil.ignore_patterns("cache", "tmp", "mlruns.db*", ".migm"))
    for artifact in ("trajectories.zarr", "samples", "base/model.safetensors", "shortcut/model.safetensors", "dataset/splits.npz"):
        path = worker / "data" / artifact
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    run(["dvc", "pull", "-r", "shared"], worker)
    assert "Data and pipelines are up to date" in run(["dvc", "status"], worker).stdout
    assert (worker / "data/shortcut/model.safetensors").read_bytes() == (project / "data/shortcut/model.safetensors").read_bytes()


def test_dvc_experiment_reruns_only_sampling_and_logs_to_the_projects_mlflow(project, tmp_path):
    """`dvc exp run --temp -S KEY=V` works in a copy under .dvc/tmp/exps: it must rerun only what the
    key touches, show in `dvc exp show`, and log to the project's MLflow store, not the copy's."""
    root = tmp_path / "project"
    shutil.copytree(project, root, ignore=shutil.ignore_patterns("tmp"))  # with .dvc/cache: nothing retrains
    run(["git", "add", "-A"], root)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "smoke run"], root)
    out = run(["dvc", "exp", "run", "--temp", "-S", "sample.seed=7"], root, pin_root=False).stdout
    assert "Stage 'train_shortcut' didn't change, skipping" in out and "Running stage 'sample'" in out
    shown = json.loads(run(["dvc", "exp", "show", "--json"], root).stdout)
    exps = [r for entry in shown for e in entry.get("experiments") or [] for r in e["revs"]]
    assert [r["data"]["params"]["params.yaml"]["data"]["sample"]["seed"] for r in exps] == [7]
    assert "data/report/headline.json" in exps[0]["data"]["metrics"]

    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlruns.db'}")
    runs = client.search_runs([client.get_experiment_by_name("migm-shortcut").experiment_id], max_results=500)
    parents = [r for r in runs if r.data.params.get("sample.seed") == "7" and "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    children = {r.info.run_name for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id}
    assert {s.name for s in load_params(root / "params.yaml").sample.settings()} <= children
