"""Pure functions that decide *when* things happen, apart from any model (like diffusers' schedulers).

- `reveal_counts`: how many tokens the MaskGIT arccos schedule commits at each step;
  `cosine_reveal_counts`: the same for Lumina-DiMOO's cosine schedule (`REVEAL` names both).
- `refresh_steps`: which steps of an N-step run call the base model (the refresh budget B);
  `learned_refresh_steps`: the B steps that minimise a measured error instead (`placement_error`).
- `cfg_weight`, `noise_scale`: the per-step ramps of the sampling rule, `SamplingRule` the rule.
"""

import math
from dataclasses import dataclass


def reveal_counts(steps: int, num_tokens: int) -> list[int]:
    """Tokens committed at each step by the arccos schedule (SPEC section 3).

    r = linspace(1, 0, N); v = arccos(r) / (pi/2); step i reveals round(v_i / sum(v) * L), at least
    one, and the last step takes whatever remains so the counts always sum to L.
    """
    if not 1 <= steps <= num_tokens:
        raise ValueError(f"steps must be in [1, {num_tokens}] (one token per step at least), got {steps}")
    if steps == 1:
        return [num_tokens]
    ratios = [1 - i / (steps - 1) for i in range(steps)]
    v = [math.acos(r) / (math.pi / 2) for r in ratios]
    total = sum(v)
    counts, left = [], num_tokens
    for i in range(steps - 1):
        # Keep at least one token for every later step, so no step is ever empty.
        n = min(max(1, round(v[i] / total * num_tokens)), left - (steps - 1 - i))
        counts.append(n)
        left -= n
    counts.append(left)
    return counts


def cosine_reveal_counts(steps: int, num_tokens: int) -> list[int]:
    """Tokens committed at each step by Lumina-DiMOO's cosine schedule (SPEC section 9).

    After step s, floor(L cos(pi/2 (s+1)/N)) positions stay masked, at least one until the last
    step, none after it. A step may commit nothing when L is small against N (the floor repeats).
    """
    if not 1 <= steps <= num_tokens:
        raise ValueError(f"steps must be in [1, {num_tokens}] (one token per step at least), got {steps}")
    masked = [max(1, math.floor(num_tokens * math.cos(math.pi / 2 * (s + 1) / steps))) for s in range(steps - 1)]
    masked.append(0)
    return [before - after for before, after in zip([num_tokens] + masked, masked)]


REVEAL = {"arccos": reveal_counts, "cosine": cosine_reveal_counts}


def refresh_steps(steps: int, budget: int) -> list[int]:
    """The B full (base-model) steps of an N-step run (SPEC section 6).

    Step 0 is always full; s_k = max(s_{k-1} + 1, round(N k / B)) for k = 1..B-1. Python's round() is
    round-half-to-even, as the spec requires. B = N gives every step, i.e. vanilla sampling.
    """
    if not 1 <= budget <= steps:
        raise ValueError(f"budget must be in [1, steps={steps}], got {budget}")
    full = [0]
    for k in range(1, budget):
        full.append(max(full[-1] + 1, round(steps * k / budget)))
    return full


def placement_error(error, full: list[int]) -> float:
    """The summed error of refreshing at steps `full`: error[s][t] is the error at step t when the
    last refresh was at step s (t > s); refresh steps themselves cost nothing."""
    last, total = 0, 0.0
    for t in range(len(error)):
        if t in full:
            last = t
        else:
            total += error[last][t]
    return total


def learned_refresh_steps(error, budget: int) -> list[int]:
    """The B refresh steps of an N-step run (N = len(error), step 0 always one) that minimise
    `placement_error`, by dynamic programming over the position of each refresh (exact).

    Equal sums go to the placement closest to `refresh_steps` (summed distance of the k-th refresh
    from the uniform grid's k-th): with a constant error per step every placement costs the same,
    and the uniform one is returned."""
    steps = len(error)
    uniform = refresh_steps(steps, budget)
    # segment[s][e]: the error of shortcut steps s+1..e-1 after a refresh at s, the next one at e.
    segment = []
    for s in range(steps):
        sums = [0.0] * (steps + 1)
        for e in range(s + 2, steps + 1):
            sums[e] = sums[e - 1] + error[s][e - 1]
        segment.append(sums)
    # best[j]: (error, distance from uniform, steps) of the best placement of refreshes 0..k, the k-th at j.
    best = {0: (0.0, 0, [0])}
    for k in range(1, budget):
        best = {j: min((e + segment[i][j], d + abs(j - uniform[k]), full + [j])
                       for i, (e, d, full) in best.items() if i < j)
                for j in range(k, steps - budget + k + 1)}
    return min((e + segment[j][steps], d, full) for j, (e, d, full) in best.items())[2]


def cfg_weight(scale: float, step: int, steps: int) -> float:
    """Guidance weight ramps linearly from 0 at the first step to `scale` at the last."""
    return scale * step / (steps - 1) if steps > 1 else scale


def noise_scale(tau: float, step: int, steps: int) -> float:
    """Gumbel confidence noise anneals linearly from tau at the first step to 0 at the last."""
    return tau * (1 - step / (steps - 1)) if steps > 1 else 0.0


@dataclass(frozen=True)
class SamplingRule:
    """MaskGIT's rule by default; Lumina-DiMOO's (SPEC 9) is schedule="cosine", ramp=False, tau=1."""

    steps: int
    cfg: float = 1.0
    tau: float = 4.5
    temperature: float = 1.0
    schedule: str = "arccos"  # a key of schedules.REVEAL
    ramp: bool = True  # CFG weight ramps up from 0 and confidence noise anneals to 0; False: both constant

    @classmethod
    def of(cls, sampling, steps: int | None = None) -> "SamplingRule":
        """The rule of params.yaml's `sampling` section at `steps` (default: sampling.steps): the
        one extraction records and every sampler follows."""
        return cls(**{**sampling.model_dump(), "steps": steps or sampling.steps})

    def __post_init__(self):
        if self.schedule not in REVEAL:
            raise ValueError(f"unknown schedule {self.schedule!r}; known: {', '.join(REVEAL)}")
