"""Prefect flows over the DVC pipeline. One code path: a flow runs DVC stages, DVC runs stages/*.

- `pipeline`: every DVC stage in order (`dvc repro --single-item`, so DVC's cache decides what
  runs). When extraction or sampling is stale, its units of work run first: extraction shards and
  sampler configurations, each filling disjoint parts of the store / sample folder; then the DVC
  stage records the result (it finds the work done: both stages resume).
- `stage_unit`: one unit of work. With `distribute`, the pipeline runs each unit as a flow run of
  the `migm-stage-unit/unit` deployment, so any worker of the pool (one per GPU, on any machine)
  takes it; the unit's inputs (dvc.lock, params.yaml, config/, the models) and its output travel
  through the DVC remote (flows/transfer.py). Without, the units are threads of the flow's own
  process.
- `sweep`: the sampler configurations of params.yaml, then recorded and evaluated.

Every flow refuses a checkout at another commit than the deployed one. Stage output streams into
the run log line by line. A unit is retried only when it was killed (a signal, a lost worker),
never after a stage's own error (e.g. `error:` on bad params); `orchestration` in params.yaml sets
the retries and a timeout per unit. Every subprocess shares MIGM_PIPELINE_RUN = the pipeline's
flow run id, so all stages on all machines log under one MLflow parent run.

    python -m flows.pipeline --workers 2          # local mode: no server needed
"""

import argparse
import collections
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from migm_shortcut import telemetry

telemetry.switch_off()  # before Prefect reads its settings
# Local mode starts a temporary server; on a busy 2-core machine that takes 25-30 s, past Prefect's 20 s default.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.runtime import flow_run  # noqa: E402
from prefect.variables import Variable  # noqa: E402

from flows import transfer  # noqa: E402
from migm_shortcut.config import load_params  # noqa: E402
from stages.cli import STAGES  # noqa: E402

UNIT_DEPLOYMENT = "migm-stage-unit/unit"
SPEC_FILES = ("dvc.lock", "params.yaml", "config")  # what a unit needs besides code and models


class Killed(RuntimeError):
    """A process or worker that died from outside: the one failure a retry can fix."""


def _env() -> dict[str, str]:
    # A unit is a subflow of the pipeline's run (run_deployment links it): the root is the pipeline.
    pipeline_run = os.environ.get("MIGM_PIPELINE_RUN") or str(flow_run.root_flow_run_id)
    env = {**os.environ, **telemetry.OFF, "MIGM_PIPELINE_RUN": pipeline_run}
    bin_dir = str(Path(sys.executable).parent)  # dvc and python of this environment
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    return env


def _run(cmd: list[str], project: str, timeout_s: float | None = None) -> str:
    """Run cmd in project, each output line into the run log as it comes (tqdm's \\r updates
    too: progress); its output. Raises Killed for a killed process, RuntimeError otherwise."""
    logger = get_run_logger()
    proc = subprocess.Popen(cmd, cwd=project, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, bufsize=1)
    timer = threading.Timer(timeout_s, proc.kill) if timeout_s else None
    if timer:
        timer.start()
    lines = collections.deque(maxlen=2000)
    for line in proc.stdout:
        if line := line.rstrip():
            logger.info(line)
            lines.append(line)
    code = proc.wait()
    if timer:
        timer.cancel()
    text = "\n".join(lines)
    if timer and timer.finished.is_set() and code:
        raise TimeoutError(f"`{' '.join(cmd)}` ran past orchestration.timeout_minutes and was stopped")
    if code:
        killed = code < 0 or code > 128  # a signal (or a shell's 128 + signal): not the stage's own error
        raise (Killed if killed else RuntimeError)(f"`{' '.join(cmd)}` failed ({code}):\n{text[-4000:]}")
    return text


def _killed(task, task_run, state) -> bool:
    try:
        state.result()
    except Killed:
        return True
    except Exception:
        return False
    return False


def head(project: str) -> str:
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=project, capture_output=True, text=True).stdout.strip()


def check_commit(project: str, commit: str | None) -> None:
    """Refuse to run other code than the deployed commit (None: not deployed, nothing to check)."""
    here = head(project)
    if commit and here != commit:
        raise RuntimeError(f"error: this worker's checkout {project} is at commit {here or 'unknown'}, the "
                           f"deployment at {commit}: check out {commit} there (git fetch && git checkout {commit})")


@task(tags=["gpu"], task_run_name="dvc-{stage}")
def dvc_stage(stage: str, project: str) -> str:
    return _run(["dvc", "repro", "--single-item", stage], project)


@task(task_run_name="{args}")
def unit_task(args: list[str], project: str, timeout_s: float) -> str:
    return _run([sys.executable, *args], project, timeout_s)


def _unit(project: str):
    """unit_task with the retries of params.yaml (only after a kill); its timeout in seconds."""
    o = load_params(Path(project) / "params.yaml").orchestration
    return unit_task.with_options(retries=o.retries, retry_delay_seconds=o.retry_delay_seconds,
                                  retry_condition_fn=_killed), o.timeout_minutes * 60


@flow(name="migm-stage-unit", log_prints=True)
def stage_unit(args: list[str], output: str, spec: str, commit: str | None = None, project: str = ".") -> dict:
    """One unit of work on this worker: `python ARGS` in this checkout with the run's dvc.lock,
    params.yaml, config/ and models from the DVC remote; `output` (a path) goes back there. Its
    record (output hash, worker, device) is the Prefect variable `migm-unit-<flow run id>`."""
    project = str(Path(project).resolve())
    check_commit(project, commit)
    transfer.download(spec, Path(project), Path(project), overwrite=True)
    _run(["dvc", "pull", *_inputs(args, project)], project)
    run_unit, timeout_s = _unit(project)
    run_unit(args, project, timeout_s)
    record = {"output": transfer.upload(Path(project) / output, Path(project)), "checkout": project,
              "worker": os.environ.get("PREFECT__WORKER_NAME"), "device": os.environ.get("MIGM_DEVICE")}
    Variable.set(f"migm-unit-{flow_run.id}", record, overwrite=True)
    return record


def _inputs(args: list[str], project: str) -> list[str]:
    """The stages whose outputs a unit's stage (`-m stages.NAME ...`) reads: only these are pulled,
    not the stage's own previous outputs (an old store would leave its shards nothing to do)."""
    import yaml

    stages = yaml.safe_load((Path(project) / "dvc.yaml").read_text())["stages"]
    deps = set(stages[args[1].removeprefix("stages.")]["deps"])
    return [name for name, stage in stages.items()
            if any((out if isinstance(out, str) else next(iter(out))) in deps for out in stage.get("outs", []))]


def _spec(project: str) -> str:
    """Push the models to the DVC remote, and the run's settings (dvc.lock, params.yaml, config/)
    as one object: its hash."""
    import tempfile

    _run(["dvc", "push"], project)
    with tempfile.TemporaryDirectory() as tmp:
        for name in SPEC_FILES:
            src = Path(project) / name
            (shutil.copytree if src.is_dir() else shutil.copyfile)(src, Path(tmp) / name)
        return transfer.upload(Path(tmp), Path(project))


def _final(run) -> bool:
    return run.state is not None and run.state.is_final()


def _remote_units(units: list[tuple[list[str], str]], project: str, commit: str | None) -> list[dict]:
    """Run every (args, output) unit as a flow run of the unit deployment, then merge the outputs
    into this checkout. A crashed run (a lost worker) is started again, a failed one is final."""
    from prefect import get_client
    from prefect.deployments import run_deployment

    spec, retries = _spec(project), load_params(Path(project) / "params.yaml").orchestration.retries
    _run([sys.executable, "-m", "stages.cli", "parent"], project)  # before units race to make two

    def start(args: list[str], output: str):
        return run_deployment(UNIT_DEPLOYMENT, timeout=0, parameters={
            "args": args, "output": output, "spec": spec, "commit": commit})

    runs, tries = [start(*u) for u in units], [0] * len(units)
    with get_client(sync_client=True) as client:
        while not all(_final(r) for r in runs):
            time.sleep(2)
            runs = [r if _final(r) else client.read_flow_run(r.id) for r in runs]
            for i, r in enumerate(runs):
                if r.state.is_crashed() and tries[i] < retries:
                    tries[i] += 1
                    runs[i] = start(*units[i])
    if failed := [f"{r.name}: {r.state.message}" for r in runs if not r.state.is_completed()]:
        raise RuntimeError("units failed:\n" + "\n".join(failed))
    records = [Variable.get(f"migm-unit-{r.id}") for r in runs]
    for (_, output), record in zip(units, records):
        transfer.download(record["output"], Path(project), Path(project) / output, overwrite=False)
    return records


def fan_out(units: list[tuple[list[str], str]], project: str, workers: int, distribute: bool,
            commit: str | None) -> list[dict]:
    """Run the units: on the work pool, or `workers` at a time as threads of this flow run."""
    if distribute:
        return _remote_units(units, project, commit)
    run_unit, timeout_s = _unit(project)
    for wave in range(0, len(units), workers):
        for future in [run_unit.submit(args, project, timeout_s) for args, _ in units[wave : wave + workers]]:
            future.result()
    return []


def _units(stage: str, workers: int, project: str) -> list[tuple[list[str], str]]:
    if stage == "extract":
        return [(["-m", "stages.extract", "--worker", str(i), "--workers", str(workers)], "data/trajectories.zarr")
                for i in range(workers)]
    settings = load_params(Path(project) / "params.yaml").sample.settings()
    return [(["-m", "stages.sample", "--only", s.name], f"data/samples/{s.name}") for s in settings]


def _stale(stage: str, project: str) -> bool:
    return bool(json.loads(_run(["dvc", "status", "--json", stage], project) or "{}"))


@flow(name="migm-pipeline", log_prints=True)
def pipeline(project: str = ".", workers: int = 1, profile: str | None = None, pull: bool = False,
             push: bool = False, distribute: bool = False, commit: str | None = None) -> list[dict]:
    """The whole DVC pipeline; with workers > 1 (or `distribute`: on the work pool), stale
    extraction and sampling run as units of work. The units' records (worker, device, output)."""
    project = str(Path(project).resolve())
    check_commit(project, commit)
    commit = commit or (head(project) if distribute else None)  # the units run this flow's code
    if profile:
        _run([sys.executable, "-m", "stages.cli", "profile", profile], project)
    if pull:
        _run(["dvc", "pull", "--allow-missing"], project)
    records = []
    for stage in STAGES:
        if (workers > 1 or distribute) and stage in ("extract", "sample") and _stale(stage, project):
            if stage == "extract":  # the store is created once, before its writers start
                _run([sys.executable, "-m", "stages.extract", "--create-only"], project)
            records += fan_out(_units(stage, workers, project), project, workers, distribute, commit)
        out = dvc_stage(stage, project)
        print(next((line for line in out.splitlines() if f"'{stage}'" in line), f"stage {stage}: done"))
    if push:
        _run(["dvc", "push"], project)
    return records


@flow(name="migm-sweep", log_prints=True)
def sweep(project: str = ".", names: list[str] | None = None, workers: int = 1, distribute: bool = False,
          commit: str | None = None):
    """Fan the sampler grid of params.yaml (or the named configurations) out, one unit each."""
    project = str(Path(project).resolve())
    check_commit(project, commit)
    units = {output.rsplit("/", 1)[1]: (args, output) for args, output in _units("sample", 1, project)}
    names = names or list(units)
    if unknown := set(names) - set(units):
        raise ValueError(f"configurations {sorted(unknown)} are not in params.yaml's sample grid")
    for stage in STAGES[:-2]:  # everything sampling needs, from DVC's cache when unchanged
        dvc_stage(stage, project)
    fan_out([units[name] for name in names], project, workers, distribute, commit)
    dvc_stage("sample", project)  # records the folders (all fingerprints match: nothing reruns)
    dvc_stage("evaluate", project)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--project", default=".")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--profile")
    parser.add_argument("--distribute", action="store_true", help="units on the work pool (PREFECT_API_URL)")
    args = parser.parse_args()
    pipeline(project=args.project, workers=args.workers, profile=args.profile, distribute=args.distribute)


if __name__ == "__main__":
    main()
