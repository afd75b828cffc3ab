"""Variational autoencoder on binarised MNIST: over-parameterised and drifting settings.

Losses an envelope can shape, each element-wise:

- ``recon``: binary cross-entropy per pixel, shape (batch, 784);
- ``prior``: KL(q(z|x) || N(0, I)) per latent dimension, shape (batch, latent);
- ``total``: each sample's loss, the sum of its (shaped) recon and
  ``kl_weight`` times its (shaped) prior; its envelope scales that sample's
  contribution.

Baselines in the same runner: free bits (``free_bits = λ``: each KL element
replaced by ``max(KL, λ)``) and KL annealing (the KL weight rises linearly
from 0 to 1 over ``kl_annealing_steps`` optimiser steps).

Settings: ``overparameterised`` trains on ``train_size`` images (200 in the
paper) for a few epochs; ``drift`` resamples the training set each epoch,
with replacement, under class weights that move sinusoidally with the epoch,
and reports validation on the static, current and cumulative distributions.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from tasks.common import (
    ControlledLoss,
    Divergence,
    EnvelopeMeter,
    MeanStd,
    VWPRMonitor,
    check,
    check_optimizer,
    make_optimizer,
    optimise,
)
from tasks.seed_batch import ModelGroup, generators, normal, seed_outcomes, stack_seeds, take
from tasks.supervised import batches, run_epochs

SEED_BATCH = True
OBJECTIVE = ("val/recon", "min")
# what a run records (file names; * any ending), for checking report.metric before training
METRICS = (
    "epoch",
    "val_recon",
    "val_recon_current",
    "val_recon_cumulative",
    "val_kl",
    "val_kl_dim_*",
    "val_elbo",
    "val_neg_elbo",
    "val_effective_rank",
    "val_active_units",
    "test_recon",
    "test_kl",
    "test_elbo",
    "train_*",
    "envelope_*",
    "drift_*",
    "vwpr_*",
    "controller_*",
    "monitor_*",
    "executor_*",
)
AUX_LOSSES = ("kl",)  # for the loss controller: its weight is the KL weight
PROBE_SIZE = 500
SETTINGS = ("overparameterised", "drift")
SPLITS = ("random", "fixed")
IMAGE_SIDE = 28
EVAL_CHUNK = 500


@dataclass
class VAEConfig:
    name: str = "vae"
    setting: str = "overparameterised"
    dataset: str = "mnist"
    data_dir: str = "${data_root}/mnist"
    download: bool = False
    subsets: list[str] = field(default_factory=lambda: ["test"])
    train_size: int = 200
    val_size: int = 2000
    test_size: int = 0
    # random: train and validation images drawn per seed | fixed: the paper's code, the pool's first train_size
    # images for training (the drift setting's pool: drift_pool_size) and images val_start .. val_start + val_size
    # for validation, the same for every seed
    split: str = "random"
    val_start: int = 1000
    latent_dim: int = 8
    hidden: list[int] = field(default_factory=lambda: [800, 400])
    lr: float = 1e-3
    optimizer: str = "adam"  # adam | sgd
    momentum: float = 0.9  # sgd's momentum (adam ignores it)
    batch_size: int = 50
    epochs: int = 10
    free_bits: float | None = None
    kl_annealing_steps: int = 0
    active_unit_threshold: float = 0.01
    # drift setting: per epoch, train_size images drawn with replacement from a pool of drift_pool_size
    drift_pool_size: int = 6000
    drift_frequency: float = 0.1
    drift_amplitude: float = 0.8
    drift_spread: float = 0.3


Config = VAEConfig


def loss_names(task_cfg) -> tuple[str, ...]:
    return ("recon", "prior", "total")


def data_files(task_cfg) -> list:
    """The files this task reads ([] for scikit-learn's bundled digits); with ``download``, fetched first."""
    from tasks.datasets import task_files

    return task_files(task_cfg)


def check_data(task_cfg) -> None:
    """Read the data once, so that an unreadable file or splits larger than the data fail before a sweep starts."""
    from tasks.common import resolve_path
    from tasks.datasets import check_task_sizes, pool_size

    train_size = training_pool(task_cfg)
    check_task_sizes(task_cfg, train_size)
    if task_cfg.split == "fixed":
        size = pool_size(
            task_cfg.dataset, str(resolve_path(task_cfg.data_dir)), tuple(task_cfg.subsets), task_cfg.download
        )
        end = task_cfg.val_start + task_cfg.val_size
        check(
            end <= size - task_cfg.test_size,
            "val_start",
            f"+ val_size must fit in the {size - task_cfg.test_size} images left after test_size (split=fixed)",
            end,
        )


def training_pool(task_cfg) -> int:
    """How many images the training split holds: the drift setting's pool it resamples from, else train_size."""
    return task_cfg.drift_pool_size if task_cfg.setting == "drift" else task_cfg.train_size


def validate(task_cfg) -> None:
    check_optimizer(task_cfg)
    check(task_cfg.setting in SETTINGS, "setting", f"must be one of {list(SETTINGS)}", task_cfg.setting)
    check(
        task_cfg.dataset in ("mnist", "fashion_mnist"),
        "dataset",
        "must be one of ['mnist', 'fashion_mnist']",
        task_cfg.dataset,
    )
    for key in ("train_size", "val_size", "latent_dim", "batch_size", "epochs", "drift_pool_size"):
        check(task_cfg[key] > 0, key, "must be a positive integer", task_cfg[key])
    check(task_cfg.test_size >= 0, "test_size", "must be >= 0", task_cfg.test_size)
    check(task_cfg.split in SPLITS, "split", f"must be one of {list(SPLITS)}", task_cfg.split)
    train_size = training_pool(task_cfg)
    check(
        task_cfg.split == "random" or task_cfg.val_start >= train_size,
        "val_start",
        f"must be >= the {train_size} training images with split=fixed (validation after them)",
        task_cfg.val_start,
    )
    check(
        task_cfg.free_bits is None or task_cfg.free_bits >= 0, "free_bits", "must be null or >= 0", task_cfg.free_bits
    )
    check(
        task_cfg.kl_annealing_steps >= 0,
        "kl_annealing_steps",
        "must be >= 0 (0: no annealing)",
        task_cfg.kl_annealing_steps,
    )
    check(task_cfg.drift_frequency >= 0, "drift_frequency", "must be >= 0 (cycles per epoch)", task_cfg.drift_frequency)
    check(task_cfg.drift_amplitude >= 0, "drift_amplitude", "must be >= 0", task_cfg.drift_amplitude)
    check(task_cfg.drift_spread >= 0, "drift_spread", "must be >= 0", task_cfg.drift_spread)
    check(task_cfg.active_unit_threshold > 0, "active_unit_threshold", "must be > 0", task_cfg.active_unit_threshold)


class VAE(nn.Module):
    """MLP encoder (784-800-400, ReLU) with mean and log-variance heads; decoder 400-800-784.

    The decoder returns logits; the pixel probabilities are their sigmoid,
    and the BCE is computed from logits for numerical stability.
    """

    def __init__(self, in_features: int, hidden: list[int], latent_dim: int):
        super().__init__()
        layers, width = [], in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        self.encoder = nn.Sequential(*layers)
        self.mean = nn.Linear(width, latent_dim)
        self.log_variance = nn.Linear(width, latent_dim)
        layers, width = [], latent_dim
        for h in reversed(hidden):
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, in_features))
        self.decoder = nn.Sequential(*layers)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(x)
        return self.mean(h), self.log_variance(h)

    def forward(
        self, x: torch.Tensor, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Decoder logits, posterior mean and log-variance; ``z = mean + noise * std`` (``z = mean`` without noise)."""
        mean, log_variance = self.encode(x)
        z = mean if noise is None else mean + noise * (0.5 * log_variance).exp()
        return self.decoder(z), mean, log_variance


def elementwise_losses(
    model, x: torch.Tensor, noise: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pixel BCE (..., 784), per-dimension KL (..., latent), and the posterior means.

    ``model`` is a :class:`VAE` or a :class:`~tasks.seed_batch.ModelGroup` of them
    (inputs with a leading seed dimension); ``noise`` is the reparameterisation
    noise (None: decode the posterior mean).
    """
    logits, mean, log_variance = model(x, noise)
    recon = F.binary_cross_entropy_with_logits(logits, x, reduction="none")
    kl = 0.5 * (mean.square() + log_variance.exp() - 1.0 - log_variance)
    return recon, kl, mean


def vae_loss(
    recon: torch.Tensor, kl: torch.Tensor, envelopes: dict, kl_weight: float, free_bits: float | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The training loss and its parts: (loss, shaped recon, shaped prior, per-sample total).

    The loss is the mean over the batch (the last dimension of the per-sample
    totals): one value per seed when the losses have a leading seed dimension.
    """
    if free_bits is not None:
        kl = kl.clamp_min(free_bits)
    shaped_recon = envelopes["recon"](recon)
    shaped_prior = envelopes["prior"](kl)
    per_sample = shaped_recon.sum(-1) + kl_weight * shaped_prior.sum(-1)
    return envelopes["total"](per_sample).mean(-1), shaped_recon, shaped_prior, per_sample


def effective_rank(means: torch.Tensor) -> torch.Tensor:
    """exp of the entropy of the normalised eigenvalue spectrum of the latent means' covariance.

    ``means`` is (n, latent), or (..., n, latent) for one rank per leading index.
    """
    centred = means - means.mean(-2, keepdim=True)
    covariance = centred.mT @ centred / max(means.shape[-2] - 1, 1)
    eigenvalues = torch.linalg.eigvalsh(covariance.double()).clamp_min(0)
    p = eigenvalues / eigenvalues.sum(-1, keepdim=True).clamp_min(1e-300)
    entropy = -(p * torch.log(p.clamp_min(1e-300))).sum(-1)
    return entropy.exp()


def class_weights(
    epoch: int, phase: torch.Tensor, shift: torch.Tensor, amplitude: float, frequency: float
) -> torch.Tensor:
    """Sampling weight of each class at an epoch (normalised to sum to 1 along the last dimension)."""
    raw = (1.0 + shift + amplitude * torch.sin(2 * math.pi * frequency * epoch + phase)).clamp_min(1e-3)
    return raw / raw.sum(-1, keepdim=True)


@torch.no_grad()
def evaluate(model, x: torch.Tensor, threshold: float) -> tuple[list[dict[str, float]], torch.Tensor]:
    """Validation metrics per seed (z = posterior mean; ``x`` is (S, n, 784)) and the per-sample summed BCE (S, n).

    Images go through in chunks of :data:`EVAL_CHUNK`: activations that fit in
    the cache made this 30% faster on CPU than one pass over 2,000 images.
    """
    recon_parts, kl_parts, mean_parts = [], [], []
    for start in range(0, x.shape[1], EVAL_CHUNK):
        recon, kl, mean = elementwise_losses(model, x[:, start : start + EVAL_CHUNK])
        recon_parts.append(recon.sum(-1))
        kl_parts.append(kl)
        mean_parts.append(mean)
    recon_per_sample, kl, mean = torch.cat(recon_parts, 1), torch.cat(kl_parts, 1), torch.cat(mean_parts, 1)
    kl_per_dim = kl.mean(1)
    columns = torch.cat(
        [
            recon_per_sample.mean(1, keepdim=True),
            kl_per_dim.sum(1, keepdim=True),
            effective_rank(mean).unsqueeze(1).to(kl.dtype),
            (mean.var(1) > threshold).sum(1, keepdim=True).to(kl.dtype),
            kl_per_dim,
        ],
        dim=1,
    ).tolist()  # one host sync for every seed
    out = []
    for recon_mean, kl_total, rank, active, *per_dim in columns:
        metrics = {
            "val/recon": recon_mean,
            "val/kl": kl_total,
            "val/effective_rank": rank,
            "val/active_units": active,
            "val/elbo": -(recon_mean + kl_total),
        }
        metrics.update({f"val/kl_dim_{d}": v for d, v in enumerate(per_dim)})
        out.append(metrics)
    return out, recon_per_sample


def load_data(task_cfg, seed: int, device: torch.device) -> dict[str, torch.Tensor]:
    from tasks.datasets import split_indices, task_pool

    pool = task_pool(task_cfg)
    train_size = training_pool(task_cfg)
    try:
        index = split_indices(len(pool.labels), train_size, task_cfg.val_size, task_cfg.test_size, seed)
        if task_cfg.split == "fixed":
            end = task_cfg.val_start + task_cfg.val_size
            if end > len(pool.labels) - task_cfg.test_size:
                raise ValueError(
                    f"val_start + val_size = {end} exceeds the {len(pool.labels) - task_cfg.test_size} images left "
                    f"after test_size = {task_cfg.test_size} (pool of {len(pool.labels)})"
                )
            index.update(train=torch.arange(train_size), val=torch.arange(task_cfg.val_start, end))
    except ValueError as error:
        raise ValueError(f"task.train_size/val_size/test_size/drift_pool_size/val_start: {error}") from None
    binary = (pool.features > 0.5).float()
    out = {}
    for name, idx in index.items():
        out[f"{name}_x"] = binary[idx].to(device)
        out[f"{name}_y"] = pool.labels[idx].to(device)
    return out


class Drift:
    """The drift setting: each epoch's training images drawn by class weights that drift (``class_weights``),
    and the validation loss reweighted to the current and the cumulative class distribution.

    Each seed's drift is its own (phases and shifts drawn from ``seed + 7``).
    """

    def __init__(self, task_cfg, seeds: list[int], data: dict[str, torch.Tensor], device: torch.device):
        self.task_cfg, self.device = task_cfg, device
        phase, shift = [], []
        for seed in seeds:
            draw = torch.Generator().manual_seed(seed + 7)
            phase.append(torch.rand(10, generator=draw) * 2 * math.pi)
            shift.append((torch.rand(10, generator=draw) * 2 - 1) * task_cfg.drift_spread)
        self.phase, self.shift = torch.stack(phase), torch.stack(shift)
        self.cumulative = torch.zeros(len(seeds), 10)
        counts = torch.stack([torch.bincount(y, minlength=10) for y in data["val_y"]])
        self.val_class_counts = counts.clamp_min(1).to(device)
        self.weights: torch.Tensor | None = None

    def sample(self, epoch: int, data: dict[str, torch.Tensor], gens: list[torch.Generator]) -> torch.Tensor:
        """This epoch's training images (seeds, train_size, ...), drawn with replacement by class weight."""
        cfg = self.task_cfg
        self.weights = class_weights(epoch, self.phase, self.shift, cfg.drift_amplitude, cfg.drift_frequency)
        self.cumulative += self.weights
        per_image = self.weights.to(self.device).gather(1, data["train_y"])
        index = torch.stack(
            [torch.multinomial(p, cfg.train_size, replacement=True, generator=g) for p, g in zip(per_image, gens)]
        )
        return take(data["train_x"], index)

    def add_metrics(self, val: list[dict[str, float]], recon_per_sample: torch.Tensor, val_y: torch.Tensor) -> None:
        """Each seed's validation reconstruction under this epoch's and the cumulative class distribution, and
        the class weights (nothing before the first epoch)."""
        if self.weights is None:
            return
        # reweight validation images so that each class carries its weight under this distribution
        reweighted = {}
        cumulative = self.cumulative / self.cumulative.sum(1, keepdim=True)
        for label, dist in (("current", self.weights), ("cumulative", cumulative)):
            per_image = (dist.to(self.device) / self.val_class_counts).gather(1, val_y)
            reweighted[label] = ((per_image * recon_per_sample).sum(1) / per_image.sum(1)).tolist()
        for s, metrics in enumerate(val):
            metrics.update({f"val/recon_{label}": values[s] for label, values in reweighted.items()})
            metrics.update({f"drift/class_weight_{c}": w for c, w in enumerate(self.weights[s].tolist())})


def controlled_loss(cfg, context, group: ModelGroup, val_x: torch.Tensor) -> ControlledLoss:
    """The loss controller of a VAE run, its probe the negative ELBO of a fixed held-out batch."""
    task_cfg = cfg.task
    probe_x = val_x[:, :PROBE_SIZE]

    def probe() -> float:
        with torch.no_grad():
            recon, kl, _ = elementwise_losses(group, probe_x)
            return (recon.sum(-1) + kl.sum(-1)).mean().item()

    steps = task_cfg.epochs * -(-task_cfg.train_size // task_cfg.batch_size)
    return ControlledLoss(cfg, context, None, AUX_LOSSES, "val/neg_elbo", probe, group.parameters(), steps)


def epoch_summary(meters: dict, envelope_meters: dict, kl_weight: float) -> Callable[[int], dict[str, float]]:
    """Seed ``s``'s training metrics of an epoch: the losses' statistics, the KL weight, the envelopes'."""

    def seed_metrics(s: int) -> dict[str, float]:
        metrics = {}
        for name, meter in meters.items():
            metrics.update(meter.summary(f"train/{name}", s))
        metrics["train/kl_weight"] = kl_weight
        metrics["train/samples"] = meters["total"].count
        for name, meter in envelope_meters.items():
            metrics.update(meter.summary(f"envelope/{name}", s))
        return metrics

    return seed_metrics


def test_metrics(group: ModelGroup, data: dict[str, torch.Tensor], task_cfg, n_seeds: int) -> list[dict[str, float]]:
    """Each seed's reconstruction, KL and ELBO on its test split, evaluated once (none without one)."""
    if task_cfg.test_size == 0:
        return [{} for _ in range(n_seeds)]
    test, _ = evaluate(group, data["test_x"], task_cfg.active_unit_threshold)
    return [{"test_recon": t["val/recon"], "test_kl": t["val/kl"], "test_elbo": t["val/elbo"]} for t in test]


def run(cfg, context) -> list[dict[str, float] | Exception]:
    task_cfg, device, recorders, seeds = cfg.task, context.device, context.recorders, context.seeds
    n_seeds = len(seeds)
    data = stack_seeds([load_data(task_cfg, seed, device) for seed in seeds])
    envelopes = {name: context.envelope(name) for name in context.envelopes}
    group = ModelGroup(
        lambda: VAE(data["train_x"].shape[-1], list(task_cfg.hidden), task_cfg.latent_dim), seeds, device
    )
    optimizer = make_optimizer(group.parameters(), task_cfg)
    gens = generators(seeds, device)
    vwpr = None if context.vwpr is None else VWPRMonitor(context.vwpr, group.module)

    drift = Drift(task_cfg, seeds, data, device) if task_cfg.setting == "drift" else None
    controlled = controlled_loss(cfg, context, group, data["val_x"]) if context.controller is not None else None
    step, kl_weight = 0, 1.0

    def train_epoch(epoch: int) -> Callable[[int], dict[str, float]]:
        nonlocal step, kl_weight
        train_x = data["train_x"] if drift is None else drift.sample(epoch, data, gens)
        meters = {name: MeanStd(device, n_seeds) for name in ("recon", "prior", "total")}
        envelope_meters = {name: EnvelopeMeter(envelopes[name], device) for name in loss_names(task_cfg)}
        for index in batches(train_x.shape[1], task_cfg.batch_size, gens, device):
            x = take(train_x, index)
            step += 1
            kl_weight = min(1.0, step / task_cfg.kl_annealing_steps) if task_cfg.kl_annealing_steps else 1.0
            if controlled is not None:
                kl_weight = controlled.controller.weights["kl"]
            recon, kl, _ = elementwise_losses(group, x, normal((x.shape[1], task_cfg.latent_dim), gens, device))
            loss, shaped_recon, _, per_sample = vae_loss(recon, kl, envelopes, kl_weight, task_cfg.free_bits)
            loss = loss.sum()
            if controlled is not None:  # the base loss: reconstruction alone
                base = shaped_recon.sum(-1).mean()
                loss = controlled.controller.guard(loss, base)
            optimise(loss, optimizer, None if vwpr is None else vwpr.vwpr)
            if controlled is not None:
                controlled.controller.after_step(base)
            meters["recon"].add(recon.detach().sum(-1))
            meters["prior"].add(kl.detach().sum(-1))
            meters["total"].add(per_sample)
            for meter in envelope_meters.values():
                meter.add()

        return epoch_summary(meters, envelope_meters, kl_weight)

    def evaluate_val() -> list[dict[str, float]]:
        val, recon_per_sample = evaluate(group, data["val_x"], task_cfg.active_unit_threshold)
        if drift is not None:
            drift.add_metrics(val, recon_per_sample, data["val_y"])
        return val

    failed = run_epochs(
        task_cfg.epochs,
        train_epoch,
        evaluate_val,
        recorders,
        Divergence(OBJECTIVE[0], cfg.divergence_factor),
        vwpr,
        controlled,
        control_value=lambda val: -val[0]["val/elbo"],
        postfix=lambda val: {"val_recon": f"{val[0]['val/recon']:.2f}", "kl": f"{val[0]['val/kl']:.2f}"},
    )
    for s, recorder in enumerate(recorders):
        if recorder.writer is not None and s not in failed:
            log_images(group.model(s), data["val_x"][s], gens[s], task_cfg, recorder.writer)
    return seed_outcomes(test_metrics(group, data, task_cfg, len(seeds)), failed)


@torch.no_grad()
def log_images(model: VAE, val_x: torch.Tensor, generator: torch.Generator, task_cfg, writer) -> None:
    """A grid of 16 validation images above their reconstructions, and one of 32 samples from the prior.

    TensorBoard's ``add_images`` tiles each batch (N, 1, 28, 28) into one image.
    """
    shown = val_x[:16]
    logits, _, _ = model(shown)
    pairs = torch.cat([shown, torch.sigmoid(logits)]).reshape(-1, 1, IMAGE_SIDE, IMAGE_SIDE)
    writer.add_images("images/reconstructions", pairs.cpu(), task_cfg.epochs)
    noise = torch.randn(32, task_cfg.latent_dim, device=val_x.device, generator=generator)
    samples = torch.sigmoid(model.decoder(noise)).reshape(-1, 1, IMAGE_SIDE, IMAGE_SIDE)
    writer.add_images("images/samples", samples.cpu(), task_cfg.epochs)
