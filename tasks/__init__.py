"""Tasks: one module per task, each owning its data, model, training loop and loss names.

A task module provides:

- ``Config``: the dataclass schema of its ``task`` config node;
- ``loss_names(task_cfg)``: the names of the losses an envelope can shape;
- ``OBJECTIVE``: ``(metric, "min" | "max")``, the value a sweep optimises;
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
from types import ModuleType

TASKS = {
    "classification": "tasks.classification",
    "regression": "tasks.regression",
    "vae": "tasks.vae",
    "ppo": "tasks.ppo",
}


def task_module(name: str) -> ModuleType:
    if name not in TASKS:
        raise ValueError(f"task.name must be one of {list(TASKS)}, got {name!r}")
    return importlib.import_module(TASKS[name])
