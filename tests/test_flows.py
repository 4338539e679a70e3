"""The Prefect layer: the pipeline flow (test harness, two workers), and deployments run through a
real server and process workers on loopback."""

import json
import subprocess
import sys

import numpy as np
import pytest
import zarr
from mlflow import MlflowClient

from migm_shortcut.config import load_params

from conftest import prefect_server, run, start_worker, stop


def test_flow_with_two_workers_reproduces_the_one_worker_dvc_run(project, flow_project):
    for upstream in ("tokenizer", "base"):  # the flow must reuse DVC's cached stages, not retrain them
        assert (project / f"data/{upstream}/model.safetensors").read_bytes() == \
            (flow_project / f"data/{upstream}/model.safetensors").read_bytes(), f"the flow retrained the {upstream}"
    one, two = (zarr.open_group(str(p / "data/trajectories.zarr"), mode="r") for p in (project, flow_project))
    for name in ("tokens", "order", "labels", "features", "unit_done"):
        np.testing.assert_array_equal(one[name][:], two[name][:], err_msg=name)
    for setting in load_params(flow_project / "params.yaml").sample.settings():
        a, b = (np.load(p / "data/samples" / setting.name / "samples.npz")["tokens"] for p in (project, flow_project))
        if setting.sampler != "shortcut":  # the shortcut is retrained from the store: not bitwise equal
            np.testing.assert_array_equal(a, b, err_msg=setting.name)
    assert "Data and pipelines are up to date" in run(["dvc", "status"], flow_project).stdout


def test_flow_run_logs_one_parent_with_every_configuration(flow_project):
    client = MlflowClient(tracking_uri=f"sqlite:///{flow_project / 'mlruns.db'}")
    runs = client.search_runs([client.get_experiment_by_name("migm-shortcut").experiment_id], max_results=500)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    names = {r.info.run_name for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id}
    assert {s.name for s in load_params(flow_project / "params.yaml").sample.settings()} <= names


@pytest.fixture(scope="module")
def server(flow_project, tmp_path_factory):
    """One Prefect server for the module (each start costs 10-60 s), with its pools and
    flow_project's deployments: (the environment that talks to it, a `prefect` CLI runner)."""
    with prefect_server(tmp_path_factory.mktemp("prefect"), flow_project) as (env, cli):
        yield env, cli


def test_deployment_runs_through_a_server_and_a_process_worker(server, flow_project):
    env, cli = server
    workers = [start_worker(env, flow_project, pool) for pool in ("driver", "gpu")]
    try:
        out = cli("deployment", "run", "migm-pipeline/default", "--watch", timeout=300)
        assert "Completed" in out.stdout + out.stderr
    finally:
        for worker in workers:
            stop(worker)


def _run_deployment(env: dict, cwd, name: str, parameters: dict) -> dict:
    """Run a deployment to its end; its final state's type and message."""
    code = ("import json, sys; from prefect.deployments import run_deployment; "
            "r = run_deployment(sys.argv[1], parameters=json.loads(sys.argv[2]), timeout=240); "
            "print(json.dumps({'type': r.state.type.value, 'message': r.state.message, "
            "'labels': dict(r.labels)}))")
    out = subprocess.run([sys.executable, "-c", code, name, json.dumps(parameters)], cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_worker_at_another_commit_refuses_the_deployed_one(server, flow_project, tmp_path):
    env, _ = server
    commit = run(["git", "rev-parse", "HEAD"], flow_project).stdout.strip()
    worker_checkout = tmp_path / "worker"
    run(["git", "clone", "-q", str(flow_project), str(worker_checkout)], tmp_path)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "other"],
        worker_checkout)
    other = run(["git", "rev-parse", "HEAD"], worker_checkout).stdout.strip()
    worker = start_worker(env, worker_checkout, "gpu")
    try:
        state = _run_deployment(env, flow_project, "migm-stage-unit/unit",
                                {"args": ["-m", "stages.extract"], "output": "data", "spec": "0" * 32})
    finally:
        stop(worker)
    assert state["type"] == "FAILED", state
    assert commit in state["message"] and other in state["message"], state["message"]
