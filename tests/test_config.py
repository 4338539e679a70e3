"""Typed params: the profiles load, and every bad value fails early with its key named."""

import copy
import typing
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from migm_shortcut.config import (CONFIG_DIR, EXPERIMENT, PROFILES_DIR, ConfigError, Params, load_params,
                                  parse_params, read_raw_params, split_profile, use_profile)

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def smoke() -> dict:
    return yaml.safe_load((PROFILES_DIR / "smoke.yaml").read_text())


def changed(raw: dict, path: str, value) -> dict:
    """A deep copy of `raw` with the dotted `path` (list indices as numbers) set to `value`."""
    raw = copy.deepcopy(raw)
    keys = [int(k) if k.isdigit() else k for k in path.split(".")]
    node = raw
    for k in keys[:-1]:
        node = node[k]
    node[keys[-1]] = value
    return raw


@pytest.mark.parametrize("name", ["default", "smoke"])
def test_profiles_load(name):
    p = load_params(PROFILES_DIR / f"{name}.yaml")
    assert isinstance(p, Params)
    assert p.num_tokens == 49  # 28 px, downsampling 4
    assert p.sampling.steps in p.sample.vanilla_steps
    assert p.sample.settings()  # a non-empty sampling grid
    names = [s.name for s in p.sample.settings()]
    assert len(names) == len(set(names))  # every configuration gets its own folder


def test_smoke_profile_values(smoke):
    p = parse_params(smoke)
    assert p.sampling.steps == 8 and p.base.depth == 2
    assert [(g.steps, g.budgets, g.placement) for g in p.sample.shortcut] == [
        (8, [3, 4], "uniform"), (12, [3], "uniform"), (8, [3], "learned")]
    settings = {s.name for s in p.sample.settings()}
    # baselines only at baseline_steps (8), at every shortcut budget there
    assert {"reuse-N8-B3", "extrapolate-N8-B4", "shortcut-N12-B3", "vanilla-N4"} <= settings
    assert "reuse-N12-B3" not in settings
    # a learned placement is the shortcut's own: its configuration beside the uniform one, no baselines
    assert {"shortcut-learned-N8-B3", "shortcut-N8-B3"} <= settings and not any("-learned" in s for s in settings - {
        "shortcut-learned-N8-B3"})


@pytest.mark.parametrize("path, value, key", [
    ("base.dpth", 2, "base.dpth"),  # unknown key (typo)
    ("tokenizer.codebok_size", 64, "tokenizer.codebok_size"),
    ("base.depth", "two", "base.depth"),  # wrong type
    ("sampling.cfg", [1.0], "sampling.cfg"),
    ("extract.dtype", "bfloat16", "extract.dtype"),
    ("sample.shortcut.0.budgets", ["x"], "sample.shortcut[0].budgets[0]"),
    ("base.depth", 0, "base.depth"),  # out of range
    ("base.label_dropout", 1.0, "base.label_dropout"),
    ("shortcut.ema_decay", 1.5, "shortcut.ema_decay"),
    ("sampling.steps", 1, "sampling.steps"),
    ("sample.shortcut.1.budgets", [], "sample.shortcut[1].budgets"),
    ("sample.shortcut.0.placement", "best", "sample.shortcut[0].placement"),
])  # fmt: skip
def test_field_errors_name_the_key(smoke, path, value, key):
    with pytest.raises(ConfigError) as err:
        parse_params(changed(smoke, path, value), "my.yaml")
    message = str(err.value)
    assert message.startswith("my.yaml: invalid configuration")
    assert f"  {key}:" in message


def test_unknown_section_is_rejected(smoke):
    with pytest.raises(ConfigError, match="samplin"):
        parse_params({**smoke, "samplin": {"steps": 8}})


def test_missing_sample_section_is_rejected(smoke):
    raw = {k: v for k, v in smoke.items() if k != "sample"}
    with pytest.raises(ConfigError, match="sample"):
        parse_params(raw)


@pytest.mark.parametrize("path, value, key", [
    # budget above the steps of its grid entry
    ("sample.shortcut.0.budgets", [3, 9], "sample.shortcut[0].budgets"),
    ("sample.shortcut.1.budgets", [0], "sample.shortcut[1].budgets"),
    # more steps than the 49 image tokens of a 28 px image
    ("sampling.steps", 50, "sampling.steps"),
    ("sample.vanilla_steps", [4, 8, 50], "sample.vanilla_steps[2]"),
    ("sample.shortcut.1.steps", 64, "sample.shortcut[1].steps"),
    # the reference N must be sampled as vanilla too
    ("sampling.steps", 6, "sample.vanilla_steps"),
    # baselines only at the N of some shortcut entry
    ("sample.baseline_steps", [8, 10], "sample.baseline_steps[1]"),
    ("shortcut.unroll", 8, "shortcut.unroll"),
    ("extract.batch_size", 3, "extract.batch_size"),
])  # fmt: skip
def test_impossible_combinations_name_the_key(smoke, path, value, key):
    with pytest.raises(ConfigError) as err:
        parse_params(changed(smoke, path, value))
    assert key in str(err.value)


def test_step_limit_follows_image_size(smoke):
    # 32 px -> 8x8 = 64 tokens: 50 steps become possible
    raw = changed(changed(smoke, "data.image_size", 32), "sampling.steps", 50)
    raw = changed(raw, "sample.vanilla_steps", [8, 50])
    assert parse_params(raw).num_tokens == 64
    assert parse_params(changed(smoke, "sample.shortcut.1.steps", 49)).sample.shortcut[1].steps == 49  # N == L is allowed


def test_params_are_frozen(smoke):
    p = parse_params(smoke)
    with pytest.raises(Exception):
        p.base.depth = 3


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="no such params file"):
        load_params(tmp_path / "nope.yaml")


@pytest.mark.parametrize("text, match", [
    ("base: [1, 2\n", "not valid YAML"),
    ("base:\n  depth: 2\n   width: 3\n", "not valid YAML"),
    ("- a\n- b\n", "mapping"),
    ("", "mapping"),
])  # fmt: skip
def test_unreadable_files(tmp_path, text, match):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match) as err:
        load_params(path)
    assert str(path) in str(err.value)


def test_load_params_names_file_and_key(tmp_path, smoke):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(changed(smoke, "base.dpth", 2)))
    with pytest.raises(ConfigError) as err:
        load_params(path)
    assert str(path) in str(err.value) and "base.dpth" in str(err.value)


@pytest.mark.parametrize("name", sorted(p.stem for p in PROFILES_DIR.glob("*.yaml")))
def test_use_profile_splits_without_changing_a_value_or_losing_a_comment(tmp_path, name):
    dest = tmp_path / "params.yaml"
    dest.write_text("old: content\n")
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "old.yaml").write_text("a: 1\n")  # not a section of any profile: removed
    assert use_profile(name, dest) == dest
    profile = (PROFILES_DIR / f"{name}.yaml").read_text()
    assert load_params(dest) == load_params(PROFILES_DIR / f"{name}.yaml")
    params = yaml.safe_load(dest.read_text())
    assert {f"{s}.{k}" for s, keys in params.items() for k in keys} <= {
        f"{s}.{k}" for s, keys in EXPERIMENT.items() for k in keys}
    assert set(params) == set(Params.model_fields)  # every section, for DVC to track
    written = dest.read_text() + "".join(f.read_text() for f in (tmp_path / "config").glob("*.yaml"))
    comments = [line.partition("#")[2].strip() for line in profile.splitlines() if "#" in line]
    assert all(c in written for c in comments)
    assert not (tmp_path / "config" / "old.yaml").exists()


def test_the_committed_params_are_the_default_profile_split():
    """`migm profile default` reproduces params.yaml and config/ exactly, comments and all."""
    files = split_profile((PROFILES_DIR / "default.yaml").read_text())
    assert {f: (REPO / f).read_text() for f in files} == files
    assert sorted((REPO / CONFIG_DIR).glob("*.yaml")) == sorted(REPO / f for f in files if f != "params.yaml")


def test_params_yaml_overrides_config_key_by_key(tmp_path, smoke):
    use_profile("smoke", tmp_path / "params.yaml")
    assert load_params(tmp_path / "params.yaml").shortcut.heads == smoke["shortcut"]["heads"] == 2
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    params["shortcut"]["heads"] = 4  # what `dvc exp run -S +shortcut.heads=4` writes
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    p = load_params(tmp_path / "params.yaml")
    assert p.shortcut.heads == 4 and p.shortcut.lr == smoke["shortcut"]["lr"]
    assert p.shortcut.batch_size == smoke["shortcut"]["batch_size"]  # from config/shortcut.yaml


@pytest.mark.parametrize("file, text, match", [
    ("shortcut.yaml", "batch_sise: 8\n", "unknown key shortcut.batch_sise"),
    ("shortcuts.yaml", "batch_size: 8\n", "no section 'shortcuts'"),
    ("shortcut.yaml", "- 8\n", "mapping of keys"),
    ("shortcut.yaml", "batch_size: -8\n", "shortcut.batch_size"),
])  # fmt: skip
def test_a_bad_config_file_is_named(tmp_path, file, text, match):
    use_profile("smoke", tmp_path / "params.yaml")
    (tmp_path / "config" / file).write_text(text)
    with pytest.raises(ConfigError, match=match) as err:
        load_params(tmp_path / "params.yaml")
    assert "config" in str(err.value)


def test_use_profile_rejects_unknown_profile(tmp_path):
    dest = tmp_path / "params.yaml"
    with pytest.raises(ConfigError) as err:
        use_profile("no-such-profile", dest)
    message = str(err.value)
    assert "no-such-profile" in message
    assert "default" in message and "smoke" in message
    assert not dest.exists()


def cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stages.cli", *args], cwd=cwd, capture_output=True, text=True,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}, timeout=120)


def test_cli_check_rejects_bad_file_naming_the_key(tmp_path, smoke):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(changed(smoke, "sample.shortcut.0.budgets", [3, 9])))
    out = cli("check", str(bad))
    assert out.returncode != 0
    assert "sample.shortcut[0].budgets" in out.stderr
    assert str(bad) in out.stderr


def test_cli_check_accepts_profile_and_rejects_missing(tmp_path):
    good = cli("check", str(PROFILES_DIR / "smoke.yaml"))
    assert good.returncode == 0, good.stderr
    assert "valid" in good.stdout
    missing = cli("check", str(tmp_path / "none.yaml"))
    assert missing.returncode != 0 and "none.yaml" in missing.stderr


# Values that pass today's checks but fail later, inside a stage (after earlier stages did work).


@pytest.mark.parametrize("path, value, key", [
    # a vanilla run needs N >= 1: reveal_counts(0, L) raises only in the sample stage
    ("sample.vanilla_steps", [0, 8], "sample.vanilla_steps[0]"),
    ("sample.vanilla_steps", [-2, 8], "sample.vanilla_steps[0]"),
    # the tokenizer downsamples by 4 and rejects other sizes when the tokenizer stage builds it
    ("data.image_size", 30, "data.image_size"),
    # Shortcut() rejects heads that do not divide base.width / bottleneck_ratio (64 / 2 = 32)
    ("shortcut.heads", 3, "shortcut.heads"),
    ("shortcut.cross_heads", 5, "shortcut.cross_heads"),
])  # fmt: skip
def test_values_that_fail_in_a_later_stage_are_rejected_early(smoke, path, value, key):
    with pytest.raises(ConfigError) as err:
        parse_params(changed(smoke, path, value))
    assert key in str(err.value)


@pytest.mark.parametrize("path, value, twice", [
    ("sample.vanilla_steps", [4, 8, 8], "vanilla-N8"),
    ("sample.baselines", ["reuse", "reuse"], "reuse-N8-B3"),
    ("sample.shortcut.0.budgets", [3, 3, 4], "shortcut-N8-B3"),
])  # fmt: skip
def test_duplicate_grid_entries_are_rejected(smoke, path, value, twice):
    """Each setting's name is its output folder and MLflow run: two settings cannot share one."""
    with pytest.raises(ConfigError, match="configurations listed twice") as err:
        parse_params(changed(smoke, path, value))
    assert "sample" in str(err.value) and twice in str(err.value)


def config_model(annotation) -> type[BaseModel] | None:
    """The config model a field holds (also inside `X | None`), None for plain values."""
    return next((t for t in (annotation, *typing.get_args(annotation)) if isinstance(t, type) and issubclass(t, BaseModel)), None)


def fields_missing(raw: dict, model: type[BaseModel], prefix: str = "") -> list[str]:
    """Dotted keys of `model`'s fields, and of the config models it holds where given, absent from `raw`."""
    out = []
    for key, field in model.model_fields.items():
        if key not in raw:
            out.append(prefix + key)
        elif isinstance(raw[key], dict) and (sub := config_model(field.annotation)):
            out += fields_missing(raw[key], sub, f"{prefix}{key}.")
    return out


@pytest.mark.parametrize("path", sorted(PROFILES_DIR.glob("*.yaml")) + [REPO / "params.yaml"], ids=lambda p: p.name)
def test_profiles_write_every_param_explicitly(path):
    """Defaults written out: `dvc params diff` shows them and a changed default reruns its stages."""
    missing = fields_missing(read_raw_params(path), Params)  # params.yaml: with config/
    assert not missing, f"{path.name} leaves {missing} to the defaults in config.py"
