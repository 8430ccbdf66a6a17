"""The shipped Fashion-MNIST classifier: class accuracy of samples and the feature space of offline FID.

Inception features mean little on 28x28 grey clothes, and no Inception weights can be downloaded here,
so FID on ``fmnist-dit`` uses the 128-d penultimate features of this small CNN, trained on the real
training set by ``scripts/train_fmnist_classifier.py``. Its reference statistics (mean, covariance) are
those of the 10k real test images.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

SHIPPED_DIR = Path(__file__).parent / "fmnist-classifier"
NUM_FEATURES = 128
KID_REFERENCE_FILE = "kid_reference.safetensors"  # features of the first KID_REFERENCE_SIZE real test images
KID_REFERENCE_SIZE = 2000


class FashionClassifier(nn.Module):
    """Small CNN. ``forward`` maps uint8 images [N, 1, 28, 28] to features; ``classify`` to logits."""

    num_features = NUM_FEATURES

    def __init__(self):
        super().__init__()

        def block(cin, cout):
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            )

        self.body = nn.Sequential(block(1, 32), block(32, 64), nn.Flatten(),
                                  nn.Linear(64 * 7 * 7, NUM_FEATURES), nn.ReLU(inplace=True))
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(NUM_FEATURES, 10)

    @staticmethod
    def _to_float(images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8:
            raise TypeError(f"expected uint8 images, got {images.dtype}")
        return (images.float() / 255.0 - 0.286) / 0.353  # Fashion-MNIST train mean / std

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(self._to_float(images))

    def float_features(self, images: torch.Tensor) -> torch.Tensor:
        """Features of model-space float images in [-1, 1], differentiable (no uint8 rounding): a training loss."""
        return self.body(((images.clamp(-1, 1) + 1) / 2 - 0.286) / 0.353)

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.forward(images)))


class _FrozenEval(nn.Module):
    """Keeps the wrapped extractor in eval mode whatever ``.train()`` a metric calls."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module.eval().requires_grad_(False)
        self.num_features = module.num_features

    def train(self, mode: bool = True):
        return self

    def forward(self, images):
        return self.module(images)


def load_classifier(directory: str | Path = SHIPPED_DIR) -> FashionClassifier:
    from safetensors.torch import load_file

    path = Path(directory) / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"classifier weights {path} not found; train them with "
                                f"`python scripts/train_fmnist_classifier.py`")
    model = FashionClassifier()
    model.load_state_dict(load_file(path))
    return model.eval().requires_grad_(False)


def load_reference_stats(directory: str | Path = SHIPPED_DIR) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = Path(directory) / "reference_stats.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"reference statistics {path} not found; make them with "
                                f"`python scripts/train_fmnist_classifier.py`")
    return load_file(path)


def load_kid_reference(directory: str | Path = SHIPPED_DIR) -> torch.Tensor:
    """Real test-image features ``[KID_REFERENCE_SIZE, NUM_FEATURES]`` (KID needs features, not statistics)."""
    from safetensors.torch import load_file

    path = Path(directory) / KID_REFERENCE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"KID reference features {path} not found; make them with "
                                f"`python scripts/make_kid_reference.py`")
    return load_file(path)["features"]


def classifier_info(directory: str | Path = SHIPPED_DIR) -> dict:
    return json.loads((Path(directory) / "info.json").read_text())


def frozen(module: nn.Module) -> nn.Module:
    return _FrozenEval(module)
