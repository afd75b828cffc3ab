"""Loss Attenuation Envelopes: detached, monotone per-element loss weights.

Depends on torch alone; copy this folder into a project and write::

    from envelopes import Envelope
    envelope = Envelope("sigmoid", quantile=0.9, width=0.1, step_size=0.1)
    loss = envelope(per_sample_loss).mean()
"""

from .bank import EnvelopeBank
from .envelope import Envelope
from .functional import (
    bias_corrected_ema_,
    envelope_weight,
    focal_weight,
    quantile_levels,
    quantiles,
    shaped_loss,
)
from .shapes import SHAPES, Shape

__all__ = [
    "Envelope",
    "EnvelopeBank",
    "SHAPES",
    "Shape",
    "bias_corrected_ema_",
    "envelope_weight",
    "focal_weight",
    "quantile_levels",
    "quantiles",
    "shaped_loss",
]
