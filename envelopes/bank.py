"""``EnvelopeBank``: G envelopes with their own settings, applied to G groups of losses in one call.

A grid of runs trained as one batched model (configurations x seeds) needs
each run's envelope on that run's losses: one may be an identity, the next
a step at a static threshold, the next a sigmoid whose threshold and width
are smoothed quantiles at other levels and step sizes. A bank holds every
group's parameters as tensors and computes all weights at once:

- quantiles: one sort of each group's losses (:func:`sort_rows`), then for each group and level
  ``lerp(sorted[lo], sorted[hi], fraction)`` with ``lo``, ``hi`` and
  ``fraction`` the positions :func:`~envelopes.functional.selection_plan`
  gives that level (``torch.quantile``'s linear interpolation), computed in
  Python doubles once per batch size, so each group's value is the one its
  own :class:`~envelopes.Envelope` computes, exact where order statistics tie;
- smoothing: a bias-corrected EMA per group with its own step size (a step
  size of 1 passes the batch's value through unchanged);
- weights: the formula of each shape in the bank (:data:`~envelopes.SHAPES`),
  selected per group.

Nothing is read back to the host. Each group's thresholds and widths equal
those of a separate ``Envelope`` with the same settings fed the same
losses bit for bit, and so do its weights for identity, step, linear and
hard mining; sigmoid and focal weights agree to rounding (torch's
vectorised ``exp`` can round an element differently at another place in
memory).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .envelope import Envelope
from .functional import interpolation_positions, quantile_levels
from .shapes import SHAPES


def sort_rows(values: Tensor) -> Tensor:
    """Each row of a 2-d tensor sorted ascending: NumPy's sort on the CPU, torch's elsewhere.

    The same values in the same order (NaN last in both). On the CPU
    NumPy's vectorised sort took 12 us on (121, 100) losses, torch's 330 us:
    two banks a minibatch, that was a tenth of a PPO update's time on 121
    agents. Half precision, and code being traced by ``torch.compile``,
    take torch's.
    """
    if values.device.type == "cpu" and values.dtype in _NUMPY_SORTED and not torch.compiler.is_compiling():
        return torch.from_numpy(np.sort(values.detach().numpy(), axis=-1))
    return values.sort(dim=-1).values


_NUMPY_SORTED = (torch.float32, torch.float64)


class EnvelopeBank(nn.Module):
    """G envelopes (any mix of shapes and settings) for losses of shape (G, ...), one per group.

    Build it from envelopes or their configs::

        bank = EnvelopeBank([Envelope("identity"), Envelope("step", quantile=0.5, step_size=0.1)])
        loss = bank(per_sample_losses).sum()        # per_sample_losses: (2, batch)

    ``hard_mining`` is the unsmoothed adaptive step it is defined as; focal
    loss's modulating factor is supported as an envelope (detached), not
    with ``full_gradient``.
    """

    def __init__(self, envelopes: Sequence[Envelope | Mapping[str, Any]]):
        super().__init__()
        envelopes = [e if isinstance(e, Envelope) else Envelope.from_config(e) for e in envelopes]
        if not envelopes:
            raise ValueError("an EnvelopeBank needs at least one envelope")
        for i, envelope in enumerate(envelopes):
            if envelope.full_gradient:
                raise ValueError(f"envelope {i}: full_gradient focal loss is not an envelope and cannot be banked")
        self.groups = len(envelopes)
        self.shape_names = [e.shape for e in envelopes]
        shapes = [SHAPES[name] for name in self.shape_names]
        self.levels = [tuple(quantile_levels(e.quantile, e.width)) for e in envelopes]
        self.has_quantile = [e.quantile is not None for e in envelopes]
        self.has_width = [e.width is not None for e in envelopes]
        self.adaptive = any(self.levels)

        def column(values, dtype=torch.float32):
            return torch.tensor(values, dtype=dtype)

        # one code per formula (hard mining is a step), in the order of SHAPES
        self.formulas = list(dict.fromkeys(shape.formula for shape in SHAPES.values() if shape in shapes))
        self.register_buffer("shape_code", column([self.formulas.index(s.formula) for s in shapes], torch.long))
        self.register_buffer("threshold_applies", column([s.threshold for s in shapes], torch.bool))
        self.register_buffer("width_applies", column([s.width for s in shapes], torch.bool))
        # Static values in double, cast to the losses' dtype when used, as a Python number would be.
        double = torch.float64
        self.register_buffer(
            "static_threshold",
            column([e.threshold_value if e.threshold_value is not None else 0.0 for e in envelopes], double),
        )
        self.register_buffer(
            "static_span",
            column([e.inverse_slope_value if e.inverse_slope_value is not None else 1.0 for e in envelopes], double),
        )
        self.register_buffer("gamma", column([e.gamma if e.gamma is not None else 2.0 for e in envelopes], double))
        self.register_buffer("adaptive_threshold", column(self.has_quantile, torch.bool))
        self.register_buffer("adaptive_span", column(self.has_width, torch.bool))
        self.register_buffer("cutoff", column([s.cutoff for s in shapes], double))
        step_sizes = [e.step_size if e.adaptive else 1.0 for e in envelopes]
        # a and (1 - a) in double, cast to the trace's dtype when used, as an Envelope's Python numbers are
        self.register_buffer("step_size", column(step_sizes, double))
        self.register_buffer("keep", column([1.0 - a for a in step_sizes], double))
        self.register_buffer("smoothed_group", column([e.smoothed for e in envelopes], torch.bool))
        self.register_buffer("estimate", torch.zeros(self.groups, 2))
        self.register_buffer("trace", torch.zeros(self.groups))
        self.smoothed = any(e.smoothed for e in envelopes)
        self._positions: dict = {}
        self.weight: Tensor | None = None
        self.threshold: Tensor | None = None
        self.inverse_slope: Tensor | None = None

    def extra_repr(self) -> str:
        return f"groups={self.groups}, shapes={sorted(set(self.shape_names))}"

    def _interpolation(self, n: int, like: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(G, 3) indices ``lo``, ``hi`` and fractions: slot 0 the threshold's level, 1 and 2 the width's."""
        key = (n, like.dtype, like.get_device())
        if key not in self._positions:
            lo, hi, frac = [], [], []
            for levels, has_q in zip(self.levels, self.has_quantile):
                slots = list(levels) if has_q else [0.0, *levels]  # no adaptive threshold: slot 0 unused
                slots += [0.0] * (3 - len(slots))  # no adaptive width: slots 1 and 2 unused
                row_lo, row_hi, row_frac = zip(*(interpolation_positions(n, q) for q in slots))
                lo.append(row_lo)
                hi.append(row_hi)
                frac.append(row_frac)
            device = like.device
            self._positions[key] = (
                torch.tensor(lo, device=device),
                torch.tensor(hi, device=device),
                torch.tensor(frac, dtype=like.dtype, device=device),
            )
        return self._positions[key]

    def prepare(self, n: int, like: Tensor) -> None:
        """Work out ahead the quantile positions for batches of ``n`` losses of ``like``'s dtype and device.

        A compiled step that calls the bank then finds them already cached,
        instead of being compiled once before they are cached and again after.
        """
        if self.adaptive:
            self._interpolation(n, like)

    def _values(self, flat: Tensor) -> tuple[Tensor, Tensor]:
        """(G,) threshold and span for this batch: static values, or (smoothed) batch quantiles."""
        static_t = self.static_threshold.to(flat.dtype)
        static_s = self.static_span.to(flat.dtype)
        if not self.adaptive:
            return static_t, static_s
        lo, hi, frac = self._interpolation(flat.shape[-1], flat)
        ordered = sort_rows(flat)
        levels = torch.lerp(ordered.gather(-1, lo), ordered.gather(-1, hi), frac)  # (G, 3)
        observed = torch.stack((levels[:, 0], levels[:, 2] - levels[:, 1]), dim=-1)
        if self.smoothed:
            step_size = self.step_size.to(self.trace.dtype)
            self.trace.mul_(self.keep.to(self.trace.dtype)).add_(step_size)
            # a / o as a true division, as an Envelope computes it (exactly 1 at the first update)
            self.estimate.lerp_(observed.to(self.estimate.dtype), (step_size / self.trace)[:, None])
            # groups without smoothing keep the batch's value in its own dtype (the estimate is float32)
            observed = torch.where(self.smoothed_group[:, None], self.estimate.to(flat.dtype), observed)
        threshold = torch.where(self.adaptive_threshold, observed[:, 0], static_t)
        span = torch.where(self.adaptive_span, observed[:, 1], static_s)
        return threshold, span

    def compute_weight(self, loss: Tensor) -> Tensor:
        """The detached weights (G, ...) of losses (G, ...), updating each group's adaptive state."""
        loss = loss.detach()
        if loss.dim() == 0 or loss.shape[0] != self.groups:
            raise ValueError(
                f"an EnvelopeBank of {self.groups} envelopes needs losses of shape ({self.groups}, ...), "
                f"got {tuple(loss.shape)}"
            )
        flat = loss.reshape(self.groups, -1)
        threshold, span = self._values(flat)
        self.threshold, self.inverse_slope = threshold, span
        per_group = (self.groups,) + (1,) * (loss.dim() - 1)
        t = threshold.reshape(per_group)
        s = span.clamp_min(torch.finfo(span.dtype).tiny).reshape(per_group)
        gamma = self.gamma.to(loss.dtype).reshape(per_group)
        weight = self.formulas[0](loss, t, s, gamma)
        if len(self.formulas) > 1:
            code = self.shape_code.reshape(per_group)
            for i, formula in enumerate(self.formulas[1:], start=1):
                weight = torch.where(code == i, formula(loss, t, s, gamma), weight)
        self.weight = weight
        return weight

    def forward(self, loss: Tensor) -> Tensor:
        return loss * self.compute_weight(loss)

    def statistics(self) -> dict[str, Tensor]:
        """Per group (G,): mean weight, fraction attenuated, threshold and width of the last call.

        Thresholds and widths of groups whose shape has none (identity, and
        the width of a step) are NaN: :meth:`applies` says which apply.
        """
        weight = self.weight.reshape(self.groups, -1)
        nan = torch.full_like(self.threshold, math.nan)
        return {
            "mean_weight": weight.mean(-1),
            "fraction_attenuated": torch.mean(
                weight <= self.cutoff.to(weight.dtype)[:, None], dim=-1, dtype=weight.dtype
            ),
            "threshold": torch.where(self.threshold_applies, self.threshold, nan),
            "inverse_slope": torch.where(self.width_applies, self.inverse_slope, nan),
        }

    def applies(self, group: int) -> tuple[str, ...]:
        """The statistics that mean something for ``group``'s shape (an Envelope's statistics keys)."""
        shape = SHAPES[self.shape_names[group]]
        return (
            ("mean_weight", "fraction_attenuated")
            + (("threshold",) if shape.threshold else ())
            + (("inverse_slope",) if shape.width else ())
        )
