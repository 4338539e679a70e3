"""The sample stage's folders, one per sampler configuration: what they hold, how they are
written and read, and what makes one up to date.

A folder holds samples.npz (tokens [n, L] and labels [n]: the class, or the index of the eval
prompt), grid.png (decoded samples of the first classes) and info.json. It appears whole (written
under a temporary name, then renamed). Each folder's info.json carries a fingerprint of everything that made it (configuration, sampling
rule, sample params, models): a rerun skips the folders that are already right, so a killed or
sharded run resumes, and the folders of configurations no longer in the grid are removed.
"""

import hashlib
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import torch

from .config import SampleConfig, SamplerSetting
from .images import save_grid
from .samplers import SHORTCUT
from .sampling import SAMPLER_VERSION
from .schedules import SamplingRule


def fingerprint(setting: SamplerSetting, rule: SamplingRule, sample: SampleConfig, base_id: str,
                shortcut_id: str | None, refresh: list[int], prompts: torch.Tensor | None = None) -> str:
    """Hash of what a configuration's samples depend on. shortcut_id: the shortcut's weights (only
    shortcut configurations depend on them); refresh: its full steps (a learned placement's are
    measured, not fixed by the params); prompts: a text-to-image base's, which the params alone do
    not fix."""
    grid = {"vanilla_steps", "shortcut", "baselines", "baseline_steps"}  # the other configurations
    inputs = {"setting": setting.model_dump(), "rule": vars(rule), "refresh": refresh,
              "sample": sample.model_dump(exclude=grid), "base": base_id,
              "shortcut": shortcut_id if setting.sampler == SHORTCUT else None,
              # a new sampling or timing method resamples and re-times every set
              "timing": "batch wall time; on a CPU a slice of the batch per thread", "sampler": SAMPLER_VERSION}
    if prompts is not None:
        inputs["prompts"] = hashlib.sha256(prompts.numpy().tobytes()).hexdigest()
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def is_up_to_date(folder: Path, fingerprint: str) -> bool:
    """Whether `folder` holds samples made with this fingerprint (missing or unreadable: no)."""
    try:
        return json.loads((folder / "info.json").read_text()).get("fingerprint") == fingerprint
    except (OSError, json.JSONDecodeError):
        return False


def remove_other_folders(root: Path, names: set[str]) -> None:
    """Delete every folder under `root` but `names` (configurations dropped from the grid, and the
    temporary folders of killed runs)."""
    for folder in root.glob("*"):
        if folder.name not in names:
            shutil.rmtree(folder)


def sample_conditions(num_samples: int, choices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels [n], conditions [n, ...]), the same for every configuration: sample i gets condition
    i mod C of `choices` [C, ...] (the classes, or a text-to-image base's padded eval prompts), and
    its index as label."""
    labels = torch.arange(num_samples) % len(choices)
    return labels, choices[labels]


def sample_info(setting: SamplerSetting, refresh: list[int], num_samples: int, fingerprint: str,
                **measured) -> dict:
    """A folder's info.json: the configuration, its full steps `refresh`, its calls of the base and
    of the feature source, the fingerprint, and what was `measured` (latency, hardware)."""
    return {**setting.model_dump(), "name": setting.name, "refresh_steps": refresh, "num_samples": num_samples,
            "base_calls": setting.budget, "feature_source_calls": setting.steps - setting.budget,
            **measured, "fingerprint": fingerprint}


def write_sample_folder(folder: Path, tokens: torch.Tensor, labels: torch.Tensor, grid: torch.Tensor,
                        grid_labels: torch.Tensor, info: dict) -> None:
    """Write a folder whole, replacing the old one; grid: uint8 images of the samples it shows."""
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    np.savez(tmp / "samples.npz", tokens=tokens.numpy().astype(np.int32), labels=labels.numpy())
    save_grid(grid, grid_labels, tmp / "grid.png")
    (tmp / "info.json").write_text(json.dumps(info, indent=1) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def read_sample_set(folder: Path, num_samples: int, num_tokens: int) -> tuple[dict, dict[str, torch.Tensor]]:
    """(info, {"labels", "tokens"}) of a folder; ValueError naming it when it is missing, damaged or
    holds another number of samples or tokens than asked."""
    try:
        info = json.loads((folder / "info.json").read_text())
        with np.load(folder / "samples.npz") as z:
            arrays = {k: torch.from_numpy(z[k]) for k in ("labels", "tokens")}
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as err:
        raise ValueError(f"sample set {folder} is missing or corrupt ({err})") from err
    shape = tuple(arrays["tokens"].shape)
    if shape != (num_samples, num_tokens) or len(arrays["labels"]) != num_samples:
        raise ValueError(f"sample set {folder} holds tokens {shape}, expected {(num_samples, num_tokens)}")
    return info, arrays
