"""Every envelope shape, defined once: its weight formula, the parameters it takes, how it is shown.

``Envelope``, ``EnvelopeBank``, :func:`~envelopes.envelope_weight`, config
validation, the report's row order and the figures' colours all read
:data:`SHAPES`. A new shape is one entry here, a config file
``conf/envelope/<name>.yaml`` and a test (README, "Extending").

A formula maps the losses ``l`` (detached by the caller), the threshold
``T``, the transition width ``s`` (already floored above 0) and ``gamma`` to
weights in [0, 1], monotone non-decreasing in ``l``. ``T``, ``s`` and
``gamma`` are Python numbers or tensors that broadcast against ``l`` (one
value per group in a bank), so one formula serves every caller, with the
same operations in the same order (a bank's weights equal an
``Envelope``'s bit for bit for step and linear).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

Formula = Callable[[Tensor, Any, Any, Any], Tensor]


@dataclass(frozen=True)
class Shape:
    """One shape: ``formula(l, T, s, gamma)`` and the parameters it takes."""

    name: str
    formula: Formula
    threshold: bool = False
    """Takes a threshold ``T``: static (``threshold``) or adaptive (``quantile``)."""
    width: bool = False
    """Takes a transition width ``s``: static (``inverse_slope``) or adaptive (``width``)."""
    gamma: bool = False
    """Takes ``gamma`` (required)."""
    cutoff: float = 0.0
    """A weight at or below this counts as attenuated (a sigmoid never reaches 0)."""
    colour: str = "tab:gray"
    """Its colour in figures; the registry's order is its order in tables."""


def identity(loss: Tensor, threshold: Any, span: Any, gamma: Any) -> Tensor:
    """``w = 1``."""
    return torch.ones_like(loss)


def step(loss: Tensor, threshold: Any, span: Any, gamma: Any) -> Tensor:
    """``w = [l >= T]``."""
    return (loss >= threshold).to(loss.dtype)


def linear(loss: Tensor, threshold: Any, span: Any, gamma: Any) -> Tensor:
    """``w = clamp((l - T) / s + 1/2, 0, 1)``: a ramp of width ``s`` centred on ``T``."""
    return ((loss - threshold) / span + 0.5).clamp(0.0, 1.0)


def sigmoid(loss: Tensor, threshold: Any, span: Any, gamma: Any) -> Tensor:
    """``w = sigmoid(4 (l - T) / s)``: its tangent at ``T`` rises from 0 to 1 over ``s``."""
    # Divide first: a floored span must give (0 / tiny) * 4 = 0, not 0 * inf.
    return torch.sigmoid((loss - threshold) / span * 4.0)


def focal(loss: Tensor, threshold: Any, span: Any, gamma: Any) -> Tensor:
    r"""Focal loss's modulating factor ``(1 - exp(-l))^gamma``: ``(1 - p)^gamma`` for ``l = -log p``.

    Negative losses are treated as 0 (weight 0).
    """
    return (-torch.expm1(-loss.clamp_min(0.0))).pow(gamma)


SHAPES: dict[str, Shape] = {
    shape.name: shape
    for shape in (
        Shape("identity", identity, colour="0.3"),
        Shape("step", step, threshold=True, colour="tab:red"),
        Shape("linear", linear, threshold=True, width=True, colour="tab:blue"),
        Shape("sigmoid", sigmoid, threshold=True, width=True, cutoff=1e-3, colour="tab:green"),
        Shape("focal", focal, gamma=True, cutoff=1e-3, colour="tab:purple"),
        # online hard example mining: the unsmoothed adaptive step at quantile 1 - fraction (Envelope sets it up)
        Shape("hard_mining", step, threshold=True, colour="tab:orange"),
    )
}
"""The envelope shapes by name, in display order: the paper's four, and two classic per-sample reweightings."""


def shapes_with_width() -> tuple[str, ...]:
    """Shapes whose transition has a width (``inverse_slope`` or ``width``)."""
    return tuple(name for name, shape in SHAPES.items() if shape.width)


def threshold_shapes() -> tuple[str, ...]:
    """Shapes with a threshold, one per formula (hard mining is a step), in display order."""
    first: dict[Formula, str] = {}
    for name, shape in SHAPES.items():
        if shape.threshold:
            first.setdefault(shape.formula, name)
    return tuple(first.values())


def check_shape(shape: str, name: str = "shape") -> str:
    if shape not in SHAPES:
        raise ValueError(f"{name} must be one of {list(SHAPES)}, got {shape!r}")
    return shape


def shape_order(name: str) -> int:
    """A shape's place in tables (unknown names last)."""
    return list(SHAPES).index(name) if name in SHAPES else len(SHAPES)
