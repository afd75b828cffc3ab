"""A results cache shared between sweeps: completed runs keyed by run id and code version.

With ``cache_dir=<path>``, a run whose effective config (seed included) has
already completed with the same code, in any sweep that used the same
cache, is not trained again: its result, metrics, TensorBoard events and
figures are copied into the new job's directory, and its ``result.json``
says where they came from (``cached_from``). Completed runs are stored
after they end; failed runs never are.

The code version is a hash of the project's Python sources and the versions
of torch, numpy, scikit-learn, gymnasium and the environment back ends
(Box2D, EnvPool) where installed, so an edit to a task or an envelope, or
another version of one of these libraries, starts a
fresh cache entry instead of serving stale results. Entries are written to
a temporary directory and renamed into place, so a reader never sees a
half-written one, with any number of concurrent writers.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("envelopes", "methods", "runner", "tasks")
CACHED_FILES = ("result.json", "metrics.jsonl")
CACHED_DIRS = ("tb", "figures")

log = logging.getLogger(__name__)


# Libraries whose version can change what a run computes: numerics, data and splits, environments.
VERSIONED = ("torch", "numpy", "scikit-learn", "gymnasium", "Box2D", "envpool")


def library_versions() -> dict[str, str]:
    """The installed version of each library in :data:`VERSIONED` (those not installed are left out)."""
    from importlib import metadata

    out = {}
    for name in VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


# what the runs execute: Python, and the C++ of the fused kernels (tasks/fused_mlp.py builds it)
CODE_SUFFIXES = (".py", ".cpp", ".h")


def code_files(root: Path = ROOT) -> list[Path]:
    """``run_ablation.py`` and every file of :data:`CODE_SUFFIXES` in the packages of :data:`SOURCES`."""
    return [root / "run_ablation.py"] + sorted(
        p for package in SOURCES for p in (root / package).rglob("*") if p.suffix in CODE_SUFFIXES
    )


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """A short hash of every source file the runs execute (:func:`code_files`) and of the libraries' versions."""
    digest = hashlib.sha256(json.dumps(library_versions(), sort_keys=True).encode())
    paths = code_files()
    for path in paths:
        digest.update(str(path.relative_to(ROOT)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


class ResultsCache:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def entry(self, run_id: str) -> Path:
        return self.root / run_id / code_version()

    def fetch(self, run_id: str, job_dir: Path) -> dict[str, Any] | None:
        """Copy a cached run's files into ``job_dir`` and return its result, or None if there is none."""
        entry = self.entry(run_id)
        try:
            result = json.loads((entry / "result.json").read_text())
        except (OSError, ValueError):
            return None
        if result.get("status") != "completed" or result.get("run_id") != run_id:
            return None
        for name in CACHED_DIRS:
            shutil.rmtree(job_dir / name, ignore_errors=True)
            if (entry / name).is_dir():
                shutil.copytree(entry / name, job_dir / name)
        for name in CACHED_FILES[1:]:
            if (entry / name).exists():
                shutil.copy2(entry / name, job_dir / name)
        result["cached_from"] = str(entry)
        return result

    def store(self, run_id: str, job_dir: Path) -> None:
        """Keep a completed run's files (no-op if this run and code version are already cached)."""
        entry = self.entry(run_id)
        if entry.exists():
            return
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = entry.parent / f".{entry.name}.{os.getpid()}.{uuid.uuid4().hex}"
        try:
            tmp.mkdir()
            for name in CACHED_FILES:
                if (job_dir / name).exists():
                    shutil.copy2(job_dir / name, tmp / name)
            for name in CACHED_DIRS:
                if (job_dir / name).is_dir():
                    shutil.copytree(job_dir / name, tmp / name)
            os.rename(tmp, entry)  # atomic; fails if another writer got there first, which is as good
        except OSError as error:
            if not entry.exists():
                log.warning("results cache: could not store %s in %s: %s", job_dir, entry, error)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
