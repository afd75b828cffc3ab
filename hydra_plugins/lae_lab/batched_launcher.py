"""The batching launcher: a sweep's jobs that differ only in envelopes and seeds train as one model.

    python run_ablation.py -m experiment=acrobot_paper hydra/launcher=batched task.backend=envpool

Hydra hands a launcher the override lists of a sweep's jobs. This one
composes each job's config (as the basic launcher does), groups the jobs
whose configs are equal once their envelopes and seed are set aside, and
trains each group, up to ``max_batch`` runs at a time, in this process as
one batched model (:func:`runner.job.run_members`): stacked parameters,
one envelope per run (``EnvelopeBank``), each run with its own data order,
noise and environments. Every run keeps what a job alone has: its
directory (the one the basic launcher would give it), config, overrides,
metrics, TensorBoard events, ``result.json`` and ``run_id``; resume,
de-duplication, the results cache and the analysis see runs as usual.

Jobs that cannot share a model (VWPR on, the loss controller on) run one
by one, as under the basic launcher.

Where the groups run: ``executor=here`` (the default) trains them on this
machine, one after another in the launching process, or with ``workers=W``
in W worker processes at once (each process trains one group after another,
largest groups first; one torch thread each unless ``threads`` is set; a
process that dies loses the group it was training only); ``executor=slurm`` submits each group
as one Slurm job through submitit, and ``executor=local`` as one process on
this machine (submitit's local executor: all groups at once), with
``submitit`` holding the executor's parameters (``timeout_min``,
``slurm_partition``, ``cpus_per_task``, ``gpus_per_node``, ``mem_gb``, ...).
The launcher waits for every group; a group whose job dies leaves its runs
unfinished (the sweep then exits 1, and re-running it resumes them).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus, configure_log, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger(__name__)


def group_key(cfg: DictConfig) -> str | None:
    """What the runs of a group must share: the whole config but envelopes and seed (None: runs alone)."""
    from runner.config import controller_on

    if cfg.vwpr.enabled or controller_on(cfg.controller.mode):
        return None
    container = {
        key: OmegaConf.to_container(cfg[key], resolve=True) if OmegaConf.is_config(cfg[key]) else cfg[key]
        for key in cfg
        if key not in ("hydra", "envelopes", "seed")
    }
    return json.dumps(container, sort_keys=True, default=str)


def set_hydra_config(cfg: DictConfig) -> None:
    """``HydraConfig.instance().set_config(cfg)`` without its copy of the job's ``hydra`` node (2.4 ms a job, a
    sixth of composing a grid): ``HydraConfig.get()`` and the ``hydra:`` resolver read the ``hydra`` node of what
    is set, which is here the job's own node, read-only and with the job's config as its parent, as Hydra's
    copy is. The job's config is not changed afterwards."""
    OmegaConf.set_readonly(cfg.hydra, True)
    HydraConfig.instance().cfg = cfg


class BatchedLauncher(Launcher):
    EXECUTORS = ("here", "slurm", "local")

    def __init__(self, max_batch: int = 256, executor: str = "here", submitit: Any = None, workers: int = 1) -> None:
        super().__init__()
        if not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"hydra.launcher.max_batch must be a positive integer, got {max_batch!r}")
        if executor not in self.EXECUTORS:
            raise ValueError(f"hydra.launcher.executor must be one of {list(self.EXECUTORS)}, got {executor!r}")
        if not isinstance(workers, int) or workers < 1:
            raise ValueError(f"hydra.launcher.workers must be a positive integer, got {workers!r}")
        if workers > 1 and executor != "here":
            raise ValueError(
                f"hydra.launcher.workers={workers} runs groups in processes on this machine (executor=here); "
                f"with executor={executor} each group is a job of its own: leave workers at 1"
            )
        self.workers = workers
        self.max_batch = max_batch
        self.executor = executor
        if OmegaConf.is_config(submitit):
            submitit = OmegaConf.to_container(submitit, resolve=True)
        self.submitit = dict(submitit or {})
        self._seen: set[str] = set()  # run ids of the jobs grouped so far
        self._to_train: dict[int, int] = {}  # per job: its runs that no earlier job repeats
        self.config: DictConfig | None = None
        self.task_function: TaskFunction | None = None
        self.hydra_context: HydraContext | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        setup_globals()
        assert self.config is not None and self.hydra_context is not None
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        from runner.callbacks import paused_gc

        # thousands of configs, kept to the sweep's end (Hydra holds the jobs' returns through the report): out of
        # the garbage collector's reach until then (SweepCallback.on_multirun_end gives them back)
        with paused_gc(freeze=True):
            jobs = self._compose(job_overrides, initial_job_idx, sweep_dir)
        batches = self._group(jobs)
        returns = self._dispatch(batches, jobs, sweep_dir)
        out = []
        for position, (_, cfg, member) in enumerate(jobs):
            ret = JobReturn(
                overrides=member.overrides,
                cfg=member.cfg,
                hydra_cfg=cfg,
                working_dir=str(member.dir),
                task_name=str(cfg.hydra.job.name),
                status=JobStatus.COMPLETED,
            )
            ret.return_value = returns[position]
            out.append(ret)
        return out

    def _compose(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int, sweep_dir: Path) -> list:
        """Each job as ``(index, its config with the hydra node, its Member)``."""
        from runner.callbacks import checked_envelopes, compose_job, task_config
        from runner.job import Member

        jobs = []
        for offset, overrides in enumerate(job_overrides):
            idx = initial_job_idx + offset
            # composed once per job but its seed, by the sweep's check where it ran in this process
            cfg = compose_job(self.config, overrides, self.hydra_context.config_loader)
            with open_dict(cfg):
                cfg.hydra.job.id = idx
                cfg.hydra.job.num = idx
            set_hydra_config(cfg)
            job_dir = sweep_dir / str(cfg.hydra.sweep.subdir)
            member = Member(
                task_config(self.config, overrides, self.hydra_context.config_loader),
                job_dir,
                list(overrides),
                write_hydra_files=True,
                hydra=cfg.hydra,
                envelopes=checked_envelopes(self.config, overrides),
            )
            jobs.append((idx, cfg, member))
        return jobs

    def _group(self, jobs: list) -> list[list[int]]:
        """The jobs' positions in batches: the jobs of a group (:func:`group_key`) in chunks of at most
        ``max_batch`` runs to train, then each job that runs alone."""
        from runner.callbacks import split_seed

        groups: dict[str, list[int]] = {}
        alone: list[int] = []
        keys: dict[tuple[str, ...], str | None] = {}  # jobs that differ only in their seed share a group
        for position, (_, cfg, member) in enumerate(jobs):
            seedless, _ = split_seed(member.overrides)
            if seedless not in keys:
                keys[seedless] = group_key(cfg)
            key = keys[seedless]
            (alone if key is None else groups.setdefault(key, [])).append(position)
        batches = [chunk for positions in groups.values() for chunk in self._split(positions, jobs)]
        batches += [[position] for position in alone]
        log.info(
            "Launching %d jobs in %d batched groups (at most %d runs to train each)",
            len(jobs),
            len(batches),
            self.max_batch,
        )
        return batches

    def _runs_to_train(self, batch: list[int], jobs: list) -> int:
        return sum(self._to_train.get(p, jobs[p][2].cfg.seed_batch) for p in batch)

    def _dispatch(self, batches: list[list[int]], jobs: list, sweep_dir: Path) -> dict[int, Any]:
        """Train the batches (here, in worker processes, or as submitit jobs); each job's objective by position.
        A group whose process or job died leaves NaN for its jobs (their runs stay unfinished)."""
        from runner.job import run_members

        returns: dict[int, Any] = {}
        submitted = []
        pool = None
        if self.workers > 1 and len(batches) > 1:
            # largest groups first, so that the workers finish together
            batches.sort(key=lambda batch: self._runs_to_train(batch, jobs), reverse=True)
            pool = WorkerPool(min(self.workers, len(batches)))
        elif self.workers > 1:
            log.info("workers=%d: one group to train, so it trains in this process", self.workers)
        for number, batch in enumerate(batches, 1):
            members = [jobs[p][2] for p in batch]
            log.info(
                "group %d/%d: %d jobs, %d runs to train (#%s)",
                number,
                len(batches),
                len(members),
                self._runs_to_train(batch, jobs),
                ",".join(str(jobs[p][0]) for p in batch[:8]) + (",..." if len(batch) > 8 else ""),
            )
            if pool is not None:
                pool.submit(number, members, sweep_dir)
            elif self.executor == "here":
                returns.update(zip(batch, run_members(members, sweep_dir, reraise=False)))
            else:
                submitted.append((number, batch, self._submit(members, sweep_dir, number)))
        for number, values in [] if pool is None else pool.results():
            batch = batches[number - 1]
            if isinstance(values, Exception):  # the process died: its group's runs stay unfinished
                log.error("group %d (worker process) failed: %s; its runs stay unfinished", number, values)
                values = [math.nan] * len(batch)
            returns.update(zip(batch, values))
        for number, batch, job in submitted:
            try:
                values = job.result()
            except Exception as error:  # the job died (killed, timed out, node failure): its runs stay unfinished
                log.error("group %d (%s job %s) failed: %r", number, self.executor, job.job_id, error)
                values = [math.nan] * len(batch)
            returns.update(zip(batch, values))
        return returns

    def _submit(self, members: list, sweep_dir: Path, number: int):
        """Submit one group as a submitit job (Slurm, or a process on this machine) that trains it."""
        import submitit

        from runner.job import run_members

        params = dict(self.submitit)
        folder = Path(str(params.pop("folder", None) or sweep_dir / ".submitit"))
        executor = submitit.AutoExecutor(folder=folder / "%j", cluster=self.executor)
        params.setdefault("name", f"lae_group_{number}")
        executor.update_parameters(**params)
        # each run's torch threads: the CPUs its job was given, as under Hydra's submitit launcher
        job = executor.submit(run_members, members, sweep_dir, False, params.get("cpus_per_task"))
        log.info("group %d submitted: %s job %s (logs in %s)", number, self.executor, job.job_id, folder)
        return job

    def _split(self, positions: list[int], jobs) -> list[list[int]]:
        """Consecutive chunks of at most ``max_batch`` runs to train (a seed-batched job counts its seeds).

        A run that repeats an effective config of an earlier job (a paper
        grid written in full repeats many: identity ignores its threshold)
        will be skipped as a duplicate and does not count, so each group
        trains about ``max_batch`` models.
        """
        from runner.config import config_id, effective_config

        chunks, current, size = [], [], 0
        for position in positions:
            member = jobs[position][2]
            cfg = member.cfg
            effective = effective_config(cfg, member.validated())
            ids = {
                config_id({**effective, "seed": seed}, with_seed=True)
                for seed in range(cfg.seed, cfg.seed + cfg.seed_batch)
            }
            runs = len(ids - self._seen) if cfg.deduplicate else len(ids)
            self._seen |= ids
            self._to_train[position] = runs
            if current and size + runs > self.max_batch:
                chunks.append(current)
                current, size = [], 0
            current.append(position)
            size += runs
        if current:
            chunks.append(current)
        return chunks


class WorkerPool:
    """Worker processes on this machine that train groups (``workers=W``): at most W spawned processes, each
    training one group at a time, then the next one waiting, largest first.

    A process is started once and trains group after group: starting one
    (mostly importing torch) took 4 to 5 s of a core, and a grid of six
    groups in two workers started six. A process that dies (a kill, the
    kernel's out-of-memory killer) loses the group it was training only, as
    a submitit job that dies does: its runs stay unfinished, the other
    groups go on (a fresh process takes the next waiting group), and
    resuming the sweep redoes them. A launcher that is killed takes its
    workers with it (:func:`_exit_with_launcher`). Each process trains with
    one torch thread unless a run's ``threads`` says otherwise.
    """

    def __init__(self, processes: int) -> None:
        import multiprocessing

        self.processes = processes
        self.context = multiprocessing.get_context("spawn")
        self.waiting: list[tuple[int, list, Path]] = []
        log.info("%d worker processes, one group each at a time", processes)

    def submit(self, number: int, members: list, sweep_dir: Path) -> None:
        self.waiting.append((number, members, sweep_dir))

    def _start(self) -> tuple[Any, Any]:
        """A worker process and the launcher's end of its pipe (the child holds the other: its death closes it)."""
        ours, theirs = self.context.Pipe()
        process = self.context.Process(target=_serve_groups, args=(theirs,), daemon=True)
        process.start()
        theirs.close()
        return process, ours

    def results(self):
        """Train the submitted groups, W at a time; yield ``(number, values or the error that lost the group)``."""
        import time

        waiting = list(self.waiting)
        # every process is started before any is handed a group: handing one over waits until it reads it
        fresh = [self._start() for _ in range(min(self.processes, len(waiting)))]
        idle: list[tuple[Any, Any]] = []  # processes that trained a group and wait for the next
        busy: dict[int, tuple[Any, Any]] = {}
        try:
            while waiting or busy:
                while waiting and (fresh or idle or len(busy) < self.processes):
                    trained = not fresh and bool(idle)
                    worker = fresh.pop() if fresh else idle.pop() if idle else self._start()
                    number, members, sweep_dir = waiting[0]
                    try:
                        worker[1].send((members, sweep_dir))
                    except OSError:  # the process is gone
                        _stop(worker)
                        if trained:  # it died idle, after its last group: nothing is lost, another takes this one
                            continue
                        waiting.pop(0)  # it died starting: the group is lost, as if it had died training it
                        yield number, RuntimeError(f"worker process exited with status {worker[0].exitcode}")
                        continue
                    waiting.pop(0)
                    busy[number] = worker
                for number, (process, conn) in list(busy.items()):
                    if conn.poll():
                        del busy[number]
                        try:
                            values = conn.recv()
                        except EOFError:  # the process died before sending
                            _stop((process, conn))
                            values = RuntimeError(f"worker process exited with status {process.exitcode}")
                        else:
                            idle.append((process, conn))
                        yield number, values
                time.sleep(0.05)
        finally:
            for worker in fresh + idle:
                _stop(worker)
            for worker in busy.values():  # the launcher is ending before them (an error, Ctrl-C)
                _stop(worker, busy=True)


def _stop(worker: tuple[Any, Any], busy: bool = False) -> None:
    """End a worker: an idle one is told to and reaped, a busy one is terminated (its runs stay unfinished)."""
    process, conn = worker
    if busy:
        process.terminate()
    else:
        try:
            conn.send(None)
        except OSError:
            pass
    conn.close()
    process.join(timeout=10)
    if process.is_alive():
        process.kill()
        process.join()


def _serve_groups(conn) -> None:
    """A worker process's work: train each group the launcher sends, send its objectives back; end on None."""
    _worker_logging()
    _exit_with_launcher()
    from runner.job import run_members

    while True:
        try:
            work = conn.recv()
        except EOFError:
            return
        if work is None:
            return
        members, sweep_dir = work
        try:
            conn.send(run_members(members, sweep_dir, False, None))
        except KeyboardInterrupt:  # Ctrl-C reaches every process of the terminal: the launching one says so
            raise SystemExit(130) from None


def _exit_with_launcher() -> None:
    """End this worker as soon as the launching process is gone.

    A launcher killed outright (SIGKILL, or SIGTERM, which skips Python's
    clean-up) does not take its spawned workers with it: they would train on
    beside a relaunched sweep, on its cores and in its run directories. A
    thread waits on the launcher's end (the sentinel ``multiprocessing``
    keeps for it) and exits the process; its unfinished runs stay
    unfinished, as a killed worker's do, and resuming the sweep redoes them.
    """
    import multiprocessing
    import os
    import threading

    launcher = multiprocessing.parent_process()
    if launcher is None:
        return

    def watch() -> None:
        launcher.join()
        os._exit(1)

    threading.Thread(target=watch, name="launcher-watch", daemon=True).start()


def _worker_logging() -> None:
    """A worker's log lines on its standard error, formatted as Hydra formats the launcher's."""
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
