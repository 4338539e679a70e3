"""The Prefect layer: the pipeline flow (test harness, two workers) and a deployment run through
a real server and process worker on loopback."""

import os
import signal
import socket
import subprocess
import time

import numpy as np
import pytest
import zarr
from mlflow import MlflowClient

from migm_shortcut.config import load_params

from conftest import BIN, run


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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGTERM, signal.SIGKILL):  # workers ignore the first SIGTERM at times
        if proc.poll() is not None:
            return
        os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pass


def test_deployment_runs_through_a_server_and_a_process_worker(flow_project, tmp_path):
    port = _free_port()
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "PREFECT_HOME": str(tmp_path / "prefect"),
           "PREFECT_API_URL": f"http://127.0.0.1:{port}/api", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "DO_NOT_TRACK": "1", "MIGM_PROJECT_DIR": str(flow_project), "MIGM_ROOT": str(flow_project)}
    env.pop("MLFLOW_TRACKING_URI", None)
    prefect = [str(BIN / "prefect")]

    def cli(*args: str, timeout: int = 180) -> subprocess.CompletedProcess:
        out = subprocess.run([*prefect, *args], cwd=flow_project, env=env, capture_output=True, text=True, timeout=timeout)
        assert out.returncode == 0, f"prefect {' '.join(args)}:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}"
        return out

    server = subprocess.Popen([*prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port), "--analytics-off"],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    worker = None
    try:
        for _ in range(90):
            if _healthy(port):
                break
            time.sleep(1)
        else:
            pytest.fail("the Prefect server did not start within 90 s")
        cli("work-pool", "create", "gpu", "--type", "process")
        cli("concurrency-limit", "create", "gpu", "1")
        cli("deploy", "--all")
        worker = subprocess.Popen([*prefect, "worker", "start", "--pool", "gpu"], cwd=flow_project, env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        out = cli("deployment", "run", "migm-pipeline/default", "--watch", timeout=300)
        assert "Completed" in out.stdout + out.stderr
    finally:
        if worker is not None:
            _stop(worker)
        _stop(server)
    assert server.poll() is not None and (worker is None or worker.poll() is not None)


def _healthy(port: int) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False
