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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from envelopes import Envelope, EnvelopeBank
from methods.loss_controller import ControllerSettings
from runner.cache import ResultsCache
from runner.claims import claim, claim_key, release
from runner.config import (
    config_id,
    config_yaml,
    controller_on,
    controller_settings,
    effective_config,
    resolve_kernels,
    validate,
)
from runner.recorder import Recorder, file_key, run_label
from runner.result import Result, previous_result
from tasks import task_module
from tasks.common import resolve_path

log = logging.getLogger(__name__)


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
    compile: bool = False  # compile the training step (a task with COMPILE = True)
    compile_s: float | None = None  # set by such a task: its first compiled step's seconds, compilation included
    kernels: str = "torch"  # the networks' kernels for a task with FUSED = True: fused | torch (runner.config)

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


@dataclass
class SeedRun:
    """One seed's run inside a job: its directory, identity and result."""

    seed: int
    dir: Path
    overrides: list[str]
    result: Result
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
    if cfg.seed == seed and cfg.seed_batch == 1:  # the job's one run: its config as it is (no copy, 1.5 ms a job)
        seed_cfg = cfg
    else:
        seed_cfg = cfg.copy()
        seed_cfg.seed, seed_cfg.seed_batch = seed, 1
    run_dir = job_dir / f"seed_{seed}" if batched else job_dir
    run_overrides = seed_overrides(overrides, seed) if batched else overrides
    effective = effective_config(seed_cfg, envelopes)
    result = Result(
        run_overrides,
        cfg.task.name,
        seed,
        config_id=config_id(effective),
        run_id=config_id(effective, with_seed=True),
        effective=effective,
    )
    return SeedRun(seed, run_dir, run_overrides, result, seed_cfg, envelopes)


def write_config(run: SeedRun, batched: bool) -> None:
    """The seed's resolved config (and, in a batch, the overrides the analysis reads)."""
    (run.dir / ".hydra").mkdir(parents=True, exist_ok=True)
    if batched:
        (run.dir / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in run.overrides))
    (run.dir / "config.yaml").write_text(config_yaml(run.config, resolve=True))


class GroupLog(logging.FileHandler):
    """A job's ``run_ablation.log``: every log line of this process while the job's group trains, in Hydra's
    format (a job that Hydra's ``run_job`` starts gets the same file from Hydra). See :func:`group_logs`."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, mode="a", delay=True)
        self.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
        self.setLevel(logging.INFO)
        root = logging.getLogger()
        if root.level > logging.INFO or root.level == logging.NOTSET:
            root.setLevel(logging.INFO)
        root.addHandler(self)

    def close(self) -> None:
        logging.getLogger().removeHandler(self)
        super().close()


def group_logs(job_dirs: list[Path]) -> list[GroupLog]:
    """The group's log in each job's ``run_ablation.log``, each line written once for the group.

    The jobs whose log is new share one file: the first one's, hard-linked
    into the others' directories (a group of 781 jobs with a handler each
    wrote each of its lines 781 times). A job whose log is already there (a
    resumed sweep) appends to it, once per file: the jobs of an earlier
    attempt's group share theirs, which then gets this group's lines (the
    jobs of that group that are not in this one too). Where a link cannot be
    made, a job gets a file of its own.
    """
    handlers: list[GroupLog] = []
    shared: Path | None = None
    existing: set[tuple[int, int]] = set()  # the files (device, inode) of logs already there
    for job_dir in job_dirs:
        job_dir.mkdir(parents=True, exist_ok=True)
        path = job_dir / "run_ablation.log"
        if path.exists():
            stat = path.stat()
            if (stat.st_dev, stat.st_ino) not in existing:
                existing.add((stat.st_dev, stat.st_ino))
                handlers.append(GroupLog(path))
            continue
        if shared is not None:
            try:
                os.link(shared, path)
                continue
            except OSError:  # no hard links here, or another process made the file meanwhile
                handlers.append(GroupLog(path))
                continue
        path.touch()
        shared = path
        handlers.append(GroupLog(path))
    return handlers


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
    envelopes: dict[str, Envelope] | None = None  # validated already (by the sweep's check); None: validate it

    def validated(self) -> dict[str, Envelope]:
        """The job's envelopes: those the sweep's check validated, or the job's config validated now."""
        return self.envelopes if self.envelopes is not None else validate(self.cfg)


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
    pending: list[SeedRun] = []
    recorders: list[Recorder] = []
    claimed: list[Path] = []
    logs = group_logs([member.dir for member in members if member.write_hydra_files])
    try:
        prepared = prepare_members(members, sweep_dir, pending, claimed, start, reraise)
        if pending and not train_pending(pending, recorders, default_threads, start, reraise):
            return outcomes
        export(pending, sweep_dir)
    finally:
        for recorder in recorders:
            recorder.close()
        for run_dir in claimed:  # results written: the claims' owners no longer live here
            release(run_dir)
        for group_log in logs:
            group_log.close()
    for index, runs in prepared:
        outcomes[index] = finish_member(members[index], runs, pending, sweep_dir, start)
    return outcomes


def prepare_members(
    members: list[Member],
    sweep_dir: Path | None,
    pending: list[SeedRun],
    claimed: list[Path],
    start: float,
    reraise: bool,
) -> list[tuple[int, list[SeedRun]]]:
    """Each job's runs (:func:`prepare_member`), by the job's index; a job that cannot be prepared fails alone."""
    prepared = []
    for index, member in enumerate(members):
        try:
            runs = prepare_member(member, sweep_dir, pending, claimed, start)
        except Exception as error:
            fail_runs(member, [], [], error, start, batched=member.cfg.seed_batch > 1)
            if reraise:
                raise
            continue
        prepared.append((index, runs))
    return prepared


def train_pending(
    pending: list[SeedRun], recorders: list[Recorder], default_threads: int | None, start: float, reraise: bool
) -> bool:
    """Train the pending runs together and keep the completed ones in the results cache; an error of the batch as
    a whole fails every pending run (False)."""
    try:
        train(pending, recorders, default_threads)
    except Exception as error:
        for member in {id(m): m for m in (run.member for run in pending)}.values():
            member_pending = [run for run in pending if run.member is member]
            fail_runs(member, member_pending, recorders, error, start, batched=member.cfg.seed_batch > 1)
        if reraise:
            raise
        return False
    cache_dir = pending[0].member.cfg.cache_dir
    if cache_dir is not None:
        cache = ResultsCache(resolve_path(cache_dir))
        for run in pending:
            if run.result.status == "completed":
                cache.store(run.result.run_id, run.dir)
    return True


def finish_member(member: Member, runs: list[SeedRun], pending: list[SeedRun], sweep_dir: Path | None, start: float):
    """A job's outcome once its runs have ended: the mean of their finite objectives (NaN if none); a
    seed-batched job writes its ``batch`` result, a single run says where its files went."""
    if member.cfg.seed_batch > 1:
        Result(
            member.overrides,
            member.cfg.task.name,
            member.cfg.seed,
            status="batch",
            seeds=[run.seed for run in runs],
            trained=[run.seed for run in runs if run in pending],
            runs=[run.dir.name for run in runs],
            wall_time_s=time.time() - start,
        ).write(member.dir)
    if sweep_dir is None:  # a single run: say where its files went (a sweep's report does)
        status = ", ".join(sorted({str(run.result.status) for run in runs}))
        print(
            f"Run {status}: files in {member.dir} (config.yaml, metrics.jsonl, result.json, tb/); "
            f"tensorboard --logdir {member.dir}"
        )
    finite = [run.result.objective_value for run in runs if run.result.status == "completed"]
    finite = [v for v in finite if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def export(runs: list[SeedRun], sweep_dir: Path | None) -> None:
    """Each trained run to the experiment tracker its config names (``tracking``), one tracker run per run."""
    from runner.tracking import export_run

    for run in runs:
        if run.config.get("tracking") and run.result.status in ("completed", "failed"):
            experiment = sweep_dir.name if sweep_dir is not None else "runs"
            name = run_label(run.overrides) or run.dir.name
            export_run(run.dir, run.result.to_json(), experiment, run.config.tracking_uri, name)


def prepare_member(
    member: Member, sweep_dir: Path | None, pending: list[SeedRun], claimed: list[Path], start: float
) -> list[SeedRun]:
    """A job's runs, each completed before, a duplicate, busy elsewhere, cached, or appended to ``pending``."""
    cfg, job_dir = member.cfg, member.dir
    job_dir.mkdir(parents=True, exist_ok=True)
    if member.write_hydra_files:
        (job_dir / ".hydra").mkdir(exist_ok=True)
        (job_dir / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in member.overrides))
        (job_dir / ".hydra" / "config.yaml").write_text(config_yaml(cfg))
        if member.hydra is not None:
            (job_dir / ".hydra" / "hydra.yaml").write_text(config_yaml({"hydra": member.hydra}))
    batched = cfg.seed_batch > 1
    envelopes = member.validated()
    cache = None if cfg.cache_dir is None else ResultsCache(resolve_path(cfg.cache_dir))
    if batched:
        (job_dir / "config.yaml").write_text(config_yaml(cfg, resolve=True))
    runs = []
    for seed in range(cfg.seed, cfg.seed + cfg.seed_batch):
        run = prepare(cfg, envelopes, job_dir, member.overrides, batched, seed)
        run.member = member
        runs.append(run)
        done = previous_result(run.dir, run.result.run_id)
        if done is not None:
            log.info("seed %d already completed in %s; not re-running", seed, run.dir)
            run.result = done
            continue  # its files are already there: a resumed sweep passes over it quickly
        if sweep_dir is not None:
            key = claim_key(run.result.run_id, run.dir, cfg.deduplicate)
            taken = claim(sweep_dir, key, run.dir, run.result.run_id)
            if taken.status == "busy":
                log.info("seed %d: another live process is training %s; skipping it here", seed, run.dir)
                continue  # its files are that process's to write
            claimed.append(run.dir)
            if taken.status == "duplicate":
                write_config(run, batched)
                log.info("same effective config as %s; skipping", taken.owner)
                run.result.status, run.result.duplicate_of = "duplicate", str(taken.owner)
                run.result.wall_time_s = time.time() - start
                run.result.write(run.dir)
                continue
        write_config(run, batched)
        cached = None if cache is None else cache.fetch(run.result.run_id, run.dir)
        if cached is not None:
            log.info("seed %d: results cached in %s; not re-running", seed, cached["cached_from"])
            run.result = Result.from_json({**cached, "overrides": run.overrides})
            run.result.write(run.dir)
            continue
        pending.append(run)
    return runs


def fail_runs(
    member: Member, runs: list[SeedRun], recorders: list[Recorder], error: Exception, start: float, batched: bool
) -> None:
    """Write a failed result for each of ``runs`` (and the job's own for a failure before any run)."""
    wall_time, trace = time.time() - start, traceback.format_exc()
    log.error("job %s failed: %s: %s", member.dir, type(error).__name__, error)
    by_dir = {recorder.job_dir: recorder for recorder in recorders}
    for run in runs:
        run.result.failed(error, wall_time, trace)
        recorder = by_dir.get(run.dir)
        if recorder is not None:
            run.result.final, run.result.best = recorder.final, recorder.best
        run.result.write(run.dir)
    if not runs or batched:
        job_result = Result(member.overrides, member.cfg.task.name, member.cfg.seed)
        job_result.failed(error, wall_time, trace)
        member.dir.mkdir(parents=True, exist_ok=True)
        job_result.write(member.dir)


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
        controller_settings(cfg) if controller_on(cfg.controller.mode) else None,
        run_envelopes=None if same else per_run,
        compile=cfg.compile,
        kernels=resolve_kernels(cfg, device),
    )
    extras = module.run(cfg, context)
    extras = [extras] if isinstance(extras, dict) else extras
    wall_time = time.time() - start
    objective_key = file_key(module.OBJECTIVE[0])
    for run, recorder, extra in zip(runs, recorders, extras):
        if isinstance(extra, Exception):  # this run failed; the batch's others did not
            run.result.failed(extra, wall_time / len(runs))
            run.result.final, run.result.best = recorder.final, recorder.best
            run.result.write(run.dir)
            log.error("seed %d failed: %s", run.seed, extra)
            continue
        final = {**recorder.final, **extra}
        value = final.get(objective_key)
        result = run.result
        result.status, result.device, result.threads = "completed", str(device), torch.get_num_threads()
        result.compile_s = context.compile_s
        result.kernels = context.kernels if getattr(module, "FUSED", False) else None
        # bit-identical results need the same threads and the same group (docs/running.md, "Seeds and devices")
        result.group_size = len(runs)
        result.final, result.best = final, recorder.best
        result.objective = {"metric": objective_key, "mode": module.OBJECTIVE[1], "value": value}
        result.wall_time_s = wall_time / len(runs)  # a batch's runs share its time: each is charged its share
        if len(runs) > 1:
            result.batch = {"seeds": [r.seed for r in runs], "wall_time_s": wall_time}
        if context.warnings:
            result.warnings = list(context.warnings)
        recorder.log_hparams(result.effective, {k: v for k, v in final.items() if isinstance(v, (int, float))})
        result.write(run.dir)
        log.info("seed %d completed: %s = %s", run.seed, objective_key, value)
