"""The sample stage's folders, one per sampler configuration, and what makes one up to date.

Each folder's info.json carries a fingerprint of everything that made it (configuration, sampling
rule, sample params, models): a rerun skips the folders that are already right, so a killed or
sharded run resumes, and the folders of configurations no longer in the grid are removed.
"""

import hashlib
import json
import shutil
from pathlib import Path

import torch

from .config import SampleConfig, SamplerSetting
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
              "sample": sample.model_dump(exclude=grid), "base": base_id, "shortcut": shortcut_id if setting.sampler == "shortcut" else None,
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
