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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from envelopes import Envelope, EnvelopeBank
from methods.loss_controller import ControllerSettings
from runner.cache import ResultsCache
from runner.config import config_id, controller_settings, effective_config, validate
from runner.recorder import Recorder, file_key, run_label, write_json_atomic
from tasks import task_module
from tasks.common import resolve_path

log = logging.getLogger(__name__)

RESULT_FILE = "result.json"
CLAIMS_DIR = ".claims"


@dataclass
class RunContext:
    """What a task's ``run`` receives besides the config.

    ``seeds`` lists the seeds this job trains, with one recorder (and
    directory) each: one seed, or several with ``seed_batch`` for tasks that
    train seeds as one batched model (``SEED_BATCH = True``).
    """

    device: torch.device
    envelopes: dict[str, Envelope]
    recorders: list[Recorder]
    seeds: list[int]
    vwpr: Any = None  # the vwpr config node (None: off)
    controller: ControllerSettings | None = None  # the loss controller's settings (None: off)
    run_envelopes: list[dict[str, Envelope]] | None = None  # one dict per run when runs differ in envelopes
    warnings: list[str] = field(default_factory=list)  # what the run should know (in result.json)

    def envelope(self, loss: str) -> Envelope | EnvelopeBank:
        """The envelope of ``loss`` for this job's runs: the run's own for one run, else a bank of one per run."""
        per_run = self.run_envelopes or [self.envelopes] * len(self.seeds)
        if len(per_run) == 1:
            return per_run[0][loss]
        return EnvelopeBank([envelopes[loss] for envelopes in per_run]).to(self.device)

    @property
    def recorder(self) -> Recorder:
        return self.recorders[0]

    @property
    def job_dir(self) -> Path:
        return self.recorders[0].job_dir


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


def keep_freed_memory(trim_threshold: int = 1 << 30, mmap_threshold: int = 32 << 20) -> bool:
    """Have glibc's allocator keep freed memory for reuse instead of handing it back to the kernel at once.

    A training step allocates and frees the same few-megabyte tensors over
    and over. By default glibc returns such memory to the kernel when it is
    freed (the heap's top is trimmed past a threshold that follows the
    largest recent block, about twice its size), so the next step faults
    every page in again, zero-filled: on the reference machine about 3.5 µs
    a 4 KiB page, 2.5 ms for one 3 MB activation of a 121-agent PPO group,
    as long as the arithmetic on it. Here the heap keeps up to
    ``trim_threshold`` bytes free, and only blocks of ``mmap_threshold``
    bytes or more get their own mapping (returned when freed). Results do
    not change. Returns False where the C library is not glibc.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
    return bool(mallopt(m_trim_threshold, trim_threshold)) and bool(mallopt(m_mmap_threshold, mmap_threshold))


# Claims this process holds: claim file -> (open descriptor holding its lock, owner run directory).
_held: dict[str, tuple[int, Path]] = {}


@dataclass
class Claim:
    """Who trains a run: ``mine`` (this process, now), ``duplicate`` (another run directory with the
    same run id, completed or being trained by a live process) or ``busy`` (this very run directory,
    being trained by another live process: a concurrent sweep into the same directory)."""

    status: str
    owner: Path | None = None


def _owner_of(fd: int) -> Path | None:
    text = os.pread(fd, 4096, 0).decode(errors="replace")
    first = text.splitlines()[0].strip() if text.strip() else ""
    return Path(first) if first else None


def _open_claim(path: Path) -> int | None:
    try:
        return os.open(path, os.O_RDWR)
    except FileNotFoundError:  # removed or replaced meanwhile
        return None


def _lock(fd: int) -> bool:
    """Take the claim's exclusive lock without waiting; False if a live process holds it."""
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _same(a: Path, b: Path) -> bool:
    return a.resolve() == b.resolve()


def claim(sweep_dir: Path, key: str, run_dir: Path, run_id: str | None = None) -> Claim:
    """Claim the run ``key`` (its run id) of a sweep for ``run_dir``, for as long as this process lives.

    A claim is a file in ``<sweep>/.claims/`` naming the run directory that
    trains the run, and an exclusive ``flock`` on it held by the process
    that trains it; the operating system drops the lock when that process
    ends, however it ends. So a claim belongs to a live process or to none:

    - no claim yet: it is created complete and already locked (a locked
      temporary file hard-linked into place), and is this process's;
    - a claim locked by another process: that process is training the run;
      ``busy`` if it is this very directory (two sweeps into one
      directory: this one skips it and waits at its end), else ``duplicate``;
    - a claim nobody holds: its owner finished or died. If the owner
      completed the run, ``duplicate`` (or, for this very directory, the
      caller has already found its result); if it died or failed, the claim
      is taken over and the run is trained again. A failed run never makes
      another skip as its duplicate.

    ``flock`` also works between the nodes of a cluster where the shared
    file system supports locks (NFSv4 and Lustre do; Linux maps ``flock``
    to NFS byte-range locks). The claim is given up with :func:`release`.
    """
    import fcntl
    import socket

    claims = sweep_dir / CLAIMS_DIR
    claims.mkdir(parents=True, exist_ok=True)
    path = claims / key
    if str(path) in _held:
        owner = _held[str(path)][1]
        return Claim("mine") if _same(owner, run_dir) else Claim("duplicate", owner)
    content = f"{run_dir}\n{socket.gethostname()} {os.getpid()}\n".encode()
    for _ in range(1000):
        tmp = claims / f".{key}.{os.getpid()}.{uuid.uuid4().hex}"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, content)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a new file: never contended
        try:
            os.link(tmp, path)
            _held[str(path)] = (fd, run_dir)
            return Claim("mine")
        except FileExistsError:
            os.close(fd)
        finally:
            tmp.unlink(missing_ok=True)
        fd = _open_claim(path)
        if fd is None:
            continue
        if not _lock(fd):  # a live process holds it
            owner = _owner_of(fd)
            os.close(fd)
            if owner is None:  # being rewritten by the process that took it over
                time.sleep(0.01)
                continue
            return Claim("busy" if _same(owner, run_dir) else "duplicate", owner)
        try:
            replaced = os.stat(path).st_ino != os.fstat(fd).st_ino
        except FileNotFoundError:
            replaced = True
        if replaced:  # locked a file that is no longer the claim: look again
            os.close(fd)
            continue
        owner = _owner_of(fd)
        if owner is not None and not _same(owner, run_dir) and previous_result(owner, run_id or key) is not None:
            os.close(fd)
            return Claim("duplicate", owner)
        # its owner died or failed (or is this directory's interrupted attempt): take it over
        os.ftruncate(fd, 0)
        os.pwrite(fd, content, 0)
        _held[str(path)] = (fd, run_dir)
        return Claim("mine")
    raise RuntimeError(f"could not claim {path}: it kept changing hands")


def release(run_dir: Path) -> None:
    """Give up this process's claims on runs trained in ``run_dir`` (after their results are written)."""
    for path, (fd, owner) in list(_held.items()):
        if _same(owner, run_dir):
            os.close(fd)
            del _held[path]


def live_claims(sweep_dir: Path) -> list[Path]:
    """Run directories of the sweep that another live process is training now."""
    live = []
    for path in sorted((sweep_dir / CLAIMS_DIR).glob("[!.]*")):
        if str(path) in _held:
            continue
        fd = _open_claim(path)
        if fd is None:
            continue
        if not _lock(fd):
            owner = _owner_of(fd)
            if owner is not None:
                live.append(owner)
        os.close(fd)
    return live


def claim_key(run_id: str, run_dir: Path, deduplicate: bool) -> str:
    """The claim's name: the run id, or, without de-duplication, the run id and its directory."""
    if deduplicate:
        return run_id
    import hashlib

    return f"{run_id}.{hashlib.sha256(str(run_dir.resolve()).encode()).hexdigest()[:12]}"


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


@dataclass
class SeedRun:
    """One seed's run inside a job: its directory, identity and result."""

    seed: int
    dir: Path
    overrides: list[str]
    result: dict[str, Any]
    config: DictConfig
    envelopes: dict[str, Envelope]
    member: Any = None  # the Member (job) it belongs to


def seed_overrides(overrides: list[str], seed: int) -> list[str]:
    """A batched job's overrides as the equivalent single-seed job's."""
    kept = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in ("seed", "seed_batch")]
    return kept + [f"seed={seed}"]


def prepare(
    cfg: DictConfig, envelopes: dict[str, Envelope], job_dir: Path, overrides: list[str], batched: bool, seed: int
) -> SeedRun:
    """A seed's directory and identity; nothing is written yet (see ``write_config``)."""
    seed_cfg = cfg.copy()
    seed_cfg.seed, seed_cfg.seed_batch = seed, 1
    run_dir = job_dir / f"seed_{seed}" if batched else job_dir
    run_overrides = seed_overrides(overrides, seed) if batched else overrides
    effective = effective_config(seed_cfg, envelopes)
    result = {
        "overrides": run_overrides,
        "task": cfg.task.name,
        "seed": seed,
        "config_id": config_id(effective),
        "run_id": config_id(effective, with_seed=True),
        "effective": effective,
    }
    return SeedRun(seed, run_dir, run_overrides, result, seed_cfg, envelopes)


def write_config(run: SeedRun, batched: bool) -> None:
    """The seed's resolved config (and, in a batch, the overrides the analysis reads)."""
    (run.dir / ".hydra").mkdir(parents=True, exist_ok=True)
    if batched:
        (run.dir / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in run.overrides))
    (run.dir / "config.yaml").write_text(OmegaConf.to_yaml(run.config, resolve=True))


def objective_value(result: dict[str, Any]) -> float:
    value = (result.get("objective") or {}).get("value")
    return math.nan if value is None else float(value)


class GroupLog(logging.FileHandler):
    """``<job dir>/run_ablation.log``: every log line of this process while the job's group trains, in Hydra's
    format (a job that Hydra's ``run_job`` starts gets the same file from Hydra)."""

    def __init__(self, job_dir: Path) -> None:
        job_dir.mkdir(parents=True, exist_ok=True)
        super().__init__(job_dir / "run_ablation.log", mode="a", delay=True)
        self.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
        self.setLevel(logging.INFO)
        root = logging.getLogger()
        if root.level > logging.INFO or root.level == logging.NOTSET:
            root.setLevel(logging.INFO)
        root.addHandler(self)

    def close(self) -> None:
        logging.getLogger().removeHandler(self)
        super().close()


@dataclass
class Member:
    """One job of a sweep as the runner trains it: a config, its directory and overrides.

    A job trains the seeds ``seed .. seed + seed_batch - 1`` (one, or
    several as a seed batch, each in ``seed_<s>/``). ``write_hydra_files``
    is set for jobs that Hydra's own ``run_job`` did not start (the batching
    launcher's), which then get what Hydra writes for a job: ``.hydra/``
    with ``overrides.yaml``, ``config.yaml`` and (given ``hydra``, the job's
    ``hydra`` node) ``hydra.yaml``, and ``run_ablation.log``, which holds the
    log lines of the group the job trained in.
    """

    cfg: DictConfig
    dir: Path
    overrides: list[str]
    write_hydra_files: bool = False
    hydra: DictConfig | None = None


def run_job(
    cfg: DictConfig,
    job_dir: Path,
    sweep_dir: Path | None,
    overrides: list[str],
    reraise: bool,
    default_threads: int | None = None,
) -> float:
    """Run one job and write its ``result.json``; return the objective (NaN if none).

    With ``seed_batch = N > 1`` the job trains seeds ``seed .. seed+N-1`` as
    one batched model. Each seed gets a directory ``seed_<s>/`` with the
    files of a single run (its config, overrides, metrics, events and
    result), exactly what the equivalent single-seed job would write, and the
    job's own ``result.json`` says ``batch``. Seeds already completed or
    claimed by another job are left out of the batch. The return value is
    the mean objective over the job's seeds.

    An interruption (Ctrl-C, a kill) writes no result: the job did not end,
    and re-running the sweep redoes it.
    """
    return run_members([Member(cfg, job_dir, overrides)], sweep_dir, reraise, default_threads)[0]


def run_members(
    members: list[Member], sweep_dir: Path | None, reraise: bool, default_threads: int | None = None
) -> list[float]:
    """Train the runs of several jobs as one batched model; return each job's objective (NaN if none).

    The jobs must differ only in their envelopes and seeds (the batching
    launcher groups them so). Each run is prepared as a job alone prepares
    it (validated, its directory and run id, skipped if completed, a
    duplicate or claimed by a live process, copied from the results cache),
    then the pending runs of every job train together. A job whose config
    is invalid fails alone, before anything trains; a run that diverges
    fails alone; an error of the batch as a whole fails its pending runs.
    """
    start = time.time()
    outcomes: list[float] = [math.nan] * len(members)
    prepared: list[tuple[int, list[SeedRun]]] = []
    pending: list[SeedRun] = []
    recorders: list[Recorder] = []
    claimed: list[Path] = []
    logs = [GroupLog(member.dir) for member in members if member.write_hydra_files]
    try:
        for index, member in enumerate(members):
            try:
                runs = prepare_member(member, sweep_dir, pending, claimed, start)
            except Exception as error:
                fail_runs(member, [], [], error, start, batched=member.cfg.seed_batch > 1)
                if reraise:
                    raise
                continue
            prepared.append((index, runs))
        if pending:
            try:
                train(pending, recorders, default_threads)
            except Exception as error:
                for member in {id(m): m for m in (run.member for run in pending)}.values():
                    member_pending = [run for run in pending if run.member is member]
                    fail_runs(member, member_pending, recorders, error, start, batched=member.cfg.seed_batch > 1)
                if reraise:
                    raise
                return outcomes
            cache = None if members[0].cfg.cache_dir is None else ResultsCache(resolve_path(members[0].cfg.cache_dir))
            if cache is not None:
                for run in pending:
                    if run.result.get("status") == "completed":
                        cache.store(run.result["run_id"], run.dir)
            export(pending, sweep_dir)
    finally:
        for recorder in recorders:
            recorder.close()
        for run_dir in claimed:  # results written: the claims' owners no longer live here
            release(run_dir)
        for group_log in logs:
            group_log.close()
    for index, runs in prepared:
        member = members[index]
        if member.cfg.seed_batch > 1:
            job_result = {
                "overrides": member.overrides,
                "task": member.cfg.task.name,
                "seed": member.cfg.seed,
                "status": "batch",
                "seeds": [run.seed for run in runs],
                "trained": [run.seed for run in runs if run in pending],
                "runs": [run.dir.name for run in runs],
                "wall_time_s": time.time() - start,
            }
            write_json_atomic(member.dir / RESULT_FILE, job_result)
        values = [objective_value(run.result) for run in runs if run.result.get("status") == "completed"]
        finite = [v for v in values if math.isfinite(v)]
        outcomes[index] = sum(finite) / len(finite) if finite else math.nan
        if sweep_dir is None:  # a single run: say where its files went (a sweep's report does)
            status = ", ".join(sorted({str(run.result.get("status")) for run in runs}))
            print(
                f"Run {status}: files in {member.dir} (config.yaml, metrics.jsonl, result.json, tb/); "
                f"tensorboard --logdir {member.dir}"
            )
    return outcomes


def export(runs: list[SeedRun], sweep_dir: Path | None) -> None:
    """Each trained run to the experiment tracker its config names (``tracking``), one tracker run per run."""
    from runner.tracking import export_run

    for run in runs:
        if run.config.get("tracking") and run.result.get("status") in ("completed", "failed"):
            experiment = sweep_dir.name if sweep_dir is not None else "runs"
            name = run_label(run.overrides) or run.dir.name
            export_run(run.dir, run.result, experiment, run.config.tracking_uri, name)


def prepare_member(
    member: Member, sweep_dir: Path | None, pending: list[SeedRun], claimed: list[Path], start: float
) -> list[SeedRun]:
    """A job's runs, each completed before, a duplicate, busy elsewhere, cached, or appended to ``pending``."""
    cfg, job_dir = member.cfg, member.dir
    job_dir.mkdir(parents=True, exist_ok=True)
    if member.write_hydra_files:
        (job_dir / ".hydra").mkdir(exist_ok=True)
        (job_dir / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in member.overrides))
        (job_dir / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
        if member.hydra is not None:
            (job_dir / ".hydra" / "hydra.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create({"hydra": member.hydra})))
    batched = cfg.seed_batch > 1
    envelopes = validate(cfg)
    cache = None if cfg.cache_dir is None else ResultsCache(resolve_path(cfg.cache_dir))
    if batched:
        (job_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    runs = []
    for seed in range(cfg.seed, cfg.seed + cfg.seed_batch):
        run = prepare(cfg, envelopes, job_dir, member.overrides, batched, seed)
        run.member = member
        runs.append(run)
        done = previous_result(run.dir, run.result["run_id"])
        if done is not None:
            log.info("seed %d already completed in %s; not re-running", seed, run.dir)
            run.result = done
            continue  # its files are already there: a resumed sweep passes over it quickly
        if sweep_dir is not None:
            key = claim_key(run.result["run_id"], run.dir, cfg.deduplicate)
            taken = claim(sweep_dir, key, run.dir, run.result["run_id"])
            if taken.status == "busy":
                log.info("seed %d: another live process is training %s; skipping it here", seed, run.dir)
                continue  # its files are that process's to write
            claimed.append(run.dir)
            if taken.status == "duplicate":
                write_config(run, batched)
                log.info("same effective config as %s; skipping", taken.owner)
                run.result.update(status="duplicate", duplicate_of=str(taken.owner), wall_time_s=time.time() - start)
                write_json_atomic(run.dir / RESULT_FILE, run.result)
                continue
        write_config(run, batched)
        cached = None if cache is None else cache.fetch(run.result["run_id"], run.dir)
        if cached is not None:
            log.info("seed %d: results cached in %s; not re-running", seed, cached["cached_from"])
            run.result = {**cached, "overrides": run.overrides}
            write_json_atomic(run.dir / RESULT_FILE, run.result)
            continue
        pending.append(run)
    return runs


def fail_runs(
    member: Member, runs: list[SeedRun], recorders: list[Recorder], error: Exception, start: float, batched: bool
) -> None:
    """Write a failed result for each of ``runs`` (and the job's own for a failure before any run)."""
    failure = {
        "status": "failed",
        "error": f"{type(error).__name__}: {error}",
        "traceback": traceback.format_exc(),
        "wall_time_s": time.time() - start,
    }
    log.error("job %s failed: %s", member.dir, failure["error"])
    by_dir = {recorder.job_dir: recorder for recorder in recorders}
    for run in runs:
        run.result.update(failure)
        recorder = by_dir.get(run.dir)
        if recorder is not None:
            run.result.update(final=recorder.final, best=recorder.best)
        write_json_atomic(run.dir / RESULT_FILE, run.result)
    if not runs or batched:
        job_result = {"overrides": member.overrides, "task": member.cfg.task.name, "seed": member.cfg.seed, **failure}
        member.dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(member.dir / RESULT_FILE, job_result)


def train(runs: list[SeedRun], recorders: list[Recorder], default_threads: int | None) -> None:
    """Train the given runs (one, or several as one batched model) and write each one's completed result.

    The runs share their task and every setting but their envelopes and
    seeds; the first run's config stands for what they share.
    """
    start = time.time()
    cfg = runs[0].config
    module = task_module(cfg.task.name)
    device = resolve_device(cfg.device)
    # one torch thread per training process unless told otherwise: on a shared machine more threads than free
    # cores is several times slower, and the models here gain little from a second thread (BENCHMARKS.md)
    threads = cfg.threads or default_threads or 1
    torch.set_num_threads(threads)
    torch.set_flush_denormal(cfg.flush_denormal)
    keep_freed_memory()
    seed_everything(runs[0].seed)
    for i, run in enumerate(runs):
        # one progress bar per job: the first seed's
        recorders.append(
            Recorder(
                run.dir,
                module.OBJECTIVE,
                tensorboard=cfg.tensorboard,
                progress=cfg.progress if i == 0 else False,
                run_name=run_label(run.overrides),
            )
        )
    per_run = [{name: envelope.to(device) for name, envelope in run.envelopes.items()} for run in runs]
    same = all(run.envelopes is runs[0].envelopes for run in runs)
    context = RunContext(
        device,
        per_run[0],
        recorders,
        [run.seed for run in runs],
        cfg.vwpr if cfg.vwpr.enabled else None,
        # baseline (the base loss alone) trains exactly what no controller trains: it is that run
        None if cfg.controller.mode in (None, "baseline") else controller_settings(cfg),
        run_envelopes=None if same else per_run,
    )
    extras = module.run(cfg, context)
    extras = [extras] if isinstance(extras, dict) else extras
    wall_time = time.time() - start
    objective_key = file_key(module.OBJECTIVE[0])
    for run, recorder, extra in zip(runs, recorders, extras):
        if isinstance(extra, Exception):  # this run failed; the batch's others did not
            run.result.update(
                status="failed",
                error=f"{type(extra).__name__}: {extra}",
                final=recorder.final,
                best=recorder.best,
                wall_time_s=wall_time / len(runs),
            )
            write_json_atomic(run.dir / RESULT_FILE, run.result)
            log.error("seed %d failed: %s", run.seed, extra)
            continue
        final = {**recorder.final, **extra}
        value = final.get(objective_key)
        run.result.update(
            status="completed",
            device=str(device),
            threads=torch.get_num_threads(),
            # bit-identical results need the same threads and the same group (docs/running.md, "Seeds and devices")
            group_size=len(runs),
            final=final,
            best=recorder.best,
            objective={"metric": objective_key, "mode": module.OBJECTIVE[1], "value": value},
            # a batch's runs share its time: each is charged its share
            wall_time_s=wall_time / len(runs),
        )
        if len(runs) > 1:
            run.result["batch"] = {"seeds": [r.seed for r in runs], "wall_time_s": wall_time}
        if context.warnings:
            run.result["warnings"] = list(context.warnings)
        recorder.log_hparams(run.result["effective"], {k: v for k, v in final.items() if isinstance(v, (int, float))})
        write_json_atomic(run.dir / RESULT_FILE, run.result)
        log.info("seed %d completed: %s = %s", run.seed, objective_key, value)
