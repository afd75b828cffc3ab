"""Load Hydra multirun directories into pandas DataFrames.

A job is a directory holding ``.hydra/overrides.yaml`` (Hydra writes it at
the job's start) and, once the job has ended, ``result.json``. A job that
trained several seeds as one batch (``seed_batch``) has one such directory
per seed, ``seed_<s>/``, and each counts as a job here. Jobs with an
overrides file but no result are reported as ``unfinished``, jobs whose
result cannot be read as ``unreadable`` (with a warning naming the file):
nothing is dropped silently.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable
from pathlib import Path

import pandas as pd
import pyarrow
import pyarrow.json
import yaml

SEED_KEYS = ("seed",)
ENVELOPE_PARAMETERS = ("shape", "quantile", "width", "threshold", "inverse_slope", "step_size", "gamma", "fraction")


def _job_dirs(sweep_dir: Path) -> list[Path]:
    """Job directories, and in place of a seed-batched job (``seed_batch > 1``) its per-seed directories."""
    seeds: dict[Path, list[Path]] = {}
    for p in sweep_dir.glob("*/seed_*/.hydra/overrides.yaml"):
        seeds.setdefault(p.parent.parent.parent, []).append(p.parent.parent)
    jobs = {p.parent.parent for p in sweep_dir.glob("*/.hydra/overrides.yaml")} | set(seeds)
    out = []
    for job in sorted(jobs, key=lambda p: (len(p.name), p.name)):
        out += sorted(seeds[job], key=lambda p: int(p.name.removeprefix("seed_"))) if job in seeds else [job]
    return out


def _read_overrides(path: Path) -> list[str]:
    """Hydra's YAML list of override strings, read with libyaml's C loader where PyYAML has it."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return [str(item) for item in yaml.load(path.read_text(), Loader=loader) or []]


def config_label(overrides: Iterable[str]) -> str:
    """The overrides that name a configuration: all but the seed, sorted."""
    kept = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in SEED_KEYS]
    return " ".join(sorted(kept)) or "(defaults)"


# Each envelope parameter's letter in a label and its name spelled out (legends, table notes).
ABBREVIATIONS = {
    "quantile": ("q", "threshold quantile"),
    "width": ("w", "width"),
    "threshold": ("T", "threshold"),
    "inverse_slope": ("s", "inverse slope"),
    "step_size": ("a", "step size"),
    "gamma": ("γ", "focusing γ"),
    "fraction": ("k", "hardest fraction"),
}


def envelope_label(envelopes: dict) -> str:
    """``loss: shape q=0.1 w=0.1 a=0.1`` per loss, in the paper's terms."""
    short = {key: letter for key, (letter, _) in ABBREVIATIONS.items()}
    parts = []
    for loss, params in sorted(envelopes.items()):
        text = params.get("shape", "?")
        text += "".join(f" {short[k]}={params[k]:g}" for k in short if k in params)
        parts.append(f"{loss}: {text}")
    return "; ".join(parts)


def load_jobs(*sweep_dirs: str | Path) -> pd.DataFrame:
    """One row per job, from sweep directories or from reports' ``jobs.csv`` files (the same rows, written by
    :func:`analysis.report.write_report`; without the runs' metrics there are no curves).

    Columns: sweep, job_dir, overrides, config (overrides but the seed),
    status, task, seed, config_id, run_id, error, wall_time_s, objective
    (metric, mode, value), ``env_<loss>_<parameter>`` for each envelope,
    ``envelopes`` (a readable label), ``final_<metric>`` and ``best_<metric>``.
    """
    rows = []
    frames = [pd.read_csv(Path(p)) for p in sweep_dirs if Path(p).suffix == ".csv" and Path(p).is_file()]
    for sweep_dir in (Path(p) for p in sweep_dirs if not (Path(p).suffix == ".csv" and Path(p).is_file())):
        if not sweep_dir.is_dir():
            raise FileNotFoundError(f"sweep directory {sweep_dir} does not exist")
        for job_dir in _job_dirs(sweep_dir):
            overrides = _read_overrides(job_dir / ".hydra" / "overrides.yaml")
            row = {
                "sweep": str(sweep_dir),
                "job_dir": str(job_dir),
                "overrides": " ".join(overrides),
                "config": config_label(overrides),
            }
            result_path = job_dir / "result.json"
            result = None
            if result_path.exists():
                try:
                    result = json.loads(result_path.read_text())
                    if not isinstance(result, dict):
                        raise ValueError(f"expected a JSON object, got {type(result).__name__}")
                except (OSError, ValueError) as error:  # empty, truncated or not JSON: this run is left out
                    row.update(status="unreadable", error=f"{result_path}: cannot be read ({error})")
                    warnings.warn(f"{row['error']}; the run is left out of the tables", stacklevel=2)
                    rows.append(row)
                    continue
            if result is None:
                row["status"] = "unfinished"
            else:
                row.update(
                    {
                        k: result.get(k)
                        for k in (
                            "status",
                            "task",
                            "seed",
                            "config_id",
                            "run_id",
                            "error",
                            "duplicate_of",
                            "wall_time_s",
                        )
                    }
                )
                objective = result.get("objective") or {}
                row["objective_metric"] = objective.get("metric")
                row["objective_mode"] = objective.get("mode")
                row["objective"] = objective.get("value")
                effective = result.get("effective") or {}
                envelopes = effective.get("envelopes") or {}
                row["envelopes"] = envelope_label(envelopes)
                row["envelopes_json"] = json.dumps(envelopes, sort_keys=True)
                for loss, params in envelopes.items():
                    for key in ENVELOPE_PARAMETERS:
                        row[f"env_{loss}_{key}"] = params.get(key)
                task_params = effective.get("task") or {}
                row["dataset"] = task_params.get("dataset", task_params.get("env_id"))
                row["task_json"] = json.dumps(effective.get("task") or {}, sort_keys=True)
                row["vwpr"] = bool((effective.get("vwpr") or {}).get("enabled", False))
                row["controller"] = (effective.get("controller") or {}).get("mode")
                row.update({f"final_{k}": v for k, v in (result.get("final") or {}).items()})
                row.update({f"best_{k}": v for k, v in (result.get("best") or {}).items()})
            rows.append(row)
    # a report's jobs.csv (what this function returned for its sweeps) stands for sweeps whose runs are gone
    return pd.concat([pd.DataFrame(rows), *frames], ignore_index=True) if frames else pd.DataFrame(rows)


# the positions a run logs its rows at (``runner.recorder.Recorder.log``: an integer step or epoch); every other
# value it logs is a float
POSITIONS = ("step", "epoch")


def read_metrics_file(path: Path, columns: set[str] | None = None) -> pd.DataFrame:
    """A run's ``metrics.jsonl`` as a table, one row per line (``columns``: only those, where present).

    Read by pyarrow's JSON reader, in C++ (a grid's report spent most of its
    time in Python's ``json`` on 2.4 million lines); given ``columns``, only
    those are converted (integer positions, float values, as the recorder
    writes them). A file it does not take (a line that is not JSON, a value
    of another type) is read line by line with ``json``, as before, so the
    table is the same either way; a line that is not JSON raises
    ``ValueError`` naming the file and the line.
    """
    parse = None
    if columns is not None:
        fields = [(name, pyarrow.int64() if name in POSITIONS else pyarrow.float64()) for name in sorted(columns)]
        parse = pyarrow.json.ParseOptions(explicit_schema=pyarrow.schema(fields), unexpected_field_behavior="ignore")
    try:
        table = pyarrow.json.read_json(path, parse_options=parse)
    except (pyarrow.ArrowInvalid, pyarrow.ArrowNotImplementedError):
        records = []
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if line:
                try:
                    record = json.loads(line)
                except ValueError as error:
                    raise ValueError(f"{path}: line {number} cannot be read ({error})") from None
                records.append(record if columns is None else {k: v for k, v in record.items() if k in columns})
        return pd.DataFrame(records)
    if columns is not None:  # the asked-for columns in the file, in the file's order; none that it lacks
        with path.open() as handle:  # the first line alone, not the whole file a second time
            order = json.loads(handle.readline() or "{}")
        present = [name for name in table.column_names if table[name].null_count < len(table)]
        present.sort(key=lambda name: list(order).index(name) if name in order else len(order))
        table = table.select(present)
    return table.to_pandas()


def load_metrics(
    jobs: pd.DataFrame, keep: Iterable[str] | None = None, columns: Iterable[str] | None = None
) -> pd.DataFrame:
    """Long table of per-epoch (or per-step) metrics: one row per job and logged step.

    ``keep`` (job directories) keeps only those runs' rows and ``columns``
    only those metrics (beside ``step`` and ``epoch``): a report's figures
    plot the table's rows alone, so a grid of thousands of runs need not be
    held in memory. Every completed run's file is still read through: a
    run whose ``metrics.jsonl`` has a line that is not JSON (a truncated
    file) is left out of the curves with a warning naming the file and line;
    ``attrs["unreadable"]`` lists those messages for the report.
    """
    kept_dirs = None if keep is None else set(map(str, keep))
    wanted = None if columns is None else {*POSITIONS, *columns}
    frames = []
    unreadable = []
    for job in jobs.itertuples(index=False):
        path = Path(job.job_dir) / "metrics.jsonl"
        if job.status != "completed" or not path.exists():
            continue
        try:
            frame = read_metrics_file(path, wanted)
        except ValueError as error:
            unreadable.append(f"{error}; the run's curves are left out")
            warnings.warn(unreadable[-1], stacklevel=2)
            continue
        if (kept_dirs is None or str(job.job_dir) in kept_dirs) and len(frame):
            frames.append(frame.assign(job_dir=job.job_dir, config_id=job.config_id, seed=job.seed))
    frame = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    frame.attrs["unreadable"] = unreadable
    return frame


def read_at_step(jobs: pd.DataFrame, step: int) -> pd.DataFrame:
    """The jobs as they stood at ``step`` environment steps: ``final_*`` from the last row logged at or before it.

    For reading RL runs at a point of training (the paper's Acrobot Table 6
    is its 200k-step runs at 50k steps). Metrics a run computes only at its
    end (``return_ma100_final_phase``) are left out; a completed run that
    logged no row at or before ``step`` gets status ``no_row_at_step``.
    Each row records the step in ``read_at_step``, so that a report's
    ``jobs.csv`` read at that step stands for runs whose metrics are gone;
    such rows cannot be read at another step.
    """
    jobs = jobs.copy()
    if "read_at_step" in jobs.columns and jobs["read_at_step"].notna().all():
        read = sorted(set(jobs["read_at_step"].astype(int)))
        if read != [step]:
            raise ValueError(f"these runs were read at {read} environment steps (a report's jobs.csv), not at {step}")
        jobs.attrs["at_step"] = step
        return jobs
    finals = [c for c in jobs.columns if c.startswith("final_")]
    jobs[finals] = float("nan")
    last_rows = {}  # per job: its last row at or before the step, set below one column at a time
    for index, job in jobs.iterrows():
        if job["status"] != "completed":
            continue
        rows = read_metrics_file(Path(job["job_dir"]) / "metrics.jsonl")
        # each row's position: its step, else its epoch, else 0
        position = pd.Series(0, index=rows.index)
        for key in ("epoch", "step"):
            if key in rows:
                position = rows[key].where(rows[key].notna(), position)
        before = rows[position <= step]
        if before.empty:
            jobs.loc[index, "status"] = "no_row_at_step"
            continue
        last_rows[index] = before.iloc[-1].add_prefix("final_")  # NaN: a key that row did not log
    if last_rows:
        last = pd.DataFrame.from_dict(last_rows, orient="index").dropna(axis=1, how="all")
        for column in last:
            jobs.loc[last.index, column] = last[column]
    jobs["read_at_step"] = step
    jobs.attrs["at_step"] = step
    return jobs
