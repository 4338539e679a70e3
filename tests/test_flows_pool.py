"""Units of work on a real Prefect server's work pool, workers in separate checkouts.

Costs: a Prefect server start (10-60 s on 2 busy cores) per test; the two-worker pipeline test
also needs the `project` fixture (a smoke `dvc repro`, 3-4 min) and runs about 2-3 min more."""

import json
import subprocess
import sys

from conftest import BIN, fresh_copy, prefect_server, run, start_worker, stop


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


def test_a_worker_at_another_commit_refuses_the_deployed_one(tmp_path):
    deployed = fresh_copy(tmp_path / "deployed")
    commit = run(["git", "rev-parse", "HEAD"], deployed).stdout.strip()
    worker_checkout = tmp_path / "worker"
    run(["git", "clone", "-q", str(deployed), str(worker_checkout)], tmp_path)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "other"],
        worker_checkout)
    other = run(["git", "rev-parse", "HEAD"], worker_checkout).stdout.strip()
    with prefect_server(tmp_path, deployed) as (env, cli):
        worker = start_worker(env, worker_checkout, "gpu")
        try:
            state = _run_deployment(env, deployed, "migm-stage-unit/unit",
                                    {"args": ["-m", "stages.extract"], "output": "data", "spec": "0" * 32})
        finally:
            stop(worker)
    assert state["type"] == "FAILED", state
    assert commit in state["message"] and other in state["message"], state["message"]
