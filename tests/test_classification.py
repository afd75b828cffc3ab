"""The classification task through the job runner: determinism, failures, data options."""

import json
import math
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


def test_rare_classes_are_thinned_in_training_only(compose):
    from tasks.classification import load_splits

    clean = load_splits(compose("task.train_size=800").task, [0, 1], torch.device("cpu"))
    rare = load_splits(
        compose("task.train_size=800", "task.rare_classes=[3,7]", "task.rare_fraction=0.2").task,
        [0, 1],
        torch.device("cpu"),
    )
    for seed in range(2):
        before, after = clean["train"][1][seed], rare["train"][1][seed]
        assert len(after) == len(before)  # the same size: dropped examples replaced by other classes
        for c in (3, 7):
            assert (after == c).sum().item() == math.ceil(0.2 * (before == c).sum().item())
        assert torch.equal(clean["val"][1][seed], rare["val"][1][seed])


def test_thinned_training_indices_are_distinct_and_outside_validation():
    from tasks.datasets import split_indices, thin_classes

    labels = torch.arange(1000) % 10
    index = split_indices(1000, 500, 200, 100, seed=0, spare=True)
    train = thin_classes(index["train"], index["spare"], labels, [2], 0.5)
    assert len(train) == 500 and len(train.unique()) == 500
    assert not torch.isin(train, torch.cat([index["val"], index["test"]])).any()
    assert (labels[train] == 2).sum() == math.ceil(0.5 * (labels[index["train"]] == 2).sum().item())


def test_rare_class_accuracy_is_the_accuracy_on_those_classes(compose):
    from tasks.classification import evaluate
    from tasks.seed_batch import ModelGroup

    group = ModelGroup(lambda: torch.nn.Linear(4, 3), [0], torch.device("cpu"))
    x = torch.randn(1, 50, 4)
    predicted = group(x).argmax(-1)
    labels = torch.where(torch.arange(50) % 2 == 0, predicted[0], (predicted[0] + 1) % 3).unsqueeze(0)
    (result,) = evaluate(group, x, labels, 16, torch.tensor([1]))
    expected = ((predicted[0] == labels[0]) & (labels[0] == 1)).sum() / (labels[0] == 1).sum()
    assert result["rare_accuracy"] == pytest.approx(expected.item())
    assert result["accuracy"] == pytest.approx(0.5)


def test_rare_class_runs_report_rare_accuracy(compose, tmp_path):
    cfg = compose("task.epochs=2", "tensorboard=false", "task.train_size=800", "task.rare_classes=[3]")
    run_job(cfg, tmp_path, None, [], reraise=True)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert 0.0 <= rows[-1]["val_rare_accuracy"] <= 1.0
    assert 0.0 <= json.loads((tmp_path / "result.json").read_text())["final"]["test_rare_accuracy"] <= 1.0
    with pytest.raises(ValueError, match="only .* examples of other classes are outside the splits"):
        run_job(
            compose("task.rare_classes=[3]", "task.rare_fraction=0.01"),
            tmp_path / "x",
            None,
            [],
            reraise=True,
        )


def test_pixel_normalisation_feeds_normalised_pixels(compose):
    from runner.config import ConfigError, validate
    from tasks.classification import load_splits

    raw = load_splits(compose().task, [0], torch.device("cpu"))
    paper = load_splits(compose("task.pixel_normalisation=[0.1307,0.3081]").task, [0], torch.device("cpu"))
    for split in ("train", "val", "test"):
        torch.testing.assert_close(paper[split][0], (raw[split][0] - 0.1307) / 0.3081)
        assert torch.equal(paper[split][1], raw[split][1])
    with pytest.raises(ConfigError, match=r"task.pixel_normalisation must be null .* or \[mean, std\]"):
        validate(compose("task.pixel_normalisation=[0.1,0.0]"))
