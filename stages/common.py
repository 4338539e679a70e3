"""What every stage shares: telemetry off, freed memory kept, the project root, params, device,
JSON outputs, MLflow."""

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from migm_shortcut import telemetry

telemetry.switch_off()  # before torch, mlflow and transformers are imported

import torch  # noqa: E402

from migm_shortcut import tracking  # noqa: E402
from migm_shortcut.hardware import keep_freed_memory  # noqa: E402
from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT, MLFLOW_SOURCE_NAME, MLFLOW_SOURCE_TYPE  # noqa: E402

from migm_shortcut.config import ConfigError, Params, load_params  # noqa: E402
from migm_shortcut.data import DatasetNotFoundError, read_prompts  # noqa: E402

keep_freed_memory()  # every stage process: no page faults for reused activation memory

DATA = Path("data")
PARAMS_FILE = Path("params.yaml")
# What the stages hand each other (dvc.yaml's outs of one, deps of the next), named once here.
SPLITS, PROMPTS = DATA / "dataset" / "splits.npz", DATA / "dataset" / "prompts.json"
TOKENIZER = DATA / "tokenizer" / "model.safetensors"
CODES, PROMPT_IDS = DATA / "tokenizer" / "codes.npz", DATA / "tokenizer" / "prompts.json"
CLASSIFIER = DATA / "classifier" / "model.safetensors"
INCEPTION_REFERENCE = DATA / "reference" / "inception.npz"
BASE = DATA / "base" / "model.safetensors"
SHORTCUT = DATA / "shortcut" / "model.safetensors"
SHORTCUT_METRICS = DATA / "shortcut" / "metrics.json"
PLACEMENT = DATA / "shortcut" / "placement.json"  # the learned refresh steps (migm_shortcut.placement)
SAMPLES = DATA / "samples"


def stage_args(doc: str, argv=None) -> argparse.Namespace:
    """The command line of a stage without options: `--help` prints `doc` before any work starts."""
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)


def project_root() -> Path:
    """The real project folder, also from inside a `dvc exp run` temporary copy (.dvc/tmp/exps/...).

    MLflow's store and the pipeline-run record live there, so experiments land in the same place."""
    if env := os.environ.get("MIGM_ROOT"):
        return Path(env).resolve()
    cwd = Path.cwd().resolve()
    parts = cwd.parts
    for i in range(len(parts) - 2):
        if parts[i : i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return cwd


def params() -> Params:
    """The validated params.yaml, after checking that every outside file it names exists: a stage
    (and so `dvc repro`) stops at once, before any work, naming the file and where to put it."""
    try:
        p = load_params(PARAMS_FILE)
    except ConfigError as err:
        sys.exit(f"error: {err}")
    missing = [f"base.published.files.{key} = {path}: missing; put {what} there"
               for key, (path, what) in p.published_files().items() if not Path(path).exists()]
    if p.data.dataset == "imagenet" and not Path(p.data.root).is_file():
        missing.append(f"data.root = {p.data.root}: missing; put the FID reference batch there (an .npz of uint8 "
                       f"images [n, {p.data.image_size}, {p.data.image_size}, 3] under arr_0, e.g. the ADM evaluation "
                       f"suite's VIRTUAL_imagenet{p.data.image_size}.npz)")
    if p.evaluate.clip_model and not (Path(p.evaluate.clip_model) / "config.json").is_file():
        missing.append(f"evaluate.clip_model = {p.evaluate.clip_model}: no CLIP model there; save one with "
                       "CLIPModel/CLIPProcessor.save_pretrained (the paper's: openai/clip-vit-large-patch14)")
    if p.is_text_to_image:
        missing += _prompt_problems(p)
    if p.sample.compile and not torch.cuda.is_available() and not (os.environ.get("CXX") or shutil.which("g++")
                                                                   or shutil.which("clang++")):
        missing.append("sample.compile = true: torch.compile on a CPU builds C++ kernels, and no C++ compiler is "
                       "here (g++, clang++ or $CXX); install one or set sample.compile: false")
    if missing:
        sys.exit(f"error: {PARAMS_FILE} asks for what is not here or does not fit:\n  " + "\n  ".join(missing))
    return p


def _prompt_problems(p: Params) -> list[str]:
    """Extraction gives every trajectory its own prompt: train.txt must hold one per trajectory."""
    try:
        prompts = read_prompts(p.data.root)
    except DatasetNotFoundError as err:
        return [f"data.root: {err}"]
    wanted = p.extract.num_train + p.extract.num_val
    if len(prompts["train"]) < wanted:
        return [f"data.root: {Path(p.data.root) / 'train.txt'} holds {len(prompts['train'])} prompts; extract.num_train + "
                f"extract.num_val = {wanted} trajectories need one each"]
    return []


def decode_batch(p: Params) -> int:
    """Images decoded per call: 250 at MNIST sizes, 64 at 256 px, 16 at 512 px, where a VQGAN
    decoder's full-resolution activations take about half a GB per image."""
    return max(16, min(250, 2**22 // p.data.image_size**2))


def prompt_conditions(base, prompt_set: str) -> torch.Tensor:
    """The conditions of a text-to-image prompt set ("train" or "eval"): its prompts' token ids
    (stage tokenizer), left-padded by the base [n, P]."""
    return base.pad_prompts(read_json(PROMPT_IDS)[prompt_set])


def device() -> torch.device:
    return torch.device(os.environ.get("MIGM_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu"))


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def write_json(path: Path, obj) -> Path:
    """Atomic: a reader (or a killed run) never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    tmp.replace(path)
    return path


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _dvc_hashes() -> dict[str, str]:
    """Output hashes recorded in dvc.lock: the data and model versions a run used."""
    lock = Path("dvc.lock")
    if not lock.is_file():
        return {}
    import yaml

    out = {}
    # libyaml: the pure-Python parser takes 0.15 s on a smoke dvc.lock, and every logged run reads it
    for stage, entry in (yaml.load(lock.read_text(), Loader=yaml.CSafeLoader) or {}).get("stages", {}).items():
        for o in entry.get("outs", []):
            out[f"dvc.{stage}.{o['path']}"] = o.get("md5", "")
    return out


def parent_run(p: Params) -> str:
    """The MLflow parent run of this pipeline run, shared by all its stages (also across processes).

    A pipeline run is `MIGM_PIPELINE_RUN` when a flow sets it, else (git commit, params) — so the
    stages of one `dvc repro` meet in one parent, and a changed sweep gets a new one."""
    commit = _git("rev-parse", "HEAD")
    key = os.environ.get("MIGM_PIPELINE_RUN") or f"{commit[:12]}-{hashlib.sha256(PARAMS_FILE.read_bytes()).hexdigest()[:12]}"
    root = project_root()
    return tracking.pipeline_run(
        root, p.tracking.experiment, run_name=f"pipeline {key}", params=p.model_dump(mode="json"),
        tags={**source_tags(commit), "git_dirty": str(bool(_git("status", "--porcelain", "-uno"))), **_dvc_hashes()},
        key=key, state_file=root / ".migm" / "pipeline_runs.json",
    )  # fmt: skip


def source_tags(commit: str) -> dict[str, str]:
    """MLflow's standard source tags: the UI links a run to its commit and entry point."""
    return {MLFLOW_GIT_COMMIT: commit, MLFLOW_SOURCE_NAME: " ".join(sys.argv), MLFLOW_SOURCE_TYPE: "LOCAL"}


@contextlib.contextmanager
def stage_run(p: Params, name: str, *, params: dict | None = None):
    """The MLflow child run of a working stage, open while the block runs (FAILED if it raises),
    with the machine's load logged meanwhile: pass its `log` as a training loop's callback and the
    curve is logged as it happens."""
    with tracking.stage_run(project_root(), parent_run(p), name, params=params, system_metrics=True,
                            tags=source_tags(_git("rev-parse", "HEAD"))) as run:
        yield run


CURVES = DATA / "curves"


class Curve:
    """A training loop's `log(step, stats)` callback: each point goes to the stage's MLflow run at
    once and is kept for the DVC plot (data/curves/NAME.json)."""

    def __init__(self, run: tracking.StageRun):
        self.run, self.points = run, []

    def __call__(self, step: int, stats: dict) -> None:
        self.points.append({"step": step, **stats})
        self.run.log(step, stats)


def no_training_curve(name: str) -> None:
    """A stage that trains nothing (a published base brings its own model) still writes the curve
    file dvc.yaml declares as its plot, empty."""
    write_json(CURVES / f"{name}.json", [])


@contextlib.contextmanager
def training_run(p: Params, name: str, *, params: dict):
    """`stage_run` for a training stage, yielding its Curve; when the block ends, the curve's
    training points (those with a loss; the last is the final validation) go to data/curves/NAME.json."""
    with stage_run(p, name, params=params) as run:
        curve = Curve(run)
        yield curve
        write_json(CURVES / f"{name}.json", [point for point in curve.points if "loss" in point])


def log_stage(p: Params, name: str, *, params: dict | None = None, metrics: dict | None = None,
              artifacts: list[Path] = ()) -> str:
    """One MLflow child run, logged at once, for a result under the pipeline's parent run."""
    root = project_root()
    return tracking.child_run(root, parent_run(p), name, params=params, metrics=metrics, artifacts=artifacts,
                              tags=source_tags(_git("rev-parse", "HEAD")))
