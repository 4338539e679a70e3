"""Checkpoints: weights in safetensors, the config that rebuilds the model in JSON beside them.

`model.safetensors` + `model.json`: the JSON is enough to rebuild the module without importing
anything pickled, and a reader can see at a glance what a checkpoint holds. Every model of the
project (tokenizer, classifier, base, shortcut) is saved with `save_model` and read with `load_model`.
"""

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch
from safetensors.torch import load_file, save_file


def weights_hash(state: dict[str, torch.Tensor]) -> str:
    """A short hash of the tensors of `state` and their names: a model's identity in its config."""
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def config_path(path: str | Path) -> Path:
    return Path(path).with_suffix(".json")


def save_checkpoint(path: str | Path, state: dict[str, torch.Tensor], config: dict) -> Path:
    """Write both files atomically (temporary names, then rename): a killed run leaves no half file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_weights, tmp_config = path.with_suffix(".safetensors.tmp"), path.with_suffix(".json.tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, tmp_weights)
    tmp_config.write_text(json.dumps(config, indent=1, sort_keys=True))
    tmp_weights.replace(path)
    tmp_config.replace(config_path(path))
    return path


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    path = Path(path)
    for p in (path, config_path(path)):
        if not p.is_file():
            raise FileNotFoundError(f"checkpoint file {p} is missing (run the stage that writes it)")
    try:
        state = load_file(path)
        config = json.loads(config_path(path).read_text())
    except Exception as err:  # safetensors and json raise several types for a damaged file
        raise ValueError(f"checkpoint {path} is unreadable or corrupt: {err}") from err
    return state, config


def load_state_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """load_state_dict that names every missing, unexpected or misshapen tensor."""
    own = module.state_dict()
    problems = [f"missing {k}" for k in own if k not in state]
    problems += [f"unexpected {k}" for k in state if k not in own]
    problems += [
        f"{k}: shape {tuple(state[k].shape)} != expected {tuple(v.shape)}"
        for k, v in own.items() if k in state and state[k].shape != v.shape
    ]  # fmt: skip
    if problems:
        raise ValueError(f"{source}: checkpoint does not fit the model: " + "; ".join(problems))
    module.load_state_dict(state)


Model = TypeVar("Model", bound=torch.nn.Module)


def save_model(path: str | Path, model: torch.nn.Module, config: dict) -> Path:
    """`model`'s weights and the `config` that rebuilds it (what `load_model`'s `build` reads)."""
    return save_checkpoint(path, model.state_dict(), config)


def load_model(path: str | Path, build: Callable[[dict], Model]) -> tuple[Model, dict]:
    """(the module `build` makes from the checkpoint's config, its weights loaded strictly, in eval
    mode and frozen; the config)."""
    state, config = load_checkpoint(path)
    model = build(config)
    load_state_strict(model, state, str(path))
    return model.eval().requires_grad_(False), config
