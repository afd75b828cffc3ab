"""Image classification with an MLP: the paper's MNIST experiment.

The whole data set lives on the device as tensors; a batch is an index
slice. The per-sample cross-entropy is the ``classification`` loss that an
envelope shapes. Per epoch: raw and shaped train loss (mean, std), envelope
statistics, validation loss and accuracy; the test split is evaluated once,
at the end, and never used for selection.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

import torch
import torch.nn.functional as F

from tasks.common import VWPRMonitor, adam, check, resolve_path
from tasks.supervised import build_mlp, fit

DATASETS = ("mnist", "fashion_mnist", "digits")
SUBSETS = ("train", "test")
OBJECTIVE = ("val/loss", "min")


@dataclass
class ClassificationConfig:
    name: str = "classification"
    dataset: str = "digits"
    data_dir: str = "${data_root}/mnist"
    download: bool = False
    subsets: List[str] = field(default_factory=lambda: ["train", "test"])
    train_size: int = 1200
    val_size: int = 300
    test_size: int = 297
    label_noise: float = 0.0
    hidden: List[int] = field(default_factory=lambda: [256])
    lr: float = 1e-3
    batch_size: int = 1000
    epochs: int = 20
    eval_batch_size: int = 10000


Config = ClassificationConfig


def loss_names(task_cfg) -> tuple[str, ...]:
    return ("classification",)


def validate(task_cfg) -> None:
    check(task_cfg.dataset in DATASETS, "dataset", f"must be one of {list(DATASETS)}", task_cfg.dataset)
    check(
        len(task_cfg.subsets) > 0 and all(s in SUBSETS for s in task_cfg.subsets),
        "subsets", f"must be a non-empty list drawn from {list(SUBSETS)}", list(task_cfg.subsets),
    )
    for key in ("train_size", "val_size", "batch_size", "epochs", "eval_batch_size"):
        check(task_cfg[key] > 0, key, "must be a positive integer", task_cfg[key])
    check(task_cfg.test_size >= 0, "test_size", "must be >= 0", task_cfg.test_size)
    check(0.0 <= task_cfg.label_noise < 1.0, "label_noise", "must lie in [0, 1)", task_cfg.label_noise)
    check(task_cfg.lr > 0, "lr", "must be > 0", task_cfg.lr)
    check(all(h > 0 for h in task_cfg.hidden), "hidden", "must be a list of positive layer widths", list(task_cfg.hidden))


@torch.no_grad()
def evaluate(model: torch.nn.Module, features: torch.Tensor, labels: torch.Tensor, batch_size: int) -> dict[str, float]:
    """Mean cross-entropy and accuracy over a split (one host sync)."""
    loss_sum = torch.zeros((), device=features.device)
    correct = torch.zeros((), device=features.device, dtype=torch.long)
    for start in range(0, len(features), batch_size):
        logits = model(features[start : start + batch_size])
        target = labels[start : start + batch_size]
        loss_sum += F.cross_entropy(logits, target, reduction="sum")
        correct += (logits.argmax(1) == target).sum()
    totals = torch.stack([loss_sum, correct.to(loss_sum.dtype)]).tolist()
    return {"loss": totals[0] / len(features), "accuracy": totals[1] / len(features)}


def load_splits(task_cfg, seed: int, device: torch.device) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    from tasks.datasets import load_classification_pool, split_indices, symmetric_label_noise

    pool = load_classification_pool(task_cfg.dataset, resolve_path(task_cfg.data_dir), list(task_cfg.subsets), task_cfg.download)
    try:
        index = split_indices(len(pool.labels), task_cfg.train_size, task_cfg.val_size, task_cfg.test_size, seed)
    except ValueError as error:
        raise ValueError(f"task.train_size/val_size/test_size: {error}") from None
    splits = {name: (pool.features[idx], pool.labels[idx]) for name, idx in index.items()}
    if task_cfg.label_noise > 0:
        x, y = splits["train"]
        splits["train"] = (x, symmetric_label_noise(y, task_cfg.label_noise, pool.num_classes, seed + 1))
    splits = {name: (x.to(device), y.to(device)) for name, (x, y) in splits.items()}
    splits["num_classes"] = pool.num_classes
    return splits


def per_sample_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, target, reduction="none")


def run(cfg, context) -> dict[str, float]:
    task_cfg, device = cfg.task, context.device
    data = load_splits(task_cfg, cfg.seed, device)
    train_x, _ = data["train"]
    model = build_mlp(train_x.shape[1], list(task_cfg.hidden), data["num_classes"]).to(device)
    optimizer = adam(model.parameters(), task_cfg.lr)

    def evaluate_val() -> dict[str, float]:
        val = evaluate(model, *data["val"], task_cfg.eval_batch_size)
        return {"val/loss": val["loss"], "val/accuracy": val["accuracy"]}

    fit(model, optimizer, context.envelopes["classification"], "classification", data["train"],
        per_sample_cross_entropy, evaluate_val, task_cfg.epochs, task_cfg.batch_size, cfg.seed, context.recorder,
        None if context.vwpr is None else VWPRMonitor(context.vwpr, model))
    if task_cfg.test_size == 0:
        return {}
    test = evaluate(model, *data["test"], task_cfg.eval_batch_size)
    return {"test_loss": test["loss"], "test_accuracy": test["accuracy"]}
