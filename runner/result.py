"""``result.json``: what a run is and how it ended, built in one place (:class:`Result`).

A run's file holds its identity (overrides, task, seed, config and run ids,
the effective config) and its outcome: ``completed`` (final and best rows,
the objective, device, threads, group size, wall time, compile time), ``failed`` (the
error, its traceback, the rows logged before it), ``duplicate`` (the run
directory that trains the same run id). A job of several seeds also writes
one for itself: ``batch`` (its seeds, those it trained, their directories),
or ``failed`` when it failed before any run started. Fields that do not
apply are left out of the file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from runner.recorder import write_json_atomic

RESULT_FILE = "result.json"


@dataclass
class Result:
    overrides: list[str]
    task: str
    seed: int
    config_id: str | None = None
    run_id: str | None = None
    effective: dict[str, Any] | None = None
    status: str | None = None
    """completed | failed | duplicate | batch (a job's own file); None: not ended."""
    duplicate_of: str | None = None
    error: str | None = None
    traceback: str | None = None
    device: str | None = None
    threads: int | None = None
    compile_s: float | None = None
    """``compile=true``: seconds of the group's first compiled step, compilation included (paid once per group,
    not divided among its runs)."""
    group_size: int | None = None
    kernels: str | None = None
    """A task with fused kernels (``FUSED = True``): the networks' kernels its runs used, fused or torch."""
    final: dict[str, Any] | None = None
    best: dict[str, Any] | None = None
    objective: dict[str, Any] | None = None
    wall_time_s: float | None = None
    batch: dict[str, Any] | None = None
    warnings: list[str] | None = None
    seeds: list[int] | None = None
    trained: list[int] | None = None
    runs: list[str] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    """Keys written by others (``cached_from``, by the results cache), kept as they are."""

    def to_json(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        return {**{k: v for k, v in out.items() if v is not None}, **self.extra}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Result:
        names = {f.name for f in fields(cls)} - {"extra"}
        return cls(
            **{k: v for k, v in data.items() if k in names},
            extra={k: v for k, v in data.items() if k not in names},
        )

    def write(self, directory: Path) -> None:
        write_json_atomic(directory / RESULT_FILE, self.to_json())

    def failed(self, error: BaseException | str, wall_time_s: float, traceback: str | None = None) -> None:
        self.status = "failed"
        self.error = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        self.traceback = traceback
        self.wall_time_s = wall_time_s

    @property
    def objective_value(self) -> float:
        """The objective's value (NaN if none)."""
        value = (self.objective or {}).get("value")
        return float("nan") if value is None else float(value)


def previous_result(job_dir: Path, run_id: str) -> Result | None:
    """A completed result of the same run in this directory (an interrupted sweep re-run)."""
    path = job_dir / RESULT_FILE
    if not path.exists():
        return None
    try:
        result = json.loads(path.read_text())
    except ValueError:
        return None
    if result.get("status") == "completed" and result.get("run_id") == run_id:
        return Result.from_json(result)
    return None
