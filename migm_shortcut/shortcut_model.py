"""The trained shortcut as an MLflow model: a pyfunc that samples with the shortcut and its base.

The model holds the shortcut's checkpoint, the sampling rule and this package's code (`code_paths`,
so it loads wherever torch and mlflow are installed). The base is not copied into every model (at
paper scale it is gigabytes, and a DVC output already): it is read from `model_config["base"]`, by
default the path given when the model was saved (the pipeline gives the project's
data/base/model.safetensors), and must be the base the shortcut was trained on (its id is checked).
Input: the conditions, int64 class labels [n] (prompt ids [n, prompt_len] for a text-to-image
base). Params: `steps` (N), `budget` (B full base steps of the N), `seed`, and `decode` (uint8
images [n, C, H, W] instead of token grids [n, L]).
"""

import dataclasses
import hashlib
import tempfile
from pathlib import Path

import mlflow
import mlflow.pyfunc
import numpy as np
import torch
from mlflow.entities.model_registry import ModelVersion
from mlflow.models import ModelSignature
from mlflow.types.schema import ParamSchema, ParamSpec, Schema, TensorSpec

from . import tracking
from .bases import MaskedBase, load_base
from .checkpoint import config_path
from .images import to_uint8
from .sampling import Learned, generate
from .schedules import SamplingRule
from .shortcut import load_shortcut

PACKAGE = Path(__file__).resolve().parent


class ShortcutSampler(mlflow.pyfunc.PythonModel):
    """Conditions -> samples of the shortcut sampler, on the CPU."""

    def load_context(self, context) -> None:
        self.base = load_base(context.model_config["base"])
        try:
            self.shortcut = load_shortcut(context.artifacts["shortcut"], self.base.base_id)
        except ValueError as err:
            raise ValueError(f"{err}; load the model with model_config={{'base': PATH}} of its base") from err
        self.rule = SamplingRule(**context.model_config["sampling"])

    @torch.no_grad()
    def predict(self, context, model_input: np.ndarray, params: dict) -> np.ndarray:
        """`params`: every key of the signature (MLflow fills in the defaults)."""
        cond = torch.as_tensor(np.asarray(model_input), dtype=torch.long)
        rule = dataclasses.replace(self.rule, steps=params["steps"])
        tokens = generate(self.base, rule, cond, list(range(len(cond))), params["seed"],
                          budget=params["budget"], source=Learned(self.shortcut, self.base)).tokens
        return to_uint8(self.base.decode(tokens)).numpy() if params["decode"] else tokens.numpy()


def signature(base: MaskedBase, rule: SamplingRule, budget: int) -> ModelSignature:
    """What predict takes: conditions shaped for the base, and the sampler's settings as params."""
    shape = (-1, base.prompt_len) if hasattr(base, "prompt_len") else (-1,)  # prompt ids, or classes
    params = [ParamSpec("steps", "long", rule.steps), ParamSpec("budget", "long", budget),
              ParamSpec("seed", "long", 0), ParamSpec("decode", "boolean", False)]
    inputs = Schema([TensorSpec(np.dtype(np.int64), shape)])
    return ModelSignature(inputs=inputs, params=ParamSchema(params))


def save_shortcut_model(folder: Path, shortcut: Path, base: MaskedBase, base_path: Path,
                        rule: SamplingRule, budget: int) -> Path:
    """Save the MLflow model of the shortcut checkpoint `shortcut` (by default sampling with the
    base at `base_path`, at budget `budget`) into `folder`, which must not exist."""
    mlflow.pyfunc.save_model(
        folder, python_model=ShortcutSampler(), code_paths=[str(PACKAGE)],
        artifacts={"shortcut": str(shortcut), "shortcut_config": str(config_path(shortcut))},
        model_config={"base": str(Path(base_path).resolve()), "sampling": dataclasses.asdict(rule)},
        signature=signature(base, rule, budget),
        # Stated, not inferred: inference loads the model in a subprocess, seconds for nothing.
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}",
                          f"mlflow=={mlflow.__version__}", "safetensors", "numpy"],
    )  # fmt: skip
    return folder


def registered_name(experiment: str) -> str:
    """The registered model of the shortcuts trained in MLflow experiment `experiment`."""
    return f"{experiment}-shortcut"


def checkpoint_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def register_shortcut(run: tracking.StageRun, name: str, shortcut: Path, base: MaskedBase, base_path: Path,
                      rule: SamplingRule, budget: int, metrics: dict[str, float]) -> ModelVersion:
    """Log the shortcut as run `run`'s MLflow model and register it as a new version of `name`, its
    `metrics` as tags and in the description, the checkpoint's hash as tag `checkpoint_sha256`."""
    numbers = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
    description = f"MIGM-Shortcut of base {base.base_id}, trained on N={rule.steps}: {numbers}"
    with tempfile.TemporaryDirectory(prefix="shortcut-model-") as tmp:
        folder = save_shortcut_model(Path(tmp) / "model", shortcut, base, base_path, rule, budget)
        tags = {**metrics, "base_id": base.base_id, "checkpoint_sha256": checkpoint_sha256(shortcut)}
        return run.register_model(folder, name, tags=tags, description=description)


def tag_with_headline(root: Path, name: str, shortcut: Path, headline: dict[str, float]) -> int:
    """Tag the registered versions of `name` made from the checkpoint `shortcut` with the headline
    of its latest evaluation (keys `headline.*`); how many versions."""
    tags = {f"headline.{k}": v for k, v in headline.items()}
    return tracking.tag_model_versions(root, name, ("checkpoint_sha256", checkpoint_sha256(shortcut)), tags)
