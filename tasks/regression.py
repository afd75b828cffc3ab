"""California Housing regression with an MLP: the paper's second supervised experiment.

Eight features (median income, house age, average rooms and bedrooms per
household, population, average occupancy, latitude, longitude) and the
median house value in units of $100,000, both standardised with statistics
of the training split only (``standardise=all``: of every row, as the
paper's code does). The per-sample squared error is the ``mse``
loss an envelope shapes.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from tasks.common import Divergence, VWPRMonitor, check, check_optimizer, make_optimizer, resolve_path
from tasks.seed_batch import ModelGroup, seed_outcomes
from tasks.supervised import build_mlp, fit

SEED_BATCH = True
OBJECTIVE = ("val/mse", "min")
# what a run records (file names; * any ending), for checking report.metric before training
METRICS = ("epoch", "val_*mse*", "test_*mse*", "train_*", "envelope_*", "vwpr_*")
FEATURES = ("MedInc", "HouseAge", "AveRooms", "AveBedrms", "Population", "AveOccup", "Latitude", "Longitude")
RAW_COLUMNS = (
    "longitude",
    "latitude",
    "housing_median_age",
    "total_rooms",
    "total_bedrooms",
    "population",
    "households",
    "median_income",
    "median_house_value",
)
CSV_NAME = "cal_housing.csv"
# The held-out test rows do not depend on the run's seed.
TEST_SPLIT_SEED = 20_640
STANDARDISE = ("train", "all")
SPLITS = ("random", "randperm")


@dataclass
class RegressionConfig:
    name: str = "regression"
    dataset: str = "california_housing"
    data_dir: str = "${data_root}/california_housing"
    download: bool = False
    val_fraction: float = 0.2
    test_fraction: float = 0.0
    # which rows' statistics standardise features and target: train (the training split's) | all (every row's,
    # as the paper's code does)
    standardise: str = "train"
    # random: val rows first in a numpy permutation under the seed (test rows fixed across seeds) | randperm: the
    # paper's code: torch.randperm of all rows under the seed, training rows first, then validation (no test)
    split: str = "random"
    hidden: list[int] = field(default_factory=lambda: [64])
    lr: float = 1e-3
    optimizer: str = "adam"  # adam | sgd
    momentum: float = 0.9  # sgd's momentum (adam ignores it)
    batch_size: int = 129
    epochs: int = 100


Config = RegressionConfig


def loss_names(task_cfg) -> tuple[str, ...]:
    return ("mse",)


def validate(task_cfg) -> None:
    check_optimizer(task_cfg)
    check(
        task_cfg.dataset == "california_housing", "dataset", "must be one of ['california_housing']", task_cfg.dataset
    )
    check(0.0 < task_cfg.val_fraction < 1.0, "val_fraction", "must lie in (0, 1)", task_cfg.val_fraction)
    check(0.0 <= task_cfg.test_fraction < 1.0, "test_fraction", "must lie in [0, 1)", task_cfg.test_fraction)
    check(
        task_cfg.val_fraction + task_cfg.test_fraction < 1.0,
        "val_fraction",
        "plus test_fraction must leave training data (sum < 1)",
        task_cfg.val_fraction + task_cfg.test_fraction,
    )
    for key in ("batch_size", "epochs"):
        check(task_cfg[key] > 0, key, "must be a positive integer", task_cfg[key])
    check(
        task_cfg.standardise in STANDARDISE, "standardise", f"must be one of {list(STANDARDISE)}", task_cfg.standardise
    )
    check(task_cfg.split in SPLITS, "split", f"must be one of {list(SPLITS)}", task_cfg.split)
    check(
        task_cfg.split == "random" or task_cfg.test_fraction == 0.0,
        "test_fraction",
        "must be 0 with split=randperm (the paper's code splits into training and validation rows only)",
        task_cfg.test_fraction,
    )
    check(
        all(h > 0 for h in task_cfg.hidden), "hidden", "must be a list of positive layer widths", list(task_cfg.hidden)
    )


def features_from_raw(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's California Housing features and target from the raw census columns.

    ``raw`` has the columns of :data:`RAW_COLUMNS`. Averages are per household;
    the target is in units of $100,000.
    """
    col = {name: raw[:, i] for i, name in enumerate(RAW_COLUMNS)}
    households = col["households"]
    features = np.stack(
        [
            col["median_income"],
            col["housing_median_age"],
            col["total_rooms"] / households,
            col["total_bedrooms"] / households,
            col["population"],
            col["population"] / households,
            col["latitude"],
            col["longitude"],
        ],
        axis=1,
    )
    return features, col["median_house_value"] / 100_000.0


def load_california_housing(data_dir: str | Path, download: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Features (N, 8) and target (N,) as float64, from the raw CSV or scikit-learn's fetcher."""
    path = Path(data_dir) / CSV_NAME
    if path.is_file():
        from tasks.datasets import DataError

        with path.open() as handle:
            header = next(csv.reader(handle), [])
        if tuple(header) != RAW_COLUMNS:
            raise DataError(f"{path}: expected columns {list(RAW_COLUMNS)}, got {header}")
        try:
            raw = np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.float64, ndmin=2)
        except ValueError as error:  # numpy names a bad cell by its data row from 0: say the file's line
            message = re.sub(
                r"at row (\d+), column (\d+)",
                lambda m: f"on line {int(m.group(1)) + 2}, column {m.group(2)}",
                str(error),
            )
            raise DataError(f"{path}: {message}") from None
        if raw.shape[1] != len(RAW_COLUMNS):
            raise DataError(f"{path}: expected {len(RAW_COLUMNS)} columns per row, got {raw.shape[1]}")
        if not np.isfinite(raw).all():
            row = int(np.flatnonzero(~np.isfinite(raw).all(1))[0]) + 2  # 1-based, after the header
            raise DataError(f"{path}: a value that is not a finite number on line {row}")
        return features_from_raw(raw)
    if download:
        from sklearn.datasets import fetch_california_housing

        bunch = fetch_california_housing(data_home=str(data_dir), download_if_missing=True)
        return bunch.data.astype(np.float64), bunch.target.astype(np.float64)
    from tasks.datasets import DataNotFoundError

    raise DataNotFoundError(
        f"california_housing: {path} not found. Put the raw CSV there (columns {', '.join(RAW_COLUMNS)}), "
        f"set task.data_dir, or run with task.download=true to use scikit-learn's fetcher."
    )


def data_files(task_cfg) -> list[Path]:
    """The file this task reads (scikit-learn's copy, fetched first, with ``download`` and no CSV)."""
    data_dir = resolve_path(task_cfg.data_dir)
    path = data_dir / CSV_NAME
    if path.is_file() or not task_cfg.download:
        if not path.is_file():
            load_california_housing(data_dir)  # raises the missing-file message
        return [path]
    from sklearn.datasets import fetch_california_housing

    fetch_california_housing(data_home=str(data_dir), download_if_missing=True)
    return sorted(data_dir.glob("cal_housing*.pkz"))


def check_data(task_cfg) -> None:
    """Read the data once, so that an unreadable file fails before a sweep starts."""
    load_california_housing(resolve_path(task_cfg.data_dir), task_cfg.download)


def split_indices(n: int, val_fraction: float, test_fraction: float, seed: int, split: str) -> dict[str, np.ndarray]:
    """Row indices of each split.

    ``random``: test rows fixed across seeds, the rest in a numpy permutation under the seed, validation rows
    first. ``randperm``: the paper's code, ``torch.randperm(n)`` under the seed, the first
    ``n - round(val_fraction * n)`` rows for training, the rest for validation, no test rows.
    """
    n_val = int(round(val_fraction * n))
    if split == "randperm":
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).numpy()
        return {"train": order[: n - n_val], "val": order[n - n_val :], "test": order[:0]}
    n_test = int(round(test_fraction * n))
    fixed = np.random.default_rng(TEST_SPLIT_SEED).permutation(n)
    test_index, rest = fixed[:n_test], fixed[n_test:]
    rest = rest[np.random.default_rng(seed).permutation(len(rest))]
    return {"train": rest[n_val:], "val": rest[:n_val], "test": test_index}


def split_and_standardise(
    features: np.ndarray,
    target: np.ndarray,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    standardise: str = "train",
    split: str = "random",
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], float]:
    """The splits of :func:`split_indices`, standardised with the statistics of the training rows (``train``) or
    of every row (``all``, as the paper's code does; population std, as scikit-learn's ``StandardScaler``).

    Returns the standardised splits and the target's std that standardised it (to convert errors back to dollars).
    """
    index = split_indices(len(target), val_fraction, test_fraction, seed, split)
    rows = index["train"] if standardise == "train" else slice(None)
    x_mean, x_std = features[rows].mean(0), features[rows].std(0)
    y_mean, y_std = target[rows].mean(), target[rows].std()
    splits = {}
    for name, idx in index.items():
        x = torch.from_numpy(((features[idx] - x_mean) / x_std).astype(np.float32))
        y = torch.from_numpy(((target[idx] - y_mean) / y_std).astype(np.float32))
        splits[name] = (x, y)
    return splits, float(y_std)


def per_sample_squared_error(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (prediction.squeeze(-1) - target).square()


def error_metrics(
    group: ModelGroup, x: torch.Tensor, y: torch.Tensor, target_std: torch.Tensor, prefix: str
) -> list[dict[str, float]]:
    """Per seed: MSE and RMSE on the standardised target; MSE on the original target (in $100,000,
    squared: the standardised MSE times the training split's target variance, the unit the paper's
    code reports) and RMSE in dollars (one host sync)."""
    mse = per_sample_squared_error(group(x), y).mean(-1)
    rows = torch.stack(
        [mse, mse.sqrt(), mse * target_std.square(), mse.sqrt() * target_std * 100_000.0], dim=1
    ).tolist()
    return [
        {f"{prefix}/mse": a, f"{prefix}/rmse": b, f"{prefix}/mse_target_units": c, f"{prefix}/rmse_dollars": d}
        for a, b, c, d in rows
    ]


def run(cfg, context) -> list[dict[str, float] | Exception]:
    task_cfg, device, seeds = cfg.task, context.device, context.seeds
    features, target = load_california_housing(resolve_path(task_cfg.data_dir), task_cfg.download)
    per_seed = [
        split_and_standardise(
            features,
            target,
            task_cfg.val_fraction,
            task_cfg.test_fraction,
            seed,
            task_cfg.standardise,
            task_cfg.split,
        )
        for seed in seeds
    ]
    data = {
        name: tuple(torch.stack([splits[name][i] for splits, _ in per_seed]).to(device) for i in range(2))
        for name in ("train", "val", "test")
    }
    target_std = torch.tensor([std for _, std in per_seed], device=device)

    group = ModelGroup(lambda: build_mlp(len(FEATURES), list(task_cfg.hidden), 1), seeds, device)
    optimizer = make_optimizer(group.parameters(), task_cfg)
    failed = fit(
        group,
        optimizer,
        context.envelope("mse"),
        "mse",
        data["train"],
        per_sample_squared_error,
        lambda: error_metrics(group, *data["val"], target_std, "val"),
        task_cfg.epochs,
        task_cfg.batch_size,
        seeds,
        context.recorders,
        None if context.vwpr is None else VWPRMonitor(context.vwpr, group.module),
        diverged=Divergence(OBJECTIVE[0], cfg.divergence_factor),
    )
    if data["test"][1].shape[1] == 0:
        tests = [{} for _ in seeds]
    else:
        with torch.no_grad():
            tests = [
                {key.replace("/", "_"): value for key, value in test.items()}
                for test in error_metrics(group, *data["test"], target_std, "test")
            ]
    return seed_outcomes(tests, failed)
