"""Export finished runs to an experiment tracker (MLflow), beside the files and TensorBoard events.

With ``tracking=mlflow`` every run a process trains (alone, seed-batched or
in a batched group) becomes one MLflow run once its ``result.json`` is
written: its params are the run's effective config, flattened
(``envelopes.classification.quantile``, ``task.lr``, ...), its metrics the
rows of ``metrics.jsonl`` by epoch (or environment step), and its files
(``config.yaml``, ``metrics.jsonl``, ``result.json``, figures) its
artifacts. A sweep is one MLflow experiment, named after its directory;
single runs go to the experiment ``runs``. The store defaults to SQLite in
``outputs/mlruns`` (MLflow 3 keeps its plain-file store in maintenance
mode); ``tracking_uri`` names another (a tracking server's ``http://...``).

    python run_ablation.py -m experiment=quick_digits tracking=mlflow
    mlflow ui --backend-store-uri sqlite:///outputs/mlruns/mlflow.db
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

TRACKERS = ("mlflow",)
DEFAULT_DIR = Path("outputs") / "mlruns"
ARTIFACTS = ("config.yaml", "metrics.jsonl", "result.json", "run_ablation.log", "controller.pt")


def check(tracking: str | None) -> None:
    """``tracking`` is null or a tracker whose package is installed; a ValueError naming the key otherwise."""
    if tracking is None:
        return
    if tracking not in TRACKERS:
        raise ValueError(f"tracking must be one of {list(TRACKERS)} or null, got {tracking!r}")
    try:
        import mlflow  # noqa: F401
    except ImportError:
        raise ValueError(
            "tracking=mlflow needs MLflow, which is not installed: pip install -r requirements-mlflow.txt"
        ) from None


def tracking_uri(uri: str | None) -> str:
    """The store: ``uri`` as given, or SQLite under ``outputs/mlruns`` of the directory the command ran in."""
    if uri:
        return uri
    from tasks.common import resolve_path

    directory = resolve_path(str(DEFAULT_DIR))
    directory.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{directory / 'mlflow.db'}"


def artifact_location(store: str, experiment: str) -> str | None:
    """Where an experiment's files go: beside a SQLite store (``<its folder>/artifacts/<experiment>``); a server's
    own choice otherwise (MLflow's default would be ``./mlruns`` of whatever directory the command ran in)."""
    if store.startswith("sqlite:///"):
        return str(Path(store.removeprefix("sqlite:///")).parent / "artifacts" / experiment)
    return None


def flatten(tree: Any, prefix: str = "") -> dict[str, str]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": "1"}``; lists stay whole, as JSON."""
    if isinstance(tree, dict):
        out: dict[str, str] = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): tree if isinstance(tree, str) else json.dumps(tree)}


def export_run(run_dir: Path, result: dict, experiment: str, uri: str | None, name: str) -> str | None:
    """One finished run (``run_dir`` and its ``result``) as an MLflow run; returns its id (None on failure).

    A tracker that cannot be reached costs the run nothing: its files are
    written already, and the failure is logged.
    """
    try:
        from mlflow.entities import Metric, Param, RunStatus
        from mlflow.tracking import MlflowClient

        store = tracking_uri(uri)
        client = MlflowClient(store)
        found = client.get_experiment_by_name(experiment)
        experiment_id = (
            found.experiment_id
            if found is not None
            else client.create_experiment(experiment, artifact_location=artifact_location(store, experiment))
        )
        run = client.create_run(
            experiment_id,
            run_name=name,
            tags={"lae_lab.run_id": str(result.get("run_id")), "lae_lab.run_dir": str(run_dir)},
        )
        run_id = run.info.run_id
        params = [Param(k, v[:6000]) for k, v in sorted(flatten(result.get("effective") or {}).items())]
        metrics = []
        metrics_file = run_dir / "metrics.jsonl"
        if metrics_file.exists():
            for line in metrics_file.read_text().splitlines():
                if not line:
                    continue
                row = json.loads(line)
                step = int(row.get("step", row.get("epoch", 0)))
                for key, value in row.items():
                    if key not in ("epoch", "step") and isinstance(value, (int, float)) and math.isfinite(value):
                        metrics.append(Metric(key, float(value), 0, step))
        for start in range(0, len(params), 100):  # MLflow's limits per batch
            client.log_batch(run_id, params=params[start : start + 100])
        for start in range(0, len(metrics), 1000):
            client.log_batch(run_id, metrics=metrics[start : start + 1000])
        for name_ in ARTIFACTS:
            if (run_dir / name_).exists():
                client.log_artifact(run_id, str(run_dir / name_))
        if (run_dir / "figures").is_dir():
            client.log_artifacts(run_id, str(run_dir / "figures"), "figures")
        status = RunStatus.FINISHED if result.get("status") == "completed" else RunStatus.FAILED
        client.set_terminated(run_id, RunStatus.to_string(status))
        return run_id
    except Exception as error:  # the run's own files stand; the export is a copy
        log.error("MLflow export of %s failed: %s", run_dir, error)
        return None
