"""The sampler loop and its feature sources (SPEC sections 3 and 6) on a tiny random base."""

import shutil

import pytest
import torch
from tiny_models import make_base, make_shortcut, one_thread  # noqa: F401 (autouse fixture)

from migm_shortcut.checkpoint import save_model
from migm_shortcut.noise import sample_keys, uniforms
from migm_shortcut.sampling import (Extrapolate, FeatureSource, Learned, Reuse, StepState, commit_step, draw,
                                    fixed_threads, generate, generate_on_cores, guided_logits)
from migm_shortcut.schedules import SamplingRule, noise_scale, refresh_steps, reveal_counts
from migm_shortcut.shortcut import load_shortcut

SEED = 7


@pytest.fixture(scope="module")
def base():
    return make_base()


@pytest.fixture(scope="module")
def shortcut():
    return make_shortcut()


def labels(n: int) -> torch.Tensor:
    return torch.arange(n) % 10


def run(base, steps, ids=(0, 1, 2), seed=SEED, **kw):
    return generate(base, SamplingRule(steps=steps, cfg=1.0, tau=4.5), labels(len(ids)), list(ids), seed, **kw)


def sources(base, shortcut):
    return {"shortcut": Learned(shortcut, base), "reuse": Reuse(), "extrapolate": Extrapolate()}


# (a) B = N: every source is the vanilla sampler


@pytest.mark.parametrize("step", [2, 6])
def test_a_step_guides_the_logits(base, step):
    """commit_step guides the two branches' features before one head: the draws are those of
    CFG on the two heads' logits (SPEC section 3), since the head is affine."""
    rule, B, M = SamplingRule(steps=8, cfg=3.0, tau=4.5, temperature=1.5), 4, 20
    g = torch.Generator().manual_seed(step)
    f = torch.randn(2 * B, base.seq_len, base.dim, generator=g)
    masked = torch.stack([torch.randperm(base.num_tokens, generator=g)[:M] for _ in range(B)])
    keys = sample_keys(SEED, torch.arange(B))
    with torch.no_grad():
        commit = commit_step(base, rule, f, masked, keys, step, 5)
        logits = guided_logits(base.head(f, masked.repeat(2, 1)), rule, step)
    drawn, conf = draw(logits, uniforms(keys, step, masked, 0), uniforms(keys, step, masked, 1),
                       noise_scale(rule.tau, step, rule.steps))
    chosen = conf.argsort(dim=1, descending=True)[:, :5]
    assert torch.equal(commit.positions, masked.gather(1, chosen))
    assert torch.equal(commit.ids, drawn.gather(1, chosen))


@pytest.mark.parametrize("kind", ["shortcut", "reuse", "extrapolate"])
@pytest.mark.parametrize("steps", [4, 8])
def test_full_budget_equals_vanilla(base, shortcut, kind, steps):
    vanilla = run(base, steps, record=True)
    full = run(base, steps, budget=steps, source=sources(base, shortcut)[kind], record=True)
    assert torch.equal(full.tokens, vanilla.tokens)
    assert torch.equal(full.order, vanilla.order)
    assert torch.equal(full.features, vanilla.features)


def test_vanilla_source_cannot_predict(base):
    with pytest.raises(NotImplementedError, match="budget"):
        run(base, 4, budget=2, source=FeatureSource())


# (b) the base runs exactly B times, the shortcut N - B times, on the right steps


class Calls:
    """Counts base.features and shortcut calls and what each call saw."""

    def __init__(self, base, shortcut, monkeypatch):
        self.base_masked, self.shortcut_args, self.shortcut_out = [], [], []
        features = base.features

        def counted(tokens, cond):
            self.base_masked.append((tokens == base.mask_id).sum(1).tolist())
            return features(tokens, cond)

        monkeypatch.setattr(base, "features", counted)
        self.hook = shortcut.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs, out):
        self.shortcut_args.append([a if a is None else a.clone() for a in args]
                                  + [kwargs["new_positions"], kwargs["at"]])
        self.shortcut_out.append(out.clone())


def test_refresh_steps_given_are_the_base_calls(base, shortcut, monkeypatch):
    # A learned placement names its full steps; the loop runs the base there and nowhere else.
    calls = Calls(base, shortcut, monkeypatch)
    try:
        run(base, 8, refresh=[0, 1, 6], source=Learned(shortcut, base))
    finally:
        calls.hook.remove()
    reveal = reveal_counts(8, base.num_tokens)
    assert [m[0] for m in calls.base_masked] == [base.num_tokens - sum(reveal[:i]) for i in (0, 1, 6)]
    assert len(calls.shortcut_args) == 5
    with pytest.raises(ValueError, match="step 0"):
        run(base, 8, refresh=[1, 6], source=Reuse())


@pytest.mark.parametrize("steps, budget", [(4, 1), (4, 2), (4, 3), (8, 3), (8, 5), (12, 3), (12, 12), (15, 7)])
def test_base_and_shortcut_call_counts(base, shortcut, monkeypatch, steps, budget):
    calls = Calls(base, shortcut, monkeypatch)
    try:
        out = run(base, steps, budget=budget, source=Learned(shortcut, base))
    finally:
        calls.hook.remove()
    assert len(calls.base_masked) == budget
    assert len(calls.shortcut_args) == steps - budget

    # The base ran on the refresh steps: its input had exactly the tokens still masked at that step.
    L, reveal = base.num_tokens, reveal_counts(steps, base.num_tokens)
    masked_at = [L - sum(reveal[:i]) for i in range(steps)]
    full = refresh_steps(steps, budget)
    assert [m[0] for m in calls.base_masked] == [masked_at[s] for s in full]
    assert all(len(set(m)) == 1 for m in calls.base_masked)  # every row of both branches alike

    # The shortcut saw both branches, the tokens of the previous step as new tokens, and the mask
    # ratio of the state it predicts (SPEC section 3/5: same convention as training).
    shortcut_steps = [s for s in range(steps) if s not in full]
    for s, (f, new_embed, new_mask, ratio, positions, at), out_f in zip(shortcut_steps, calls.shortcut_args,
                                                                       calls.shortcut_out):
        assert f.shape == (6, base.seq_len, base.dim) and new_embed.shape == (6, reveal[s - 1], base.dim)
        assert new_mask is None  # the keys are the gathered new tokens, nothing else
        torch.testing.assert_close(ratio, torch.full((6,), masked_at[s] / L))
        # the new tokens are those the sampler committed at step s-1, with their own ids
        committed = torch.zeros(6, L, dtype=torch.bool).scatter_(1, positions, True)
        assert torch.equal(committed, (out.order == s - 1).repeat(2, 1))
        ids = out.tokens.repeat(2, 1).gather(1, positions)
        torch.testing.assert_close(new_embed, base.embed_tokens(ids, positions))
        # it predicts the positions still masked, the only ones the head reads; the rest keep f
        predicted = torch.zeros(6, base.seq_len, dtype=torch.bool).scatter_(1, at, True)
        assert torch.equal(predicted[:, base.image_positions], (out.order >= s).repeat(2, 1))
        assert predicted.sum() == predicted[:, base.image_positions].sum()
        assert torch.equal(out_f[~predicted], f[~predicted])

    # Chained shortcut steps: a shortcut step's input is the previous shortcut step's output.
    for k in range(1, len(shortcut_steps)):
        if shortcut_steps[k] == shortcut_steps[k - 1] + 1:
            assert torch.equal(calls.shortcut_args[k][0], calls.shortcut_out[k - 1])


@pytest.mark.parametrize("kind", ["reuse", "extrapolate"])
def test_training_free_sources_call_base_b_times(base, shortcut, monkeypatch, kind):
    calls = Calls(base, shortcut, monkeypatch)
    try:
        run(base, 8, budget=3, source=sources(base, shortcut)[kind])
    finally:
        calls.hook.remove()
    assert len(calls.base_masked) == 3 and len(calls.shortcut_args) == 0


# (c) determinism and batch independence


@pytest.mark.parametrize("budget", [None, 3])
def test_same_seed_same_samples(base, shortcut, budget):
    src = (lambda: Learned(shortcut, base)) if budget else (lambda: None)
    a = run(base, 6, budget=budget, source=src())
    b = run(base, 6, budget=budget, source=src())
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.order, b.order)
    c = run(base, 6, seed=SEED + 1, budget=budget, source=src())
    assert not torch.equal(a.tokens, c.tokens)
    assert not torch.equal(a.order, c.order)


@pytest.mark.parametrize("budget", [None, 3])
def test_sample_does_not_depend_on_its_batch(base, shortcut, budget):
    src = (lambda: Learned(shortcut, base)) if budget else (lambda: None)
    ids = list(range(6))
    labels6 = labels(6)
    rule = SamplingRule(steps=6, cfg=1.0, tau=4.5)
    whole = generate(base, rule, labels6, ids, SEED, budget=budget, source=src())
    first = generate(base, rule, labels6[:3], ids[:3], SEED, budget=budget, source=src())
    second = generate(base, rule, labels6[3:], ids[3:], SEED, budget=budget, source=src())
    assert torch.equal(whole.tokens, torch.cat([first.tokens, second.tokens]))
    assert torch.equal(whole.order, torch.cat([first.order, second.order]))
    # a lone sample, out of order, as well
    single = generate(base, rule, labels6[4:5], [4], SEED, budget=budget, source=src())
    assert torch.equal(single.tokens[0], whole.tokens[4])
    # rows of one batch differ: samples are not copies of each other
    assert len({tuple(t.tolist()) for t in whole.tokens}) == 6


@pytest.mark.parametrize("kind", ["shortcut", "extrapolate"])
def test_batch_split_over_cores_samples_what_one_call_samples(base, shortcut, kind):
    # extrapolation keeps state across steps: each slice needs its own source, or slices would mix
    make = {"shortcut": lambda: Learned(shortcut, base), "extrapolate": Extrapolate}[kind]
    rule, ids = SamplingRule(steps=6, cfg=1.0, tau=4.5), [3, 9, 1, 4, 0]
    whole = generate(base, rule, labels(5), ids, SEED, budget=3, source=make(), record=True)
    threads = torch.get_num_threads()
    split = generate_on_cores(2, base, rule, labels(5), ids, SEED, budget=3, source=make, record=True)
    assert torch.get_num_threads() == threads
    assert torch.equal(split.tokens, whole.tokens) and torch.equal(split.order, whole.order)
    torch.testing.assert_close(split.features, whole.features, rtol=0, atol=1e-5)
    assert generate_on_cores(2, base, rule, labels(1), [7], SEED, budget=3, source=make).tokens.shape == (1, base.num_tokens)


def test_fixed_threads_restores():
    before = torch.get_num_threads()
    with fixed_threads(2):
        assert torch.get_num_threads() == 2
    assert torch.get_num_threads() == before


# (d) every position committed exactly once, on schedule


@pytest.mark.parametrize("steps, budget, kind", [
    (4, None, None), (8, None, None), (49, None, None), (8, 3, "shortcut"), (12, 3, "reuse"), (12, 5, "extrapolate"),
])  # fmt: skip
def test_every_position_committed_once_on_schedule(base, shortcut, steps, budget, kind):
    source = sources(base, shortcut)[kind] if kind else None
    out = run(base, steps, budget=budget, source=source)
    L, K = base.num_tokens, base.codebook_size
    assert out.tokens.shape == out.order.shape == (3, L)
    assert out.order.min() >= 0 and out.order.max() < steps
    expected = torch.tensor(reveal_counts(steps, L))
    for row in out.order:
        assert torch.equal(torch.bincount(row, minlength=steps), expected)
    assert (out.tokens != base.mask_id).all()
    assert out.tokens.min() >= 0 and out.tokens.max() < K


# (e) recorded features are the base's features on the recorded states


def test_recorded_features_match_base_on_reconstructed_states(base):
    steps, n = 6, 3
    out = run(base, steps, record=True)
    L, S, D = base.num_tokens, base.seq_len, base.dim
    assert out.features.shape == (n, 2, steps, S, D)
    assert out.features.dtype == torch.float32
    cond = labels(n)
    # step 0: all masked
    all_masked = torch.full((n, L), base.mask_id)
    torch.testing.assert_close(out.features[:, 0, 0], base.features(all_masked, cond))
    torch.testing.assert_close(out.features[:, 1, 0], base.features(all_masked, base.uncond(cond)))
    # step i: the state holds the final tokens committed before i (order < i), masks elsewhere
    for i in range(1, steps):
        state = torch.where(out.order < i, out.tokens, base.mask_id)
        both = base.features(torch.cat([state, state]), torch.cat([cond, base.uncond(cond)]))
        torch.testing.assert_close(out.features[:, 0, i], both[:n], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.features[:, 1, i], both[n:], rtol=1e-5, atol=1e-5)
    # the branches are different inputs: cond and uncond features differ
    assert not torch.allclose(out.features[:, 0], out.features[:, 1])


def test_recorded_features_at_shortcut_steps_are_the_predictions(base, shortcut):
    steps, n = 6, 3
    out = run(base, steps, budget=2, source=Learned(shortcut, base), record=True)
    assert refresh_steps(steps, 2) == [0, 3]
    both = torch.cat([labels(n), base.uncond(labels(n))])

    def branches(x):  # [n, 2, ...] -> [2n, ...] as the sampler batches them: cond rows, then uncond
        return x.transpose(0, 1).flatten(0, 1)

    for i in (1, 2, 4, 5):  # the shortcut's output given the state rebuilt from the final tokens
        state = torch.where(out.order < i, out.tokens, base.mask_id).repeat(2, 1)
        new, ratio = (out.order == i - 1).repeat(2, 1), (state == base.mask_id).float().mean(1)
        prev = branches(out.features[:, :, i - 1])
        predicted = shortcut(prev, base.embed_tokens(state), new, ratio, context=base.shortcut_context(both))
        kept = torch.ones(2 * n, base.seq_len, 1, dtype=torch.bool)  # all but the positions still masked
        kept[:, base.image_positions] = (out.order < i).repeat(2, 1)[..., None]
        torch.testing.assert_close(branches(out.features[:, :, i]), torch.where(kept, prev, predicted),
                                   rtol=1e-5, atol=1e-5)
        # not reuse's answer: the shortcut's update is not zero
        assert not torch.allclose(out.features[:, :, i], out.features[:, :, i - 1])


# (f) a shortcut has no dependence on N: save once, sample at other N


@pytest.mark.parametrize("steps", [8, 12])
def test_saved_shortcut_samples_at_other_steps(base, shortcut, tmp_path, steps):
    path = save_model(tmp_path / "shortcut.safetensors", shortcut, {"spec": shortcut.spec.to_dict(), "base_id": "b"})
    loaded = load_shortcut(path, "b")
    assert loaded.spec == shortcut.spec and not loaded.training
    with pytest.raises(ValueError, match="trained on base b, not other"):
        load_shortcut(path, "other")

    ids = list(range(4))
    learned = run(base, steps, ids=ids, budget=3, source=Learned(loaded, base))
    original = run(base, steps, ids=ids, budget=3, source=Learned(shortcut, base))
    reuse = run(base, steps, ids=ids, budget=3, source=Reuse())
    assert torch.equal(learned.tokens, original.tokens)
    assert not torch.equal(learned.tokens, reuse.tokens)
    assert (learned.tokens != base.mask_id).all()


# (g) first-order extrapolation


def state_at(step: int, steps: int = 10) -> StepState:
    z = torch.zeros(1)
    return StepState(step, steps, prev_feature=z, tokens=z, new_ids=z, new_positions=z, mask_ratio=z, masked=z)


def test_extrapolate_formula():
    ex = Extrapolate()
    f0, f1, f2 = torch.randn(3, 2, 5, 4).unbind(0)
    ex.observe(0, f0)
    assert torch.equal(ex.predict(state_at(1)), f0)  # one full step: reuse it
    ex.observe(2, f1)
    torch.testing.assert_close(ex.predict(state_at(3)), f1 + (f1 - f0) * (1 / 2))
    torch.testing.assert_close(ex.predict(state_at(4)), f1 + (f1 - f0) * (2 / 2))
    ex.observe(5, f2)  # keeps the last two full steps: (2, f1), (5, f2)
    torch.testing.assert_close(ex.predict(state_at(6)), f2 + (f2 - f1) * (1 / 3))
    torch.testing.assert_close(ex.predict(state_at(8)), f2 + (f2 - f1) * (3 / 3))


def test_extrapolate_inside_the_sampler(base):
    steps, budget = 8, 3
    full = refresh_steps(steps, budget)
    assert full == [0, 3, 5]
    f = run(base, steps, budget=budget, source=Extrapolate(), record=True).features
    # before the second full step: reuse f_0
    assert torch.equal(f[:, :, 1], f[:, :, 0]) and torch.equal(f[:, :, 2], f[:, :, 0])
    # after it: continue the difference of the last two full steps, scaled by the step gap
    torch.testing.assert_close(f[:, :, 4], f[:, :, 3] + (f[:, :, 3] - f[:, :, 0]) / 3)
    torch.testing.assert_close(f[:, :, 6], f[:, :, 5] + (f[:, :, 5] - f[:, :, 3]) / 2)
    torch.testing.assert_close(f[:, :, 7], f[:, :, 5] + (f[:, :, 5] - f[:, :, 3]))


@pytest.mark.skipif(not shutil.which("g++"), reason="torch.compile (inductor) needs a C++ compiler on the CPU")
def test_compiled_models_sample_what_the_eager_models_sample(shortcut):
    """`sample.compile`: the compiled base and shortcut give the same tokens (up to float rounding,
    none at this size), at shortcut steps of several new-token counts (dynamic shapes)."""
    from migm_shortcut.shortcut import compiled

    eager, fast = make_base().eval(), make_base().compile_features().eval()
    tokens = [run(model, 6, budget=2, source=Learned(net, model)).tokens
              for model, net in ((eager, shortcut), (fast, compiled(shortcut)))]
    assert torch.equal(*tokens)


# (h) the noise is made where sampling runs, from (seed, sample, step, position) alone


def test_sampling_makes_nothing_on_the_host(shortcut):
    """With the model and the conditions on the `meta` device, any per-step tensor made on the host
    (noise drawn from a CPU generator, say) would meet meta tensors and fail."""
    base = make_base().to("meta")
    out = generate(base, SamplingRule(steps=6, cfg=1.0, tau=4.5), torch.arange(3, device="meta"), [0, 1, 2], SEED,
                   budget=3, source=Learned(make_shortcut().to("meta"), base))
    assert out.tokens.device.type == "meta" and out.tokens.shape == (3, base.num_tokens)


def test_noise_is_a_function_of_its_counters():
    keys = sample_keys(SEED, torch.tensor([5, 9]))
    positions = torch.tensor([[3, 1, 4], [3, 1, 4]])
    u = uniforms(keys, 2, positions, 0)
    assert u.dtype == torch.float32 and ((u > 0) & (u < 1)).all()
    # the same (sample, step, position) gives the same value in any batch and any order
    alone = uniforms(sample_keys(SEED, torch.tensor([9])), 2, torch.tensor([[4, 3]]), 0)
    assert torch.equal(alone[0], u[1, [2, 0]])
    # every counter matters: sample, step, position, stream and seed
    assert not torch.equal(u[0], u[1])
    assert not torch.equal(u, uniforms(keys, 3, positions, 0))
    assert not torch.equal(u, uniforms(keys, 2, positions, 1))
    assert not torch.equal(u[:, 0], u[:, 2])
    assert not torch.equal(u, uniforms(sample_keys(SEED + 1, torch.tensor([5, 9])), 2, positions, 0))


def test_noise_is_uniform():
    u = uniforms(sample_keys(0, torch.arange(200)), 0, torch.arange(500).expand(200, 500), 0).double()
    assert abs(u.mean() - 0.5) < 0.005 and abs(u.var() - 1 / 12) < 0.002
    counts = torch.histc(u, bins=10, min=0, max=1)
    assert (counts - 10_000).abs().max() < 500  # 10 equal bins of 100k draws, each within 5 sigma


def test_draw_follows_the_distribution():
    """Inverting the CDF at a uniform draws token k with probability softmax(logits)_k."""
    logits = torch.tensor([0.0, 1.0, 2.0, -1.0]).expand(1, 40_000, 4)
    keys = sample_keys(3, torch.tensor([0]))
    u_draw = uniforms(keys, 0, torch.arange(40_000)[None], 0)
    drawn, conf = draw(logits, u_draw, uniforms(keys, 0, torch.arange(40_000)[None], 1), tau=0.0)
    freq = torch.bincount(drawn[0], minlength=4).double() / 40_000
    torch.testing.assert_close(freq, torch.softmax(logits[0, 0].double(), 0), atol=0.01, rtol=0)
    # tau = 0: the confidence is the drawn token's log-probability
    torch.testing.assert_close(conf[0], torch.log_softmax(logits[0, 0], 0)[drawn[0]])
