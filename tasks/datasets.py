"""Data sets held as tensors: MNIST-format IDX files, CIFAR-10, scikit-learn's digits, splits.

IDX files and CIFAR-10's ``cifar-10-batches-py`` pickles are read with
numpy and pickle (no torchvision), from a directory in any of the usual
layouts. Online users can download them; every download is checked
against the official MD5 before it is used.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import logging
import math
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

# Official MD5s of the gzipped files, as published with each data set.
IDX_SOURCES = {
    "mnist": {
        "mirrors": ["https://ossci-datasets.s3.amazonaws.com/mnist/", "https://yann.lecun.com/exdb/mnist/"],
        "md5": {
            "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
            "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
            "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
        },
        "layouts": ["", "raw", "MNIST/raw"],
        "system_dirs": [],
    },
    "fashion_mnist": {
        "mirrors": ["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"],
        "md5": {
            "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
            "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
            "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
        },
        "layouts": ["", "raw", "FashionMNIST/raw"],
        # Debian's dataset-fashion-mnist package.
        "system_dirs": ["/usr/share/datasets/fashion-mnist"],
    },
}

_IDX_DTYPES = {
    0x08: np.uint8,
    0x09: np.int8,
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


class DataNotFoundError(FileNotFoundError):
    """A data file is missing; the message says where it was looked for and how to get it."""


class DataError(ValueError):
    """A data file is unreadable or inconsistent; the message starts with the file's path."""


def unreadable(path: Path, error: BaseException) -> DataError:
    return DataError(
        f"{path}: cannot be read ({type(error).__name__}: {error}); the file is truncated or corrupt: "
        f"replace it with an intact copy (task.download=true fetches one, MD5-checked)"
    )


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (gzipped or not) into a numpy array of its declared shape."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            data = handle.read()
    except (EOFError, zlib.error, gzip.BadGzipFile) as error:
        raise unreadable(path, error) from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DataError(f"{path}: not an IDX file (bad magic number {data[:4]!r})")
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    ndim = data[3]
    header = 4 + 4 * ndim
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(data) - header != expected:
        raise DataError(f"{path}: IDX header declares shape {dims} ({expected} bytes) but holds {len(data) - header}")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def md5sum(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download_verified(urls: list[str], target: Path, md5: str) -> Path:
    """Download to ``target`` from the first mirror that answers with the right MD5."""
    target.parent.mkdir(parents=True, exist_ok=True)
    errors = []
    for url in urls:
        handle, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=target.name + ".", suffix=".part")
        os.close(handle)
        tmp = Path(tmp_name)
        try:
            log.info("downloading %s", url)
            with urllib.request.urlopen(url, timeout=60) as response, tmp.open("wb") as out:
                shutil.copyfileobj(response, out)
            actual = md5sum(tmp)
            if actual != md5:
                raise ValueError(f"checksum mismatch: expected md5 {md5}, got {actual}")
            os.replace(tmp, target)
            return target
        except Exception as error:  # try the next mirror, report all if none works
            errors.append(f"{url}: {error}")
        finally:
            tmp.unlink(missing_ok=True)
    raise OSError(f"could not download {target.name}:\n  " + "\n  ".join(errors))


def find_idx_file(dataset: str, data_dir: str | Path, stem: str, download: bool = False) -> Path:
    """Locate ``stem`` (gzipped or not) under ``data_dir`` in a known layout, or download it."""
    source = IDX_SOURCES[dataset]
    roots = [Path(data_dir) / layout for layout in source["layouts"]] + [Path(d) for d in source["system_dirs"]]
    candidates = [root / (stem + suffix) for root in roots for suffix in (".gz", "")]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    if download:
        name = stem + ".gz"
        return download_verified([m + name for m in source["mirrors"]], Path(data_dir) / name, source["md5"][name])
    looked = "\n  ".join(str(c) for c in candidates)
    raise DataNotFoundError(
        f"{dataset}: {stem}(.gz) not found. Looked for:\n  {looked}\n"
        f"Put the official IDX files in task.data_dir (now {data_dir}), "
        f"or run with task.download=true to fetch them (MD5-checked)."
    )


def load_idx_dataset(
    dataset: str, data_dir: str | Path, subset: str, download: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, H, W) uint8 and labels (N,) int64 of one official subset."""
    images_path, labels_path = (find_idx_file(dataset, data_dir, stem, download) for stem in IDX_FILES[subset])
    images = read_idx(images_path)
    labels = read_idx(labels_path).astype(np.int64)
    if len(images) != len(labels):
        raise DataError(f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} labels")
    return images, labels


def idx_files(dataset: str, data_dir: str | Path, subsets: list[str], download: bool = False) -> list[Path]:
    """The IDX files of the given subsets (downloaded first with ``download``); raises DataNotFoundError."""
    return [find_idx_file(dataset, data_dir, stem, download) for subset in subsets for stem in IDX_FILES[subset]]


CIFAR10 = {
    "url": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    "md5": "c58f30108f718f92721af3b95e74349a",
    "dir": "cifar-10-batches-py",
    "subsets": {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]},
}


def load_cifar10(data_dir: str | Path, subset: str, download: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 3, 32, 32) uint8 and labels (N,) int64 of one official subset.

    Reads the ``cifar-10-batches-py`` directory (the official Python
    version: pickled dicts with ``data``, N x 3072 bytes, channel-major, and
    ``labels``) under ``data_dir``; with ``download``, fetches and unpacks
    the official archive, MD5-checked.
    """
    images, labels = [], []
    for path in cifar10_files(data_dir, [subset], download):
        try:
            with path.open("rb") as handle:
                batch = pickle.load(handle, encoding="bytes")
            data = np.asarray(batch[b"data"], dtype=np.uint8)
            batch_labels = np.asarray(batch[b"labels"], dtype=np.int64)
        except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as error:
            raise unreadable(path, error) from None
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise DataError(f"{path}: expected data of shape (N, 3072), got {data.shape}")
        if len(data) != len(batch_labels):
            raise DataError(f"{path}: {len(data)} images but {len(batch_labels)} labels")
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(batch_labels)
    return np.concatenate(images), np.concatenate(labels)


def cifar10_files(data_dir: str | Path, subsets: list[str], download: bool = False) -> list[Path]:
    """The ``cifar-10-batches-py`` files of the given subsets (the archive fetched first with ``download``)."""
    root = Path(data_dir) / CIFAR10["dir"]
    names = [name for subset in subsets for name in CIFAR10["subsets"][subset]]
    if not all((root / name).is_file() for name in names):
        if not download:
            raise DataNotFoundError(
                f"cifar10: {', '.join(names)} not found in {root}. Put the official cifar-10-batches-py "
                f"directory in task.data_dir (now {data_dir}), or run with task.download=true (MD5-checked)."
            )
        archive = download_verified([CIFAR10["url"]], Path(data_dir) / "cifar-10-python.tar.gz", CIFAR10["md5"])
        with tarfile.open(archive) as tar:
            tar.extractall(Path(data_dir), filter="data")
    return [root / name for name in names]


def image_files(dataset: str, data_dir: str | Path, subsets: list[str], download: bool = False) -> list[Path]:
    """The files :func:`load_classification_pool` reads ([] for scikit-learn's bundled digits)."""
    if dataset == "digits":
        return []
    if dataset == "cifar10":
        return cifar10_files(data_dir, subsets, download)
    return idx_files(dataset, data_dir, subsets, download)


@dataclass
class ArrayDataset:
    """Features as float32 in [0, 1], flattened per example, and integer labels.

    ``image_shape`` is each example's (channels, height, width), for models that need it.
    """

    features: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    image_shape: tuple[int, int, int]


def load_classification_pool(
    dataset: str, data_dir: str | Path, subsets: list[str], download: bool = False
) -> ArrayDataset:
    """Concatenate the given official subsets into one pool (in that order)."""
    if dataset == "digits":
        from sklearn.datasets import load_digits

        bunch = load_digits()
        features = torch.from_numpy(bunch.data.astype(np.float32) / 16.0)
        return ArrayDataset(features, torch.from_numpy(bunch.target.astype(np.int64)), 10, (1, 8, 8))
    if dataset == "cifar10":
        parts = [load_cifar10(data_dir, subset, download) for subset in subsets]
    else:
        parts = [load_idx_dataset(dataset, data_dir, subset, download) for subset in subsets]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    shape = tuple(images.shape[1:]) if images.ndim == 4 else (1, *images.shape[1:])
    features = torch.from_numpy(images.reshape(len(images), -1)).float().div_(255.0)
    return ArrayDataset(features, torch.from_numpy(labels), int(labels.max()) + 1, shape)


def task_pool(task_cfg) -> ArrayDataset:
    """The pool an image task's config names (its ``dataset``, ``data_dir``, ``subsets``, ``download``)."""
    from tasks.common import resolve_path

    return load_classification_pool(
        task_cfg.dataset, resolve_path(task_cfg.data_dir), list(task_cfg.subsets), task_cfg.download
    )


def task_files(task_cfg) -> list[Path]:
    """The files :func:`task_pool` reads for an image task's config ([] for scikit-learn's digits); fetched first
    with ``download``."""
    from tasks.common import resolve_path

    return image_files(task_cfg.dataset, resolve_path(task_cfg.data_dir), list(task_cfg.subsets), task_cfg.download)


def check_split_sizes(pool_size: int, train_size: int, val_size: int, test_size: int) -> None:
    """Raise ValueError unless the splits fit in a pool of ``pool_size`` examples."""
    if test_size > pool_size:
        raise ValueError(f"test_size = {test_size} exceeds the pool of {pool_size} examples")
    available = pool_size - test_size
    if train_size + val_size > available:
        raise ValueError(
            f"train_size + val_size = {train_size + val_size} exceeds the {available} examples left "
            f"after test_size = {test_size} (pool of {pool_size})"
        )


@functools.lru_cache(maxsize=16)
def pool_size(dataset: str, data_dir: str, subsets: tuple[str, ...], download: bool) -> int:
    """How many examples the pool of these subsets holds (read once per process and location)."""
    return len(load_classification_pool(dataset, data_dir, list(subsets), download).labels)


def check_task_sizes(task_cfg, train_size: int) -> None:
    """The task's splits fit in its pool (read once), before any run starts: a ValueError naming the keys."""
    from tasks.common import resolve_path

    size = pool_size(task_cfg.dataset, str(resolve_path(task_cfg.data_dir)), tuple(task_cfg.subsets), task_cfg.download)
    try:
        check_split_sizes(size, train_size, task_cfg.val_size, task_cfg.test_size)
    except ValueError as error:
        raise ValueError(f"task.train_size/val_size/test_size: {error}") from None


def split_indices(
    pool_size: int, train_size: int, val_size: int, test_size: int, seed: int, spare: bool = False
) -> dict[str, torch.Tensor]:
    """Train/val drawn per seed; test fixed: the last ``test_size`` examples of the pool.

    With the pool ``[train, test]`` of an IDX data set and ``test_size`` equal
    to the official test split, the test split is exactly the official one.
    With ``spare``, also ``"spare"``: the examples in none of the splits, in
    the seed's order.
    """
    check_split_sizes(pool_size, train_size, val_size, test_size)
    available = pool_size - test_size
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(available, generator=generator)
    out = {
        "train": order[:train_size],
        "val": order[train_size : train_size + val_size],
        "test": torch.arange(available, pool_size),
    }
    if spare:
        out["spare"] = order[train_size + val_size :]
    return out


def thin_classes(
    train: torch.Tensor, spare: torch.Tensor, labels: torch.Tensor, rare: list[int], fraction: float
) -> torch.Tensor:
    """``train`` with each rare class cut to ``ceil(fraction * its count)`` examples, the same size.

    A rare class keeps its first examples in ``train``'s order; the places of
    those dropped go to the first examples of other classes in ``spare``, so
    the training split keeps its size (and a seed's split does not depend on
    which other runs it is trained with).
    """
    rare_set = torch.tensor(rare, dtype=labels.dtype)
    train_labels = labels[train]
    keep = ~torch.isin(train_labels, rare_set)
    for c in rare:
        members = (train_labels == c).nonzero().squeeze(1)
        keep[members[: math.ceil(fraction * len(members))]] = True
    dropped = int((~keep).sum())
    fill = spare[~torch.isin(labels[spare], rare_set)][:dropped]
    if len(fill) < dropped:
        raise ValueError(
            f"task.rare_classes: {dropped} rare-class training examples to replace, but only {len(fill)} examples "
            "of other classes are outside the splits; lower task.train_size or task.val_size"
        )
    return torch.cat([train[keep], fill])


def symmetric_label_noise(labels: torch.Tensor, rate: float, num_classes: int, seed: int) -> torch.Tensor:
    """Each label, with probability ``rate``, replaced by a uniformly drawn *other* class."""
    generator = torch.Generator().manual_seed(seed)
    flip = torch.rand(len(labels), generator=generator) < rate
    offset = torch.randint(1, num_classes, (len(labels),), generator=generator)
    return torch.where(flip, (labels + offset) % num_classes, labels)
