"""Pieces every task's training loop uses: device-side meters, checks, paths."""

from __future__ import annotations

import functools
import logging
import math
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from envelopes import Envelope

log = logging.getLogger(__name__)


class DivergedError(RuntimeError):
    """Training produced a NaN or infinite value in a recorded metric: the run failed."""


def divergence(metrics: Mapping[str, float], step: str) -> str | None:
    """``"diverged at <step>: <metric> is <value>"`` for the first non-finite metric, else None."""
    for name, value in metrics.items():
        if not math.isfinite(value):
            return f"diverged at {step}: {name} is {value}"
    return None


class Divergence:
    """When a seed's run has failed: a recorded value that is not finite, or ``metric`` (a loss: lower is better)
    above ``factor`` times its value before training (``divergence_factor``; None: finiteness alone)."""

    def __init__(self, metric: str | None = None, factor: float | None = None) -> None:
        self.metric, self.factor = metric, factor
        self.first: dict[int, float] = {}

    @property
    def needs_reference(self) -> bool:
        return self.factor is not None and self.metric is not None

    def reference(self, before: list[Mapping[str, float]]) -> None:
        """Each seed's metrics before training (its first recorded values stand in where this is not called)."""
        for s, metrics in enumerate(before):
            if self.metric in metrics and math.isfinite(metrics[self.metric]):
                self.first[s] = metrics[self.metric]

    def __call__(self, seed_index: int, metrics: Mapping[str, float], step: str) -> str | None:
        """The reason the run of ``seed_index`` failed at ``step``, or None."""
        reason = divergence(metrics, step)
        if reason is not None or self.factor is None or self.metric not in metrics:
            return reason
        value = metrics[self.metric]
        first = self.first.setdefault(seed_index, value)
        if first > 0 and value > self.factor * first:
            return (
                f"diverged at {step}: {self.metric} is {value:.4g}, more than {self.factor:g} times its value "
                f"{first:.4g} before training (divergence_factor)"
            )
        return None


def log_seeds(
    recorders: list,
    failed: dict[int, str],
    rows: Mapping[int, dict[str, float]],
    check: Callable[[int, dict[str, float], str], str | None],
    step: int,
    where: str,
    step_name: str = "epoch",
    unit: str = "seed",
) -> None:
    """Log each live run's row at ``step``: the failed-run rule of every task.

    ``rows`` holds the metrics of each run not yet in ``failed``. A run whose
    row ``check(index, row, where)`` rejects (a value that is not finite, a
    loss past the divergence factor: :class:`Divergence`) goes into
    ``failed`` with the reason and is no longer logged, while the others
    train on (runs are independent); :class:`DivergedError` when none is left.
    """
    for s, metrics in rows.items():
        reason = check(s, metrics, where)
        if reason is not None:
            failed[s] = reason
            continue
        recorders[s].log(step, metrics, step_name=step_name)
    if len(failed) == len(recorders):
        raise DivergedError(failed[0] if len(recorders) == 1 else f"every {unit} diverged: {failed}")


def check(condition: bool, key: str, allowed: str, value) -> None:
    """Raise ``ValueError("key: allowed, got value")`` unless ``condition``."""
    if not condition:
        raise ValueError(f"{key} {allowed}, got {value!r}")


def resolve_path(path: str) -> Path:
    """A config path, relative to the directory the command was launched from."""
    try:
        from hydra.utils import to_absolute_path

        return Path(to_absolute_path(path))
    except ValueError:  # outside a Hydra app
        return Path(path).absolute()


OPTIMIZERS = ("adam", "sgd")


def check_optimizer(task_cfg) -> None:
    """``task.optimizer`` is adam or sgd; ``task.lr`` > 0; ``task.momentum`` in [0, 1)."""
    check(task_cfg.optimizer in OPTIMIZERS, "optimizer", f"must be one of {list(OPTIMIZERS)}", task_cfg.optimizer)
    check(task_cfg.lr > 0, "lr", "must be > 0", task_cfg.lr)
    check(0.0 <= task_cfg.momentum < 1.0, "momentum", "must lie in [0, 1)", task_cfg.momentum)


def make_optimizer(parameters, task_cfg) -> torch.optim.Optimizer:
    """The task's optimiser (``task.optimizer``: adam, or sgd with ``task.momentum``) at ``task.lr``.

    Both act element by element, so one optimiser over stacked parameters is
    one optimiser per run. The fused kernel where torch has it: about 30%
    faster per step for the small models here.
    """
    parameters = list(parameters)
    if task_cfg.optimizer == "sgd":
        make = functools.partial(torch.optim.SGD, parameters, lr=task_cfg.lr, momentum=task_cfg.momentum)
    else:
        make = functools.partial(torch.optim.Adam, parameters, lr=task_cfg.lr)
    try:
        return make(fused=True)
    except (RuntimeError, ValueError):  # a device or build without the fused kernel
        return make()


def optimise(loss: torch.Tensor, optimizer: torch.optim.Optimizer, vwpr=None) -> None:
    """One optimiser step on ``loss``: VWPR's step when it is on (an ``EnhancedVWPRWrapper``)."""
    if vwpr is not None:
        vwpr.apply_vwpr_step(loss, optimizer)
    else:
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


class MeanStd:
    """Mean and std of every element added, accumulated on the device (no host sync).

    With ``groups=G``, values have a leading dimension of G groups (seeds
    trained together) and each group is summarised on its own.
    """

    def __init__(self, device: torch.device, groups: int | None = None):
        self.groups = groups
        self.total = torch.zeros(2 if groups is None else (groups, 2), dtype=torch.float64, device=device)
        self.count = 0

    def add(self, values: torch.Tensor) -> None:
        values = values.detach()
        values = values.reshape(-1) if self.groups is None else values.reshape(self.groups, -1)
        values = values.double()  # squares of float32 losses above 1.8e19 would overflow
        self.total += torch.stack((values.sum(-1), values.square().sum(-1)), dim=-1)
        self.count += values.shape[-1]

    def summary(self, prefix: str, group: int | None = None) -> dict[str, float]:
        return self._summarise(prefix, (self.total if group is None else self.total[group]).tolist())

    def summaries(self, prefix: str) -> list[dict[str, float]]:
        """Every group's summary, with one host transfer for all of them."""
        return [self._summarise(prefix, pair) for pair in self.total.tolist()]

    def _summarise(self, prefix: str, pair: list[float]) -> dict[str, float]:
        total, squares = pair
        count = max(self.count, 1)
        mean = total / count
        variance = max(squares / count - mean * mean, 0.0)
        return {f"{prefix}_mean": mean, f"{prefix}_std": variance**0.5}


class EnvelopeMeter:
    """Per-step envelope statistics averaged over an epoch, on the device.

    Static values (an identity's weight, a static threshold) are Python
    numbers and are reported as they are; only tensors are accumulated. A
    grouped envelope's statistics are per group: ``summary(prefix, group)``.
    """

    def __init__(self, envelope: Envelope, device: torch.device):
        self.envelope = envelope
        self.device = device
        self.constants: dict[str, float] = {}
        self.names: list[str] = []
        self.total: torch.Tensor | None = None
        self.steps = 0

    def add(self) -> None:
        stats = self.envelope.statistics()
        if self.steps == 0:
            self.names = [k for k, v in stats.items() if isinstance(v, torch.Tensor)]
            self.constants = {k: float(v) for k, v in stats.items() if k not in self.names}
        if self.names:
            stacked = torch.stack([stats[k] for k in self.names])
            if self.total is None:
                self.total = stacked.float()
            else:
                self.total += stacked
        self.steps += 1

    def summary(self, prefix: str, group: int | None = None) -> dict[str, float]:
        out = {f"{prefix}/{name}": value for name, value in self.constants.items()}
        if self.total is not None:
            total = self.total if group is None or self.total.dim() == 1 else self.total[:, group]
            values = (total / self.steps).tolist()
            out.update(self._named(prefix, values, group))
        return out

    def summaries(self, prefix: str, groups: int) -> list[dict[str, float]]:
        """Every group's summary (``groups`` of them), with one host transfer for all."""
        if self.total is None:
            return [{f"{prefix}/{name}": value for name, value in self.constants.items()} for _ in range(groups)]
        per_group = (
            (self.total / self.steps).T.tolist()
            if self.total.dim() == 2
            else [(self.total / self.steps).tolist()] * groups
        )
        return [
            {**{f"{prefix}/{name}": value for name, value in self.constants.items()}, **self._named(prefix, values, g)}
            for g, values in enumerate(per_group)
        ]

    def _named(self, prefix: str, values: list[float], group: int | None) -> dict[str, float]:
        # a bank's groups differ in shape: only the statistics of this group's shape
        keep = self.envelope.applies(group) if hasattr(self.envelope, "applies") and group is not None else self.names
        return {f"{prefix}/{name}": value for name, value in zip(self.names, values) if name in keep}


class VWPRMonitor:
    """Builds VWPR for a model when configured; logs its value weights each epoch and draws their distribution."""

    def __init__(self, vwpr_cfg, model: torch.nn.Module):
        from methods.vwpr import EnhancedVWPRWrapper

        self.vwpr = EnhancedVWPRWrapper(
            model,
            normalize_phi=vwpr_cfg.normalise,
            l1_lambda=vwpr_cfg.l1,
            phi_clip_value=vwpr_cfg.clip,
            track_history=True,
            rule=vwpr_cfg.rule,
            alpha=vwpr_cfg.lr,
            strength=vwpr_cfg.strength,
            per_element=vwpr_cfg.per_element,
        )
        self.per_epoch: list[torch.Tensor] = []

    def epoch_end(self, epoch: int, recorder) -> dict[str, float]:
        phi = self.vwpr.phi_values().float().cpu()
        self.per_epoch.append(phi)
        if recorder.writer is not None:
            recorder.writer.add_histogram("vwpr/phi", phi, epoch)
        return {
            "vwpr/phi_mean": phi.mean().item(),
            "vwpr/phi_std": phi.std().item() if phi.numel() > 1 else 0.0,
            "vwpr/phi_min": phi.min().item(),
            "vwpr/phi_max": phi.max().item(),
        }

    def save_figure(self, job_dir: Path) -> Path:
        """``figures/phi_distribution.png``: the value weights' distribution at the end of each epoch."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(max(4.5, 0.35 * len(self.per_epoch) + 2), 3.0), layout="constrained")
        ax.boxplot([p.numpy() for p in self.per_epoch], positions=range(1, len(self.per_epoch) + 1), showfliers=True)
        ax.axhline(1.0, color="0.5", ls="--", lw=0.8)
        ax.set_xlabel("epoch")
        ax.set_ylabel("value weight phi")
        unit = "element" if self.vwpr.per_element else "tensor"
        ax.set_title(f"VWPR value weights (one per {unit}) by epoch")
        path = job_dir / "figures" / "phi_distribution.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=150)
        plt.close(fig)
        return path


class ControlledLoss:
    """The adaptive loss controller in a task's loop (``controller.mode`` set).

    Args:
        cfg: the run's config (its seed seeds the monitor).
        context: the run's context (the controller's settings, device, recorder).
        aux_losses: ``(outputs, targets) -> {name: per-sample loss}``, the auxiliary losses.
        names: their names.
        metric: the validation metric the meta controller learns from (lower is better).
        probe: the base loss on a fixed held-out batch, for the monitor's reward.
        parameters: the model's parameters (for the gradient norm).
        total_steps: optimiser steps in the run.
    """

    def __init__(self, cfg, context, aux_losses, names, metric: str, probe, parameters, total_steps: int):
        from methods.loss_controller import LossController

        self.aux_losses = aux_losses
        self.metric = metric
        self.controller = LossController(
            names,
            context.controller,
            context.device,
            cfg.seed,
            probe,
            list(parameters),
            total_steps,
            context.recorder.writer_for_steps(),
        )
        self.job_dir = context.job_dir
        for warning in self.controller.schedule_warnings():  # in the log and in result.json
            log.warning(warning)
            context.warnings.append(warning)

    def loss(self, base: torch.Tensor, outputs, targets) -> torch.Tensor:
        """The combined loss; auxiliary losses are computed only while some weight is non-zero."""
        if not any(self.controller.weights.values()):
            return self.controller.guard(base, base)
        aux = {name: value.mean() for name, value in self.aux_losses(outputs, targets).items()}
        return self.controller.combine(base, aux)

    def save(self) -> None:
        self.controller.save(self.job_dir / "controller.pt")


def cpp_compilers() -> tuple[list[str], str | None]:
    """The C++ compilers torch.compile's CPU kernels can use (``$CXX`` first), and the first on PATH (None if none)."""
    compilers = [c for c in (os.environ.get("CXX"), "g++", "c++", "clang++") if c]
    return compilers, next((c for c in compilers if shutil.which(c)), None)
