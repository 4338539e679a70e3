"""The one sampler loop (SPEC sections 3 and 6) and its pluggable feature sources.

At every step the loop needs the feature f of both CFG branches. On a *full* step (chosen by the
refresh plan) the base model computes it; on the other steps a `FeatureSource` predicts it from the
previous feature and the tokens just committed. Everything after the feature — head, CFG, the
categorical draw, the annealed Gumbel confidence and the mask schedule — is the same code for every
sampler, so with B = N any source gives exactly the vanilla sampler.

Randomness comes from one generator per sample, seeded by (seed, sample index) and consumed in the
same order whatever the batch: a sample's result does not depend on how the work was batched.
"""

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch

from .bases.contract import MaskedBase
from .schedules import REVEAL, cfg_weight, noise_scale, refresh_steps


@dataclass(frozen=True)
class SamplingRule:
    """MaskGIT's rule by default; Lumina-DiMOO's (SPEC 9) is schedule="cosine", ramp=False, tau=1."""

    steps: int
    cfg: float = 1.0
    tau: float = 4.5
    temperature: float = 1.0
    schedule: str = "arccos"  # a key of schedules.REVEAL
    ramp: bool = True  # CFG weight ramps up from 0 and confidence noise anneals to 0; False: both constant

    def __post_init__(self):
        if self.schedule not in REVEAL:
            raise ValueError(f"unknown schedule {self.schedule!r}; known: {', '.join(REVEAL)}")


@dataclass
class StepState:
    """What a feature source may look at when asked for the feature of `step`."""

    step: int
    steps: int
    prev_feature: torch.Tensor  # f of the previous step, both branches [2B, S, D]
    tokens: torch.Tensor  # current tokens, both branches [2B, L] (mask_id where masked)
    new_mask: torch.Tensor  # positions committed at the previous step [2B, L]
    mask_ratio: torch.Tensor  # fraction of image tokens still masked in the current state [2B]
    cond: torch.Tensor | None = None  # conditions of both branches [2B, ...] (cond, then uncond)


class FeatureSource:
    """Predicts the feature at shortcut steps. Subclasses override `predict`; `observe` sees full steps."""

    name = "base"

    def observe(self, step: int, feature: torch.Tensor) -> None:
        pass

    def predict(self, state: StepState) -> torch.Tensor:
        raise NotImplementedError(f"{self.name} cannot predict features; use budget = steps")


class Reuse(FeatureSource):
    """Training-free baseline: keep the last feature unchanged (the shortcut with zero update)."""

    name = "reuse"

    def predict(self, state: StepState) -> torch.Tensor:
        return state.prev_feature


class Extrapolate(FeatureSource):
    """Training-free baseline (TaylorSeer-style, first order): continue the finite difference of the
    last two full-step features, scaled by the step gap; reuse until two full steps exist."""

    name = "extrapolate"

    def __init__(self):
        self.history: list[tuple[int, torch.Tensor]] = []

    def observe(self, step: int, feature: torch.Tensor) -> None:
        self.history = (self.history + [(step, feature)])[-2:]

    def predict(self, state: StepState) -> torch.Tensor:
        if len(self.history) < 2:
            return self.history[-1][1]
        (s0, f0), (s1, f1) = self.history
        return f1 + (f1 - f0) * ((state.step - s1) / (s1 - s0))


class Learned(FeatureSource):
    """The MIGM-Shortcut: a small model predicts f_t from f_{t-1}, the new tokens and the mask ratio."""

    name = "shortcut"

    def __init__(self, shortcut: torch.nn.Module, base: MaskedBase):
        self.shortcut, self.base = shortcut, base

    def predict(self, state: StepState) -> torch.Tensor:
        new_embed = self.base.embed_tokens(state.tokens)
        context = None if state.cond is None else self.base.shortcut_context(state.cond)
        f = self.shortcut(state.prev_feature, new_embed, state.new_mask, state.mask_ratio, context=context)
        return f.to(state.prev_feature.dtype)


@dataclass
class SampleOutput:
    tokens: torch.Tensor  # [B, L]
    order: torch.Tensor  # [B, L] step at which each position was committed
    features: torch.Tensor | None  # [B, 2, N, S, D] when recorded (cond, uncond)


def _gumbel(u: torch.Tensor) -> torch.Tensor:
    return -torch.log(-torch.log(u.clamp(1e-20, 1 - 1e-7)))


@torch.no_grad()
def generate(base: MaskedBase, rule: SamplingRule, cond: torch.Tensor, sample_ids: list[int], seed: int, *,
             budget: int | None = None, source: FeatureSource | None = None, record: bool = False,
             autocast_dtype: torch.dtype | None = None) -> SampleOutput:
    """Sample images as token grids. `budget` = B full steps of the N = `rule.steps` (None: all)."""
    N, L, K = rule.steps, base.num_tokens, base.codebook_size
    B, dev = len(cond), cond.device
    full = set(refresh_steps(N, budget or N))
    source = source or FeatureSource()
    reveal = REVEAL[rule.schedule](N, L)
    gens = [torch.Generator().manual_seed(seed * 1_000_003 + int(i)) for i in sample_ids]

    tokens = torch.full((B, L), base.mask_id, dtype=torch.long, device=dev)
    order = torch.full((B, L), -1, dtype=torch.long, device=dev)
    both = torch.cat([cond, base.uncond(cond)])
    new_mask = torch.zeros(2 * B, L, dtype=torch.bool, device=dev)
    recorded, f = [], None
    amp = torch.autocast(dev.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()

    for i in range(N):
        masked = tokens == base.mask_id
        tokens2 = torch.cat([tokens, tokens])
        with amp:
            if i in full:
                f = base.features(tokens2, both)
                source.observe(i, f)
            else:
                ratio = masked.float().mean(1).repeat(2)
                f = source.predict(StepState(i, N, f, tokens2, new_mask, ratio, both))
            logits = base.head(f).float()
        if record:
            recorded.append(f.to("cpu", torch.float32))

        c, u = logits.chunk(2)
        w = cfg_weight(rule.cfg, i, N) if rule.ramp else rule.cfg
        tau = noise_scale(rule.tau, i, N) if rule.ramp else rule.tau
        logp = torch.log_softmax(((1 + w) * c - w * u) / rule.temperature, dim=-1)
        noise = torch.stack([torch.rand(L, K + 1, generator=g) for g in gens]).to(dev)
        drawn = (logp + _gumbel(noise[..., :K])).argmax(-1)  # Gumbel-max = one categorical draw
        conf = logp.gather(-1, drawn[..., None])[..., 0] + tau * _gumbel(noise[..., K])
        conf = conf.masked_fill(~masked, -torch.inf)
        chosen = torch.zeros_like(masked).scatter_(1, conf.topk(reveal[i], dim=1).indices, True)
        tokens = torch.where(chosen, drawn, tokens)
        order[chosen] = i
        new_mask = torch.cat([chosen, chosen])

    features = None
    if record:
        features = torch.stack(recorded, 1).unflatten(0, (2, B)).transpose(0, 1)
    return SampleOutput(tokens, order, features)


@contextmanager
def fixed_threads(n: int) -> Iterator[None]:
    """Run the block with `n` intra-op CPU threads, restoring the previous count afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def generate_on_cores(cores: int, base: MaskedBase, rule: SamplingRule, cond: torch.Tensor, sample_ids: list[int],
                      seed: int, *, source: Callable[[], FeatureSource] = FeatureSource, **options) -> SampleOutput:
    """`generate` with the batch cut into `cores` slices that run side by side, one CPU thread each.

    A small base's ops are too short to share well between cores, and a whole batch's activations
    spill out of cache: on a 2-core CPU two one-thread halves sample about 1.4x faster than the whole
    batch on two threads (BENCHMARKS.md). Every sample has its own generator, so the result is the
    same as one `generate` call; `source` makes a fresh feature source for each slice. On a GPU, or
    with one core, it is one `generate` call.
    """
    if cores == 1 or cond.device.type != "cpu":
        return generate(base, rule, cond, sample_ids, seed, source=source(), **options)
    slices = [s for s in torch.arange(len(cond)).tensor_split(cores) if len(s)]

    def run(rows: torch.Tensor) -> SampleOutput:
        return generate(base, rule, cond[rows], [sample_ids[i] for i in rows], seed, source=source(), **options)

    with fixed_threads(1), ThreadPoolExecutor(len(slices)) as pool:
        parts = list(pool.map(run, slices))
    features = None if parts[0].features is None else torch.cat([o.features for o in parts])
    return SampleOutput(torch.cat([o.tokens for o in parts]), torch.cat([o.order for o in parts]), features)
