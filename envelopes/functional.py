"""Stateless envelope math: weights, selection quantiles, bias-corrected EMA.

Everything here is a pure function of tensors and Python numbers that come
from configuration. No function reads a tensor value back to the host, so
every one of them traces under ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

SHAPES = ("identity", "step", "linear", "sigmoid")
"""The envelope shapes, in order of smoothness."""

SHAPES_WITH_WIDTH = ("linear", "sigmoid")
"""Shapes whose transition has a width (``inverse_slope``)."""

ATTENUATION_CUTOFF = {"identity": 0.0, "step": 0.0, "linear": 0.0, "sigmoid": 1e-3}
"""A weight at or below this counts as attenuated (sigmoid never reaches 0)."""


def check_shape(shape: str, name: str = "shape") -> str:
    if shape not in SHAPES:
        raise ValueError(f"{name} must be one of {list(SHAPES)}, got {shape!r}")
    return shape


def check_finite(value: float, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def check_probability(value: float, name: str) -> float:
    value = check_finite(value, name)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {value!r}")
    return value


def check_step_size(value: float, name: str = "step_size") -> float:
    value = check_finite(value, name)
    if not 0.0 < value <= 1.0:
        raise ValueError(f"{name} must lie in (0, 1], got {value!r}")
    return value


def check_positive(value: float, name: str) -> float:
    value = check_finite(value, name)
    if value <= 0.0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return value


def envelope_weight(
    loss: Tensor,
    shape: str,
    threshold: Tensor | float = 0.0,
    inverse_slope: Tensor | float = 1.0,
) -> Tensor:
    r"""Envelope weight ``w(l)`` in [0, 1], monotone non-decreasing in ``l``.

    .. math::
        \text{step}:    w = [l \ge T] \\
        \text{linear}:  w = \mathrm{clamp}((l - T)/s + 1/2, 0, 1) \\
        \text{sigmoid}: w = \sigma(4 (l - T) / s)

    with ``T = threshold`` and ``s = inverse_slope`` (the width of the linear
    ramp, and the width over which the sigmoid's tangent at ``T`` rises from
    0 to 1). ``identity`` gives ``w = 1``.

    Args:
        loss: losses of any shape; read only, never differentiated.
        shape: one of :data:`SHAPES`.
        threshold: ``T``, a number or a 0-d tensor.
        inverse_slope: ``s > 0``, a number or a 0-d tensor; a tensor that is
            0 (all losses equal) is floored to the smallest positive float,
            which turns linear and sigmoid into a step at ``T``.

    Returns:
        A detached tensor with the shape and dtype of ``loss``.
    """
    check_shape(shape)
    loss = loss.detach()
    if shape == "identity":
        return torch.ones_like(loss)
    if shape == "step":
        return (loss >= threshold).to(loss.dtype)
    if isinstance(inverse_slope, Tensor):
        inverse_slope = inverse_slope.clamp_min(torch.finfo(inverse_slope.dtype).tiny)
    else:
        check_positive(inverse_slope, "inverse_slope")
    if shape == "linear":
        return ((loss - threshold) / inverse_slope + 0.5).clamp_(0.0, 1.0)
    # Divide first: a floored span must give (0 / tiny) * 4 = 0, not 0 * inf.
    return torch.sigmoid((loss - threshold) / inverse_slope * 4.0)


def shaped_loss(
    loss: Tensor,
    shape: str,
    threshold: Tensor | float = 0.0,
    inverse_slope: Tensor | float = 1.0,
) -> Tensor:
    """``w(l) * l`` element-wise, with ``w`` detached: ``d/dθ = w · dl/dθ``."""
    return loss * envelope_weight(loss, shape, threshold, inverse_slope)


def _order_statistic_plan(n: int, levels: Sequence[float]) -> tuple[list[int], list[tuple[int, int, float]]]:
    """Ranks to select and, per level, (lower slot, upper slot, fraction).

    Uses the positions of ``torch.quantile(..., interpolation="linear")``:
    ``pos = q (n - 1)``, interpolating between ``floor(pos)`` and ``ceil(pos)``.
    """
    ranks: list[int] = []
    plan = []
    for q in levels:
        pos = q * (n - 1)
        lo = min(int(math.floor(pos)), n - 1)
        hi = min(lo + 1, n - 1)
        frac = pos - lo
        if frac == 0.0:
            hi = lo
        slots = []
        for rank in (lo, hi):
            if rank not in ranks:
                ranks.append(rank)
            slots.append(ranks.index(rank))
        plan.append((slots[0], slots[1], frac))
    return ranks, plan


def quantiles(values: Tensor, levels: Sequence[float]) -> Tensor:
    """Quantiles of all elements of ``values`` at the given levels.

    Equal to ``torch.quantile(values.flatten(), torch.tensor(levels))`` with
    linear interpolation, but found by selection (``kthvalue``, O(n) per
    rank) rather than a full sort, and without torch.quantile's size limit.

    Args:
        values: a non-empty tensor of any shape.
        levels: quantile levels in [0, 1] (Python numbers: they come from
            configuration, and the ranks they select depend only on the
            number of elements, so nothing is read back from the device).

    Returns:
        A 1-d tensor of ``len(levels)`` quantiles, dtype of ``values``.
    """
    flat = values.detach().reshape(-1)
    n = flat.numel()
    if n == 0:
        raise ValueError("quantiles: values must have at least one element")
    for q in levels:
        check_probability(q, "quantile level")
    ranks, plan = _order_statistic_plan(n, levels)
    selected = [flat.kthvalue(rank + 1).values for rank in ranks]
    out = []
    for lo, hi, frac in plan:
        if lo == hi:
            out.append(selected[lo])
        else:
            out.append(torch.lerp(selected[lo], selected[hi], frac))
    return torch.stack(out)


def quantile_levels(quantile: float | None, width: float | None) -> list[float]:
    """Levels an adaptive envelope selects: ``[q]`` and/or ``[q - w/2, q + w/2]``.

    The width levels are clipped to [0, 1]; with no adaptive threshold the
    width is centred on the median.
    """
    levels = []
    if quantile is not None:
        levels.append(quantile)
    if width is not None:
        centre = 0.5 if quantile is None else quantile
        levels.append(min(max(centre - width / 2.0, 0.0), 1.0))
        levels.append(min(max(centre + width / 2.0, 0.0), 1.0))
    return levels


def bias_corrected_ema_(estimate: Tensor, trace: Tensor, observation: Tensor, step_size: float) -> Tensor:
    """One in-place update of an exponential moving average without initial bias.

    Sutton & Barto (2018), exercise 2.7: with a trace ``o`` starting at 0,
    ``o <- o + a (1 - o)`` and ``estimate <- estimate + (a / o)(x - estimate)``.
    The first update sets the estimate to the first observation; later ones
    approach a constant-step-size EMA with step ``a``.

    Args:
        estimate: running estimate, updated in place.
        trace: the 0-d trace ``o``, updated in place.
        observation: the new observation, broadcastable to ``estimate``.
        step_size: ``a`` in (0, 1].

    Returns:
        ``estimate`` (the same tensor).
    """
    trace.mul_(1.0 - step_size).add_(step_size)
    return estimate.lerp_(observation.to(estimate.dtype), step_size / trace)
