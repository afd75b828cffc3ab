"""One job, from a composed config to ``result.json``.

Order of work: validate (before any data is touched), write the resolved
config, skip if this effective config already ran in the sweep, seed, run
the task, write the result. Any exception becomes a ``failed`` result; in a
multirun it is not re-raised, so the other jobs and the end-of-sweep
callback still run.
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
import traceback
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from envelopes import Envelope
from runner.config import config_id, effective_config, validate
from runner.recorder import Recorder, file_key, write_json_atomic
from tasks import task_module

log = logging.getLogger(__name__)

RESULT_FILE = "result.json"
CLAIMS_DIR = ".claims"


@dataclass
class RunContext:
    """What a task's ``run`` receives besides the config."""

    device: torch.device
    envelopes: dict[str, Envelope]
    recorder: Recorder
    job_dir: Path
    vwpr: Any = None  # the vwpr config node (None: off)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda but torch sees no CUDA device (use device=auto or device=cpu)")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (every device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def claim(sweep_dir: Path, run_id: str, job_dir: Path) -> Path | None:
    """Atomically claim ``run_id`` for ``job_dir``; return the owner's dir if another job has it.

    The claim file is created complete (a written temporary file hard-linked
    into place, which fails if the claim exists), so a concurrent job never
    reads a half-written claim, with any launcher and on shared file systems.
    A claim owned by this very job (a re-run of the same sweep) is kept; an
    owner that was interrupted is redone when the sweep is re-run, so its
    duplicates stay duplicates.
    """
    claims = sweep_dir / CLAIMS_DIR
    claims.mkdir(parents=True, exist_ok=True)
    path = claims / run_id
    tmp = claims / f".{run_id}.{os.getpid()}.{uuid.uuid4().hex}"
    tmp.write_text(str(job_dir))
    try:
        os.link(tmp, path)
        return None
    except FileExistsError:
        owner = Path(path.read_text().strip())
        return None if owner.resolve() == job_dir.resolve() else owner
    finally:
        tmp.unlink(missing_ok=True)


def previous_result(job_dir: Path, run_id: str) -> dict[str, Any] | None:
    """A completed result of the same run in this directory (an interrupted sweep re-run)."""
    import json

    path = job_dir / RESULT_FILE
    if not path.exists():
        return None
    try:
        result = json.loads(path.read_text())
    except ValueError:
        return None
    if result.get("status") == "completed" and result.get("run_id") == run_id:
        return result
    return None


def run_job(cfg: DictConfig, job_dir: Path, sweep_dir: Path | None, overrides: list[str], reraise: bool,
            default_threads: int | None = None) -> float:
    """Run one job and write its ``result.json``; return the objective (NaN if none).

    An interruption (Ctrl-C, a kill) writes no result: the job did not end,
    and re-running the sweep redoes it.
    """
    start = time.time()
    job_dir.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"overrides": overrides, "task": cfg.task.name, "seed": cfg.seed}
    recorder = None
    try:
        envelopes = validate(cfg)
        effective = effective_config(cfg, envelopes)
        result.update(config_id=config_id(effective), run_id=config_id(effective, with_seed=True), effective=effective)
        (job_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))

        done = previous_result(job_dir, result["run_id"])
        if done is not None:
            log.info("already completed in %s; not re-running", job_dir)
            return float(done["objective"]["value"] if done["objective"]["value"] is not None else math.nan)
        if sweep_dir is not None and cfg.deduplicate:
            owner = claim(sweep_dir, result["run_id"], job_dir)
            if owner is not None:
                log.info("same effective config as %s; skipping", owner)
                result.update(status="duplicate", duplicate_of=str(owner), wall_time_s=time.time() - start)
                write_json_atomic(job_dir / RESULT_FILE, result)
                return math.nan

        module = task_module(cfg.task.name)
        device = resolve_device(cfg.device)
        threads = cfg.threads if cfg.threads is not None else default_threads
        if threads is not None:
            torch.set_num_threads(threads)
        torch.set_flush_denormal(cfg.flush_denormal)
        seed_everything(cfg.seed)
        envelopes = {name: envelope.to(device) for name, envelope in envelopes.items()}
        recorder = Recorder(job_dir, module.OBJECTIVE, tensorboard=cfg.tensorboard, progress=cfg.progress)
        extra = module.run(cfg, RunContext(device, envelopes, recorder, job_dir, cfg.vwpr if cfg.vwpr.enabled else None))

        final = {**recorder.final, **extra}
        objective_key = file_key(module.OBJECTIVE[0])
        value = final.get(objective_key)
        result.update(
            status="completed",
            device=str(device),
            threads=torch.get_num_threads(),
            final=final,
            best=recorder.best,
            objective={"metric": objective_key, "mode": module.OBJECTIVE[1], "value": value},
            wall_time_s=time.time() - start,
        )
        recorder.log_hparams(effective, {k: v for k, v in final.items() if isinstance(v, (int, float))})
        write_json_atomic(job_dir / RESULT_FILE, result)
        log.info("completed in %.1fs: %s = %s", result["wall_time_s"], objective_key, value)
        return float(value if value is not None else math.nan)
    except Exception as error:
        result.update(
            status="failed",
            error=f"{type(error).__name__}: {error}",
            traceback=traceback.format_exc(),
            wall_time_s=time.time() - start,
        )
        if recorder is not None:
            result.update(final=recorder.final, best=recorder.best)
        write_json_atomic(job_dir / RESULT_FILE, result)
        log.error("job failed: %s", result["error"])
        if reraise:
            raise
        return math.nan
    finally:
        if recorder is not None:
            recorder.close()
