"""The headline metrics and the plot rows of an evaluated grid."""

from pathlib import Path

import pytest
import torch
import yaml

from migm_shortcut.config import PROFILES_DIR, load_params
from migm_shortcut.hardware import hardware_identity
from migm_shortcut.headline import headline, plot_rows
from migm_shortcut.report import CLIP_SCORE, FID
from test_pick import ROWS

REPO = Path(__file__).resolve().parent.parent


def test_headline_answers_the_budget_questions():
    h = headline(ROWS, 8, FID, 0.4)
    assert h == {"reference_fid": 20.0, "reference_latency_ms": 8.0, "shortcut_val_mse_ratio": 0.4,
                 "max_shortcut_speedup": 8.0 / 3.5,
                 "dominating_configurations": 0, "speedup_within_5pct_loss": 8.0 / 3.5, "fid_within_5pct_loss": 20.8,
                 "best_fid_at_2x": 20.8}
    assert all(isinstance(v, (int, float)) for v in h.values()) and len(h) <= 20


def test_headline_leaves_out_what_no_configuration_answers_and_adds_paired_differences():
    rows = [r for r in ROWS if r["sampler"] == "vanilla"]  # nothing faster than the reference within 5%
    rows += [{**ROWS[2], "fid": 30.0, "fid_minus_reuse": -1.5, "dominates_slower_vanilla": True}]
    h = headline(rows, 8, FID, 0.4)
    assert "speedup_within_5pct_loss" not in h and h["best_fid_at_2x"] == 30.0
    assert h["shortcut-N8-B3_fid_minus_reuse"] == -1.5 and h["dominating_configurations"] == 1


def test_plot_rows_carry_a_generic_quality_field():
    rows = [{**r, "clip_score": 40 - r["fid"]} for r in ROWS]
    points = plot_rows(rows, CLIP_SCORE)
    assert points[0]["quality"] == 10.0 and "quality_ci_low" not in points[0]
    assert plot_rows(ROWS, FID)[1] == {"name": "vanilla-N8", "sampler": "vanilla", "steps": 8, "budget": 8,
                                             "latency_ms": 8.0, "quality": 20.0, "quality_ci_low": 19.0,
                                             "quality_ci_high": 21.0}


def test_rows_from_different_hardware_do_not_compare():
    here = {"hardware": "Xeon", "threads": 2, "torch": "2.13.0"}
    rows = [{**r, **here} for r in ROWS]
    assert headline(rows, 8, FID, 0.4)["reference_fid"] == 20.0
    rows[3] = {**rows[3], "hardware": "NVIDIA H200"}
    with pytest.raises(ValueError, match="vanilla-N4 was timed with hardware='Xeon', shortcut-N8-B4 with "
                                         "hardware='NVIDIA H200'"):
        headline(rows, 8, FID, 0.4)


def test_hardware_identity_names_this_machine():
    identity = hardware_identity(torch.device("cpu"), 3)
    assert identity["threads"] == 3 and identity["torch"] == torch.__version__ and identity["hardware"]


def default_headline(params: Path) -> dict:
    """The headline of the default grid with every question answered (the most keys it can have)."""
    p = load_params(params)
    rows = [{"name": s.name, "sampler": s.sampler, "steps": s.steps, "budget": s.budget,
             "latency_ms": float(s.budget), "speedup_vs_reference": p.sampling.steps / s.budget,
             "fid": 20.0, "fid_minus_reuse": 0.0} for s in p.sample.settings()]
    return headline(rows, p.sampling.steps, FID, 0.4)


def test_the_one_dvc_metrics_file_is_the_headline_within_20_columns():
    """`dvc exp show` and `dvc metrics diff` show every key of every metrics file dvc.yaml declares:
    only the headline, whose keys on the default grid (every question answered) stay within 20."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    declared = [path for stage in stages.values() for entry in stage.get("metrics", [])
                for path in (entry if isinstance(entry, dict) else [entry])]
    assert declared == ["data/report/headline.json"]
    assert len(default_headline(PROFILES_DIR / "default.yaml")) <= 20


def test_exp_show_lists_at_most_40_params_and_metrics():
    """`dvc exp show` lists every leaf of params.yaml (not of config/, whose files show as hashes)
    beside the headline metrics: the experiment's keys keep it within 40 columns."""
    def leaves(node) -> int:
        return sum(map(leaves, node.values())) if isinstance(node, dict) else 1

    params = REPO / "params.yaml"
    assert leaves(yaml.safe_load(params.read_text())) + len(default_headline(params)) <= 40