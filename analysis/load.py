"""Load Hydra multirun directories into pandas DataFrames.

A job is a directory holding ``.hydra/overrides.yaml`` (Hydra writes it at
the job's start) and, once the job has ended, ``result.json``. Jobs with an
overrides file but no result are reported as ``unfinished``: nothing is
dropped silently.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import pandas as pd
import yaml

SEED_KEYS = ("seed",)


def _job_dirs(sweep_dir: Path) -> list[Path]:
    return sorted((p.parent.parent for p in sweep_dir.glob("**/.hydra/overrides.yaml")), key=lambda p: str(p))


def config_label(overrides: Iterable[str]) -> str:
    """The overrides that name a configuration: all but the seed, sorted."""
    kept = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in SEED_KEYS]
    return " ".join(sorted(kept)) or "(defaults)"


def load_jobs(*sweep_dirs: str | Path) -> pd.DataFrame:
    """One row per job: sweep, job dir, overrides, ids, seed, status, final_* and best_* metrics."""
    rows = []
    for sweep_dir in map(Path, sweep_dirs):
        for job_dir in _job_dirs(sweep_dir):
            overrides = yaml.safe_load((job_dir / ".hydra" / "overrides.yaml").read_text()) or []
            row = {"sweep": str(sweep_dir), "job_dir": str(job_dir), "overrides": " ".join(overrides), "config": config_label(overrides)}
            result_path = job_dir / "result.json"
            if not result_path.exists():
                row["status"] = "unfinished"
            else:
                result = json.loads(result_path.read_text())
                row.update({k: result.get(k) for k in ("status", "task", "seed", "config_id", "run_id", "error", "duplicate_of", "wall_time_s")})
                objective = result.get("objective") or {}
                row["objective_metric"] = objective.get("metric")
                row["objective_mode"] = objective.get("mode")
                row["objective"] = objective.get("value")
                row.update({f"final_{k}": v for k, v in (result.get("final") or {}).items()})
                row.update({f"best_{k}": v for k, v in (result.get("best") or {}).items()})
            rows.append(row)
    return pd.DataFrame(rows)


def load_metrics(jobs: pd.DataFrame) -> pd.DataFrame:
    """Long table of per-epoch (or per-step) metrics, one row per job and step."""
    frames = []
    for job_dir, config, seed in zip(jobs["job_dir"], jobs["config"], jobs.get("seed", [None] * len(jobs))):
        path = Path(job_dir) / "metrics.jsonl"
        if path.exists() and path.stat().st_size:
            frame = pd.read_json(path, lines=True)
            frame.insert(0, "job_dir", job_dir)
            frame.insert(1, "config", config)
            frame.insert(2, "seed", seed)
            frames.append(frame)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
