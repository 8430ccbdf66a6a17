import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from cqpolicy.data import DatasetMissingError, load_fashion_mnist
from cqpolicy.data.fashion_mnist import DEFAULT_DIR


def _write_idx(path, array, magic):
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def _fake_split(folder, n=5, truncate=False):
    images = np.arange(n * 28 * 28).reshape(n, 28, 28) % 256
    labels = np.arange(n) % 10
    _write_idx(folder / "t10k-images-idx3-ubyte.gz", images, 0x803)
    _write_idx(folder / "t10k-labels-idx1-ubyte.gz", labels, 0x801)
    if truncate:
        data = gzip.open(folder / "t10k-images-idx3-ubyte.gz").read()[:-10]
        with gzip.open(folder / "t10k-images-idx3-ubyte.gz", "wb") as f:
            f.write(data)
    return images, labels


def test_reads_idx_files_from_the_env_override(tmp_path, monkeypatch):
    images, labels = _fake_split(tmp_path)
    monkeypatch.setenv("CQPOLICY_FASHION_MNIST", str(tmp_path))
    got_images, got_labels = load_fashion_mnist("test")
    assert np.array_equal(got_images, images) and np.array_equal(got_labels, labels)


def test_missing_dataset_names_the_install_command(tmp_path):
    with pytest.raises(DatasetMissingError, match="apt-get install -y dataset-fashion-mnist"):
        load_fashion_mnist("train", root=tmp_path)


def test_truncated_file_is_an_error(tmp_path):
    _fake_split(tmp_path, truncate=True)
    with pytest.raises(ValueError, match="truncated"):
        load_fashion_mnist("test", root=tmp_path)


@pytest.mark.skipif(not (Path(DEFAULT_DIR) / "t10k-images-idx3-ubyte.gz").is_file(),
                    reason="Debian's dataset-fashion-mnist is not installed (scripts/setup.sh installs it as root)")
def test_real_fashion_mnist_from_debian():
    images, labels = load_fashion_mnist("test", root=DEFAULT_DIR)
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [1000] * 10
