"""Checkpoints: weights in safetensors, the config that rebuilds the model in JSON beside them.

`model.safetensors` + `model.json`: the JSON is enough to rebuild the module without importing
anything pickled, and a reader can see at a glance what a checkpoint holds.
"""

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


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
