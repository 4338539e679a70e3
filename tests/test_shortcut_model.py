"""The shortcut as a registered MLflow model: it loads through the registry and samples as the
pipeline's sampler does, with the base it was trained on."""

from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from tiny_models import SHORTCUT_SPEC, TINY_BASE, make_base, make_shortcut, one_thread  # noqa: F401

from migm_shortcut import tracking
from migm_shortcut.checkpoint import save_model
from migm_shortcut.sampling import Learned, generate
from migm_shortcut.schedules import SamplingRule
from migm_shortcut.shortcut_model import register_shortcut, tag_with_headline

RULE = SamplingRule(steps=6)


@pytest.fixture(scope="module")
def registered(tmp_path_factory) -> tuple[Path, str]:
    """(folder, version) of a tiny random shortcut registered as `test-shortcut`."""
    root = tmp_path_factory.mktemp("registry")
    base = make_base()
    base_path = save_model(root / "base.safetensors", base, TINY_BASE)
    config = {"spec": {"dim": 32, **SHORTCUT_SPEC}, "base_id": base.base_id}
    shortcut_path = save_model(root / "shortcut" / "model.safetensors", make_shortcut(), config)
    parent = tracking.pipeline_run(root, "test-exp", "pipeline", params={}, tags={}, key="k",
                                   state_file=root / "parents.json")
    with tracking.stage_run(root, parent, "shortcut") as run:
        metrics = {"val_mse_ratio_mean": 0.4, "rollout_mse_ratio_B3": 0.5}
        version = register_shortcut(run, "test-shortcut", shortcut_path, base, base_path, RULE, 3, metrics)
    assert version.run_id == run.run_id
    return root, version.version


@pytest.fixture
def registry(registered, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, str]:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking.tracking_uri(registered[0]))
    return registered


def test_registered_shortcut_carries_its_metrics(registry):
    version = MlflowClient().get_model_version("test-shortcut", registry[1])
    assert version.tags["val_mse_ratio_mean"] == "0.4" and version.tags["base_id"] == make_base().base_id
    assert "rollout_mse_ratio_B3 0.5" in version.description


def test_registered_shortcut_loads_through_mlflow_and_samples(registry):
    model = mlflow.pyfunc.load_model(f"models:/test-shortcut/{registry[1]}")
    labels = np.array([1, 2, 3], dtype=np.int64)
    tokens = model.predict(labels, params={"budget": 2})  # steps: the trained N by default
    base, shortcut = make_base(), make_shortcut()
    expected = generate(base, RULE, torch.as_tensor(labels), [0, 1, 2], 0, budget=2,
                        source=Learned(shortcut, base))
    np.testing.assert_array_equal(tokens, expected.tokens.numpy())
    assert model.predict(labels).shape == (3, base.num_tokens)  # every param defaults (B=3 of N=6)
    images = model.predict(labels, params={"steps": 4, "budget": 2, "decode": True})
    assert images.shape == (3, 1, 28, 28) and images.dtype == np.uint8


def test_a_shortcut_loaded_with_another_base_says_how_to_name_its_own(registry):
    other = save_model(registry[0] / "other.safetensors", make_base(seed=1), {**TINY_BASE, "hash": "other"})
    with pytest.raises(ValueError, match="model_config"):
        mlflow.pyfunc.load_model(f"models:/test-shortcut/{registry[1]}",
                                 model_config={"base": str(other)})


def test_an_evaluation_tags_the_versions_of_its_checkpoint_with_its_headline(registry):
    root, version = registry
    checkpoint = root / "shortcut" / "model.safetensors"
    assert tag_with_headline(root, "test-shortcut", checkpoint, {"reference_fid": 70.0}) == 1
    tags = MlflowClient().get_model_version("test-shortcut", version).tags
    assert tags["headline.reference_fid"] == "70.0"
    other = save_model(root / "other" / "model.safetensors", make_shortcut(seed=2), {})
    assert tag_with_headline(root, "test-shortcut", other, {"reference_fid": 1.0}) == 0
