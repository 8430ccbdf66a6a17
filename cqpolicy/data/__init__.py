"""Real datasets used for model training and reference statistics."""
from cqpolicy.data.fashion_mnist import (
    CLASS_NAMES,
    DatasetMissingError,
    load_fashion_mnist,
    fashion_mnist_dir,
)

__all__ = ["CLASS_NAMES", "DatasetMissingError", "load_fashion_mnist", "fashion_mnist_dir"]
