"""The classification task through the job runner: determinism, failures, data options."""

import json
from pathlib import Path

import pytest
import torch

from runner.job import run_job
from tests.conftest import SHARED_DATA, needs_mnist


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_same_config_and_seed_give_bit_identical_metrics(compose, tmp_path):
    overrides = ("envelope@envelopes.classification=sigmoid", "task.epochs=3", "tensorboard=false", "device=cpu")
    first = run_job(compose(*overrides), tmp_path / "a", None, list(overrides), reraise=True)
    second = run_job(compose(*overrides), tmp_path / "b", None, list(overrides), reraise=True)
    assert first == second
    assert (tmp_path / "a" / "metrics.jsonl").read_bytes() == (tmp_path / "b" / "metrics.jsonl").read_bytes()
    other_seed = run_job(compose(*overrides, "seed=1"), tmp_path / "c", None, [], reraise=True)
    assert other_seed != first


def test_envelope_changes_training(compose, tmp_path):
    identity = run_job(compose("task.epochs=2", "tensorboard=false"), tmp_path / "a", None, [], reraise=True)
    step = run_job(
        compose(
            "task.epochs=2",
            "tensorboard=false",
            "envelope@envelopes.classification=step",
            "envelopes.classification.quantile=0.5",
            "envelopes.classification.step_size=1",
        ),
        tmp_path / "b",
        None,
        [],
        reraise=True,
    )
    assert identity != step
    rows = read_lines(tmp_path / "b" / "metrics.jsonl")
    assert rows[-1]["envelope_classification_mean_weight"] == pytest.approx(0.5, abs=0.05)
    assert rows[-1]["envelope_classification_fraction_attenuated"] == pytest.approx(0.5, abs=0.05)
    assert rows[-1]["train_shaped_loss_mean"] < rows[-1]["train_raw_loss_mean"]


def test_non_finite_loss_fails_with_reason(compose, tmp_path):
    with pytest.raises(RuntimeError, match="diverged at epoch 1: train/raw_loss_mean is nan"):
        run_job(compose("task.lr=1e30", "task.epochs=3", "tensorboard=false"), tmp_path, None, [], reraise=True)
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["status"] == "failed"
    assert result["error"] == "DivergedError: diverged at epoch 1: train/raw_loss_mean is nan"


def test_in_a_sweep_a_failure_is_recorded_not_raised(compose, tmp_path):
    value = run_job(compose("task.lr=1e30", "tensorboard=false"), tmp_path, tmp_path, [], reraise=False)
    assert value != value  # NaN
    assert json.loads((tmp_path / "result.json").read_text())["status"] == "failed"


@needs_mnist
def test_mnist_test_split_preset_trains_and_reports_test_metrics(compose, tmp_path):
    cfg = compose(
        "task=mnist_test_split",
        f"data_root={SHARED_DATA}",
        "task.epochs=2",
        "tensorboard=false",
        "task.train_size=2000",
        "task.val_size=500",
        "task.test_size=500",
        "task.batch_size=100",
    )
    run_job(cfg, tmp_path, None, [], reraise=True)
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["status"] == "completed"
    assert result["final"]["val_accuracy"] > 0.7
    assert 0.7 < result["final"]["test_accuracy"] <= 1.0


def test_missing_data_fails_before_training(compose, tmp_path):
    with pytest.raises(FileNotFoundError, match="task.download=true"):
        run_job(compose("task=mnist", f"data_root={tmp_path}"), tmp_path / "job", None, [], reraise=True)
    assert not (tmp_path / "job" / "metrics.jsonl").exists()


def test_label_noise_is_applied_to_training_labels_only(compose):
    from tasks.classification import load_splits

    clean = load_splits(compose().task, [0], torch.device("cpu"))
    noisy = load_splits(compose("task.label_noise=0.4").task, [0], torch.device("cpu"))
    assert torch.equal(clean["train"][0], noisy["train"][0])
    flipped = (clean["train"][1] != noisy["train"][1]).float().mean().item()
    assert flipped == pytest.approx(0.4, abs=0.05)
    assert torch.equal(clean["val"][1], noisy["val"][1]) and torch.equal(clean["test"][1], noisy["test"][1])
