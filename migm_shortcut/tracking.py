"""MLflow 3 tracking: one parent run per pipeline run, one nested child run per stage or setting.

Stages run as separate processes (DVC, Prefect), so the parent's id is kept in a small JSON file
mapping a pipeline-run key (chosen by the caller, e.g. git commit + params hash) to a run id.
`dvc exp run` works in a temporary copy of the repo, so nothing here derives paths from the
working directory: every call gets the real project root.

Only the client API is used (no `mlflow.start_run`), so no process-global "active run" exists.
A stage's run opens when the stage starts and closes when it ends (`stage_run`), FAILED on error.
Runs are only ever created and appended to: nothing here deletes, restores or overwrites a run.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

PIPELINE_KEY_TAG = "migm.pipeline_key"
_RETRIES = 6  # waits 0.25 + 0.5 + 1 + 2 + 4 s, about 8 s in all, before giving up
T = TypeVar("T")


def tracking_uri(root: Path) -> str:
    """`MLFLOW_TRACKING_URI` if set, else the SQLite file `<root>/mlruns.db` (absolute path)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(root).resolve() / 'mlruns.db'}"


@functools.cache
def _client(uri: str) -> MlflowClient:
    if not uri.startswith("sqlite:///"):
        return MlflowClient(tracking_uri=uri)
    # MlflowClient() connects at once, and the first connection to a new SQLite file creates its
    # tables with alembic migrations; processes doing that at once break each other's schema.
    db = Path(uri.removeprefix("sqlite:///"))
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{db}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        return MlflowClient(tracking_uri=uri)


def _retry(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Call fn, retrying with backoff while SQLite reports "database is locked" (several
    processes writing one file); any other error is raised at once."""
    for attempt in range(_RETRIES - 1):
        try:
            return fn(*args, **kwargs)
        except Exception as err:
            if "database is locked" not in str(err):
                raise
            time.sleep(0.25 * 2**attempt)
    return fn(*args, **kwargs)  # the last try: its error propagates


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    # Nested params.yaml sections become "section.key" params, the way DVC names them.
    out: dict[str, str] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out |= _flatten(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = str(v)
    return out


def _chunks(items: list[T], size: int) -> Iterable[list[T]]:
    return (items[i : i + size] for i in range(0, len(items), size))


def _log(
    client: MlflowClient,
    run_id: str,
    *,
    params: Mapping[str, Any] | None = None,
    metrics: Iterable[tuple[str, float, int]] = (),
) -> None:
    """Log params and (key, value, step) metrics in batches within MLflow's per-request limits."""
    now = int(time.time() * 1000)
    for chunk in _chunks([Param(k, v) for k, v in _flatten(params or {}).items()], 100):
        _retry(client.log_batch, run_id, params=chunk)
    for chunk in _chunks([Metric(k, float(v), now, step) for k, v, step in metrics], 1000):
        _retry(client.log_batch, run_id, metrics=chunk)


def _experiment_id(client: MlflowClient, root: Path, name: str) -> str:
    exp = _retry(client.get_experiment_by_name, name)
    if exp is None:
        # MLflow's default artifact root is ./mlruns relative to the working directory, which
        # DVC discards after `exp run`: pin a local store's artifacts under the real root.
        local = tracking_uri(root).startswith("sqlite:")
        location = (Path(root).resolve() / "mlartifacts").as_uri() if local else None
        try:
            return _retry(client.create_experiment, name, artifact_location=location)
        except MlflowException as err:
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            exp = _retry(client.get_experiment_by_name, name)  # another process just created it
    if exp.lifecycle_stage != "active":
        raise RuntimeError(f"MLflow experiment {name!r} is deleted: restore it or choose another name")
    return exp.experiment_id


def _is_active(client: MlflowClient, run_id: str) -> bool:
    try:
        return _retry(client.get_run, run_id).info.lifecycle_stage == "active"
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        return False  # e.g. the tracking URI changed since the id was stored


def pipeline_run(
    root: Path,
    experiment: str,
    run_name: str,
    params: Mapping[str, Any],
    tags: Mapping[str, str],
    *,
    key: str,
    state_file: Path,
) -> str:
    """Id of the parent run for pipeline-run `key`, created (with params and tags) if needed.

    `state_file` maps keys to parent ids; it is locked while read and updated, so stages that
    start at the same time share one parent. A stored id whose run is missing or deleted is
    replaced by a new run (the old one is left alone).
    """
    client = _client(tracking_uri(root))
    state_file = Path(state_file)
    state_file.parent.mkdir(parents=True, exist_ok=True)
    with state_file.open("a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes
        f.seek(0)
        text = f.read()
        parents: dict[str, str] = json.loads(text) if text.strip() else {}
        if key in parents and _is_active(client, parents[key]):
            return parents[key]
        experiment_id = _experiment_id(client, root, experiment)
        # Another machine's stages (a flow's workers) may have made it: their state file is theirs.
        found = _retry(client.search_runs, [experiment_id], f"tags.`{PIPELINE_KEY_TAG}` = '{key}'",
                       max_results=1, order_by=["attributes.start_time ASC"])
        parents[key] = found[0].info.run_id if found else _new_parent(client, experiment_id, run_name,
                                                                      params, {**tags, PIPELINE_KEY_TAG: key})
        f.seek(0)
        f.truncate()
        json.dump(parents, f, indent=1)
    return parents[key]


def _new_parent(client: MlflowClient, experiment_id: str, name: str, params: Mapping[str, Any],
                tags: Mapping[str, str]) -> str:
    run_id = _retry(client.create_run, experiment_id, run_name=name, tags=tags).info.run_id
    _log(client, run_id, params=params)
    # Children may still be added later; FINISHED just keeps the UI from showing it as live.
    _retry(client.set_terminated, run_id)
    return run_id


def _numbers(stats: Mapping[str, Any], step: int) -> list[tuple[str, float, int]]:
    """(key, value, step) of the numeric entries (a "step" key and non-numbers skipped)."""
    return [(k, v, step) for k, v in stats.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)]


class StageRun:
    """A nested MLflow run open while its stage works: metrics land with their step and the time
    they were measured, so a run lasts as long as its work and a curve is live in the UI."""

    def __init__(self, client: MlflowClient, run_id: str):
        self.client, self.run_id = client, run_id

    def log(self, step: int, stats: Mapping[str, Any]) -> None:
        """A training callback: the numeric `stats` at `step`."""
        _log(self.client, self.run_id, metrics=_numbers(stats, step))

    def log_metrics(self, metrics: Mapping[str, Any]) -> None:
        """Final values, at step 0."""
        self.log(0, metrics)

    def log_params(self, params: Mapping[str, Any]) -> None:
        _log(self.client, self.run_id, params=params)

    def log_artifacts(self, paths: Iterable[Path]) -> None:
        """Files or folders."""
        for path in map(Path, paths):
            log = self.client.log_artifacts if path.is_dir() else self.client.log_artifact
            _retry(log, self.run_id, str(path))

    def register_model(self, folder: Path, name: str, *, tags: Mapping[str, Any],
                       description: str) -> ModelVersion:
        """Log the MLflow model saved in `folder` as this run's artifact `model` and register it as a
        new version of `name` (created when missing), with `tags` and `description`."""
        _retry(self.client.log_artifacts, self.run_id, str(folder), "model")
        try:
            _retry(self.client.create_registered_model, name)
        except MlflowException as err:
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        source = f"{_retry(self.client.get_run, self.run_id).info.artifact_uri}/model"
        return _retry(self.client.create_model_version, name, source, run_id=self.run_id,
                      tags={k: str(v) for k, v in tags.items()}, description=description)


@contextlib.contextmanager
def _system_metrics(uri: str, run_id: str) -> Iterator[None]:
    """MLflow's system metrics (CPU, memory, disk, network; GPU where pynvml finds one) go into the
    run while the block runs, every MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL seconds (default 10)."""
    try:
        import psutil  # noqa: F401  MLflow's CPU monitor imports it at module level
    except ImportError:
        print("MLflow system metrics are off: psutil is not installed (pip install psutil)",
              file=sys.stderr)
        yield
        return
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run_id, tracking_uri=uri)
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()  # flushes the last samples, before the run is closed


@contextlib.contextmanager
def stage_run(root: Path, parent_id: str, name: str, *, params: Mapping[str, Any] | None = None,
              tags: Mapping[str, str] | None = None,
              system_metrics: bool = False) -> Iterator[StageRun]:
    """A nested run under `parent_id`, started now and ended when the block ends: FINISHED, or
    FAILED when the block raises (the error propagates). With `system_metrics` the machine's load
    is logged while the block runs."""
    uri = tracking_uri(root)
    client = _client(uri)
    experiment_id = _retry(client.get_run, parent_id).info.experiment_id
    run = _retry(client.create_run, experiment_id, run_name=name, tags={**(tags or {}), MLFLOW_PARENT_RUN_ID: parent_id})
    stage = StageRun(client, run.info.run_id)
    status = "FAILED"
    try:
        stage.log_params(params or {})
        with _system_metrics(uri, stage.run_id) if system_metrics else contextlib.nullcontext():
            yield stage
        status = "FINISHED"
    finally:
        _retry(client.set_terminated, stage.run_id, status)


def tag_model_versions(root: Path, name: str, match: tuple[str, str], tags: Mapping[str, Any]) -> int:
    """Set `tags` on every version of registered model `name` whose tag match[0] is match[1]; how
    many there were."""
    client = _client(tracking_uri(root))
    found = _retry(client.search_model_versions, f"name = '{name}' and tags.`{match[0]}` = '{match[1]}'")
    for version in found:
        for key, value in tags.items():
            _retry(client.set_model_version_tag, name, version.version, key, str(value))
    return len(found)


def child_run(
    root: Path,
    parent_id: str,
    name: str,
    *,
    params: Mapping[str, Any] | None = None,
    metrics: Mapping[str, float] | None = None,
    history: Iterable[Mapping[str, Any]] = (),
    artifacts: Iterable[Path] = (),
    tags: Mapping[str, str] | None = None,
) -> str:
    """Log one finished nested run at once; its id.

    `metrics` are final values; `history` is a training curve, one dict per logged step (its
    "step" key, else its index; non-numeric entries skipped); `artifacts` are files or folders.
    """
    with stage_run(root, parent_id, name, params=params, tags=tags) as run:
        points = [x for i, h in enumerate(history) for x in _numbers(h, int(h.get("step", i)))]
        _log(run.client, run.run_id, metrics=points + _numbers(metrics or {}, 0))  # one batch, not one call a step
        run.log_artifacts(artifacts)
    return run.run_id
