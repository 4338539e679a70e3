"""The pure schedules of SPEC sections 3 and 6: arccos reveal counts, refresh steps (uniform and
learned from a measured error), CFG/noise ramps."""

import itertools
import random

import pytest

from migm_shortcut.schedules import (cfg_weight, learned_refresh_steps, noise_scale, placement_error, refresh_steps,
                                     reveal_counts)


def test_reveal_counts_reference_example():
    # SPEC section 3: the reference MaskGIT schedule at N=15 over 32x32 tokens.
    assert reveal_counts(15, 1024) == [1, 26, 38, 46, 54, 61, 67, 73, 79, 84, 89, 94, 99, 104, 109]


@pytest.mark.parametrize("steps, tokens", [
    (1, 1), (1, 49), (2, 2), (2, 49), (3, 3), (4, 49), (8, 49), (12, 49), (16, 49), (32, 49), (48, 49),
    (49, 49), (15, 256), (32, 1024), (64, 4096), (100, 101), (100, 100), (1024, 1024),
])  # fmt: skip
def test_reveal_counts_cover_every_token_once(steps, tokens):
    counts = reveal_counts(steps, tokens)
    assert len(counts) == steps
    assert sum(counts) == tokens
    assert min(counts) >= 1


@pytest.mark.parametrize("n", [1, 2, 7, 49, 1024])
def test_reveal_counts_n_equals_l_reveals_one_per_step(n):
    assert reveal_counts(n, n) == [1] * n


def test_reveal_counts_grow_along_arccos():
    # arccos(linspace(1, 0, N)) increases, so (apart from rounding) later steps commit more tokens.
    counts = reveal_counts(16, 1024)
    assert counts[0] < counts[1] < counts[-1]
    assert all(b >= a - 1 for a, b in zip(counts, counts[1:]))


@pytest.mark.parametrize("steps, tokens", [(50, 49), (2, 1), (0, 49), (-1, 49)])
def test_reveal_counts_reject_impossible_steps(steps, tokens):
    with pytest.raises(ValueError):
        reveal_counts(steps, tokens)


@pytest.mark.parametrize("steps, budget, expected", [
    (15, 7, [0, 2, 4, 6, 9, 11, 13]),
    (32, 8, [0, 4, 8, 12, 16, 20, 24, 28]),
    (32, 12, [0, 3, 5, 8, 11, 13, 16, 19, 21, 24, 27, 29]),
    (64, 11, [0, 6, 12, 17, 23, 29, 35, 41, 47, 52, 58]),
    (15, 1, [0]),
])  # fmt: skip
def test_refresh_steps_spec_examples(steps, budget, expected):
    assert refresh_steps(steps, budget) == expected


def test_refresh_steps_round_half_to_even():
    # N=10, B=4: N k / B = 2.5, 5, 7.5 -> round half to even gives 2, 5, 8 (half-up would give 3, 5, 8).
    assert refresh_steps(10, 4) == [0, 2, 5, 8]


@pytest.mark.parametrize("steps", [1, 2, 5, 8, 15, 16, 32, 64])
def test_refresh_steps_full_budget_is_every_step(steps):
    assert refresh_steps(steps, steps) == list(range(steps))


@pytest.mark.parametrize("steps", [2, 3, 8, 12, 15, 16, 32, 49, 64])
def test_refresh_steps_are_b_distinct_steps_starting_at_zero(steps):
    for budget in range(1, steps + 1):
        full = refresh_steps(steps, budget)
        assert len(full) == budget and full[0] == 0
        assert all(a < b for a, b in zip(full, full[1:]))
        assert full[-1] < steps


@pytest.mark.parametrize("steps, budget", [(8, 0), (8, 9), (8, -1), (1, 2)])
def test_refresh_steps_reject_budget_out_of_range(steps, budget):
    with pytest.raises(ValueError, match="budget"):
        refresh_steps(steps, budget)


@pytest.mark.parametrize("steps", [1, 2, 5, 7])
def test_learned_refresh_steps_match_brute_force(steps):
    rng = random.Random(steps)
    error = [[rng.random() for _ in range(steps)] for _ in range(steps)]
    for budget in range(1, steps + 1):
        placements = [[0, *rest] for rest in itertools.combinations(range(1, steps), budget - 1)]
        best = min(placements, key=lambda full: placement_error(error, full))  # random errors: no ties
        assert learned_refresh_steps(error, budget) == best


@pytest.mark.parametrize("steps", [2, 7, 12, 16, 32])
def test_learned_refresh_steps_with_constant_error_are_uniform(steps):
    # Every placement then costs N - B: the tie-break towards the uniform grid decides, alone.
    error = [[0.5] * steps for _ in range(steps)]
    for budget in range(1, steps + 1):
        assert learned_refresh_steps(error, budget) == refresh_steps(steps, budget)


def test_learned_refresh_steps_follow_the_error():
    # Shortcut steps cost nothing after step 3 and much before it: the refreshes crowd the start.
    error = [[1.0 if t < 3 else 0.0 for t in range(8)] for _ in range(8)]
    assert learned_refresh_steps(error, 3) == [0, 1, 2]


@pytest.mark.parametrize("steps", [1, 6, 16])
def test_learned_refresh_steps_full_budget_is_every_step(steps):
    rng = random.Random(0)
    error = [[rng.random() for _ in range(steps)] for _ in range(steps)]
    assert learned_refresh_steps(error, steps) == list(range(steps))


def test_cfg_weight_ramps_from_zero_to_scale():
    steps, w = 9, 2.0
    ramp = [cfg_weight(w, i, steps) for i in range(steps)]
    assert ramp[0] == 0.0
    assert ramp[-1] == pytest.approx(w)
    assert ramp[4] == pytest.approx(w / 2)
    diffs = [b - a for a, b in zip(ramp, ramp[1:])]
    assert all(d == pytest.approx(w / (steps - 1)) for d in diffs)  # linear
    assert cfg_weight(0.0, 5, steps) == 0.0
    assert cfg_weight(3.0, 0, 1) == 3.0  # a single step uses the full weight


def test_noise_scale_anneals_from_tau_to_zero():
    steps, tau = 11, 4.5
    ramp = [noise_scale(tau, i, steps) for i in range(steps)]
    assert ramp[0] == pytest.approx(tau)
    assert ramp[-1] == 0.0
    assert ramp[5] == pytest.approx(tau / 2)
    assert all(a > b for a, b in zip(ramp, ramp[1:]))
    assert noise_scale(tau, 0, 1) == 0.0
