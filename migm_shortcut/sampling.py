"""The one sampler loop (SPEC sections 3 and 6) and its pluggable feature sources.

At every step the loop needs the feature f of both CFG branches. On a *full* step (chosen by the
refresh plan) the base model computes it; on the other steps a `FeatureSource` predicts it from the
previous feature and the tokens just committed. Everything after the feature — head, CFG, the
categorical draw, the annealed Gumbel confidence and the mask schedule — is the same code for every
sampler, so with B = N any source gives exactly the vanilla sampler.

Randomness is hashed from (seed, sample index, step, position) where the sampling runs
(`noise.py`): a sample's result does not depend on how the work was batched.
"""

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch

from .bases.contract import MaskedBase
from .noise import sample_keys, uniforms
from .samplers import EXTRAPOLATE, REUSE, SHORTCUT, VANILLA
from .schedules import REVEAL, SamplingRule, cfg_weight, noise_scale, refresh_steps


# Names the sampler's arithmetic (noise, draws): recorded with trajectories and sample sets, so that
# outputs of an earlier sampler are redone instead of resumed or kept.
SAMPLER_VERSION = ("counter-hash noise, inverse-CDF draws, masked positions only, CFG on features, "
                   "the shortcut predicts masked positions only")


@dataclass
class StepState:
    """What a feature source may look at when asked for the feature of `step`."""

    step: int
    steps: int
    prev_feature: torch.Tensor  # f of the previous step, both branches [2B, S, D]
    tokens: torch.Tensor  # current tokens, one branch [B, L] (mask_id where masked)
    new_ids: torch.Tensor  # tokens committed at the previous step, both branches [2B, R]
    new_positions: torch.Tensor  # their image token indices [2B, R]
    mask_ratio: torch.Tensor  # fraction of image tokens still masked in the current state [2B]
    masked: torch.Tensor  # image token indices still masked in the current state [2B, M]
    cond: torch.Tensor | None = None  # conditions of both branches [2B, ...] (cond, then uncond)


class FeatureSource:
    """Predicts the feature at shortcut steps. Subclasses override `predict`; `observe` sees full steps."""

    name = VANILLA

    def observe(self, step: int, feature: torch.Tensor) -> None:
        pass

    def predict(self, state: StepState) -> torch.Tensor:
        raise NotImplementedError(f"{self.name} cannot predict features; use budget = steps")


class Reuse(FeatureSource):
    """Training-free baseline: keep the last feature unchanged (the shortcut with zero update)."""

    name = REUSE

    def predict(self, state: StepState) -> torch.Tensor:
        return state.prev_feature


class Extrapolate(FeatureSource):
    """Training-free baseline (TaylorSeer-style, first order): continue the finite difference of the
    last two full-step features, scaled by the step gap; reuse until two full steps exist."""

    name = EXTRAPOLATE

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
    """The MIGM-Shortcut: a small model predicts f_t from f_{t-1}, the new tokens and the mask ratio.

    It sees only the tokens committed at the previous step, gathered (no mask over all L), predicts
    only the positions the next head reads (`predicted_positions`), and the base's context for the
    run's conditions is made once, not at every step."""

    name = SHORTCUT

    def __init__(self, shortcut: torch.nn.Module, base: MaskedBase):
        self.shortcut, self.base = shortcut, base
        self._context: tuple[torch.Tensor, object] | None = None  # (conditions, their context)

    def _context_for(self, cond: torch.Tensor | None):
        if cond is None:
            return None
        if self._context is None or self._context[0] is not cond:
            self._context = (cond, self.base.shortcut_context(cond))
        return self._context[1]

    def predict(self, state: StepState) -> torch.Tensor:
        new_embed = self.base.embed_tokens(state.new_ids, state.new_positions)
        context = self._context_for(state.cond)
        f = self.shortcut(state.prev_feature, new_embed, None, state.mask_ratio, context=context,
                          new_positions=state.new_positions,
                          at=predicted_positions(self.base, state.masked, context))
        return f.to(state.prev_feature.dtype)


def predicted_positions(base: MaskedBase, masked: torch.Tensor, context) -> torch.Tensor | None:
    """The feature positions [B, M] a shortcut step predicts: those of the image tokens still
    masked (`masked` [B, M]), the only ones the next head reads and MaskGIT's loss trains (SPEC
    section 5); None, every position, for a base that gives the shortcut a context (DiMOO, whose
    loss covers them all)."""
    return None if context is not None else base.image_positions[masked]


def feature_source(sampler: str, base: MaskedBase, shortcut: torch.nn.Module | None = None) -> FeatureSource:
    """A fresh feature source of `sampler` (one of `samplers.SAMPLERS`; the shortcut's needs
    `shortcut`): fresh for every run, since some keep state across its steps (extrapolation)."""
    if sampler == SHORTCUT:
        return Learned(shortcut, base)
    return {VANILLA: FeatureSource, REUSE: Reuse, EXTRAPOLATE: Extrapolate}[sampler]()


@dataclass
class SampleOutput:
    tokens: torch.Tensor  # [B, L]
    order: torch.Tensor  # [B, L] step at which each position was committed
    features: torch.Tensor | None  # [B, 2, N, S, D] when recorded (cond, uncond)


def _gumbel(u: torch.Tensor) -> torch.Tensor:
    return -torch.log(-torch.log(u))


def draw(guided: torch.Tensor, u_draw: torch.Tensor, u_conf: torch.Tensor, tau: float
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """One categorical draw per row of logits [B, M, K] by inverting its CDF at `u_draw` [B, M],
    and its confidence log p(drawn) + tau * Gumbel(u_conf): (tokens [B, M], confidence [B, M]).

    One uniform per position instead of K (Gumbel-max): the same distribution at 1/K the noise."""
    probs = torch.softmax(guided, dim=-1)
    cdf = probs.cumsum(-1)
    drawn = torch.searchsorted(cdf, (u_draw * cdf[..., -1])[..., None]).clamp_(max=guided.shape[-1] - 1)
    logp = torch.log(probs.gather(-1, drawn))[..., 0]
    return drawn[..., 0], logp + tau * _gumbel(u_conf)


def guided(x: torch.Tensor, rule: SamplingRule, step: int | torch.Tensor) -> torch.Tensor:
    """CFG (SPEC section 3) over rows (cond..., uncond...) of x [2B, ...]: (1 + w) cond - w uncond
    in float32 [B, ...], w the rule's weight at `step`: an int, or one step per pair [B] (training).

    Logits or features alike: a base's head is affine (the contract), and the two weights sum to 1,
    so the head of the guided features is the guided logits, at half the head's work."""
    c, u = x.float().chunk(2)
    w = cfg_weight(rule.cfg, step, rule.steps) if rule.ramp else rule.cfg
    if isinstance(w, torch.Tensor):
        w = w.to(c.dtype).reshape(-1, *[1] * (c.dim() - 1))
    return (1 + w) * c - w * u


def guided_logits(logits: torch.Tensor, rule: SamplingRule, step: int | torch.Tensor
                  ) -> torch.Tensor:
    """The logits the sampler draws from at `step` (SPEC section 3: CFG, then the temperature).

    logits [2B, M, K]: the head's output for rows (cond..., uncond...); step: as in `guided`.
    Returns [B, M, K] in float32."""
    return guided(logits, rule, step) / rule.temperature


@dataclass
class Commit:
    """The outcome of one step: what was committed, and what stays masked."""

    positions: torch.Tensor  # image token indices committed at this step [B, R]
    ids: torch.Tensor  # their tokens [B, R]
    masked: torch.Tensor  # image token indices still masked after it [B, M - R]


def commit_step(base: MaskedBase, rule: SamplingRule, f: torch.Tensor, masked: torch.Tensor,
                keys: torch.Tensor, step: int, count: int, amp=nullcontext()) -> Commit:
    """The sampler's own work at one step, after the feature: CFG on the features f [2B, S, D] of
    both branches (`guided`: equal to CFG on the logits), the head at the still-masked positions
    `masked` [B, M], temperature, the draws and the confidence noise (hashed from `keys`, see
    `noise.py`), and the choice of the `count` most confident positions. The same for every
    feature source."""
    with amp:
        logits = base.head(guided(f, rule, step), masked)
    tau = noise_scale(rule.tau, step, rule.steps) if rule.ramp else rule.tau
    drawn, conf = draw(logits.float() / rule.temperature, uniforms(keys, step, masked, 0),
                       uniforms(keys, step, masked, 1), tau)
    ranked = conf.argsort(dim=1, descending=True)  # the first `count` are committed
    chosen = ranked[:, :count]
    return Commit(masked.gather(1, chosen), drawn.gather(1, chosen), masked.gather(1, ranked[:, count:]))


@torch.inference_mode()  # not just no_grad: no view or version tracking on the many small ops
def generate(base: MaskedBase, rule: SamplingRule, cond: torch.Tensor, sample_ids: list[int], seed: int, *,
             budget: int | None = None, refresh: list[int] | None = None, source: FeatureSource | None = None,
             record: bool = False, autocast_dtype: torch.dtype | None = None) -> SampleOutput:
    """Sample images as token grids. `budget` = B full steps of the N = `rule.steps` (None: all),
    on the uniform grid; or `refresh`: the full steps themselves (a learned placement, step 0 first).

    Every step works only on the positions still masked: all samples of a batch have the same
    number of them at every step (the schedule fixes it), so they are a dense [B, M] index, and
    the head, the softmax and the draws run on M of the L positions. The noise is hashed from
    (seed, sample index, step, position) on the sampling device (`noise.uniforms`).
    """
    N, L = rule.steps, base.num_tokens
    B, dev = len(cond), cond.device
    if refresh is not None and (budget is not None or 0 not in refresh):
        raise ValueError(f"refresh={refresh}: give either budget or refresh steps, and step 0 among them")
    full = set(refresh_steps(N, budget or N) if refresh is None else refresh)
    source = source or FeatureSource()
    reveal = REVEAL[rule.schedule](N, L)
    keys = sample_keys(seed, torch.as_tensor(sample_ids, device=dev))

    tokens = torch.full((B, L), base.mask_id, dtype=torch.long, device=dev)
    order = torch.full((B, L), -1, dtype=torch.long, device=dev)
    masked = torch.arange(L, device=dev).expand(B, L)  # image token indices still masked [B, M]
    both = torch.cat([cond, base.uncond(cond)])
    recorded, f, new = [], None, None
    amp = torch.autocast(dev.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()

    for i in range(N):
        with amp:
            if i in full:
                f = base.features(torch.cat([tokens, tokens]), both)
                source.observe(i, f)
            else:
                ratio = torch.full((2 * B,), masked.shape[1] / L, device=dev)
                f = source.predict(StepState(i, N, f, tokens, new.ids.repeat(2, 1),
                                             new.positions.repeat(2, 1), ratio, masked.repeat(2, 1), both))
        if record:
            recorded.append(f.to("cpu", torch.float32))
        new = commit_step(base, rule, f, masked, keys, i, reveal[i], amp)
        tokens = tokens.scatter(1, new.positions, new.ids)  # a new tensor: handed-out states stay
        order.scatter_(1, new.positions, i)
        masked = new.masked

    features = None
    if record:
        features = torch.stack(recorded, 1).unflatten(0, (2, B)).transpose(0, 1)
    return SampleOutput(tokens, order, features)


def sampling_autocast(device: torch.device) -> torch.dtype | None:
    """The autocast dtype of sampling on `device`: bf16 on CUDA, none on a CPU. Extraction records
    trajectories under the same one, so the shortcut learns the features it will be fed."""
    return torch.bfloat16 if device.type == "cuda" else None


@contextmanager
def fixed_threads(n: int) -> Iterator[None]:
    """Run the block with `n` intra-op CPU threads, restoring the previous count afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def generate_on_cores(threads: int, base: MaskedBase, rule: SamplingRule, cond: torch.Tensor,
                      sample_ids: list[int], seed: int, *, slice_batch: bool = True,
                      source: Callable[[], FeatureSource] = FeatureSource, **options) -> SampleOutput:
    """`generate` on a CPU under exactly `threads` threads, whatever the slicing, so that every
    latency is timed on a known thread count. On a GPU it is one `generate` call.

    slice_batch: the batch is cut into `threads` slices that run side by side, one thread each. A
    small base's ops are too short to share well between cores, and a whole batch's activations
    spill out of cache: on a 2-core CPU two one-thread halves sample about 1.1x faster than the
    whole batch on two threads (BENCHMARKS.md, section 1). A sample's noise depends on its index alone, so the
    result is the same as one `generate` call; `source` makes a fresh feature source per slice.
    Off (e.g. for a compiled forward, which is not called from several threads at once): the whole
    batch on `threads` intra-op threads.
    """
    if cond.device.type != "cpu":
        return generate(base, rule, cond, sample_ids, seed, source=source(), **options)
    slices = [s for s in torch.arange(len(cond)).tensor_split(threads if slice_batch else 1) if len(s)]
    if len(slices) == 1:
        with fixed_threads(threads):
            return generate(base, rule, cond, sample_ids, seed, source=source(), **options)

    def run(rows: torch.Tensor) -> SampleOutput:
        ids = [sample_ids[i] for i in rows]
        return generate(base, rule, cond[rows], ids, seed, source=source(), **options)

    with fixed_threads(1), ThreadPoolExecutor(len(slices)) as pool:
        parts = list(pool.map(run, slices))
    features = None if parts[0].features is None else torch.cat([o.features for o in parts])
    return SampleOutput(torch.cat([o.tokens for o in parts]), torch.cat([o.order for o in parts]), features)
