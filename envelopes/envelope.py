"""The ``Envelope`` module: a shape with static or adaptive parameters."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .functional import (
    SelectionPlan,
    bias_corrected_ema_,
    check_finite,
    check_positive,
    check_probability,
    check_step_size,
    envelope_weight,
    interpolate,
    plan_tensors,
    quantile_levels,
    select_order_statistics,
    selection_plan,
)
from .shapes import SHAPES, check_shape


def check_ranges(threshold=None, quantile=None, inverse_slope=None, width=None, gamma=None, fraction=None) -> None:
    """Raise ``ValueError`` naming the first given parameter outside its range (None: not given)."""
    if threshold is not None:
        check_finite(threshold, "threshold")
    if quantile is not None:
        check_probability(quantile, "quantile")
    if inverse_slope is not None:
        check_positive(inverse_slope, "inverse_slope")
    for name, value in (("width", width), ("fraction", fraction)):
        if value is not None and check_positive(value, name) > 1.0:
            raise ValueError(f"{name} must lie in (0, 1], got {value!r}")
    if gamma is not None and check_finite(gamma, "gamma") < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma!r}")


class Envelope(nn.Module):
    r"""Loss Attenuation Envelope: ``forward(l) = w(l) * l`` with ``w`` detached.

    The threshold ``T`` is either static (``threshold``, a loss value) or
    adaptive (``quantile``: ``T`` is that quantile of the batch's losses).
    The transition width ``s`` of the linear and sigmoid shapes is either
    static (``inverse_slope``) or adaptive (``width``: ``s`` is the loss span
    between the quantiles ``quantile ± width/2``, clipped to [0, 1]).
    Adaptive values are smoothed by a bias-corrected EMA with ``step_size``
    in (0, 1] (1 means no smoothing). Quantiles are over every element of the
    loss tensor, so a per-sample-per-dimension loss works as is.

    Example::

        envelope = Envelope("sigmoid", quantile=0.9, width=0.1, step_size=0.1)
        loss = envelope(per_sample_loss).mean()

    ``focal`` (with ``gamma``) is focal loss's modulating factor
    ``(1 - exp(-l))^gamma`` on a cross-entropy: no threshold, no state.
    Detached like every envelope weight, its gradient is ``w * dl``; with
    ``full_gradient=True`` the factor is differentiated too, which is the
    focal loss of Lin et al. exactly (and no longer an envelope).
    ``hard_mining`` (with ``fraction`` k) is online hard example mining: it
    keeps the top fraction k of each batch, as the unsmoothed adaptive step
    ``Envelope("step", quantile=1 - k)`` does (exactly the top ``k n``
    losses when ``k n`` is an integer).

    "Low loss" is in the signed sense: for losses that can be negative (the
    PPO policy loss), the most negative values are the most attenuated.

    Many envelopes over a leading dimension of groups (a grid's runs trained
    as one batched model) are an :class:`~envelopes.EnvelopeBank`.

    State (the EMA estimates and trace) lives in buffers, so it follows
    ``.to(device or dtype)`` and round-trips through ``state_dict()``. A call
    never reads a value back to the host.

    After each call, :attr:`weight`, :attr:`threshold` and
    :attr:`inverse_slope` hold the values just used, and :meth:`statistics`
    summarises them for logging.
    """

    def __init__(
        self,
        shape: str = "identity",
        threshold: float | None = None,
        quantile: float | None = None,
        inverse_slope: float | None = None,
        width: float | None = None,
        step_size: float = 1.0,
        gamma: float | None = None,
        fraction: float | None = None,
        full_gradient: bool = False,
    ) -> None:
        super().__init__()
        self.shape = check_shape(shape)
        # Every value given is range-checked, also one this shape ignores (and then drops).
        check_ranges(
            threshold=threshold,
            quantile=quantile,
            inverse_slope=inverse_slope,
            width=width,
            gamma=gamma,
            fraction=fraction,
        )
        if full_gradient and shape != "focal":
            raise ValueError(f"full_gradient applies to shape 'focal' only, got shape {shape!r}")
        # Focal loss as published differentiates its modulating factor too; an envelope does not.
        self.full_gradient = bool(full_gradient)
        self.fraction = None
        if shape == "hard_mining":
            if fraction is None:
                raise ValueError(
                    "shape 'hard_mining' needs fraction (the share of each batch kept, in (0, 1]), got fraction=None"
                )
            self.fraction = check_positive(fraction, "fraction")
            if self.fraction > 1.0:
                raise ValueError(f"fraction must lie in (0, 1], got {fraction!r}")
            # the top fraction of each batch: an adaptive step at quantile 1 - fraction, unsmoothed
            threshold, quantile, step_size = None, 1.0 - self.fraction, 1.0
        uses_threshold, uses_width = SHAPES[shape].threshold, SHAPES[shape].width
        if SHAPES[shape].gamma:
            if gamma is None:
                raise ValueError(f"shape {shape!r} needs gamma (the focusing parameter, >= 0), got gamma=None")
            self.gamma = check_finite(gamma, "gamma")
            if self.gamma < 0:
                raise ValueError(f"gamma must be >= 0, got {gamma!r}")
        else:
            self.gamma = None
        if uses_threshold and (threshold is None) == (quantile is None):
            raise ValueError(
                f"shape {shape!r} needs exactly one of threshold (static) or quantile (adaptive), "
                f"got threshold={threshold!r}, quantile={quantile!r}"
            )
        if uses_width and (inverse_slope is None) == (width is None):
            raise ValueError(
                f"shape {shape!r} needs exactly one of inverse_slope (static) or width (adaptive), "
                f"got inverse_slope={inverse_slope!r}, width={width!r}"
            )
        # Parameters a shape ignores are dropped, so equal envelopes compare equal.
        self.threshold_value = (
            check_finite(threshold, "threshold") if uses_threshold and threshold is not None else None
        )
        self.quantile = check_probability(quantile, "quantile") if uses_threshold and quantile is not None else None
        self.inverse_slope_value = (
            check_positive(inverse_slope, "inverse_slope") if uses_width and inverse_slope is not None else None
        )
        self.width = check_positive(width, "width") if uses_width and width is not None else None
        if self.width is not None and self.width > 1.0:
            raise ValueError(f"width must lie in (0, 1], got {width!r}")
        self.step_size = check_step_size(step_size)

        self._levels = tuple(quantile_levels(self.quantile, self.width))
        self._plan_cache: dict = {}
        self.adaptive = bool(self._levels)
        self.smoothed = self.adaptive and self.step_size < 1.0
        if self.smoothed:
            n_estimates = int(self.quantile is not None) + int(self.width is not None)
            self.register_buffer("estimate", torch.zeros(n_estimates))
            self.register_buffer("trace", torch.zeros(()))

        self.weight: Tensor | None = None
        self.threshold: Tensor | float | None = self.threshold_value
        self.inverse_slope: Tensor | float | None = self.inverse_slope_value

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Envelope:
        """Build from a mapping with the constructor's keyword arguments."""
        return cls(**dict(config))

    def config(self) -> dict[str, Any]:
        """The effective parameters: only those the shape uses, smoothing only if adaptive."""
        out: dict[str, Any] = {"shape": self.shape}
        if self.shape == "hard_mining":
            return {"shape": self.shape, "fraction": self.fraction}
        for key in ("threshold_value", "quantile", "inverse_slope_value", "width", "gamma"):
            value = getattr(self, key)
            if value is not None:
                out[key.removesuffix("_value")] = value
        if self.adaptive:
            out["step_size"] = self.step_size
        if self.full_gradient:
            out["full_gradient"] = True
        return out

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.config().items())

    def _plan_tensors(self, plan: SelectionPlan, like: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The plan's interpolation indices and fractions on ``like``'s device.

        Built once per batch size, device and dtype: a per-call tensor built
        from Python numbers would be a host-to-device copy on a GPU.
        """
        if torch.compiler.is_compiling():
            return plan_tensors(plan, like)
        key = (like.shape[-1], like.dtype, like.get_device())  # get_device() is cheaper than .device
        if key not in self._plan_cache:
            self._plan_cache[key] = plan_tensors(plan, like)
        return self._plan_cache[key]

    def _adaptive_parameters(self, loss: Tensor) -> Tensor:
        """[threshold?, span?] from this batch's quantiles, smoothed if configured.

        Each quantile is a ``torch.lerp`` of its two order statistics, exact
        where they tie; the span is the difference of two such quantiles, so
        a batch of equal losses has span exactly 0.
        """
        flat = loss.reshape(-1)
        if torch.compiler.is_compiling():
            plan = selection_plan.__wrapped__(flat.shape[-1], self._levels)  # traced, not cached
        else:
            plan = selection_plan(flat.shape[-1], self._levels)
        levels = interpolate(select_order_statistics(flat, plan), plan, self._plan_tensors(plan, flat))
        parts = []
        if self.quantile is not None:
            parts.append(levels[..., :1])
        if self.width is not None:
            parts.append(levels[..., -1:] - levels[..., -2:-1])
        values = torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]
        if self.smoothed:
            values = bias_corrected_ema_(self.estimate, self.trace, values, self.step_size)
            if values.dtype != loss.dtype:
                values = values.to(loss.dtype)
        return values

    def compute_weight(self, loss: Tensor) -> Tensor:
        """The detached weight ``w(loss)``, updating adaptive state."""
        loss = loss.detach()
        if self.shape == "identity":
            self.weight = None
            return torch.ones_like(loss)
        threshold, inverse_slope = self.threshold_value, self.inverse_slope_value
        if self.adaptive:
            values = self._adaptive_parameters(loss).unbind(-1)
            if self.quantile is not None:
                threshold = values[0]
            if self.width is not None:
                inverse_slope = values[-1]
        self.threshold, self.inverse_slope = threshold, inverse_slope
        self.weight = envelope_weight(
            loss,
            self.shape,
            threshold,
            1.0 if inverse_slope is None else inverse_slope,
            2.0 if self.gamma is None else self.gamma,
        )
        return self.weight

    def forward(self, loss: Tensor) -> Tensor:
        if self.shape == "identity":
            self.weight = None
            return loss
        if self.full_gradient:
            # the original focal loss: the factor (1 - p)^gamma stays in the graph
            factor = SHAPES["focal"].formula(loss, None, None, self.gamma)
            self.weight = factor.detach()
            return loss * factor
        return loss * self.compute_weight(loss)

    def statistics(self) -> dict[str, Tensor | float]:
        """Mean weight, fraction attenuated and current parameters of the last call.

        Values computed from the batch are 0-d tensors on the loss's device
        (no host transfer); static values are Python floats. An identity
        envelope reports weight 1 and nothing attenuated.
        """
        if self.weight is None:
            return {"mean_weight": 1.0, "fraction_attenuated": 0.0}
        weight = self.weight.reshape(-1)
        stats: dict[str, Tensor | float] = {
            "mean_weight": weight.mean(-1),
            "fraction_attenuated": torch.mean(weight <= SHAPES[self.shape].cutoff, dim=-1, dtype=weight.dtype),
        }
        for name in ("threshold", "inverse_slope"):
            value = getattr(self, name)
            if value is not None:
                stats[name] = value
        return stats
