"""Value-Weighted Parameter Refinement (VWPR): positive value weights on parameter gradients.

:class:`EnhancedVWPRWrapper` wraps a model (``forward`` is the model's)
and keeps one value weight ``phi_i > 0`` per parameter tensor (or per
element, ``per_element=True``). One step, :meth:`~EnhancedVWPRWrapper.apply_vwpr_step`:

1. the base loss's gradients ``g`` are computed;
2. each tensor's error signal is ``l_i = mean |g_i|`` (per element: ``|g|``),
   normalised by its mean over the network (``l_map``);
3. ``phi`` is updated by one of two rules (below);
4. each gradient is multiplied by its ``phi`` (optionally normalised to
   average one, optionally clipped) and the model's optimiser steps: still
   descent on the base loss, with per-parameter step sizes.

**The document's rule** (``rule="document"``), as written:
``phi_i <- softplus(phi_i + alpha * l_i)``, with ``L_total = L_transformed +
lambda * ||phi||_1`` and ``L_transformed = sum_i phi_i * l_i``. Two facts
follow from the text. ``softplus(x) > x`` for every x, so phi grows
without bound (by at least ``alpha * min_i l_i`` per step): only
``phi_clip_value`` bounds it. And ``lambda * ||phi||_1`` reaches neither
the model (phi is detached from it) nor phi (the rule is not a gradient
step), so lambda changes nothing; it is reported in ``L_total`` only.

**A bounded variant** (``rule="bounded"``). Read as an objective,
``sum_i phi_i * l_i`` is linear in phi: it has no maximiser, and an L1
penalty keeps it linear (``sum_i phi_i (l_i - lambda)`` for phi > 0, so each
phi runs to 0 or to infinity depending on the sign of ``l_i - lambda``).
A strictly concave penalty gives an interior maximum. With a quadratic
pull towards the plain gradient (phi = 1),

    J(phi) = sum_i phi_i * l_i - (strength / 2) * sum_i (phi_i - 1)^2,
    dJ/dphi_i = l_i - strength * (phi_i - 1) = 0  =>  phi_i* = 1 + l_i / strength,

so every weight is bounded by ``1 + max_i l_i / strength`` without any
clipping, a larger ``strength`` keeps the weights closer to 1, and the
weights rank the tensors by their error signal. phi = softplus(raw) keeps
phi positive; ``optimizer_phi`` (Adam with ``alpha`` by default) ascends J
on ``raw`` once per step, so phi tracks the maximiser of the current signals.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

RULES = ("document", "bounded")
_SOFTPLUS_INVERSE_OF_ONE = math.log(math.e - 1.0)


def check_settings(l1: float, clip: float | None, lr: float, rule: str = "bounded", strength: float = 1.0) -> None:
    """Raise ``ValueError`` naming the setting, its value and what is allowed."""
    if rule not in RULES:
        raise ValueError(f"rule must be one of {list(RULES)}, got {rule!r}")
    if l1 < 0:
        raise ValueError(f"l1 must be >= 0, got {l1!r}")
    if clip is not None and clip <= 0:
        raise ValueError(f"clip must be null or > 0, got {clip!r}")
    if lr <= 0:
        raise ValueError(f"lr must be > 0, got {lr!r}")
    if strength <= 0:
        raise ValueError(f"strength must be > 0 (the bounded rule's pull towards 1), got {strength!r}")


class EnhancedVWPRWrapper(nn.Module):
    """A model with VWPR value weights on its parameters' gradients (see the module docstring).

    Args:
        base_model: the wrapped model; ``forward(x)`` is ``base_model(x)``.
        normalize_phi: rescale the weights applied to the gradients to average 1.
        l1_lambda: lambda of the document's ``L_total = L_transformed + lambda ||phi||_1``.
        phi_clip_value: cap on a weight (None: no cap).
        track_history: keep each tensor's mean weight at every step (:meth:`get_phi_history`).
        rule: ``"bounded"`` (the default: phi ascends ``J`` above, so the ``optimizer_phi`` a caller passes to
            :meth:`apply_vwpr_step` learns it) or ``"document"`` (``phi <- softplus(phi + alpha l)``, which has no
            gradient: an ``optimizer_phi`` is refused there, as it would never step).
        alpha: the document rule's step, and the learning rate of the bounded rule's default optimiser.
        strength: the bounded rule's pull towards phi = 1 (its weights reach at most ``1 + max l / strength``).
        per_element: one weight per parameter element instead of per tensor.
        figure_dir: where :meth:`visualize_phi_distribution` saves its figures when given no path.
    """

    def __init__(
        self,
        base_model: nn.Module,
        normalize_phi: bool = False,
        l1_lambda: float = 0.01,
        phi_clip_value: float | None = None,
        track_history: bool = False,
        rule: str = "bounded",
        alpha: float = 0.01,
        strength: float = 1.0,
        per_element: bool = False,
        figure_dir: str | Path = "figures",
    ):
        super().__init__()
        check_settings(l1_lambda, phi_clip_value, alpha, rule, strength)
        self.base_model = base_model
        self.names, self.targets = zip(*[(n, p) for n, p in base_model.named_parameters() if p.requires_grad])
        self.normalize_phi, self.l1_lambda, self.phi_clip_value = normalize_phi, l1_lambda, phi_clip_value
        self.rule, self.alpha, self.strength, self.per_element = rule, alpha, strength, per_element
        # bounded: phi = softplus(raw), raw learned; document: raw holds phi itself, updated by the rule
        start = _SOFTPLUS_INVERSE_OF_ONE if rule == "bounded" else 1.0
        self.raw = nn.ParameterList(
            nn.Parameter(
                torch.full(p.shape if per_element else (), start, device=p.device), requires_grad=rule == "bounded"
            )
            for p in self.targets
        )
        self._own_optimizer: torch.optim.Optimizer | None = None
        self.track_history = track_history
        self._history: list[Tensor] = []
        self.last_total: Tensor | None = None  # the document's L_total at the last step (detached)
        self.figure_dir = Path(figure_dir)
        self._drawn: tuple[int, object] | None = None  # the epoch last drawn and its figure

    def forward(self, x: Tensor) -> Tensor:
        return self.base_model(x)

    def phi_params(self) -> list[nn.Parameter]:
        """The value weights' parameters (for the bounded rule, ``phi = softplus(raw)``), for an optimiser."""
        return list(self.raw)

    def _unnormalised(self) -> list[Tensor]:
        return [F.softplus(raw) if self.rule == "bounded" else raw for raw in self.raw]

    def phi(self) -> list[Tensor]:
        """The weights applied to the gradients: normalised and clipped as configured, one per tensor."""
        values = self._unnormalised()
        if self.normalize_phi:
            total = sum(v.sum() for v in values)
            count = sum(v.numel() for v in values)
            values = [v * (count / total) for v in values]
        if self.phi_clip_value is not None:
            values = [v.clamp_max(self.phi_clip_value) for v in values]
        return values

    def apply_vwpr_step(
        self,
        base_loss: Tensor,
        optimizer_theta: torch.optim.Optimizer,
        optimizer_phi: torch.optim.Optimizer | None = None,
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Backpropagate ``base_loss``, update phi, scale the gradients by phi, step ``optimizer_theta``.

        ``optimizer_phi`` steps the bounded rule's weights (default: Adam on
        :meth:`phi_params` with learning rate ``alpha``); the document rule
        needs none. Returns ``(l_map, phi_vals)``: the normalised error
        signal and the weight applied, per parameter name (detached, on the
        device: no host synchronisation).
        """
        if optimizer_phi is not None and self.rule == "document":
            raise ValueError(
                "optimizer_phi: the document rule sets phi by its own formula (phi <- softplus(phi + alpha l)), "
                "which has no gradient for an optimiser to follow, so optimizer_phi would never step; pass none, "
                "or use rule='bounded', in which optimizer_phi ascends J (the module docstring)"
            )
        optimizer_theta.zero_grad(set_to_none=True)
        base_loss.backward()
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.targets]
        signals = [g.abs() if self.per_element else g.abs().mean() for g in grads]
        mean_signal = sum(s.sum() for s in signals) / sum(s.numel() for s in signals)
        scale = 1.0 / mean_signal.clamp_min(torch.finfo(mean_signal.dtype).tiny)
        l_map = [(s * scale).detach() for s in signals]
        if self.rule == "document":
            with torch.no_grad():
                for raw, signal in zip(self.raw, l_map):
                    raw.copy_(F.softplus(raw + self.alpha * signal))
        else:
            if optimizer_phi is None:
                if self._own_optimizer is None:
                    self._own_optimizer = torch.optim.Adam(self.phi_params(), lr=self.alpha)
                optimizer_phi = self._own_optimizer
            phi = self._unnormalised()
            objective = sum((f * s).sum() for f, s in zip(phi, l_map))
            objective = objective - 0.5 * self.strength * sum((f - 1.0).square().sum() for f in phi)
            optimizer_phi.zero_grad(set_to_none=True)
            (-objective).backward()  # ascent on J
            optimizer_phi.step()
        with torch.no_grad():
            phi_vals = [f.detach() for f in self.phi()]
            unnormalised = self._unnormalised()
            self.last_total = sum((f * s).sum() for f, s in zip(unnormalised, l_map)) + self.l1_lambda * sum(
                f.abs().sum() for f in unnormalised
            )
            for parameter, weight in zip(self.targets, phi_vals):
                if parameter.grad is not None:
                    parameter.grad.mul_(weight)
        optimizer_theta.step()
        if self.track_history:
            self._history.append(torch.stack([f.mean() for f in phi_vals]))
        return dict(zip(self.names, l_map)), dict(zip(self.names, phi_vals))

    def get_phi_history(self) -> Tensor:
        """(steps, tensors) mean value weight of each parameter tensor at every step; empty, with a warning that
        says how to keep it, when ``track_history`` is off."""
        if not self.track_history:
            warnings.warn(
                "get_phi_history: no history was kept; construct the wrapper with track_history=True to keep one",
                stacklevel=2,
            )
        if not self._history:
            return torch.empty(0, len(self.targets))
        return torch.stack(self._history)

    def phi_values(self) -> Tensor:
        """Every current value weight, flattened (for histograms)."""
        return torch.cat([f.detach().reshape(-1) for f in self.phi()])

    def visualize_phi_distribution(self, epoch: int, path: str | Path | None = None):
        """A histogram of the current value weights, saved to ``path`` (default:
        ``<figure_dir>/phi_distribution_epoch_<epoch>.png``) and closed; returns the figure.

        Without a path, one figure per epoch: a loop that calls this every step
        draws at the first call of each epoch, and later calls of that epoch
        return the same figure (a figure per step would cost more than the step).
        """
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        if path is None:
            if self._drawn is not None and self._drawn[0] == epoch:
                return self._drawn[1]
            path = self.figure_dir / f"phi_distribution_epoch_{epoch}.png"

        values = self.phi_values().float().cpu().numpy()
        fig, ax = plt.subplots(figsize=(4.5, 3.0), layout="constrained")
        ax.hist(values, bins=min(50, max(5, len(values))))
        ax.axvline(1.0, color="0.4", ls="--", lw=0.8, label="phi = 1 (plain gradient)")
        unit = "element" if self.per_element else "tensor"
        ax.set(
            xlabel="value weight phi", ylabel=f"{unit}s", title=f"VWPR value weights ({self.rule} rule), epoch {epoch}"
        )
        ax.legend(fontsize=7)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=150)
        plt.close(fig)
        self._drawn = (epoch, fig)
        return fig
