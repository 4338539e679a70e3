"""The learned placement's file (migm_shortcut/placement.py): what train_shortcut stores is what
the sample stage reads, and a file without the asked placement is refused by name."""

import json

import pytest

from migm_shortcut.config import SamplerSetting
from migm_shortcut.placement import placements, refresh_plan
from migm_shortcut.schedules import refresh_steps


def test_the_sampler_reads_the_stored_placement(tmp_path):
    # learned: the steps `placements` stored for (N, B); uniform: the grid, with no file needed
    path = tmp_path / "placement.json"
    error = [[1.0 if t < 3 else 0.0 for t in range(8)] for _ in range(8)]
    path.write_text(json.dumps({"8": placements({"kl": error, "mse": error}, [3])}))
    learned = SamplerSetting(sampler="shortcut", steps=8, budget=3, placement="learned")
    assert refresh_plan(learned, path) == [0, 1, 2]
    assert refresh_plan(learned.model_copy(update={"placement": "uniform"}), tmp_path / "none") == refresh_steps(8, 3)
    for setting, file in ((learned.model_copy(update={"budget": 4}), path), (learned, tmp_path / "none")):
        with pytest.raises(ValueError, match=f"{file.name} holds no learned placement for N=8, B={setting.budget}"):
            refresh_plan(setting, file)
