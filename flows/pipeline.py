"""Prefect flows over the DVC pipeline. One code path: a flow runs DVC stages, DVC runs stages/*.

- `pipeline`: every DVC stage in order (`dvc repro --single-item`, so DVC's cache decides what
  runs), with the parallel units of work as separate tasks when a stage is stale: extraction
  shards and sampler-grid shards, each filling disjoint parts of the store / sample folder, then
  the DVC stage records the result (it finds the work done: both stages resume).
- `sweep`: the sampler configurations of params.yaml fanned out one task each, then recorded and
  evaluated. Sweeps over other keys are DVC experiments: `dvc exp run --queue -S KEY=V`.

Every subprocess shares MIGM_PIPELINE_RUN = the flow run id, so all stages log under one MLflow
parent run. Tasks carry the tag `gpu`: `prefect concurrency-limit create gpu 1` makes one GPU run
one heavy task at a time. Artifacts move between machines through the DVC remote (pull / push).

    python -m flows.pipeline --workers 2          # local mode: no server needed
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from migm_shortcut import telemetry

telemetry.switch_off()  # before Prefect reads its settings
# Local mode starts a temporary server; on a busy 2-core machine that takes 25-30 s, past Prefect's 20 s default.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

from prefect import flow, task  # noqa: E402
from prefect.runtime import flow_run  # noqa: E402

STAGES = ("prepare", "tokenizer", "classifier", "base", "extract", "train_shortcut", "sample", "evaluate")


def _run(cmd: list[str], project: str) -> str:
    env = {**os.environ, **telemetry.OFF, "MIGM_PIPELINE_RUN": os.environ.get("MIGM_PIPELINE_RUN") or str(flow_run.id)}
    bin_dir = str(Path(sys.executable).parent)  # dvc and python of this environment
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    out = subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"`{' '.join(cmd)}` failed ({out.returncode}):\n{(out.stdout + out.stderr)[-4000:]}")
    return out.stdout


@task(retries=2, retry_delay_seconds=10, tags=["gpu"], task_run_name="dvc-{stage}")
def dvc_stage(stage: str, project: str) -> str:
    return _run(["dvc", "repro", "--single-item", stage], project)


@task(retries=2, retry_delay_seconds=10, tags=["gpu"], task_run_name="{stage}-worker-{worker}-of-{workers}")
def shard(stage: str, worker: int, workers: int, project: str) -> str:
    return _run([sys.executable, "-m", f"stages.{stage}", "--worker", str(worker), "--workers", str(workers)], project)


@task(retries=2, retry_delay_seconds=10, tags=["gpu"], task_run_name="sample-{name}")
def sample_one(name: str, project: str) -> str:
    return _run([sys.executable, "-m", "stages.sample", "--only", name], project)


def _stale(stage: str, project: str) -> bool:
    return bool(json.loads(_run(["dvc", "status", "--json", stage], project) or "{}"))


@flow(name="migm-pipeline", log_prints=True)
def pipeline(project: str = ".", workers: int = 1, profile: str | None = None, pull: bool = False, push: bool = False):
    """The whole DVC pipeline; with workers > 1, stale extraction and sampling run as parallel shards."""
    project = str(Path(project).resolve())
    if profile:
        _run([sys.executable, "-m", "stages.cli", "profile", profile], project)
    if pull:
        _run(["dvc", "pull", "--allow-missing"], project)
    for stage in STAGES:
        if workers > 1 and stage in ("extract", "sample") and _stale(stage, project):
            if stage == "extract":  # the store is created once, before its writers start
                _run([sys.executable, "-m", "stages.extract", "--create-only"], project)
            for future in [shard.submit(stage, i, workers, project) for i in range(workers)]:
                future.result()
        out = dvc_stage(stage, project)
        print(next((line for line in out.splitlines() if f"'{stage}'" in line), f"stage {stage}: done"))
    if push:
        _run(["dvc", "push"], project)


@flow(name="migm-sweep", log_prints=True)
def sweep(project: str = ".", names: list[str] | None = None):
    """Fan the sampler grid of params.yaml (or the named configurations) out, one task each."""
    project = str(Path(project).resolve())
    sys.path.insert(0, project)
    from migm_shortcut.config import load_params

    settings = [s.name for s in load_params(Path(project) / "params.yaml").sample.settings()]
    names = names or settings
    if unknown := set(names) - set(settings):
        raise ValueError(f"configurations {sorted(unknown)} are not in params.yaml's sample grid")
    for stage in STAGES[:-2]:  # everything sampling needs, from DVC's cache when unchanged
        dvc_stage(stage, project)
    for future in [sample_one.submit(name, project) for name in names]:
        future.result()
    dvc_stage("sample", project)  # records the folders (all fingerprints match: nothing reruns)
    dvc_stage("evaluate", project)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--project", default=".")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--profile")
    args = parser.parse_args()
    pipeline(project=args.project, workers=args.workers, profile=args.profile)


if __name__ == "__main__":
    main()
