"""Tasks: one module per task, each owning its data, model, training loop and loss names.

A task module provides:

- ``Config``: the dataclass schema of its ``task`` config node;
- ``loss_names(task_cfg)``: the names of the losses an envelope can shape;
- ``OBJECTIVE``: ``(metric, "min" | "max")``, the value a sweep optimises;
- ``METRICS``: the names of the metrics its runs record (file form, ``val_loss``;
  ``*`` stands for any ending), so that ``report.metric`` is checked before training;
- ``validate(task_cfg)``: range checks, raising ``ValueError("key: ...")``;
- ``run(cfg, context)``: trains and returns the final metrics (a list, one
  dict per run, for a module with ``SEED_BATCH = True``: it trains every
  run in ``context.seeds`` at once, see ``tasks/seed_batch.py``; the runs
  may differ in their envelopes too, and ``context.envelope(loss)`` gives
  the run's own envelope for one run or an ``EnvelopeBank`` of one per run).

Modules are imported lazily, so a run pays only for the task it runs.
"""

from __future__ import annotations

import importlib
from typing import Any, Protocol, cast, runtime_checkable


@runtime_checkable
class TaskModule(Protocol):
    """What the runner needs of a task module (see the module docstring).

    Optional: ``data_files(task_cfg)`` (the files a run reads, for its data
    digest) and ``check_data(task_cfg)`` (refuse a sweep whose data is missing).
    """

    Config: type
    OBJECTIVE: tuple[str, str]
    METRICS: tuple[str, ...]
    SEED_BATCH: bool

    def loss_names(self, task_cfg: Any) -> tuple[str, ...]: ...

    def validate(self, task_cfg: Any) -> None: ...

    def run(self, cfg: Any, context: Any) -> list[dict[str, float] | Exception]: ...


TASKS = {
    "classification": "tasks.classification",
    "regression": "tasks.regression",
    "vae": "tasks.vae",
    "ppo": "tasks.ppo",
}


def task_module(name: str) -> TaskModule:
    if name not in TASKS:
        raise ValueError(f"task.name must be one of {list(TASKS)}, got {name!r}")
    return cast(TaskModule, importlib.import_module(TASKS[name]))
