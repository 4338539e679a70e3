"""The sample stage's folders: the fingerprint that skips a configuration already sampled, and the
removal of folders no longer in the grid."""

import json

import pytest
import torch
import yaml

from migm_shortcut.config import PROFILES_DIR, SamplerSetting, parse_params
from migm_shortcut.sample_folders import (fingerprint, is_up_to_date, read_sample_set, remove_other_folders,
                                          sample_conditions, sample_info, write_sample_folder)
from migm_shortcut.sampling import SamplingRule

P = parse_params(yaml.safe_load((PROFILES_DIR / "smoke.yaml").read_text()))
SHORTCUT = SamplerSetting(sampler="shortcut", steps=8, budget=3)
VANILLA = SamplerSetting(sampler="vanilla", steps=8, budget=8)
RULE = SamplingRule(steps=8)
UNIFORM = [0, 3, 5]  # refresh_steps(8, 3)
EVERY = list(range(8))


def test_fingerprint_changes_with_what_made_the_samples():
    fp = fingerprint(SHORTCUT, RULE, P.sample, "b", "s", UNIFORM)
    assert fp == fingerprint(SHORTCUT, RULE, P.sample, "b", "s", UNIFORM)  # deterministic
    changed = [
        fingerprint(SHORTCUT.model_copy(update={"budget": 4}), RULE, P.sample, "b", "s", UNIFORM),
        fingerprint(SHORTCUT, SamplingRule(steps=8, cfg=2.0), P.sample, "b", "s", UNIFORM),
        fingerprint(SHORTCUT, RULE, P.sample.model_copy(update={"seed": 1}), "b", "s", UNIFORM),
        fingerprint(SHORTCUT, RULE, P.sample, "other base", "s", UNIFORM),
        fingerprint(SHORTCUT, RULE, P.sample, "b", "other shortcut", UNIFORM),
        fingerprint(SHORTCUT, RULE, P.sample, "b", "s", UNIFORM, prompts=torch.tensor([[1, 2]])),
        fingerprint(SHORTCUT, RULE, P.sample, "b", "s", UNIFORM, prompts=torch.tensor([[1, 3]])),
        fingerprint(SHORTCUT, RULE, P.sample, "b", "s", [0, 2, 5]),  # a learned placement's steps
        fingerprint(SHORTCUT.model_copy(update={"placement": "learned"}), RULE, P.sample, "b", "s", UNIFORM),
    ]
    assert len({fp, *changed}) == len(changed) + 1


def test_fingerprint_ignores_what_does_not_make_the_samples():
    # the rest of the grid; the shortcut's weights for a sampler that does not use them
    other_grid = P.sample.model_copy(update={"vanilla_steps": [2, 8], "baselines": []})
    fp = fingerprint(SHORTCUT, RULE, P.sample, "b", "s", UNIFORM)
    assert fingerprint(SHORTCUT, RULE, other_grid, "b", "s", UNIFORM) == fp
    assert fingerprint(VANILLA, RULE, P.sample, "b", "s", EVERY) == fingerprint(VANILLA, RULE, P.sample, "b", None, EVERY)


def test_a_folder_is_up_to_date_only_with_its_fingerprint(tmp_path):
    folder = tmp_path / "vanilla-N8"
    assert not is_up_to_date(folder, "abc")  # missing
    folder.mkdir()
    (folder / "info.json").write_text(json.dumps({"fingerprint": "abc"}))
    assert is_up_to_date(folder, "abc") and not is_up_to_date(folder, "abd")
    (folder / "info.json").write_text('{"fingerprint": "abc"')  # cut short by a kill
    assert not is_up_to_date(folder, "abc")


def test_folders_outside_the_grid_are_removed(tmp_path):
    for name in ("vanilla-N8", "shortcut-N8-B3", "vanilla-N2", ".vanilla-N4.tmp"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "samples.npz").write_bytes(b"x")
    remove_other_folders(tmp_path, {"vanilla-N8", "shortcut-N8-B3", "reuse-N8-B3"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shortcut-N8-B3", "vanilla-N8"]


def test_conditions_cycle_through_the_choices():
    labels, cond = sample_conditions(5, torch.tensor([[7, 7], [8, 8]]))  # two prompts
    assert labels.tolist() == [0, 1, 0, 1, 0] and cond[:, 0].tolist() == [7, 8, 7, 8, 7]


def test_a_written_folder_reads_back_and_replaces_the_old_one(tmp_path):
    folder, tokens, labels = tmp_path / "reuse-N8-B3", torch.arange(12).view(4, 3), torch.tensor([0, 1, 0, 1])
    folder.mkdir()
    (folder / "stale.txt").write_text("from an earlier run")
    info = sample_info(SHORTCUT, UNIFORM, 4, "abc", latency_ms=1.5)
    write_sample_folder(folder, tokens, labels, torch.zeros(2, 1, 4, 4, dtype=torch.uint8), labels[:2], info)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["reuse-N8-B3"]  # no temporary folder left
    assert sorted(p.name for p in folder.iterdir()) == ["grid.png", "info.json", "samples.npz"]
    read_info, arrays = read_sample_set(folder, 4, 3)
    assert read_info == info and is_up_to_date(folder, "abc")
    assert read_info["base_calls"] == 3 and read_info["feature_source_calls"] == 5
    assert read_info["refresh_steps"] == UNIFORM
    assert torch.equal(arrays["tokens"].long(), tokens) and torch.equal(arrays["labels"], labels)
    with pytest.raises(ValueError, match="holds tokens \\(4, 3\\), expected \\(4, 5\\)"):
        read_sample_set(folder, 4, 5)
    (folder / "samples.npz").write_bytes(b"cut short")
    with pytest.raises(ValueError, match="reuse-N8-B3 is missing or corrupt"):
        read_sample_set(folder, 4, 3)
