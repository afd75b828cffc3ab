"""The epoch loop shared by supervised tasks: per-sample loss -> envelope -> step.

A task supplies its data (tensors on the device, with a leading seed
dimension), its models (a :class:`~tasks.seed_batch.ModelGroup`: one seed,
or several trained as one batched model), a per-sample loss and an
evaluation function; this module runs the epochs, accumulates the
statistics on the device and logs one row per epoch and seed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from envelopes import Envelope, EnvelopeBank
from tasks.common import ControlledLoss, DivergedError, Divergence, EnvelopeMeter, MeanStd, VWPRMonitor, optimise
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
    """Train for ``epochs``, logging train/, envelope/<loss_name>/, vwpr/ and ``evaluate()``'s metrics per epoch and seed.

    ``train`` holds (S, n, ...) inputs and (S, n) targets; ``envelope`` is
    a bank of one envelope per run when S > 1 (runs may differ in their
    envelopes); ``evaluate()`` returns one dict per seed.
    A seed with a non-finite value in any recorded metric, or whose loss grew
    past ``diverged``'s factor, stops being logged while the others train on
    (seeds are independent). Returns ``{seed index: reason}``
    for such seeds; raises :class:`DivergedError` when none is left.
    """
    train_x, train_y = train
    device = train_x.device
    gens = generators(seeds, device)
    failed: dict[int, str] = {}
    diverged = diverged or Divergence()
    if diverged.needs_reference:
        with torch.no_grad():
            diverged.reference(evaluate())
    bar = recorders[0].progress(range(1, epochs + 1), total=epochs)
    for epoch in bar:
        raw, shaped = MeanStd(device, len(seeds)), MeanStd(device, len(seeds))
        meter = EnvelopeMeter(envelope, device)
        order = permutations(train_x.shape[1], gens, device)
        if controlled is not None:
            controlled.controller.epoch_start()
        for start in range(0, order.shape[1], batch_size):
            index = order[:, start : start + batch_size]
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
        method_metrics = {} if vwpr is None else vwpr.epoch_end(epoch, recorders[0])
        with torch.no_grad():
            evaluation = evaluate()
        if controlled is not None:
            method_metrics.update(controlled.controller.epoch_end(epoch, evaluation[0][controlled.metric]))
        for s, recorder in enumerate(recorders):
            if s in failed:
                continue
            metrics = {**raw.summary("train/raw_loss", s), **shaped.summary("train/shaped_loss", s)}
            metrics.update(meter.summary(f"envelope/{loss_name}", s))
            metrics.update(method_metrics)
            metrics.update(evaluation[s])
            reason = diverged(s, metrics, f"epoch {epoch}")
            if reason is not None:  # any recorded value, not only the loss: the run failed
                failed[s] = reason
                continue
            recorder.log(epoch, metrics)
        if len(failed) == len(seeds):
            raise DivergedError(failed[0] if len(seeds) == 1 else f"every seed diverged: {failed}")
        bar.set_postfix({k.split("/")[-1]: f"{v:.4g}" for k, v in list(evaluation[0].items())[:2]})
    if vwpr is not None:
        vwpr.save_figure(recorders[0].job_dir)
    if controlled is not None:
        controlled.save()
    return failed


def build_mlp(in_features: int, hidden: list[int], out_features: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [nn.Linear(in_features, width), nn.ReLU()]
        in_features = width
    layers.append(nn.Linear(in_features, out_features))
    return nn.Sequential(*layers)
