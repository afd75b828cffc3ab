"""The end-of-sweep summary: objective mean ± std (n) per configuration."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from analysis.load import load_jobs


def summarise(jobs: pd.DataFrame) -> pd.DataFrame:
    """Completed jobs grouped by configuration (all overrides but the seed)."""
    done = jobs[jobs["status"] == "completed"]
    if done.empty:
        return pd.DataFrame(columns=["config", "metric", "mean", "std", "n"])
    grouped = done.groupby("config", sort=True)
    table = pd.DataFrame(
        {
            "metric": grouped["objective_metric"].first(),
            "mean": grouped["objective"].mean(),
            "std": grouped["objective"].std(ddof=1),
            "n": grouped["objective"].count(),
        }
    ).reset_index()
    return table


def print_sweep_summary(sweep_dir: Path) -> pd.DataFrame:
    """Print counts by status, failures with their reasons, the per-config table; write summary.csv."""
    jobs = load_jobs(sweep_dir)
    if jobs.empty:
        print(f"No jobs found in {sweep_dir}")
        return jobs
    counts = jobs["status"].value_counts().to_dict()
    print(f"\nSweep {sweep_dir}: {len(jobs)} jobs, " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    for _, job in jobs[jobs["status"] == "failed"].iterrows():
        print(f"  FAILED {job['job_dir']}: {job.get('error')}")
    table = summarise(jobs)
    if not table.empty:
        lines = []
        for _, row in table.iterrows():
            std = "" if math.isnan(row["std"]) else f" ± {row['std']:.4f}"
            lines.append(f"  {row['metric']} {row['mean']:.4f}{std} (n={row['n']})  {row['config']}")
        print("\n".join(lines))
    table.to_csv(sweep_dir / "summary.csv", index=False)
    jobs.to_csv(sweep_dir / "jobs.csv", index=False)
    print(f"Results: {sweep_dir} (jobs.csv, summary.csv; one folder per job)")
    return table
