"""Shared fixtures: the smoke pipeline run once by `dvc repro` and once by the Prefect flow."""

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
sys.path.insert(0, str(REPO))  # flows/ and stages/ import from the checkout

from migm_shortcut import telemetry  # noqa: E402

telemetry.switch_off()


def run(cmd: list[str], cwd: Path, check: bool = True, pin_root: bool = True) -> subprocess.CompletedProcess:
    """Run a command in a test project; `pin_root` points MIGM_ROOT there (off: the stages find it)."""
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "MIGM_ROOT": str(cwd), "DVC_NO_ANALYTICS": "1"}
    for key in ("MLFLOW_TRACKING_URI", "MIGM_PIPELINE_RUN") + (() if pin_root else ("MIGM_ROOT",)):
        env.pop(key, None)
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if check and out.returncode:
        raise AssertionError(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out


def fresh_copy(root: Path) -> Path:
    """A clone-like copy of the repository (tracked and new files, no data), on the smoke profile."""
    files = run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], REPO).stdout.split()
    for f in files:
        if (REPO / f).is_file() and not f.startswith("data/"):
            (root / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / f, root / f)
    run(["git", "init", "-q"], root)
    run(["git", "add", "-A"], root)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "copy"], root)
    run([sys.executable, "-m", "stages.cli", "profile", "smoke"], root)
    return root


@pytest.fixture(scope="session")
def project(tmp_path_factory) -> Path:
    """The smoke pipeline run by `dvc repro` in a fresh copy."""
    root = fresh_copy(tmp_path_factory.mktemp("project"))
    run(["dvc", "repro"], root)
    return root


@pytest.fixture(scope="session")
def flow_project(project, tmp_path_factory) -> Path:
    """The DVC run's project with its trajectories and samples deleted, then completed by the Prefect
    pipeline flow with two workers (Prefect's test harness): extraction and sampling run as shards.

    It starts from the same trained base, because training on a multi-threaded CPU is not bitwise
    reproducible across processes; from there, everything the two workers make must equal the
    one-worker run's. Its grid is narrowed to one configuration per feature source (two waves of
    units, not five): a unit is a process of its own, seconds each."""
    import yaml

    from prefect.testing.utilities import prefect_test_harness

    from flows.pipeline import pipeline

    root = tmp_path_factory.mktemp("flow") / "project"
    # Keep .dvc/cache: DVC reruns a stage whose outputs are "not in cache", which would retrain the base.
    shutil.copytree(project, root, ignore=shutil.ignore_patterns("tmp", "mlruns.db*", ".migm"))
    for artifact in ("trajectories.zarr", "samples"):
        shutil.rmtree(root / "data" / artifact)
    params = yaml.safe_load((root / "params.yaml").read_text())
    n = params["sampling"]["steps"]
    params["sample"] |= {"vanilla_steps": [n], "shortcut": [{"steps": n, "budgets": [3]}],
                         "baseline_steps": [n]}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.delenv("MIGM_PIPELINE_RUN", raising=False)
        mp.setenv("MIGM_ROOT", str(root))
        with prefect_test_harness(server_startup_timeout=90):
            pipeline(project=str(root), workers=2)
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def start_service(cmd: list[str], env: dict, health_url: str, cwd: Path | None = None) -> subprocess.Popen:
    """A server in its own process group, once `health_url` answers (a busy 2-core machine: 10-60 s)."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    for _ in range(120):
        if _healthy(health_url):
            return proc
        time.sleep(1)
    stop(proc)
    pytest.fail(f"{' '.join(cmd)} did not answer within 120 s")


def stop(proc: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGTERM, signal.SIGKILL):  # workers ignore the first SIGTERM at times
        if proc.poll() is not None:
            return
        os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pass


def start_worker(env: dict, checkout: Path, pool: str, name: str | None = None, **extra: str) -> subprocess.Popen:
    """A process worker of `pool` running flows in `checkout` (its MIGM_PROJECT_DIR), one at a time."""
    env = {**env, "MIGM_PROJECT_DIR": str(checkout), "MIGM_ROOT": str(checkout), **extra}
    return subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", pool, "--limit", "1",
                             *(["--name", name] if name else [])], cwd=checkout, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


@contextlib.contextmanager
def prefect_server(tmp: Path, deploy_from: Path):
    """A Prefect server on loopback with the `driver` and `gpu` process pools and the deployments of
    `deploy_from`: (the environment that talks to it, a `prefect` CLI runner)."""
    port = free_port()
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "PREFECT_HOME": str(tmp / "prefect"),
           "PREFECT_API_URL": f"http://127.0.0.1:{port}/api", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "DO_NOT_TRACK": "1", "DVC_NO_ANALYTICS": "1",
           "PREFECT_WORKER_QUERY_SECONDS": "2"}  # a worker's poll for new runs: 10 s by default
    env.pop("MLFLOW_TRACKING_URI", None)

    def cli(*args: str, timeout: int = 180) -> subprocess.CompletedProcess:
        out = subprocess.run([str(BIN / "prefect"), *args], cwd=deploy_from, env=env, capture_output=True,
                             text=True, timeout=timeout)
        assert out.returncode == 0, f"prefect {' '.join(args)}:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}"
        return out

    server = start_service([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port),
                            "--analytics-off"], env, f"http://127.0.0.1:{port}/api/health")
    try:
        for pool in ("driver", "gpu"):
            cli("work-pool", "create", pool, "--type", "process")
        cli("deploy", "--all")
        yield env, cli
    finally:
        stop(server)


# `make test` runs the suite on two workers (pytest-xdist, `--dist loadscope`): a module's tests share
# a worker, so its module fixtures are built once, and these modules, which use the session's smoke
# pipeline (fixtures `project` and `flow_project`, minutes to build), share one worker.
PIPELINE_MODULES = {"test_flows", "test_flows_pool", "test_pipeline"}


def pytest_collection_modifyitems(items):
    for item in items:
        defs = item._fixtureinfo.name2fixturedefs
        uses = [n for n in ("project", "flow_project") if defs.get(n) and defs[n][-1].scope == "session"]
        if uses and item.module.__name__ not in PIPELINE_MODULES:
            raise pytest.UsageError(f"{item.nodeid} uses {uses[0]}: add {item.module.__name__} to "
                                    "conftest.PIPELINE_MODULES, or the pipeline is built once per worker")


@pytest.hookimpl(optionalhook=True, tryfirst=True)
def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ModuleScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return "pipeline" if Path(module).stem in PIPELINE_MODULES else module

    return ModuleScheduling(config, log)
