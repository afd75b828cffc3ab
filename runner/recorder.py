"""A job's results on disk: metrics table, TensorBoard events, atomic result file.

Layout of a job directory::

    config.yaml      the resolved config
    metrics.jsonl    one line per epoch (or logging step), flushed as written
    tb/              TensorBoard events (train/, val/, envelope/<loss>/, hparams)
    result.json      written last and atomically: its presence means the job ended

Metric names are TensorBoard tags (``val/loss``); in the plain files the
slashes become underscores (``val_loss``), so pandas and shells can use them.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from tqdm import tqdm

from tasks.common import DivergedError, divergence

log = logging.getLogger(__name__)
PROGRESS_LOG_INTERVAL_S = 60.0
"""Without a terminal, a progress line at most this often."""


def file_key(tag: str) -> str:
    return tag.replace("/", "_")


def _file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file: 0666 less the process's umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


_FILE_MODE = _file_mode()


def write_json_atomic(path: str | Path, payload: Mapping[str, Any]) -> None:
    """Write JSON so that readers see either the old file or the whole new one."""
    path = Path(path)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        os.fchmod(handle, _FILE_MODE)  # mkstemp makes 0600; the result reads like the run's other files
        with os.fdopen(handle, "w") as out:
            json.dump(payload, out, indent=2, sort_keys=True, default=_json_default)
            out.write("\n")
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def hparam_values(hparams: Mapping[str, Any]) -> dict[str, Any]:
    """A run's effective config as HPARAMS values: flattened, anything but a number, string or bool as text."""
    return {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in flatten(hparams).items()}


def write_sweep_hparams(sweep_dir: Path, results: list[Mapping[str, Any]]) -> Path | None:
    """One HPARAMS experiment summary at the sweep's root: the parameters that vary, the final metrics.

    ``results`` are the runs' ``result.json`` contents (completed runs with
    an ``effective`` config). The summary lists every parameter that takes
    more than one value across them (with its values as a discrete domain)
    and every numeric final metric, so TensorBoard's HPARAMS tab, opened on
    the sweep directory, shows all runs with all swept parameters. Written
    in ``<sweep>/tb_hparams/``; returns that directory (None: no runs).
    """
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import hparams as hparams_summary

    runs = [hparam_values(r["effective"]) for r in results if r.get("effective")]
    if not runs:
        return None
    values: dict[str, set] = {}
    for run in runs:
        for key, value in run.items():
            values.setdefault(key, set()).add(value)
    swept = {k for k, v in values.items() if len(v) > 1 or sum(k in run for run in runs) < len(runs)}
    if not swept:  # one configuration (seeds only): show the seed
        swept = {k for k in values if k == "seed"}
    domains, example = {}, {}
    for key in sorted(swept):
        kinds = {type(v) for v in values[key]}
        if kinds == {bool}:
            domain = sorted(values[key])
        elif kinds <= {int, float}:
            domain = sorted(float(v) for v in values[key])
        else:  # mixed kinds (a number here, text there) are shown as text
            domain = sorted(str(v) for v in values[key])
        domains[key], example[key] = domain, domain[0]
    metrics = sorted(
        {
            f"hparams/{k}"
            for r in results
            for k, v in (r.get("final") or {}).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        }
    )
    experiment, _, _ = hparams_summary(example, dict.fromkeys(metrics, 0.0), hparam_domain_discrete=domains)
    directory = Path(sweep_dir) / "tb_hparams"
    shutil.rmtree(directory, ignore_errors=True)
    writer = SummaryWriter(log_dir=str(directory))
    writer._get_file_writer().add_summary(experiment)
    writer.close()
    return directory


def flatten(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mapping to ``{"a.b.c": scalar}``; lists become strings."""
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, name + "."))
        elif isinstance(value, (list, tuple)):
            out[name] = str(list(value))
        else:
            out[name] = value
    return out


def run_label(overrides: Iterable[str]) -> str:
    """A run's TensorBoard name from its overrides: ``classification=sigmoid,classification.quantile=0.5,seed=1``.

    Config-group keys lose their package (``envelope@envelopes.classification`` is
    ``classification``), envelope keys their ``envelopes.`` prefix; overrides
    that do not change what the run computes are left out.
    """
    from runner.config import NOT_EFFECTIVE  # the keys a run id leaves out

    parts = []
    for override in overrides:
        key, _, value = override.partition("=")
        key = key.lstrip("+~")
        if key in NOT_EFFECTIVE or key == "experiment" or key.startswith(("hydra.", "report.")):
            continue
        key = key.split("@", 1)[1] if "@" in key else key
        key = key.removeprefix("envelopes.")
        parts.append(f"{key}={value}")
    label = ",".join(parts).replace("/", "_").replace(os.sep, "_") or "run"
    return label[:200]


class Recorder:
    """Writes per-step metrics to ``metrics.jsonl`` and TensorBoard; tracks final and best.

    Args:
        job_dir: the job's output directory.
        objective: ``(tag, "min" | "max")``; the best row is the one where it is best.
        tensorboard: write TensorBoard events under ``job_dir/tb``.
        progress: show a progress bar (None: a bar when stderr is a terminal, otherwise a log line
            about once a minute, for logs of runs in the background or on a cluster; False: neither).
        run_name: the events go to ``job_dir/tb/<run_name>``, so that TensorBoard,
            opened on a sweep, names the run ``<job>/tb/<run_name>`` (see :func:`run_label`).
    """

    def __init__(
        self,
        job_dir: str | Path,
        objective: tuple[str, str],
        tensorboard: bool = True,
        progress: bool | None = None,
        run_name: str | None = None,
    ):
        self.job_dir = Path(job_dir)
        self.job_dir.mkdir(parents=True, exist_ok=True)
        self.objective_tag, self.objective_mode = objective
        self.final: dict[str, float] = {}
        self.best: dict[str, float] = {}
        self.progress_enabled = sys.stderr.isatty() if progress is None else progress
        self.progress_logged = progress is None and not self.progress_enabled
        self.tensorboard = tensorboard
        self.tb_dir = self.job_dir / "tb" / run_name if run_name else self.job_dir / "tb"
        # Files are opened at the first row, so a job that fails while loading data leaves none.
        self._metrics_file = None
        self.writer = None

    def _open(self) -> None:
        # A job that trains starts from scratch: drop rows and events of an interrupted attempt.
        self._metrics_file = (self.job_dir / "metrics.jsonl").open("w")
        shutil.rmtree(self.job_dir / "tb", ignore_errors=True)
        if self.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(self.tb_dir))

    def writer_for_steps(self):
        """The TensorBoard writer (None if off), opened now, for values logged between epoch rows."""
        if self._metrics_file is None:
            self._open()
        return self.writer

    def progress(self, iterable: Iterable, total: int, unit: str = "epoch") -> Iterable:
        if self.progress_logged:
            return LoggedProgress(iterable, total, unit, f"{self.job_dir.name}: ")
        return tqdm(
            iterable, total=total, unit=unit, disable=not self.progress_enabled, dynamic_ncols=True, leave=False
        )

    def log(self, step: int, metrics: Mapping[str, float], step_name: str = "epoch") -> None:
        """Record one row: TensorBoard scalars at ``step`` and one JSON line.

        A non-finite value raises :class:`DivergedError` naming the metric:
        the run has diverged, and nothing of the row is written.
        """
        if self._metrics_file is None:
            self._open()
        row = {step_name: step}
        reason = divergence(metrics, f"{step_name} {step}")
        if reason is not None:  # a task checks before logging; this catches one that did not
            raise DivergedError(reason)
        for tag, value in metrics.items():
            value = float(value)
            row[file_key(tag)] = value
            if self.writer is not None:
                self.writer.add_scalar(tag, value, step)
        self._metrics_file.write(json.dumps(row) + "\n")
        self._metrics_file.flush()
        self.final = dict(row)
        key = file_key(self.objective_tag)
        if key in row and row[key] is not None:
            best = self.best.get(key)
            better = best is None or (row[key] < best if self.objective_mode == "min" else row[key] > best)
            if better:
                self.best = dict(row)

    def log_hparams(self, hparams: Mapping[str, Any], metrics: Mapping[str, float]) -> None:
        """Log the run's hyperparameters and final metrics as one session of TensorBoard's HPARAMS tab.

        Only the session (its start and end): the experiment summary, which
        says which hyperparameters and metrics the tab shows, is the sweep's,
        written once at its root by :func:`write_sweep_hparams`. A run with its
        own would hide the others' parameters (TensorBoard shows one).
        """
        if self.writer is None:
            return
        from torch.utils.tensorboard.summary import hparams as hparams_summary

        metric_tags = {
            f"hparams/{k}": float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and v is not None
        }
        _, start, end = hparams_summary(hparam_values(hparams), metric_tags)
        file_writer = self.writer._get_file_writer()
        for summary in (start, end):
            file_writer.add_summary(summary)
        for tag, value in metric_tags.items():
            self.writer.add_scalar(tag, value)

    def close(self) -> None:
        if self._metrics_file is not None:
            self._metrics_file.close()
        if self.writer is not None:
            self.writer.close()


class LoggedProgress:
    """``iterable``, logging ``done/total``, the time elapsed and an estimate of the rest every
    :data:`PROGRESS_LOG_INTERVAL_S` seconds, with the last values given to :meth:`set_postfix`.

    For a log file, where a progress bar's redraws would be noise. Counting
    and the clock only: nothing is read from a device.
    """

    def __init__(self, iterable: Iterable, total: int, unit: str, prefix: str = ""):
        self.iterable, self.total, self.unit, self.prefix = iterable, total, unit, prefix
        self.postfix = ""

    def set_postfix(self, values: Mapping[str, Any] | None = None, **named: Any) -> None:
        """As tqdm's: the values shown with the next line."""
        values = {**(values or {}), **named}
        self.postfix = ", " + ", ".join(f"{k} {v}" for k, v in values.items()) if values else ""

    def __iter__(self):
        start = last = time.monotonic()
        for done, item in enumerate(self.iterable, 1):
            yield item
            now = time.monotonic()
            if now - last >= PROGRESS_LOG_INTERVAL_S and done < self.total:
                last = now
                left = (now - start) / done * (self.total - done)
                log.info(
                    "%s%d/%d %ss (%.0f%%), %s elapsed, about %s left%s",
                    self.prefix,
                    done,
                    self.total,
                    self.unit,
                    100.0 * done / self.total,
                    _duration(now - start),
                    _duration(left),
                    self.postfix,
                )


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"
