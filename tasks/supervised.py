"""The epoch loop of the tasks that train in epochs (supervised tasks and the VAE): per-sample loss -> envelope -> step.

A task supplies its data (tensors on the device, with a leading seed
dimension), its models (a :class:`~tasks.seed_batch.ModelGroup`: one seed,
or several trained as one batched model), a per-sample loss and an
evaluation function; this module runs the epochs, accumulates the
statistics on the device and logs one row per epoch and seed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import nn

from envelopes import Envelope, EnvelopeBank
from tasks.common import ControlledLoss, Divergence, EnvelopeMeter, MeanStd, VWPRMonitor, log_seeds, optimise
from tasks.seed_batch import ModelGroup, generators, permutations, take

PerSampleLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def train_step(
    group: ModelGroup,
    optimizer,
    envelope,
    x,
    y,
    raw: MeanStd,
    shaped: MeanStd,
    meter: EnvelopeMeter,
    per_sample_loss: PerSampleLoss,
    vwpr=None,
    controlled: ControlledLoss | None = None,
) -> None:
    """One optimiser step on a batch (S seeds, B samples each; a VWPR dual step if ``vwpr``).

    The loss is the sum over seeds of each seed's mean shaped loss, so each
    seed's parameters get that seed's gradient; with the loss controller
    (one seed), that base loss plus the weighted auxiliary losses.
    Statistics accumulate on the device.
    """
    outputs = group(x)
    per_sample = per_sample_loss(outputs, y)
    shaped_loss = envelope(per_sample)
    base = shaped_loss.mean(-1).sum()
    loss = base if controlled is None else controlled.loss(base, outputs, y)
    optimise(loss, optimizer, vwpr)
    if controlled is not None:
        controlled.controller.after_step(base)
    raw.add(per_sample)
    shaped.add(shaped_loss)
    meter.add()


def batches(n: int, batch_size: int, gens: list[torch.Generator], device: torch.device) -> Iterator[torch.Tensor]:
    """One epoch's minibatches: (seeds, batch) indices into n items, a fresh order per seed from its generator."""
    order = permutations(n, gens, device)
    for start in range(0, order.shape[1], batch_size):
        yield order[:, start : start + batch_size]


def run_epochs(
    epochs: int,
    train_epoch: Callable[[int], Callable[[int], dict[str, float]]],
    evaluate: Callable[[], list[dict[str, float]]],
    recorders: list,
    diverged: Divergence,
    vwpr: VWPRMonitor | None = None,
    controlled: ControlledLoss | None = None,
    control_value: Callable[[list[dict[str, float]]], float] | None = None,
    postfix: Callable[[list[dict[str, float]]], dict[str, str]] | None = None,
) -> dict[int, str]:
    """The epoch loop of every task that trains in epochs (supervised tasks and the VAE).

    Per epoch: the controller's epoch start, ``train_epoch(epoch)`` (the
    epoch's steps; it returns each seed's training metrics, ``seed -> dict``),
    VWPR's epoch end, ``evaluate()`` (one dict per seed, without gradients),
    the controller's decision on ``control_value(evaluation)``, then one row
    per live seed (training, method and evaluation metrics) under the
    failed-seed rule (:func:`~tasks.common.log_seeds`). Returns ``{seed index:
    reason}`` for the seeds that failed; raises :class:`DivergedError` when
    none is left.
    """
    failed: dict[int, str] = {}
    if diverged.needs_reference:
        with torch.no_grad():
            diverged.reference(evaluate())
    bar = recorders[0].progress(range(1, epochs + 1), total=epochs)
    for epoch in bar:
        if controlled is not None:
            controlled.controller.epoch_start()
        train_metrics = train_epoch(epoch)
        method_metrics = {} if vwpr is None else vwpr.epoch_end(epoch, recorders[0])
        with torch.no_grad():
            evaluation = evaluate()
        if controlled is not None:
            method_metrics.update(controlled.controller.epoch_end(epoch, control_value(evaluation)))
        rows = {
            s: {**train_metrics(s), **method_metrics, **evaluation[s]} for s in range(len(recorders)) if s not in failed
        }
        log_seeds(recorders, failed, rows, diverged, epoch, f"epoch {epoch}")
        if postfix is not None:
            bar.set_postfix(postfix(evaluation))
    if vwpr is not None:
        vwpr.save_figure(recorders[0].job_dir)
    if controlled is not None:
        controlled.save()
    return failed


def fit(
    group: ModelGroup,
    optimizer: torch.optim.Optimizer,
    envelope: Envelope | EnvelopeBank,
    loss_name: str,
    train: tuple[torch.Tensor, torch.Tensor],
    per_sample_loss: PerSampleLoss,
    evaluate: Callable[[], list[dict[str, float]]],
    epochs: int,
    batch_size: int,
    seeds: list[int],
    recorders: list,
    vwpr: VWPRMonitor | None = None,
    controlled: ControlledLoss | None = None,
    diverged: Divergence | None = None,
) -> dict[int, str]:
    """Train a supervised task for ``epochs`` (:func:`run_epochs`), logging train/, envelope/<loss_name>/,
    vwpr/ and ``evaluate()``'s metrics per epoch and seed.

    ``train`` holds (S, n, ...) inputs and (S, n) targets; ``envelope`` is
    a bank of one envelope per run when S > 1 (runs may differ in their
    envelopes); ``evaluate()`` returns one dict per seed.
    """
    train_x, train_y = train
    device = train_x.device
    gens = generators(seeds, device)

    def train_epoch(epoch: int) -> Callable[[int], dict[str, float]]:
        raw, shaped = MeanStd(device, len(seeds)), MeanStd(device, len(seeds))
        meter = EnvelopeMeter(envelope, device)
        for index in batches(train_x.shape[1], batch_size, gens, device):
            train_step(
                group,
                optimizer,
                envelope,
                take(train_x, index),
                take(train_y, index),
                raw,
                shaped,
                meter,
                per_sample_loss,
                None if vwpr is None else vwpr.vwpr,
                controlled,
            )
        return lambda s: {
            **raw.summary("train/raw_loss", s),
            **shaped.summary("train/shaped_loss", s),
            **meter.summary(f"envelope/{loss_name}", s),
        }

    return run_epochs(
        epochs,
        train_epoch,
        evaluate,
        recorders,
        diverged or Divergence(),
        vwpr,
        controlled,
        control_value=lambda evaluation: evaluation[0][controlled.metric],
        postfix=lambda evaluation: {k.split("/")[-1]: f"{v:.4g}" for k, v in list(evaluation[0].items())[:2]},
    )


def build_mlp(in_features: int, hidden: list[int], out_features: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [nn.Linear(in_features, width), nn.ReLU()]
        in_features = width
    layers.append(nn.Linear(in_features, out_features))
    return nn.Sequential(*layers)
