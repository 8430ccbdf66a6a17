#!/usr/bin/env python
"""Write the real-image features KID is measured against: the shipped classifier's 128-d features of the first
2000 Fashion-MNIST test images, as ``cqpolicy/evaluation/fmnist-classifier/kid_reference.safetensors``.

    python scripts/make_kid_reference.py

(``scripts/train_fmnist_classifier.py`` writes the same file when it retrains the classifier.)
"""
from __future__ import annotations

import torch
from safetensors.torch import save_file

from cqpolicy.data import load_fashion_mnist
from cqpolicy.evaluation.classifier import KID_REFERENCE_FILE, KID_REFERENCE_SIZE, SHIPPED_DIR, load_classifier


def main():
    images, _ = load_fashion_mnist("test")
    x = torch.from_numpy(images[:KID_REFERENCE_SIZE]).unsqueeze(1)
    with torch.no_grad():
        features = load_classifier()(x).float()
    save_file({"features": features.contiguous()}, SHIPPED_DIR / KID_REFERENCE_FILE)
    print(f"wrote {SHIPPED_DIR / KID_REFERENCE_FILE}: {tuple(features.shape)} real test features")


if __name__ == "__main__":
    main()
