"""Image classification with an MLP: the paper's MNIST experiment.

The whole data set lives on the device as tensors; a batch is an index
slice. The per-sample cross-entropy is the ``classification`` loss that an
envelope shapes. Per epoch: raw and shaped train loss (mean, std), envelope
statistics, validation loss and accuracy; the test split is evaluated once,
at the end, and never used for selection.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from tasks.common import ControlledLoss, Divergence, VWPRMonitor, check, check_optimizer, make_optimizer
from tasks.seed_batch import ModelGroup, seed_outcomes
from tasks.supervised import build_mlp, fit

DATASETS = ("mnist", "fashion_mnist", "digits", "cifar10")
NUM_CLASSES = 10  # in each of them
MODELS = ("mlp", "cnn")
AUX_LOSSES = ("confidence_penalty", "label_smoothing")
PROBE_SIZE = 500
SUBSETS = ("train", "test")
SEED_BATCH = True
OBJECTIVE = ("val/loss", "min")
# what a run records (file names; * any ending), for checking report.metric before training
METRICS = (
    "epoch",
    "val_loss",
    "val_accuracy",
    "val_rare_accuracy",
    "test_loss",
    "test_accuracy",
    "test_rare_accuracy",
    "train_*",
    "envelope_*",
    "vwpr_*",
    "controller_*",
    "monitor_*",
    "executor_*",
)


@dataclass
class ClassificationConfig:
    name: str = "classification"
    dataset: str = "digits"
    data_dir: str = "${data_root}/mnist"
    download: bool = False
    subsets: list[str] = field(default_factory=lambda: ["train", "test"])
    train_size: int = 1200
    val_size: int = 300
    test_size: int = 297
    label_noise: float = 0.0
    # [mean, std]: every pixel fed as (x - mean) / std, x in [0, 1] (the paper's MNIST code: [0.1307, 0.3081]);
    # null: raw [0, 1] pixels
    pixel_normalisation: list[float] | None = None
    # rare classes: of each, only rare_fraction of its training examples are kept, the rest replaced by
    # examples of the other classes (validation and test keep every class); val/rare_accuracy reports them
    rare_classes: list[int] = field(default_factory=list)
    rare_fraction: float = 0.1
    model: str = "mlp"
    hidden: list[int] = field(default_factory=lambda: [256])
    channels: list[int] = field(default_factory=lambda: [32, 64])
    lr: float = 1e-3
    optimizer: str = "adam"  # adam | sgd
    momentum: float = 0.9  # sgd's momentum (adam ignores it)
    batch_size: int = 1000
    epochs: int = 20
    eval_batch_size: int = 10000


Config = ClassificationConfig


def loss_names(task_cfg) -> tuple[str, ...]:
    return ("classification",)


def data_files(task_cfg) -> list:
    """The files this task reads ([] for scikit-learn's bundled digits); with ``download``, fetched first."""
    from tasks.datasets import task_files

    return task_files(task_cfg)


def check_data(task_cfg) -> None:
    """Read the data once, so that an unreadable file or splits larger than the data fail before a sweep starts."""
    from tasks.datasets import check_task_sizes

    check_task_sizes(task_cfg, task_cfg.train_size)


def validate(task_cfg) -> None:
    check_optimizer(task_cfg)
    check(task_cfg.dataset in DATASETS, "dataset", f"must be one of {list(DATASETS)}", task_cfg.dataset)
    check(
        len(task_cfg.subsets) > 0 and all(s in SUBSETS for s in task_cfg.subsets),
        "subsets",
        f"must be a non-empty list drawn from {list(SUBSETS)}",
        list(task_cfg.subsets),
    )
    for key in ("train_size", "val_size", "batch_size", "epochs", "eval_batch_size"):
        check(task_cfg[key] > 0, key, "must be a positive integer", task_cfg[key])
    check(task_cfg.test_size >= 0, "test_size", "must be >= 0", task_cfg.test_size)
    check(0.0 <= task_cfg.label_noise < 1.0, "label_noise", "must lie in [0, 1)", task_cfg.label_noise)
    norm = task_cfg.pixel_normalisation
    check(
        norm is None or (len(norm) == 2 and norm[1] > 0),
        "pixel_normalisation",
        "must be null (raw [0, 1] pixels) or [mean, std] with std > 0, e.g. [0.1307, 0.3081]",
        None if norm is None else list(norm),
    )
    rare = list(task_cfg.rare_classes)
    check(
        all(isinstance(c, int) and 0 <= c < NUM_CLASSES for c in rare) and len(set(rare)) == len(rare),
        "rare_classes",
        f"must be a list of distinct classes (integers 0 to {NUM_CLASSES - 1})",
        rare,
    )
    check(0.0 < task_cfg.rare_fraction <= 1.0, "rare_fraction", "must lie in (0, 1]", task_cfg.rare_fraction)
    check(
        all(h > 0 for h in task_cfg.hidden), "hidden", "must be a list of positive layer widths", list(task_cfg.hidden)
    )
    check(task_cfg.model in MODELS, "model", f"must be one of {list(MODELS)}", task_cfg.model)
    check(
        len(task_cfg.channels) > 0 and all(c > 0 for c in task_cfg.channels),
        "channels",
        "must be a non-empty list of positive channel counts (one per conv block)",
        list(task_cfg.channels),
    )


@torch.no_grad()
def evaluate(
    group: ModelGroup,
    features: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int,
    rare_classes: torch.Tensor | None = None,
) -> list[dict[str, float]]:
    """Per seed: mean cross-entropy and accuracy over a split ((S, n, ...) features; one host sync).

    With ``rare_classes`` (a tensor of class indices), also ``rare_accuracy``:
    the accuracy over the examples of those classes.
    """
    seeds, n = labels.shape
    loss_sum = torch.zeros(seeds, device=features.device)
    correct = torch.zeros(seeds, device=features.device)
    rare_correct = torch.zeros(seeds, device=features.device)
    rare_count = torch.zeros(seeds, device=features.device)
    for start in range(0, n, batch_size):
        logits = group(features[:, start : start + batch_size])
        target = labels[:, start : start + batch_size]
        loss_sum += per_sample_cross_entropy(logits, target).sum(-1)
        hit = logits.argmax(-1) == target
        correct += hit.sum(-1)
        if rare_classes is not None:
            rare = torch.isin(target, rare_classes)
            rare_correct += (hit & rare).sum(-1)
            rare_count += rare.sum(-1)
    columns = [loss_sum / n, correct / n]
    if rare_classes is not None:
        columns.append(rare_correct / rare_count.clamp(min=1))
    names = ("loss", "accuracy", "rare_accuracy")
    return [dict(zip(names, row)) for row in torch.stack(columns, dim=1).tolist()]


def load_splits(task_cfg, seeds: list[int], device: torch.device) -> dict:
    """Each split as (S, n, ...) features and (S, n) labels: per seed its own train/val draw and label noise.

    Runs of the same seed share one copy (:class:`~tasks.seed_batch.PerRun`)."""
    from tasks.datasets import split_indices, symmetric_label_noise, task_pool, thin_classes
    from tasks.seed_batch import check_batch_memory, per_run

    pool = task_pool(task_cfg)
    if task_cfg.pixel_normalisation is not None:
        mean, std = task_cfg.pixel_normalisation
        pool.features = (pool.features - mean) / std
    sizes = task_cfg.train_size + task_cfg.val_size + task_cfg.test_size
    per_example = pool.features[0].numel() * pool.features.element_size() + pool.labels.element_size()
    distinct = list(dict.fromkeys(seeds))  # runs of one seed (differing in envelopes) share their splits
    check_batch_memory(len(distinct), sizes * per_example, device, "the data (train, val and test splits)")
    per_seed = []
    for seed in distinct:
        try:
            index = split_indices(
                len(pool.labels), task_cfg.train_size, task_cfg.val_size, task_cfg.test_size, seed, spare=True
            )
        except ValueError as error:
            raise ValueError(f"task.train_size/val_size/test_size: {error}") from None
        spare = index.pop("spare")
        if task_cfg.rare_classes:
            rare = list(task_cfg.rare_classes)
            index["train"] = thin_classes(index["train"], spare, pool.labels, rare, task_cfg.rare_fraction)
        splits = {name: (pool.features[idx], pool.labels[idx]) for name, idx in index.items()}
        if task_cfg.label_noise > 0:
            x, y = splits["train"]
            splits["train"] = (x, symmetric_label_noise(y, task_cfg.label_noise, pool.num_classes, seed + 1))
        per_seed.append(splits)
    position = {seed: i for i, seed in enumerate(distinct)}
    out: dict = {
        name: tuple(per_run([per_seed[position[seed]][name][i].to(device) for seed in seeds], seeds) for i in range(2))
        for name in per_seed[0]
    }
    out["num_classes"] = pool.num_classes
    out["image_shape"] = pool.image_shape
    return out


def per_sample_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy per sample for logits (..., classes) and targets (...)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none").reshape(
        target.shape
    )


def aux_losses(logits: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """Auxiliary losses per sample, for the loss controller.

    ``confidence_penalty``: the negative entropy of the prediction (Pereyra et
    al. 2017), lowest for a uniform prediction. ``label_smoothing``: the
    cross-entropy against the uniform distribution; ``CE + w * it`` is
    label smoothing's loss up to scale.
    """
    log_p = torch.log_softmax(logits, dim=-1)
    return {"confidence_penalty": (log_p.exp() * log_p).sum(-1), "label_smoothing": -log_p.mean(-1)}


def build_cnn(image_shape: tuple[int, int, int], channels: list[int], num_classes: int) -> torch.nn.Sequential:
    """Conv blocks (3x3 conv, ReLU, 2x2 max-pool) and a linear head, on flattened images."""
    c, h, w = image_shape
    layers: list[torch.nn.Module] = [torch.nn.Unflatten(-1, (c, h, w))]
    for out in channels:
        layers += [torch.nn.Conv2d(c, out, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2)]
        c, h, w = out, h // 2, w // 2
    layers += [torch.nn.Flatten(-3), torch.nn.Linear(c * h * w, num_classes)]
    return torch.nn.Sequential(*layers)


def run(cfg, context) -> list[dict[str, float] | Exception]:
    task_cfg, device, seeds = cfg.task, context.device, context.seeds
    data = load_splits(task_cfg, seeds, device)
    train_x, _ = data["train"]
    if task_cfg.model == "cnn":
        side = min(data["image_shape"][1:])
        if side < 2 ** len(task_cfg.channels):
            raise ValueError(
                f"task.channels: {len(task_cfg.channels)} conv blocks halve {side}-pixel images to nothing"
            )
        build = lambda: build_cnn(data["image_shape"], list(task_cfg.channels), data["num_classes"])  # noqa: E731
    else:
        build = lambda: build_mlp(train_x.shape[-1], list(task_cfg.hidden), data["num_classes"])  # noqa: E731
    group = ModelGroup(build, seeds, device)
    optimizer = make_optimizer(group.parameters(), task_cfg)
    controlled = None
    if context.controller is not None:
        probe_x, probe_y = data["val"][0][:, :PROBE_SIZE], data["val"][1][:, :PROBE_SIZE]

        def probe() -> float:
            with torch.no_grad():
                return per_sample_cross_entropy(group(probe_x), probe_y).mean().item()

        steps = task_cfg.epochs * -(-train_x.shape[1] // task_cfg.batch_size)
        controlled = ControlledLoss(cfg, context, aux_losses, AUX_LOSSES, "val/loss", probe, group.parameters(), steps)

    rare = torch.tensor(list(task_cfg.rare_classes), device=device) if task_cfg.rare_classes else None

    def evaluate_val() -> list[dict[str, float]]:
        return [
            {f"val/{name}": value for name, value in val.items()}
            for val in evaluate(group, *data["val"], task_cfg.eval_batch_size, rare)
        ]

    failed = fit(
        group,
        optimizer,
        context.envelope("classification"),
        "classification",
        data["train"],
        per_sample_cross_entropy,
        evaluate_val,
        task_cfg.epochs,
        task_cfg.batch_size,
        seeds,
        context.recorders,
        None if context.vwpr is None else VWPRMonitor(context.vwpr, group.module),
        controlled,
        Divergence(OBJECTIVE[0], cfg.divergence_factor),
    )
    if task_cfg.test_size == 0:
        tests = [{} for _ in seeds]
    else:
        tests = [
            {f"test_{name}": value for name, value in test.items()}
            for test in evaluate(group, *data["test"], task_cfg.eval_batch_size, rare)
        ]
    return seed_outcomes(tests, failed)
