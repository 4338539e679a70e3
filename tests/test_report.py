"""The report's numbers on hand-made rows whose answers are worked out by hand in the comments."""

import pytest

from migm_shortcut.evaluation import fastest_slower_vanilla
from migm_shortcut.report import CLIP_SCORE, add_comparisons, markdown_table, pareto_plot


def row(sampler: str, steps: int, budget: int, latency_ms: float, fid: float, ci: float) -> dict:
    """A configuration's row: FID `fid` with the interval `fid` +- `ci`."""
    return {"name": f"{sampler}_{steps}_{budget}", "sampler": sampler, "steps": steps,
            "budget": budget, "latency_ms": latency_ms, "num_samples": 100,
            "fid": fid, "fid_ci_low": fid - ci, "fid_ci_high": fid + ci}


def rows() -> list[dict]:
    # vanilla: latency 10, 20, 40 ms at FID 30, 20, 10 (intervals +-1)
    points = ((4, 10, 30), (8, 20, 20), (16, 40, 10))
    return [row("vanilla", n, n, lat, fid, 1) for n, lat, fid in points] + [
        row("shortcut", 16, 4, 15, 12, 1),  # halfway between vanilla 4 and 8: FID 25 (24 to 26)
        row("reuse", 16, 8, 30, 14, 2),  # halfway between vanilla 8 and 16: FID 15 (14 to 16)
        row("extrapolate", 16, 2, 5, 40, 1),  # faster than every vanilla run: nothing to match
    ]


def by_name(rows: list[dict]) -> dict:
    return {r["name"]: r for r in rows}


def test_speedups_against_the_reference_and_the_same_steps():
    r = by_name(add_comparisons(rows(), reference_steps=8))
    assert r["shortcut_16_4"]["speedup_vs_reference"] == pytest.approx(20 / 15)
    assert r["shortcut_16_4"]["speedup_vs_same_steps"] == pytest.approx(40 / 15)
    assert r["shortcut_16_4"]["speedup_limit"] == 4
    assert r["vanilla_4_4"]["speedup_vs_reference"] == pytest.approx(2)
    assert r["vanilla_8_8"]["speedup_vs_same_steps"] == pytest.approx(1)
    lone = row("shortcut", 12, 4, 15, 12, 1)  # no vanilla run of 12 steps
    assert add_comparisons(rows() + [lone], 8)[-1]["speedup_vs_same_steps"] is None


def test_matched_latency_interpolates_vanillas_quality():
    r = by_name(add_comparisons(rows(), reference_steps=8))
    assert r["shortcut_16_4"]["matched_vanilla_fid"] == pytest.approx(25)
    assert r["shortcut_16_4"]["fid_gain_at_matched_latency"] == pytest.approx(13)  # lower: a gain
    assert r["reuse_16_8"]["matched_vanilla_fid"] == pytest.approx(15)
    assert r["reuse_16_8"]["fid_gain_at_matched_latency"] == pytest.approx(1)
    for name in ("extrapolate_16_2", "vanilla_8_8"):  # outside vanilla's latencies; vanilla itself
        assert r[name]["matched_vanilla_fid"] is None
        assert r[name]["fid_gain_at_matched_latency"] is None
        assert r[name]["beats_vanilla_beyond_uncertainty"] is None


def test_beating_vanilla_needs_the_whole_interval_beyond_vanillas():
    r = by_name(add_comparisons(rows(), reference_steps=8))
    assert r["shortcut_16_4"]["beats_vanilla_beyond_uncertainty"] is True  # 11 to 13 vs 24 to 26
    # A better point estimate (14 < 15) whose interval (12 to 16) overlaps vanilla's (14 to 16)
    assert r["reuse_16_8"]["beats_vanilla_beyond_uncertainty"] is False


def test_higher_is_better_quality_flips_the_gain_and_the_decision():
    clip = [{**r, "clip_score": -r.pop("fid"), "clip_score_ci_low": -r.pop("fid_ci_high"),
             "clip_score_ci_high": -r.pop("fid_ci_low")} for r in rows()]  # the FIDs mirrored
    r = by_name(add_comparisons(clip, reference_steps=8, quality=CLIP_SCORE))
    assert r["shortcut_16_4"]["matched_vanilla_clip_score"] == pytest.approx(-25)
    assert r["shortcut_16_4"]["clip_score_gain_at_matched_latency"] == pytest.approx(13)
    assert r["shortcut_16_4"]["beats_vanilla_beyond_uncertainty"] is True
    assert r["reuse_16_8"]["beats_vanilla_beyond_uncertainty"] is False


def test_fastest_slower_vanilla_is_the_next_vanilla_point_up_the_latency_axis():
    all_rows = rows()

    def found(r: dict) -> str | None:
        return (fastest_slower_vanilla(all_rows, r) or {}).get("name")

    r = by_name(all_rows)
    assert found(r["shortcut_16_4"]) == "vanilla_8_8"  # 20 ms, not 40
    assert found(r["reuse_16_8"]) == "vanilla_16_16"
    assert found(r["extrapolate_16_2"]) == "vanilla_4_4"
    assert found(row("shortcut", 16, 4, 50, 12, 1)) is None  # slower than every vanilla run
    assert found(r["vanilla_4_4"]) is None


def table(rows: list[dict]) -> dict[str, dict[str, str]]:
    """The markdown table as {row's first two cells: {header: cell}}."""
    header, _, *body = markdown_table(rows, reference_steps=8).split("\n\n")[0].splitlines()
    heads = [h.strip() for h in header.strip("|").split("|")]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in body]
    return {f"{c[0]} {c[1]}": dict(zip(heads, c)) for c in cells}


def test_table_has_a_row_per_configuration_and_the_columns_the_rows_fill():
    compared = add_comparisons(rows(), reference_steps=8)
    by_name(compared)["shortcut_16_4"] |= {
        "faster_than": "vanilla_8_8", "dominates_slower_vanilla": True, "fid_minus_slower_vanilla_beyond_ci": True,
        "fid_minus_slower_vanilla": -8.0,
        "fid_minus_slower_vanilla_ci_low": -9.0, "fid_minus_slower_vanilla_ci_high": -7.0}
    t = table(compared)
    assert list(t) == ["vanilla 4 steps", "vanilla 8 steps", "vanilla 16 steps",
                       "extrapolate 16 steps, B=2", "reuse 16 steps, B=8", "shortcut 16 steps, B=4"]
    shortcut = t["shortcut 16 steps, B=4"]
    assert shortcut["Latency (ms/img)"] == "15.00"
    assert shortcut["Speedup vs N=8"] == "1.33x"
    assert shortcut["Speedup vs same N"] == "2.67x"
    assert shortcut["FID (95% CI)"] == "12.00 (11.00–13.00)"
    assert shortcut["Vanilla FID at same latency"] == "25.00"
    paired = "FID minus the next slower vanilla (paired 95% CI)"
    assert shortcut[paired] == "-8.00 (-9.00 to -7.00) vs vanilla_8_8 **better**"
    assert t["extrapolate 16 steps, B=2"]["Vanilla FID at same latency"] == "–"
    optional = {"KID", "FID vs dataset stats", "Class acc. (worst class)"}
    assert not optional & set(shortcut)  # no row has them
    assert "100 samples per configuration; the note" in markdown_table(compared, 8, note="the note")
    assert "FID minus reuse (paired)" not in shortcut  # no row has a baseline comparison

    # the paired comparisons with the training-free baselines, and a headline scored on fewer samples
    by_name(compared)["shortcut_16_4"] |= {"fid_minus_reuse": -3.0, "fid_minus_reuse_ci_low": -4.5,
                                           "fid_minus_reuse_ci_high": -1.5, "fid_minus_reuse_beyond_ci": True,
                                           "fid_samples": 50}
    t = table(compared)
    assert t["shortcut 16 steps, B=4"]["FID minus reuse (paired)"] == "-3.00 (-4.50 to -1.50) **better**"
    assert t["reuse 16 steps, B=8"]["FID minus reuse (paired)"] == "–"
    assert "100 samples per configuration, FID on the first 50; n" in markdown_table(compared, 8, note="n")

    extra = {"kid_mean": 0.0123, "fid_dataset_stats": 9.5, "class_accuracy": 0.9,
             "worst_class_accuracy": 0.5}
    filled = table(add_comparisons([r | extra for r in rows()], 8))["vanilla 8 steps"]
    assert (filled["KID"], filled["FID vs dataset stats"]) == ("0.0123", "9.50")
    assert filled["Class acc. (worst class)"] == "90.0% (50%)"


def test_table_shows_a_learned_placement_its_refreshes_and_its_difference_with_uniform():
    learned = row("shortcut", 16, 4, 16, 11, 1) | {"placement": "learned", "refresh_steps": [0, 3, 6, 11],
                                                   "fid_minus_uniform": -1.0, "fid_minus_uniform_ci_low": -1.5,
                                                   "fid_minus_uniform_ci_high": -0.5, "fid_minus_uniform_beyond_ci": True}
    t = table(add_comparisons(rows() + [learned], reference_steps=8))
    cell = t["shortcut-learned 16 steps, B=4, refreshes [0, 3, 6, 11]"]
    assert cell["FID learned minus uniform placement (paired)"] == "-1.00 (-1.50 to -0.50) **better**"
    assert t["shortcut 16 steps, B=4"]["FID learned minus uniform placement (paired)"] == "–"


def test_pareto_plot_writes_a_png(tmp_path):
    path = tmp_path / "new" / "pareto.png"
    learned = row("shortcut", 16, 4, 16, 11, 1) | {"placement": "learned"}  # a curve of its own
    assert pareto_plot(add_comparisons(rows() + [learned], reference_steps=8), path, "title") == path
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
