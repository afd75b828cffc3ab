"""Hydra's basic sweeper without its second composition of every job.

Hydra only loads plugins from the ``hydra_plugins`` namespace package, hence
this module's place. ``conf/hydra/sweeper_default.yaml`` selects it
(``hydra/sweeper: checked``) unless an experiment preset picks another sweeper.
"""

from __future__ import annotations

from collections.abc import Sequence

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

from runner.callbacks import was_checked


class CheckedSweeper(BasicSweeper):
    """The basic sweeper, trusting the sweep check that already composed every job.

    ``runner.callbacks.SweepCallback`` composes and validates every job before
    the sweeper starts; ``BasicSweeper`` would then compose each job once more
    before launching (``validate_batch_is_legal``), doubling the time a large
    sweep spends before its first job trains. A sweep the callback did not
    check (its callback replaced) is validated as Hydra does.
    """

    def validate_batch_is_legal(self, batch: Sequence[Sequence[str]]) -> None:
        assert self.config is not None
        if not was_checked(self.config):
            super().validate_batch_is_legal(batch)
