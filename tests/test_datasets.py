"""IDX reading, file lookup, verified download, splits and label noise."""

import gzip
import hashlib
import shutil

import numpy as np
import pytest
import torch

from tasks.datasets import (
    DataError,
    DataNotFoundError,
    download_verified,
    find_idx_file,
    load_classification_pool,
    read_idx,
    split_indices,
    symmetric_label_noise,
)
from tests.conftest import SHARED_DATA, needs_fashion, needs_mnist


def write_idx(path, array: np.ndarray, gzipped: bool = False) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if gzipped else data)


def test_read_idx_round_trip(tmp_path):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a-idx3-ubyte", array)
    write_idx(tmp_path / "b-idx3-ubyte.gz", array, gzipped=True)
    np.testing.assert_array_equal(read_idx(tmp_path / "a-idx3-ubyte"), array)
    np.testing.assert_array_equal(read_idx(tmp_path / "b-idx3-ubyte.gz"), array)


def test_read_idx_rejects_bad_files(tmp_path):
    (tmp_path / "bad").write_bytes(b"PK\x03\x04junk")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "bad")
    array = np.zeros((4, 2), dtype=np.uint8)
    write_idx(tmp_path / "short", array)
    (tmp_path / "short").write_bytes((tmp_path / "short").read_bytes()[:-3])
    with pytest.raises(ValueError, match=r"declares shape \(4, 2\) \(8 bytes\) but holds 5"):
        read_idx(tmp_path / "short")


def test_a_truncated_gzip_names_its_file(tmp_path):
    write_idx(tmp_path / "images.gz", np.zeros((50, 28, 28), dtype=np.uint8), gzipped=True)
    data = (tmp_path / "images.gz").read_bytes()
    (tmp_path / "images.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(
        DataError, match=f"^{tmp_path / 'images.gz'}: cannot be read \\(EOFError: .*truncated or corrupt"
    ):
        read_idx(tmp_path / "images.gz")
    (tmp_path / "images.gz").write_bytes(data[:10] + b"\xff" * 40)  # a corrupt stream: zlib's error, same message
    with pytest.raises(DataError, match=f"^{tmp_path / 'images.gz'}: cannot be read"):
        read_idx(tmp_path / "images.gz")


def test_an_image_label_count_mismatch_names_both_files(tmp_path):
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((5, 4, 4), dtype=np.uint8))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(4, dtype=np.uint8))
    with pytest.raises(DataError) as info:
        load_classification_pool("mnist", tmp_path, ["test"])
    assert str(info.value) == (
        f"{tmp_path / 't10k-images-idx3-ubyte'} holds 5 images but {tmp_path / 't10k-labels-idx1-ubyte'} holds 4 labels"
    )


@needs_mnist
def test_reads_official_mnist_test_split():
    images = read_idx(SHARED_DATA / "mnist" / "t10k-images-idx3-ubyte.gz")
    labels = read_idx(SHARED_DATA / "mnist" / "t10k-labels-idx1-ubyte.gz")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert labels[:8].tolist() == [7, 2, 1, 0, 4, 1, 4, 9]
    pool = load_classification_pool("mnist", SHARED_DATA / "mnist", ["test"])
    assert pool.features.shape == (10000, 784) and pool.features.dtype == torch.float32
    assert 0.0 <= pool.features.min() and pool.features.max() == 1.0
    assert pool.num_classes == 10


@needs_mnist
def test_finds_files_in_torchvision_layout(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    shutil.copy(SHARED_DATA / "mnist" / "t10k-labels-idx1-ubyte.gz", raw)
    assert find_idx_file("mnist", tmp_path, "t10k-labels-idx1-ubyte") == raw / "t10k-labels-idx1-ubyte.gz"


def test_missing_files_name_the_paths_and_the_fix(tmp_path):
    with pytest.raises(DataNotFoundError) as info:
        find_idx_file("mnist", tmp_path, "train-images-idx3-ubyte")
    message = str(info.value)
    assert str(tmp_path / "train-images-idx3-ubyte.gz") in message
    assert str(tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte") in message
    assert "task.download=true" in message and "task.data_dir" in message


def test_download_verifies_checksum(tmp_path):
    source = tmp_path / "source.gz"
    source.write_bytes(b"idx bytes")
    good = hashlib.md5(b"idx bytes").hexdigest()
    target = tmp_path / "data" / "file.gz"
    with pytest.raises(OSError, match="checksum mismatch: expected md5 0+, got " + good):
        download_verified([source.as_uri()], target, "0" * 32)
    assert not target.exists() and not list(target.parent.glob("*.part"))
    assert download_verified(["file:///nonexistent/x.gz", source.as_uri()], target, good) == target
    assert target.read_bytes() == b"idx bytes"


@needs_fashion
def test_fashion_mnist_from_debian_package_when_data_dir_is_empty(tmp_path):
    pool = load_classification_pool("fashion_mnist", tmp_path, ["train", "test"])
    assert pool.features.shape == (70000, 784)
    assert torch.bincount(pool.labels).tolist() == [7000] * 10


def test_digits_pool():
    pool = load_classification_pool("digits", "unused", ["train"])
    assert pool.features.shape == (1797, 64) and pool.features.max() == 1.0


def test_split_indices():
    a = split_indices(100, 60, 20, 15, seed=0)
    b = split_indices(100, 60, 20, 15, seed=1)
    assert [len(a[k]) for k in ("train", "val", "test")] == [60, 20, 15]
    assert a["test"].tolist() == list(range(85, 100)) == b["test"].tolist()
    union = torch.cat([a["train"], a["val"], a["test"]])
    assert len(union.unique()) == 95
    assert not torch.equal(a["train"], b["train"])
    assert torch.equal(a["train"], split_indices(100, 60, 20, 15, seed=0)["train"])
    with pytest.raises(
        ValueError, match="train_size \\+ val_size = 90 exceeds the 85 examples left after test_size = 15"
    ):
        split_indices(100, 70, 20, 15, seed=0)


def test_symmetric_label_noise():
    labels = torch.arange(10).repeat(2000)
    noisy = symmetric_label_noise(labels, 0.3, 10, seed=0)
    changed = noisy != labels
    assert changed.float().mean().item() == pytest.approx(0.3, abs=0.02)
    # flipped labels are spread uniformly over the other classes
    counts = torch.bincount((noisy[changed] - labels[changed]) % 10, minlength=10)
    assert counts[0] == 0 and counts[1:].min() > 0.8 * counts[1:].max()
    assert torch.equal(noisy, symmetric_label_noise(labels, 0.3, 10, seed=0))
    assert torch.equal(symmetric_label_noise(labels, 0.0, 10, seed=0), labels)
