"""``EnvelopeBank``: G envelopes with their own settings, applied to G groups of losses in one call.

A grid of runs trained as one batched model (configurations x seeds) needs
each run's envelope on that run's losses: one may be an identity, the next
a step at a static threshold, the next a sigmoid whose threshold and width
are smoothed quantiles at other levels and step sizes. A bank holds every
group's parameters as tensors and computes all weights at once:

- quantiles: the order statistics every group needs, then for each group
  and level ``lerp(ordered[lo], ordered[hi], fraction)`` with ``lo``, ``hi``
  and ``fraction`` the positions :func:`~envelopes.functional.interpolation_positions`
  gives that level (``torch.quantile``'s linear interpolation), computed in
  Python doubles once per batch size, so each group's value is the one its
  own :class:`~envelopes.Envelope` computes, exact where order statistics tie.
  Where all the ranks any group needs lie in a window at one end of the
  batch holding at most half of it (levels up to 0.3 with widths up to 0.1
  on batches of 100: the 36 smallest), one ``topk`` of that window reads
  them (a quarter of a full sort's time on (121, 100) losses); otherwise
  one sort of each group's losses;
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

import torch
from torch import Tensor, nn

from .envelope import Envelope
from .functional import interpolation_positions, quantile_levels
from .shapes import SHAPES


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

    def _interpolation(self, n: int, like: Tensor) -> tuple[tuple[str, int], Tensor, Tensor, Tensor]:
        """How to order a batch of ``n`` losses, and (G, 3) positions ``lo``, ``hi`` and fractions in that order.

        Slot 0 is the threshold's level, 1 and 2 the width's. The order is
        ``("bottom", k)`` (the k smallest, ascending), ``("top", k)`` (the k
        largest, descending) or ``("sort", n)``: the ranks all groups need
        decide, once per batch size.
        """
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
            # the ranks the groups' levels need (an unused slot's rank 0 needs no reading)
            used = [[has_q, has_w, has_w] for has_q, has_w in zip(self.has_quantile, self.has_width)]
            ranks = {
                rank
                for g in range(self.groups)
                for slot in range(3)
                if used[g][slot]
                for rank in (lo[g][slot], hi[g][slot])
            }
            from_bottom, from_top = max(ranks) + 1, n - min(ranks)
            if 2 * min(from_bottom, from_top) > n:
                order, slot_of = ("sort", n), lambda r: r
            elif from_bottom <= from_top:
                order, slot_of = ("bottom", from_bottom), lambda r: r
            else:
                order, slot_of = ("top", from_top), lambda r: n - 1 - r
            # a rank outside the window (an unused slot's) is read from slot 0 and never used
            window = order[1]
            lo = [[slot_of(r) if 0 <= slot_of(r) < window else 0 for r in row] for row in lo]
            hi = [[slot_of(r) if 0 <= slot_of(r) < window else 0 for r in row] for row in hi]
            device = like.device
            self._positions[key] = (
                order,
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
        (order, size), lo, hi, frac = self._interpolation(flat.shape[-1], flat)
        if order == "sort":
            ordered = flat.sort(dim=-1).values
        else:
            ordered = flat.topk(size, dim=-1, largest=order == "top", sorted=True).values
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
