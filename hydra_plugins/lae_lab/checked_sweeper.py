"""Hydra's basic sweeper without its second composition of every job, and with jobs listed in a file.

Hydra only loads plugins from the ``hydra_plugins`` namespace package, hence
this module's place. ``conf/hydra/sweeper_default.yaml`` selects it
(``hydra/sweeper: checked``) unless an experiment preset picks another sweeper.
"""

from __future__ import annotations

from collections.abc import Sequence

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

from runner.callbacks import expand_sweep, was_checked


class CheckedSweeper(BasicSweeper):
    """The basic sweeper, trusting the sweep check that already composed every job.

    ``runner.callbacks.SweepCallback`` composes and validates every job before
    the sweeper starts; ``BasicSweeper`` would then compose each job once more
    before launching (``validate_batch_is_legal``), doubling the time a large
    sweep spends before its first job trains. A sweep the callback did not
    check (its callback replaced) is validated as Hydra does.
    """

    def __init__(self, max_batch_size: int | None, params: dict[str, str] | None = None, jobs: str | None = None):
        super().__init__(max_batch_size, params)
        self.jobs = jobs

    def split_arguments(self, overrides: list, max_batch_size: int | None) -> list[list[list[str]]]:
        """The basic sweeper's product of the sweep's values; with ``jobs``, the jobs that file lists instead
        (``runner.callbacks.jobs_from_file``: each with the command line's other overrides)."""
        if self.jobs is None:
            return BasicSweeper.split_arguments(overrides, max_batch_size)
        assert self.config is not None
        jobs = expand_sweep(self.config)
        size = max_batch_size or len(jobs)
        return [jobs[i : i + size] for i in range(0, len(jobs), size)]

    def validate_batch_is_legal(self, batch: Sequence[Sequence[str]]) -> None:
        assert self.config is not None
        if not was_checked(self.config):
            super().validate_batch_is_legal(batch)
