"""Units of work on a real Prefect server's work pool, workers in separate checkouts (opt-in).

Costs: a Prefect server start (10-60 s on 2 busy cores); the `project` fixture (a smoke `dvc
repro`, 3-4 min) and about 4 min more. A worker at another commit: test_flows.py."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import BIN, free_port, prefect_server, run, start_service, start_worker, stop


def _unit_runs(env: dict, cwd) -> list[dict]:
    """Name, state and worker (label) of every flow run of the unit deployment."""
    code = ("import json; from prefect import get_client\n"
            "with get_client(sync_client=True) as c:\n"
            "    d = c.read_deployment_by_name('migm-stage-unit/unit')\n"
            "    runs = [r for r in c.read_flow_runs() if r.deployment_id == d.id]\n"
            "print(json.dumps([{'name': r.name, 'state': r.state.type.value, 'parameters': r.parameters,\n"
            "                   'worker': r.labels.get('prefect.worker.name')} for r in runs]))")
    out = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _narrow(params_file) -> None:
    """Four sampler configurations (2 waves on 2 workers) and no Inception (about 30 s a
    configuration on 2 cores): what this test checks is where units run, not the metrics."""
    import yaml

    params = yaml.safe_load(params_file.read_text())
    params["sample"] |= {"vanilla_steps": [params["sampling"]["steps"]], "baselines": []}
    params["evaluate"]["inception"] = False
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.mark.skipif(not os.environ.get("MIGM_POOL_TEST"), reason="slow, opt-in: MIGM_POOL_TEST=1 "
                    "pytest tests/test_flows_pool.py (about 4 min on 2 cores after fixture `project`)")
def test_two_workers_in_two_checkouts_run_the_units_and_match_one_worker(project, tmp_path):
    """The smoke pipeline's stale extraction and sampling run as units on two workers (own
    checkouts, own device settings, a DVC remote between them) driven by a flow in a third
    checkout; all log into one MLflow server under one parent."""
    import numpy as np
    import zarr
    from mlflow import MlflowClient

    from migm_shortcut.config import load_params

    remote, driver = tmp_path / "remote", tmp_path / "driver"
    shutil.copytree(project, driver, ignore=shutil.ignore_patterns("tmp", "mlruns.db*", ".migm"))
    for artifact in ("trajectories.zarr", "samples"):
        shutil.rmtree(driver / "data" / artifact)
    _narrow(driver / "params.yaml")
    run(["dvc", "remote", "add", "-q", "-d", "r", str(remote)], driver)
    checkouts = [tmp_path / f"worker{i}" for i in range(2)]
    for checkout in checkouts:  # another machine: the code from git, data only from the remote
        run(["git", "clone", "-q", str(driver), str(checkout)], tmp_path)
        run(["dvc", "remote", "add", "-q", "-d", "r", str(remote)], checkout)
    port = free_port()
    mlflow_server = start_service([str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
                                   "-w", "1", "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
                                   "--default-artifact-root", str(tmp_path / "mlartifacts")],
                                  {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"},
                                  f"http://127.0.0.1:{port}/health")
    uri = f"http://127.0.0.1:{port}"
    try:
        with prefect_server(tmp_path, driver) as (env, cli):
            env = {**env, "MLFLOW_TRACKING_URI": uri}
            workers = [start_worker(env, c, "gpu", f"gpu-{i}", MIGM_DEVICE="cpu", CUDA_VISIBLE_DEVICES=str(i))
                       for i, c in enumerate(checkouts)]
            try:
                out = subprocess.run([sys.executable, "-m", "flows.pipeline", "--project", str(driver),
                                      "--workers", "2", "--distribute"], cwd=driver,
                                     env={**env, "MIGM_ROOT": str(driver)}, capture_output=True, text=True,
                                     timeout=900)
                assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
                units = _unit_runs(env, driver)
            finally:
                for worker in workers:
                    stop(worker)
        client = MlflowClient(tracking_uri=uri)  # now: a client retries a dead server for 4 min
        experiment = client.get_experiment_by_name("migm-shortcut").experiment_id
        runs = client.search_runs([experiment], max_results=500)
    finally:
        stop(mlflow_server)
    settings = load_params(driver / "params.yaml").sample.settings()
    assert len(units) == 2 + len(settings) and {u["state"] for u in units} == {"COMPLETED"}, units
    for kind in ("stages.extract", "stages.sample"):
        assert {u["worker"] for u in units if kind in u["parameters"]["args"]} == {"gpu-0", "gpu-1"}, units
    one, two = (zarr.open_group(str(p / "data/trajectories.zarr"), mode="r") for p in (project, driver))
    for name in ("tokens", "order", "labels", "features", "unit_done"):
        np.testing.assert_array_equal(one[name][:], two[name][:], err_msg=name)
    for setting in settings:  # the same store: DVC keeps the trained shortcut, so its samples match too
        a, b = (np.load(p / "data/samples" / setting.name / "samples.npz")["tokens"] for p in (project, driver))
        np.testing.assert_array_equal(a, b, err_msg=setting.name)
    assert (driver / "data/report/report.md").is_file()
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1, [r.info.run_name for r in parents]
    parent = parents[0].info.run_id
    children = {r.info.run_name for r in runs if r.data.tags.get("mlflow.parentRunId") == parent}
    assert {"extract-worker-0", "extract-worker-1", "evaluate"} <= children, children
