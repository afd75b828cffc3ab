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
from dataclasses import dataclass, field
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from tasks.common import EnvelopeMeter, MeanStd, NonFiniteLossError, VWPRMonitor, adam, check, resolve_path

OBJECTIVE = ("val/recon", "min")
SETTINGS = ("overparameterised", "drift")
IMAGE_SIDE = 28


@dataclass
class VAEConfig:
    name: str = "vae"
    setting: str = "overparameterised"
    dataset: str = "mnist"
    data_dir: str = "${data_root}/mnist"
    download: bool = False
    subsets: List[str] = field(default_factory=lambda: ["test"])
    train_size: int = 200
    val_size: int = 2000
    test_size: int = 0
    latent_dim: int = 8
    hidden: List[int] = field(default_factory=lambda: [800, 400])
    lr: float = 1e-3
    batch_size: int = 50
    epochs: int = 10
    free_bits: Optional[float] = None
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


def validate(task_cfg) -> None:
    check(task_cfg.setting in SETTINGS, "setting", f"must be one of {list(SETTINGS)}", task_cfg.setting)
    check(task_cfg.dataset in ("mnist", "fashion_mnist"), "dataset", "must be one of ['mnist', 'fashion_mnist']", task_cfg.dataset)
    for key in ("train_size", "val_size", "latent_dim", "batch_size", "epochs", "drift_pool_size"):
        check(task_cfg[key] > 0, key, "must be a positive integer", task_cfg[key])
    check(task_cfg.test_size >= 0, "test_size", "must be >= 0", task_cfg.test_size)
    check(task_cfg.lr > 0, "lr", "must be > 0", task_cfg.lr)
    check(task_cfg.free_bits is None or task_cfg.free_bits >= 0, "free_bits", "must be null or >= 0", task_cfg.free_bits)
    check(task_cfg.kl_annealing_steps >= 0, "kl_annealing_steps", "must be >= 0 (0: no annealing)", task_cfg.kl_annealing_steps)
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

    def forward(self, x: torch.Tensor, sample: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mean, log_variance = self.encode(x)
        z = mean + torch.randn_like(mean) * (0.5 * log_variance).exp() if sample else mean
        return self.decoder(z), mean, log_variance


def elementwise_losses(model: VAE, x: torch.Tensor, sample: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pixel BCE (B, 784), per-dimension KL (B, latent), and the posterior means."""
    logits, mean, log_variance = model(x, sample)
    recon = F.binary_cross_entropy_with_logits(logits, x, reduction="none")
    kl = 0.5 * (mean.square() + log_variance.exp() - 1.0 - log_variance)
    return recon, kl, mean


def vae_loss(recon: torch.Tensor, kl: torch.Tensor, envelopes: dict, kl_weight: float,
             free_bits: float | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The training loss and its parts: (loss, shaped recon, shaped prior, per-sample total)."""
    if free_bits is not None:
        kl = kl.clamp_min(free_bits)
    shaped_recon = envelopes["recon"](recon)
    shaped_prior = envelopes["prior"](kl)
    per_sample = shaped_recon.sum(1) + kl_weight * shaped_prior.sum(1)
    return envelopes["total"](per_sample).mean(), shaped_recon, shaped_prior, per_sample


def effective_rank(means: torch.Tensor) -> float:
    """exp of the entropy of the normalised eigenvalue spectrum of the latent means' covariance."""
    centred = means - means.mean(0, keepdim=True)
    covariance = centred.T @ centred / max(len(means) - 1, 1)
    eigenvalues = torch.linalg.eigvalsh(covariance.double()).clamp_min(0)
    p = eigenvalues / eigenvalues.sum().clamp_min(1e-300)
    entropy = -(p * torch.log(p.clamp_min(1e-300))).sum()
    return float(entropy.exp())


def class_weights(epoch: int, phase: torch.Tensor, shift: torch.Tensor, amplitude: float, frequency: float) -> torch.Tensor:
    """Sampling weight of each class at an epoch (normalised to sum to 1)."""
    raw = (1.0 + shift + amplitude * torch.sin(2 * math.pi * frequency * epoch + phase)).clamp_min(1e-3)
    return raw / raw.sum()


@torch.no_grad()
def evaluate(model: VAE, x: torch.Tensor, threshold: float) -> tuple[dict[str, float], torch.Tensor]:
    """Validation metrics (z = posterior mean) and the per-sample summed BCE."""
    recon, kl, mean = elementwise_losses(model, x, sample=False)
    recon_per_sample = recon.sum(1)
    kl_per_dim = kl.mean(0)
    metrics = {
        "val/recon": recon_per_sample.mean().item(),
        "val/kl": kl_per_dim.sum().item(),
        "val/effective_rank": effective_rank(mean),
        "val/active_units": float((mean.var(0) > threshold).sum().item()),
    }
    metrics["val/elbo"] = -(metrics["val/recon"] + metrics["val/kl"])
    metrics.update({f"val/kl_dim_{d}": v for d, v in enumerate(kl_per_dim.tolist())})
    return metrics, recon_per_sample


def image_grid(images: torch.Tensor, columns: int = 8) -> torch.Tensor:
    """(N, 784) in [0, 1] to a (1, H, W) tile image for TensorBoard."""
    n = images.shape[0]
    rows = math.ceil(n / columns)
    grid = torch.zeros(rows * IMAGE_SIDE, columns * IMAGE_SIDE)
    for i, image in enumerate(images.reshape(n, IMAGE_SIDE, IMAGE_SIDE).cpu()):
        r, c = divmod(i, columns)
        grid[r * IMAGE_SIDE : (r + 1) * IMAGE_SIDE, c * IMAGE_SIDE : (c + 1) * IMAGE_SIDE] = image
    return grid.unsqueeze(0)


def load_data(task_cfg, seed: int, device: torch.device) -> dict[str, torch.Tensor]:
    from tasks.datasets import load_classification_pool, split_indices

    pool = load_classification_pool(task_cfg.dataset, resolve_path(task_cfg.data_dir), list(task_cfg.subsets), task_cfg.download)
    train_size = task_cfg.drift_pool_size if task_cfg.setting == "drift" else task_cfg.train_size
    try:
        index = split_indices(len(pool.labels), train_size, task_cfg.val_size, task_cfg.test_size, seed)
    except ValueError as error:
        raise ValueError(f"task.train_size/val_size/test_size/drift_pool_size: {error}") from None
    binary = (pool.features > 0.5).float()
    out = {}
    for name, idx in index.items():
        out[f"{name}_x"] = binary[idx].to(device)
        out[f"{name}_y"] = pool.labels[idx].to(device)
    return out


def run(cfg, context) -> dict[str, float]:
    task_cfg, device, recorder = cfg.task, context.device, context.recorder
    data = load_data(task_cfg, cfg.seed, device)
    envelopes = context.envelopes
    model = VAE(data["train_x"].shape[1], list(task_cfg.hidden), task_cfg.latent_dim).to(device)
    optimizer = adam(model.parameters(), task_cfg.lr)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    vwpr = None if context.vwpr is None else VWPRMonitor(context.vwpr, model)

    drift = task_cfg.setting == "drift"
    if drift:
        draw = torch.Generator().manual_seed(cfg.seed + 7)
        phase = torch.rand(10, generator=draw) * 2 * math.pi
        shift = (torch.rand(10, generator=draw) * 2 - 1) * task_cfg.drift_spread
        cumulative = torch.zeros(10)
        val_class_counts = torch.bincount(data["val_y"], minlength=10).clamp_min(1)

    step = 0
    bar = recorder.progress(range(1, task_cfg.epochs + 1), total=task_cfg.epochs)
    for epoch in bar:
        if drift:
            weights = class_weights(epoch, phase, shift, task_cfg.drift_amplitude, task_cfg.drift_frequency)
            cumulative += weights
            per_image = weights.to(device)[data["train_y"]]
            index = torch.multinomial(per_image, task_cfg.train_size, replacement=True, generator=generator)
            train_x = data["train_x"].index_select(0, index)
        else:
            train_x = data["train_x"]
        meters = {"recon": MeanStd(device), "prior": MeanStd(device), "total": MeanStd(device)}
        envelope_meters = {name: EnvelopeMeter(envelopes[name], device) for name in loss_names(task_cfg)}
        model.train()
        order = torch.randperm(len(train_x), device=device, generator=generator)
        for start in range(0, len(order), task_cfg.batch_size):
            x = train_x.index_select(0, order[start : start + task_cfg.batch_size])
            step += 1
            kl_weight = min(1.0, step / task_cfg.kl_annealing_steps) if task_cfg.kl_annealing_steps else 1.0
            recon, kl, _ = elementwise_losses(model, x)
            loss, _, _, per_sample = vae_loss(recon, kl, envelopes, kl_weight, task_cfg.free_bits)
            if vwpr is not None:
                vwpr.vwpr.dual_step(loss, optimizer)
            else:
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            meters["recon"].add(recon.detach().sum(1))
            meters["prior"].add(kl.detach().sum(1))
            meters["total"].add(per_sample)
            for meter in envelope_meters.values():
                meter.add()

        metrics = {}
        for name, meter in meters.items():
            metrics.update(meter.summary(f"train/{name}"))
        if not math.isfinite(metrics["train/total_mean"]):
            raise NonFiniteLossError(f"non-finite training loss at epoch {epoch}")
        metrics["train/kl_weight"] = kl_weight
        metrics["train/samples"] = meters["total"].count
        for name, meter in envelope_meters.items():
            metrics.update(meter.summary(f"envelope/{name}"))
        if vwpr is not None:
            metrics.update(vwpr.epoch_end(epoch, recorder))
        model.eval()
        val, recon_per_sample = evaluate(model, data["val_x"], task_cfg.active_unit_threshold)
        metrics.update(val)
        if drift:
            labels = data["val_y"]
            for label, dist in (("current", weights), ("cumulative", cumulative / cumulative.sum())):
                # reweight validation images so that each class carries its weight under this distribution
                per_image = (dist.to(device) / val_class_counts)[labels]
                metrics[f"val/recon_{label}"] = float((per_image * recon_per_sample).sum() / per_image.sum())
            metrics.update({f"drift/class_weight_{c}": w for c, w in enumerate(weights.tolist())})
        recorder.log(epoch, metrics)
        bar.set_postfix(val_recon=f"{val['val/recon']:.2f}", kl=f"{val['val/kl']:.2f}")

    if vwpr is not None:
        vwpr.save_figure(recorder.job_dir)
    if recorder.writer is not None:
        with torch.no_grad():
            shown = data["val_x"][:32]
            logits, _, _ = model(shown, sample=False)
            recorder.writer.add_image("images/reconstructions", image_grid(torch.cat([shown[:16], torch.sigmoid(logits[:16])])), task_cfg.epochs)
            samples = torch.sigmoid(model.decoder(torch.randn(32, task_cfg.latent_dim, device=device, generator=generator)))
            recorder.writer.add_image("images/samples", image_grid(samples), task_cfg.epochs)
    if task_cfg.test_size == 0:
        return {}
    test, _ = evaluate(model, data["test_x"], task_cfg.active_unit_threshold)
    return {"test_recon": test["val/recon"], "test_kl": test["val/kl"], "test_elbo": test["val/elbo"]}
