"""What data a run reads, as part of its identity, checked once per data source.

A run's results depend on the bytes it trains on, not only on its config:
two jobs that differ only in ``data_root`` (or ``task.data_dir``) can read
different files. :func:`data_identity` names the files a task reads and
their MD5 digests; it belongs to the run's effective config, so its
``run_id``, the sweep's de-duplication and the results cache all tell
runs on different data apart, and a job whose data does not exist never
matches a run that trained on data that did.

The first time a data source is seen in a process, the task reads it whole
(``check_data``), so a missing, truncated or malformed file, or splits that
do not fit in it, fail before any job of a sweep trains, once per source and
task config rather than once per job.
Digests are kept per file path, size and modification time: editing or
replacing a file is noticed, and an unchanged file is hashed once.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from omegaconf import OmegaConf

from tasks import task_module
from tasks.datasets import md5sum

_digests: dict[tuple[str, int, int], str] = {}
_checked: set[tuple[tuple[tuple[str, int, int], ...], str]] = set()


def _stat_key(path: Path) -> tuple[str, int, int]:
    stat = os.stat(path)
    return str(path.resolve()), stat.st_size, stat.st_mtime_ns


def data_identity(task_cfg) -> dict[str, str] | None:
    """``{file name: md5}`` of the files the task reads, or None for a task that reads none.

    Tasks without files: scikit-learn's bundled digits and the RL
    environments, whose versions are part of the results cache's key
    instead. Raises the task's own error (naming the file) when data is
    missing or unreadable; with ``task.download`` missing files are fetched
    first.
    """
    module = task_module(task_cfg.name)
    if not hasattr(module, "data_files"):
        return None
    files = [Path(p) for p in module.data_files(task_cfg)]
    keys = tuple(_stat_key(p) for p in files)
    # the data, and the splits the task config cuts from it: once per source and task config
    checked = (keys, json.dumps(OmegaConf.to_container(task_cfg, resolve=True), sort_keys=True, default=str))
    if checked not in _checked:
        module.check_data(task_cfg)
        _checked.add(checked)
    if not files:
        return None
    out = {}
    for path, key in zip(files, keys):
        if key not in _digests:
            _digests[key] = md5sum(path)
        out[path.name] = _digests[key]
    return out
