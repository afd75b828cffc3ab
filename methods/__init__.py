"""Gradient-shaping methods other than envelopes, to run and compare in the same runner."""
