"""The Prefect layer: the pipeline flow (test harness, two workers) and a deployment run through
a real server and process worker on loopback."""

import numpy as np
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


def test_deployment_runs_through_a_server_and_a_process_worker(flow_project, tmp_path):
    with prefect_server(tmp_path, flow_project) as (env, cli):
        workers = [start_worker(env, flow_project, pool) for pool in ("driver", "gpu")]
        try:
            out = cli("deployment", "run", "migm-pipeline/default", "--watch", timeout=300)
            assert "Completed" in out.stdout + out.stderr
        finally:
            for worker in workers:
                stop(worker)
