"""The learned refresh placement's file: train_shortcut measures the shortcut's rollout error
(`train_shortcut.measure_placements`) and stores, per N and budget B, the refresh steps that
minimise it (`placements`); the sample stage reads them back (`refresh_plan`)."""

import json
from pathlib import Path

from .config import SamplerSetting
from .schedules import learned_refresh_steps, placement_error, refresh_steps

# The error the learned placement minimises: the KL of the guided token distribution, the one the
# sampler draws from (feature MSE also counts directions of the feature that the head ignores).
PLACEMENT_ERROR = "kl"


def placements(errors: dict[str, list[list[float]]], budgets: list[int]) -> dict:
    """`rollout_errors` and, per budget, the uniform and the learned refresh steps with the summed
    `PLACEMENT_ERROR` of each: what the sampler reads for a learned placement."""
    error = errors[PLACEMENT_ERROR]
    out = {"criterion": PLACEMENT_ERROR, **errors, "budgets": {}}
    for budget in budgets:
        chosen = {"uniform": refresh_steps(len(error), budget), "learned": learned_refresh_steps(error, budget)}
        errors_of = {f"{k}_error": placement_error(error, v) for k, v in chosen.items()}
        out["budgets"][str(budget)] = chosen | errors_of
    return out


def refresh_plan(setting: SamplerSetting, placement: Path) -> list[int]:
    """The full steps of a configuration: the uniform grid, or the learned placement stored in the
    file `placement` ({N: `placements`}; ValueError naming it when it holds none for the setting)."""
    if setting.placement == "uniform":
        return refresh_steps(setting.steps, setting.budget)
    try:
        stored = json.loads(Path(placement).read_text())
        return stored[str(setting.steps)]["budgets"][str(setting.budget)]["learned"]
    except (OSError, KeyError, ValueError) as err:
        raise ValueError(f"{placement} holds no learned placement for N={setting.steps}, B={setting.budget} "
                         f"({err!r}): rerun train_shortcut") from None
