"""``from enhanced_vwpr_wrapper import EnhancedVWPRWrapper``, as VWPR's document imports it: a re-export of
:class:`methods.vwpr.EnhancedVWPRWrapper`."""

from methods.vwpr import EnhancedVWPRWrapper

__all__ = ["EnhancedVWPRWrapper"]
