"""`migm pick` on a small hand-made evaluated grid: both questions, CLIPScore, no answer, --write."""

import json
import shutil

import pytest
import yaml

from migm_shortcut import pick
from migm_shortcut.config import PROFILES_DIR, load_params
from migm_shortcut.report import CLIP_SCORE, FID
from stages.cli import main as migm


def row(sampler, steps, budget, latency, fid, ci=1.0):
    name = f"vanilla-N{steps}" if sampler == "vanilla" else f"{sampler}-N{steps}-B{budget}"
    return {"name": name, "sampler": sampler, "steps": steps, "budget": budget, "latency_ms": latency,
            "speedup_vs_reference": 8.0 / latency, "fid": fid, "fid_ci_low": fid - ci, "fid_ci_high": fid + ci}


# The reference is vanilla-N8 (smoke's sampling.steps) at 8 ms and FID 20.
ROWS = [row("vanilla", 4, 4, 4.0, 30.0), row("vanilla", 8, 8, 8.0, 20.0),
        row("shortcut", 8, 3, 3.5, 20.8), row("shortcut", 8, 4, 4.5, 20.2), row("reuse", 8, 3, 3.0, 26.0)]


def by_name(name):
    return next(r for r in ROWS if r["name"] == name)


@pytest.mark.parametrize("text, expected", [("5%", (0.05, True)), (" 2.5 ", (2.5, False)), ("0", (0.0, False))])
def test_parse_loss(text, expected):
    assert pick.parse_loss(text) == expected


@pytest.mark.parametrize("text", ["five", "-1", "%"])
def test_parse_loss_rejects(text):
    with pytest.raises(pick.PickError, match="--max-loss"):
        pick.parse_loss(text)


@pytest.mark.parametrize("max_loss, relative, expected", [
    (0.05, True, "shortcut-N8-B3"),   # 5% of 20 = 1.0: B3 loses 0.8
    (0.03, True, "shortcut-N8-B4"),   # 0.6: only B4 (0.2) qualifies
    (7.0, False, "reuse-N8-B3"),      # absolute: reuse loses 6.0 and is the fastest
])  # fmt: skip
def test_fastest_within_loss(max_loss, relative, expected):
    assert pick.fastest_within_loss(ROWS, 8, FID, max_loss, relative)["name"] == expected


def test_fastest_within_loss_says_when_nothing_faster_qualifies():
    # The reference itself always "qualifies": it is no answer to a speed question.
    with pytest.raises(pick.PickError, match="loses at most 0.10 FID; the closest, shortcut-N8-B4, loses 0.20"):
        pick.fastest_within_loss(ROWS, 8, FID, 0.005, True)


def test_best_at_speedup():
    assert pick.best_at_speedup(ROWS, FID, 2.0)["name"] == "shortcut-N8-B3"  # 2.29x: 20.8 beats reuse's 26
    assert pick.best_at_speedup(ROWS, FID, 1.5)["name"] == "shortcut-N8-B4"
    with pytest.raises(pick.PickError, match="reaches 3x; the fastest is reuse-N8-B3 at 2.67x"):
        pick.best_at_speedup(ROWS, FID, 3.0)


def test_higher_is_better_quality():
    rows = [{**r, "clip_score": 40 - r["fid"]} for r in ROWS]  # the same order, higher is better
    assert pick.rows_quality(rows) is CLIP_SCORE and pick.rows_quality(ROWS) is FID
    assert pick.fastest_within_loss(rows, 8, CLIP_SCORE, 0.05, True)["name"] == "shortcut-N8-B3"  # 5% of 20
    assert pick.best_at_speedup(rows, CLIP_SCORE, 2.0)["name"] == "shortcut-N8-B3"


def test_reference_must_be_evaluated():
    with pytest.raises(pick.PickError, match="vanilla-N16"):
        pick.fastest_within_loss(ROWS, 16, FID, 0.05, True)


@pytest.mark.parametrize("name, grid", [
    ("shortcut-N8-B3", {"vanilla_steps": [8], "shortcut": [{"steps": 8, "budgets": [3], "placement": "uniform"}], "baselines": [],
                        "baseline_steps": []}),
    ("reuse-N8-B3", {"vanilla_steps": [8], "shortcut": [{"steps": 8, "budgets": [3], "placement": "uniform"}], "baselines": ["reuse"],
                     "baseline_steps": [8]}),
    ("vanilla-N4", {"vanilla_steps": [4, 8], "shortcut": [], "baselines": [], "baseline_steps": []}),
])  # fmt: skip
def test_narrowed_grid_samples_the_choice_and_the_reference(name, grid):
    assert pick.narrowed_grid(by_name(name), 8) == grid


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copy(PROFILES_DIR / "smoke.yaml", "params.yaml")
    (tmp_path / "data/report").mkdir(parents=True)
    (tmp_path / "data/report/metrics.json").write_text(json.dumps({"summary": {"seconds": 1.0},
                                                                   **{r["name"]: r for r in ROWS}}))
    return tmp_path


def test_cli_prints_the_choice_and_writes_it(project, capsys):
    before = (project / "params.yaml").read_text()
    migm(["pick", "--max-loss", "5%", "--write"])
    out = capsys.readouterr().out
    assert "shortcut-N8-B3: 3.50 ms/image (2.29x vs vanilla-N8), FID 20.80 (95% CI 19.80-21.80)" in out
    p = load_params("params.yaml")
    assert [s.name for s in p.sample.settings()] == ["vanilla-N8", "shortcut-N8-B3"]
    after = (project / "params.yaml").read_text()
    assert "# smoke: tiny sizes" in after  # comments survive
    unchanged = {k: v for k, v in yaml.safe_load(before).items() if k != "sample"}
    assert {k: v for k, v in yaml.safe_load(after).items() if k != "sample"} == unchanged


def test_cli_no_answer_exits_nonzero_and_writes_nothing(project, capsys):
    before = (project / "params.yaml").read_text()
    with pytest.raises(SystemExit) as exit_:
        migm(["pick", "--min-speedup", "5", "--write"])
    assert "no measured configuration reaches 5x" in str(exit_.value.code)
    assert (project / "params.yaml").read_text() == before


def test_cli_names_a_missing_grid(project):
    (project / "data/report/metrics.json").unlink()
    with pytest.raises(SystemExit) as exit_:
        migm(["pick", "--min-speedup", "2"])
    assert "data/report/metrics.json: no evaluated grid" in str(exit_.value.code)
