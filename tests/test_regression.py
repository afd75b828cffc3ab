"""California Housing: features as scikit-learn defines them, splits without leakage, a real run."""

import json

import joblib
import numpy as np
import pytest

from runner.job import run_job
from tasks.datasets import DataError
from tasks.regression import (
    CSV_NAME,
    FEATURES,
    features_from_raw,
    load_california_housing,
    split_and_standardise,
)
from tests.conftest import SHARED_DATA

DATA_DIR = SHARED_DATA / "california_housing"
needs_california = pytest.mark.skipif(
    not (DATA_DIR / CSV_NAME).exists(), reason="California Housing CSV not in ../shared/data"
)


@needs_california
def test_features_match_scikit_learn_definitions(tmp_path):
    """Feed scikit-learn's own fetcher the raw table (as its cache file) and compare."""
    from sklearn.datasets import fetch_california_housing

    raw = np.loadtxt(DATA_DIR / CSV_NAME, delimiter=",", skiprows=1)
    # scikit-learn caches the raw columns reordered as [8, 7, 2, 3, 4, 5, 6, 1, 0] in this file
    joblib.dump(raw[:, [8, 7, 2, 3, 4, 5, 6, 1, 0]], tmp_path / "cal_housing_py3.pkz", compress=6)
    bunch = fetch_california_housing(data_home=str(tmp_path), download_if_missing=False)
    assert tuple(bunch.feature_names) == FEATURES
    features, target = load_california_housing(DATA_DIR)
    assert features.shape == (20640, 8)
    np.testing.assert_allclose(features, bunch.data, rtol=1e-12)
    np.testing.assert_allclose(target, bunch.target, rtol=1e-12)
    assert target.max() == pytest.approx(5.00001)  # units of $100,000


def test_features_from_raw_known_row():
    row = np.array([[-122.23, 37.88, 41.0, 880.0, 129.0, 322.0, 126.0, 8.3252, 452600.0]])
    features, target = features_from_raw(row)
    np.testing.assert_allclose(features[0], [8.3252, 41.0, 880 / 126, 129 / 126, 322.0, 322 / 126, 37.88, -122.23])
    assert target[0] == pytest.approx(4.526)


def test_missing_data_names_the_path_and_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / CSV_NAME} not found.*task.download=true"):
        load_california_housing(tmp_path)


def test_wrong_columns_are_rejected(tmp_path):
    (tmp_path / CSV_NAME).write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="expected columns"):
        load_california_housing(tmp_path)


def test_a_cell_that_is_not_a_number_names_the_file_and_where(tmp_path):
    header = "longitude,latitude,housing_median_age,total_rooms,total_bedrooms,population,households,median_income,median_house_value"
    (tmp_path / CSV_NAME).write_text(
        f"{header}\n-122,37,41,880,129,322,126,8.3,452600\n-122,37,21,abc,1106,2401,1138,8.3,358500\n"
    )
    with pytest.raises(
        DataError, match=f"^{tmp_path / CSV_NAME}: could not convert string 'abc' to float64 on line 3, column 4"
    ):
        load_california_housing(tmp_path)
    (tmp_path / CSV_NAME).write_text(f"{header}\n-122,37,41,880,129,322,126,8.3,nan\n")
    with pytest.raises(DataError, match=f"^{tmp_path / CSV_NAME}: a value that is not a finite number on line 2"):
        load_california_housing(tmp_path)


def test_splits_standardise_with_training_statistics_only():
    rng = np.random.default_rng(0)
    features = rng.normal(3.0, 2.0, size=(1000, 8))
    target = rng.normal(1.0, 0.5, size=1000)
    splits, target_std = split_and_standardise(features, target, 0.2, 0.1, seed=0)
    train_x, train_y = splits["train"]
    assert [len(splits[k][1]) for k in ("train", "val", "test")] == [700, 200, 100]
    np.testing.assert_allclose(train_x.mean(0).numpy(), 0.0, atol=1e-5)
    np.testing.assert_allclose(train_x.std(0, unbiased=False).numpy(), 1.0, atol=1e-5)
    np.testing.assert_allclose(train_y.mean().item(), 0.0, atol=1e-5)
    np.testing.assert_allclose(train_y.std(unbiased=False).item(), 1.0, atol=1e-5)
    assert abs(splits["val"][0].mean().item()) > 1e-4  # validation is not re-centred on itself
    other, _ = split_and_standardise(features, target, 0.2, 0.1, seed=1)
    assert not np.array_equal(other["train"][1].numpy(), train_y.numpy())


def test_test_rows_do_not_depend_on_the_seed():
    features = np.arange(500 * 8, dtype=float).reshape(500, 8)
    target = np.arange(500, dtype=float)
    a, _ = split_and_standardise(features, target, 0.2, 0.2, seed=0)
    b, _ = split_and_standardise(features, target, 0.2, 0.2, seed=5)
    # standardisation differs by seed, but ordering of the rows (the target is the row index) does not
    assert np.array_equal(np.argsort(a["test"][1].numpy()), np.argsort(b["test"][1].numpy()))
    train_rows = lambda s: set(np.round(s["train"][0][:, 0].numpy(), 4))  # noqa: E731
    assert train_rows(a) != train_rows(b)


@needs_california
def test_regression_run_end_to_end(compose, tmp_path):
    cfg = compose(
        "task=california_housing",
        f"data_root={SHARED_DATA}",
        "task.epochs=3",
        "task.test_fraction=0.1",
        "envelope@envelopes.mse=paper/mse_sigmoid",
        "tensorboard=false",
    )
    run_job(cfg, tmp_path, None, [], reraise=True)
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["status"] == "completed"
    final = result["final"]
    assert 0.2 < final["val_mse"] < 0.6
    assert final["val_rmse"] == pytest.approx(final["val_mse"] ** 0.5)
    assert 30_000 < final["val_rmse_dollars"] < 90_000
    # the paper's unit: ($100,000)^2, the standardised MSE times the training target's variance (about 1.32)
    assert final["val_mse_target_units"] == pytest.approx(
        final["val_mse"] * (final["val_rmse_dollars"] / 1e5 / final["val_rmse"]) ** 2
    )
    assert 1.25 < final["val_mse_target_units"] / final["val_mse"] < 1.40
    assert 0.2 < final["test_mse"] < 0.6
    assert final["envelope_mse_mean_weight"] < 1.0
    assert result["effective"]["envelopes"]["mse"] == {
        "shape": "sigmoid",
        "quantile": 0.1,
        "width": 0.1,
        "step_size": 0.01,
    }


def test_the_papers_split_is_torch_randperm_under_the_seed_training_rows_first():
    import torch

    features = np.arange(500 * 8, dtype=float).reshape(500, 8)
    target = np.arange(500, dtype=float)  # a row's target is its index
    splits, _ = split_and_standardise(features, target, 0.2, 0.0, seed=3, standardise="all", split="randperm")
    order = torch.randperm(500, generator=torch.Generator().manual_seed(3)).numpy()
    rows = {name: np.argsort(np.argsort(splits[name][1].numpy())) for name in ("train", "val")}
    ranks = {
        name: np.argsort(np.argsort(order[s])) for name, s in (("train", slice(0, 400)), ("val", slice(400, None)))
    }
    assert [len(splits[k][1]) for k in ("train", "val", "test")] == [400, 100, 0]
    for name in ("train", "val"):  # the same rows in the same order
        assert np.array_equal(rows[name], ranks[name])


def test_standardise_all_uses_every_rows_statistics():
    rng = np.random.default_rng(0)
    features = rng.normal(3.0, 2.0, size=(1000, 8))
    target = rng.normal(1.0, 0.5, size=1000)
    splits, target_std = split_and_standardise(features, target, 0.2, 0.0, seed=0, standardise="all")
    every_x = np.concatenate([splits["train"][0].numpy(), splits["val"][0].numpy()])
    every_y = np.concatenate([splits["train"][1].numpy(), splits["val"][1].numpy()])
    np.testing.assert_allclose(every_x.mean(0), 0.0, atol=1e-5)
    np.testing.assert_allclose(every_x.std(0), 1.0, atol=1e-5)
    np.testing.assert_allclose([every_y.mean(), every_y.std()], [0.0, 1.0], atol=1e-5)
    assert target_std == pytest.approx(target.std())  # the population std, as scikit-learn's StandardScaler
    assert abs(splits["train"][1].mean().item()) > 1e-4  # the training rows are not re-centred on themselves


def test_the_papers_split_refuses_a_test_split(compose):
    from runner.config import ConfigError, validate

    with pytest.raises(ConfigError, match=r"task.test_fraction must be 0 with split=randperm.*got 0.1"):
        validate(compose("task=california_housing", "task.split=randperm", "task.test_fraction=0.1"))
    with pytest.raises(ConfigError, match=r"task.standardise must be one of \['train', 'all'\], got 'rows'"):
        validate(compose("task=california_housing", "task.standardise=rows"))
