"""Value-Weighted Parameter Refinement: learnable positive value weights on parameter gradients.

Each parameter tensor (or each element, with ``per_element``) has a value
weight ``phi = softplus(raw) > 0``, optionally normalised to average one
over the network and clipped at a maximum. A dual step:

1. the base loss's gradients ``g`` are computed;
2. the local error signal of a tensor is its mean absolute gradient,
   ``l_i = mean |g_i|`` (per element: ``|g|``), normalised by its mean over
   the network;
3. ``phi`` takes one step of its own optimiser on
   ``-sum_i phi_i * l_i + lambda * ||phi||_1``, so it grows where the error
   signal is larger;
4. each gradient is scaled by its (updated, detached) ``phi`` and the model
   optimiser steps: still gradient descent on the base loss, with
   per-parameter step sizes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_SOFTPLUS_INVERSE_OF_ONE = math.log(math.e - 1.0)


def check_settings(l1: float, clip: float | None, lr: float) -> None:
    """Raise ``ValueError`` naming the setting, its value and what is allowed."""
    if l1 < 0:
        raise ValueError(f"l1 must be >= 0, got {l1!r}")
    if clip is not None and clip <= 0:
        raise ValueError(f"clip must be null or > 0, got {clip!r}")
    if lr <= 0:
        raise ValueError(f"lr must be > 0, got {lr!r}")


class ValueWeightedRefinement(nn.Module):
    """Wraps a model's parameters with value weights; see the module docstring.

    Args:
        model: the model whose trainable parameters are weighted.
        per_element: one weight per parameter element instead of per tensor.
        normalise: rescale the weights to average 1 over all weights.
        l1: ``lambda``, the L1 penalty on the weights.
        clip: cap on a weight (None: no cap).
        lr: learning rate of the weights' own Adam optimiser.
        track_history: keep the per-tensor mean weight of every dual step.
    """

    def __init__(
        self,
        model: nn.Module,
        per_element: bool = False,
        normalise: bool = True,
        l1: float = 0.0,
        clip: float | None = None,
        lr: float = 0.01,
        track_history: bool = False,
    ):
        super().__init__()
        check_settings(l1, clip, lr)
        self.names, self.targets = zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad])
        self.per_element, self.normalise, self.l1, self.clip = per_element, normalise, l1, clip
        self.raw = nn.ParameterList(
            nn.Parameter(torch.full(p.shape if per_element else (), _SOFTPLUS_INVERSE_OF_ONE, device=p.device))
            for p in self.targets
        )
        self.optimizer = torch.optim.Adam(self.raw, lr=lr)
        self.track_history = track_history
        self._history: list[Tensor] = []

    def phi_params(self) -> list[nn.Parameter]:
        """The raw value-weight parameters (``phi = softplus(raw)``), for an optimiser."""
        return list(self.raw)

    def phi(self) -> list[Tensor]:
        """Current value weights, one tensor per parameter tensor (0-d unless per element)."""
        values = [F.softplus(raw) for raw in self.raw]
        if self.normalise:
            total = sum(v.sum() for v in values)
            count = sum(v.numel() for v in values)
            values = [v * (count / total) for v in values]
        if self.clip is not None:
            values = [v.clamp_max(self.clip) for v in values]
        return values

    def dual_step(self, loss: Tensor, optimizer: torch.optim.Optimizer) -> dict[str, list[Tensor]]:
        """Backpropagate ``loss``, update the value weights, scale the gradients, step ``optimizer``.

        Returns the error signals and the value weights used (detached tensors, no host sync).
        """
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.targets]
        signals = [g.abs() if self.per_element else g.abs().mean() for g in grads]
        mean_signal = sum(s.sum() for s in signals) / sum(s.numel() for s in signals)
        scale = 1.0 / mean_signal.clamp_min(torch.finfo(mean_signal.dtype).tiny)
        phi = self.phi()
        objective = -sum((f * (s * scale).detach()).sum() for f, s in zip(phi, signals))
        if self.l1:
            objective = objective + self.l1 * sum(f.abs().sum() for f in phi)
        self.optimizer.zero_grad(set_to_none=True)
        objective.backward()
        self.optimizer.step()
        with torch.no_grad():
            phi = [f.detach() for f in self.phi()]
            for parameter, weight in zip(self.targets, phi):
                if parameter.grad is not None:
                    parameter.grad.mul_(weight)
        optimizer.step()
        if self.track_history:
            self._history.append(torch.stack([f.mean() for f in phi]))
        return {"error_signals": [s.detach() for s in signals], "phi": phi}

    def get_phi_history(self) -> Tensor:
        """(steps, tensors) mean value weight of each parameter tensor at every dual step."""
        if not self.track_history:
            raise RuntimeError("get_phi_history needs track_history=True")
        if not self._history:
            return torch.empty(0, len(self.targets))
        return torch.stack(self._history)

    def phi_values(self) -> Tensor:
        """Every current value weight, flattened (for histograms)."""
        return torch.cat([f.detach().reshape(-1) for f in self.phi()])
