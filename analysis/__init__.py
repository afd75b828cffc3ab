"""Read sweep outputs from disk into tables; never imports a task."""

from analysis.load import load_jobs, load_metrics

__all__ = ["load_jobs", "load_metrics"]
