"""Offline FID and classifier: real data scores as real, noise does not; paired fidelity is exact."""
from pathlib import Path

import pytest
import torch

from cqpolicy.data.fashion_mnist import DEFAULT_DIR
from cqpolicy.evaluation.classifier import classifier_info, load_classifier
from cqpolicy.evaluation.quality import ClassifierFID, class_accuracy, paired_fidelity

needs_data = pytest.mark.skipif(not (Path(DEFAULT_DIR) / "t10k-images-idx3-ubyte.gz").is_file(),
                                reason="Debian's dataset-fashion-mnist is not installed")


@needs_data
def test_shipped_classifier_and_reference_statistics_on_real_data():
    from cqpolicy.data import load_fashion_mnist

    test_x, test_y = load_fashion_mnist("test")
    images = torch.from_numpy(test_x).unsqueeze(1)
    accuracy = class_accuracy(images, torch.from_numpy(test_y))
    assert accuracy >= 0.90
    assert accuracy == pytest.approx(classifier_info()["test_accuracy"], abs=1e-4)
    fid = ClassifierFID()
    assert fid(images) < 1e-3  # the reference set against its own statistics
    train_x, _ = load_fashion_mnist("train")
    real = fid(torch.from_numpy(train_x[:2000]).unsqueeze(1))
    noise = fid(torch.randint(0, 256, (2000, 1, 28, 28), dtype=torch.uint8))
    assert 0 < real < 3.0 < 100 * real < noise


@needs_data
def test_kid_is_unbiased_real_against_real_and_large_for_noise():
    """KID of real training images against the real test reference: about 0 even at N = 64 (FID is not)."""
    import torch

    from cqpolicy.data import load_fashion_mnist
    from cqpolicy.evaluation.quality import ClassifierKID, unbiased_poly_mmd

    train_x, _ = load_fashion_mnist("train")
    real = torch.from_numpy(train_x[:256].copy()).unsqueeze(1)
    kid = ClassifierKID()
    draws = [kid(real[i:i + 64]) for i in range(0, 256, 64)]
    assert all(abs(d) < 0.5 for d in draws), draws
    noise = torch.randint(0, 256, (64, 1, 28, 28), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    assert kid(noise) > 10
    x, y = torch.randn(40, 8, dtype=torch.float64), torch.randn(30, 8, dtype=torch.float64) + 1
    assert unbiased_poly_mmd(x, y) == pytest.approx(unbiased_poly_mmd(y, x))  # symmetric, any two sizes


def test_fid_rejects_float_images():
    with pytest.raises(TypeError, match="uint8"):
        load_classifier()(torch.zeros(2, 1, 28, 28))


def test_paired_fidelity():
    a = torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8)
    same = paired_fidelity(a, a.clone())
    assert same["psnr"] == float("inf") and same["ssim"] == pytest.approx(1.0)
    b = (a.int() + torch.randint(-8, 9, a.shape)).clamp(0, 255).to(torch.uint8)
    near = paired_fidelity(b, a)
    assert 25 < near["psnr"] < 60 and 0 < near["ssim"] < 1
    with pytest.raises(ValueError, match="equal shapes"):
        paired_fidelity(a[:2], a)


def test_inception_metrics_without_weights_is_a_clear_error(tmp_path, monkeypatch):
    from cqpolicy.evaluation.quality import inception_metrics

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    images = torch.zeros(4, 3, 32, 32, dtype=torch.uint8)
    with pytest.raises(FileNotFoundError, match="Inception FID needs local weights"):
        inception_metrics(images, images)
    with pytest.raises(FileNotFoundError, match="not found"):
        inception_metrics(images, images, weights_path=tmp_path / "missing.pth")
