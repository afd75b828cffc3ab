"""Hydra callbacks: check a whole sweep before it starts, summarise it when it ends."""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import logging
import os
import pickle
import secrets
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra._internal.config_loader_impl import ConfigLoaderImpl, get_overrides_dirname
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, open_dict
from tqdm import tqdm

from runner.config import ConfigError, config_id, effective_config, validate

log = logging.getLogger(__name__)

BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"
CHECKED_SWEEPER = "hydra_plugins.lae_lab.checked_sweeper.CheckedSweeper"
RAY_LAUNCHER = "hydra_plugins.hydra_ray_launcher.ray_launcher.RayLauncher"


def keep_ray_inside(temp_dir: Path) -> Path:
    """Ray's token authentication on, with the token in ``temp_dir/auth_token`` (made once, owner-only).

    Called before the Ray launcher starts Ray, so Ray's session files and its
    credentials both stay in the output directory instead of /tmp/ray and
    ~/.ray. Settings already in the environment win.
    """
    temp_dir.mkdir(parents=True, exist_ok=True)
    token = temp_dir / "auth_token"
    try:
        handle = os.open(token, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(handle, "w") as out:
            out.write(secrets.token_hex(32))
    except FileExistsError:
        pass
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    os.environ.setdefault("RAY_AUTH_TOKEN_PATH", str(token))
    return token


def override_key(override: str) -> str:
    """``key`` of ``key=value``, ``+key=value`` or ``~key``."""
    return override.split("=", 1)[0].lstrip("+~")


def jobs_from_file(path: str | Path, given: list[str]) -> list[list[str]]:
    """The jobs a jobs file lists (``hydra.sweeper.jobs``): a YAML list of override lists, one per job.

    Each job gets the command line's overrides (``given``, none of them a
    sweep) for the keys it does not set itself. Raises ConfigError naming the
    file for anything else.
    """
    import yaml

    from tasks.common import resolve_path

    file = resolve_path(str(path))
    try:
        jobs = yaml.safe_load(file.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(f"hydra.sweeper.jobs: cannot read {file}: {error}") from None
    if not (
        isinstance(jobs, list)
        and jobs
        and all(isinstance(j, list) and all(isinstance(o, str) for o in j) for j in jobs)
    ):
        raise ConfigError(f"hydra.sweeper.jobs: {file} must hold a non-empty YAML list of override lists, one per job")
    out = []
    for job in jobs:
        keys = {override_key(o) for o in job}
        out.append([*job, *(o for o in given if override_key(o) not in keys)])
    return out


def expand_sweep(config: DictConfig) -> list[list[str]]:
    """The override list of every job the sweeper will launch, in its order."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    parser = OverridesParser.create(config_loader=GlobalHydra.instance().config_loader())
    if config.hydra.sweeper.get("jobs"):
        given = parser.parse_overrides(list(config.hydra.overrides.task))
        if any(o.is_sweep_override() for o in given) or config.hydra.sweeper.get("params"):
            raise ConfigError(
                "hydra.sweeper.jobs: the jobs file lists every job; give no sweep (a,b or sweeper params) beside it"
            )
        return jobs_from_file(config.hydra.sweeper.jobs, list(config.hydra.overrides.task))
    params = [f"{k}={v}" for k, v in (config.hydra.sweeper.get("params") or {}).items()]
    params += list(config.hydra.overrides.task)
    batches = BasicSweeper.split_arguments(parser.parse_overrides(params), None)
    return [list(job) for batch in batches for job in batch]


def split_seed(overrides: Sequence[str]) -> tuple[tuple[str, ...], str | None]:
    """A job's overrides without its seed, and the seed's value as given (None: not given)."""
    seedless = tuple(o for o in overrides if o.split("=", 1)[0] != "seed")
    seed = next((o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0] == "seed"), None)
    return seedless, seed


# Hydra's composition of each set of config group choices of the sweeps of this process, keyed by sweep directory
# and the jobs' group overrides: a sweep's check fills it and its launcher reads it, so a grid is composed by Hydra
# once per set of group choices (about 0.15 s each; a paper grid's 512 seedless jobs have 16), and each job's plain
# values are set on a copy of that composition by Hydra's own code (milliseconds). Compositions are kept pickled:
# unpickling copies a paper grid's job config (hydra node included) about three times faster than DictConfig.copy
# (1.5 against 5 ms, content, flags, types and parents kept), and a grid copies one per job.
_by_choices: dict[tuple[str, tuple[str, ...]], bytes] = {}
# the sweep's config group repository (Hydra's, with the sweep's search path), by sweep directory
_repositories: dict[str, Any] = {}


@contextlib.contextmanager
def paused_gc(freeze: bool = False):
    """Python's cyclic garbage collector paused while a sweep's job configs are built: thousands of configs of
    thousands of objects each, all kept, which each collection would traverse again (composing the Acrobot
    paper grid's 2,560 jobs took 44 s with it running, 26 s paused). It runs again afterwards; with ``freeze``,
    the objects made meanwhile are first moved out of its reach (``gc.freeze``; ``gc.unfreeze`` gives them back),
    for a caller that keeps them: the first collection after the pause traversed them all (about 5 s)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if freeze:
            gc.freeze()
        if enabled:
            gc.enable()


@functools.cache
def _parsed(override: str) -> Override:
    return OverridesParser.create().parse_overrides([override])[0]


def _group_overrides(config: DictConfig, overrides: Sequence[str], loader) -> tuple[str, ...] | None:
    """The overrides that choose config groups, as Hydra's defaults list splits them; the others set plain values
    in the composed config. None where a job override is not one this shortcut takes (a sweep, a ``hydra``
    override, a group deletion or addition): such a job is composed by Hydra whole."""
    sweep = str(config.hydra.sweep.dir)
    if sweep not in _repositories:
        hydra_overrides = list(config.hydra.overrides.hydra)
        _, _repositories[sweep] = loader._parse_overrides_and_create_caching_repo(
            config.hydra.job.config_name, hydra_overrides
        )
    repo = _repositories[sweep]
    groups = []
    for line in overrides:
        override = _parsed(line)
        if override.is_sweep_override() or override.is_hydra_override():
            return None
        if repo.group_exists(override.key_or_group) and not isinstance(override.value(), dict):
            if override.is_add() or override.is_delete() or override.is_force_add():
                return None
            groups.append(line)
    return tuple(groups)


def _compose_from_choices(config: DictConfig, overrides: Sequence[str], loader) -> DictConfig:
    """The job's config as Hydra's ``load_sweep_config`` gives it, from the composition of its group choices.

    Hydra composes a job in two stages: the defaults list (the group
    choices) gives a config, then the remaining overrides set values in it
    (``ConfigLoaderImpl._apply_overrides_to_config``), and it records the
    overrides (``hydra.overrides.task``, ``hydra.job.override_dirname``). The
    first stage is composed once per set of group choices here; the second
    is Hydra's own code on a copy (:func:`_with_values`). A test compares the
    result with Hydra's whole composition on the jobs of every preset.
    """
    sweep = str(config.hydra.sweep.dir)
    groups = _group_overrides(config, overrides, loader)
    if groups is None:
        return loader.load_sweep_config(config, list(overrides))
    if (sweep, groups) not in _by_choices:
        _by_choices[(sweep, groups)] = _pickled(loader.load_sweep_config(config, list(groups)))
    values = [line for line in overrides if line not in groups]
    return _with_values(config, _by_choices[(sweep, groups)], values, overrides, loader)


def _pickled(cfg: DictConfig) -> bytes:
    return pickle.dumps(cfg, protocol=pickle.HIGHEST_PROTOCOL)


def _with_values(config: DictConfig, base: bytes, values: list[str], overrides: Sequence[str], loader):
    """A copy of the pickled composition ``base`` with the plain-value overrides ``values`` set and the job's
    ``overrides`` recorded, as Hydra does after composing; where Hydra's code refuses a value, the job is
    composed by Hydra whole, so that the error is Hydra's own."""
    cfg = pickle.loads(base)
    try:
        ConfigLoaderImpl._apply_overrides_to_config([_parsed(line) for line in values], cfg)
    except Exception:
        return loader.load_sweep_config(config, list(overrides))
    dirname = cfg.hydra.job.config.override_dirname
    task = [line for line in overrides if not _parsed(line).is_hydra_override()]  # hydra's own are recorded apart
    with open_dict(cfg):
        cfg.hydra.overrides.task = task
        cfg.hydra.job.override_dirname = get_overrides_dirname(
            overrides=[_parsed(line) for line in task],
            kv_sep=dirname.kv_sep,
            item_sep=dirname.item_sep,
            exclude_keys=dirname.exclude_keys,
        )
    return cfg


# each seedless job's composition, by sweep directory and its overrides: the jobs that differ only in their seed
# (a grid's seeds) are each a copy with the seed set
_composed: dict[tuple[str, tuple[str, ...]], bytes] = {}


def compose_job(config: DictConfig, overrides: Sequence[str], loader=None) -> DictConfig:
    """A job's config as Hydra composes it: its seedless job's composition (:func:`_compose_from_choices`, once
    per sweep), then its seed as Hydra sets a value. The copy is the caller's to change."""
    loader = loader or GlobalHydra.instance().config_loader()
    seedless, seed = split_seed(overrides)
    key = (str(config.hydra.sweep.dir), seedless)
    if key not in _composed:
        _composed[key] = _pickled(_compose_from_choices(config, seedless, loader))
    seeds = [line for line in overrides if line not in seedless]
    return _with_values(config, _composed[key], seeds, overrides, loader)


# each seedless job's config as its task sees it (no hydra node), by the key of its composition
_task_configs: dict[tuple[str, tuple[str, ...]], bytes] = {}


def task_config(config: DictConfig, overrides: Sequence[str], loader=None) -> DictConfig:
    """The job's config without its ``hydra`` node, as Hydra's ``run_job`` gives the task (a copy of the
    composition with ``hydra`` deleted), from a copy of its seedless job's, without copying the hydra node
    for each job; the copy is the caller's."""
    loader = loader or GlobalHydra.instance().config_loader()
    seedless, _ = split_seed(overrides)
    key = (str(config.hydra.sweep.dir), seedless)
    if key not in _task_configs:
        cfg = compose_job(config, seedless, loader)
        with open_dict(cfg):
            del cfg["hydra"]
        _task_configs[key] = _pickled(cfg)
    cfg = pickle.loads(_task_configs[key])
    ConfigLoaderImpl._apply_overrides_to_config([_parsed(line) for line in overrides if line not in seedless], cfg)
    return cfg


def forget_compositions(config: DictConfig) -> None:
    """Drop the sweep's cached compositions and validations (a new sweep into the directory composes afresh)."""
    sweep = str(config.hydra.sweep.dir)
    for cache in (_composed, _validated, _by_choices, _task_configs):
        for key in [k for k in cache if k[0] == sweep]:
            del cache[key]
    _repositories.pop(sweep, None)


# the envelopes of each job the sweep's check validated, by the key of its composition
_validated: dict[tuple[str, tuple[str, ...]], dict] = {}


def checked_envelopes(config: DictConfig, overrides: Sequence[str]) -> dict | None:
    """The envelopes the sweep's check validated for this job (jobs that differ only in their seed share its
    validation), so that the job is not validated again; None where the check did not validate it in this
    process, or the job's seed is not a valid one (the job's own validation then names the error)."""
    seedless, seed = split_seed(overrides)
    envelopes = _validated.get((str(config.hydra.sweep.dir), seedless))
    if envelopes is None or seed is None:
        return envelopes
    try:
        return envelopes if int(seed) >= 0 else None
    except ValueError:
        return None


# sweep directories whose every job check_sweep composed and validated in this process
_checked_sweeps: set[str] = set()


def was_checked(config: DictConfig) -> bool:
    """Whether SweepCallback validated this sweep (so the sweeper need not compose its jobs again)."""
    return str(config.hydra.sweep.dir) in _checked_sweeps


def check_sweep(config: DictConfig, data: bool = True) -> tuple[int, int, int]:
    """Validate every job's config and data; return (jobs, runs, distinct runs). Raises ConfigError listing failures.

    Each distinct data source is read once (``runner.data``); a source that
    is missing or unreadable is listed once, with the number of jobs that
    need it. ``data=False`` checks the configs alone.

    A job trains ``seed_batch`` runs (seeds); runs that repeat an effective
    config and seed already in the sweep are not distinct.

    Jobs that differ only in their seed share a validation (a seed cannot
    make a config invalid); their run ids differ by the seed alone, and the
    error of an invalid one is listed once, for its first seed.
    """
    loader = GlobalHydra.instance().config_loader()
    errors: list[str] = []
    run_ids: set[str] = set()
    runs = invalid = 0
    checked: dict[tuple[str, ...], tuple[dict, int] | str | None] = {}  # None: invalid config; str: data error
    data_errors: dict[str, int] = {}
    jobs = expand_sweep(config)
    # Hydra composes each set of group choices once (about 0.15 s each), each job from a copy (compose_job)
    show = sys.stderr.isatty() if config.get("progress") is None else bool(config.progress)
    if len(jobs) >= 50:
        log.info("Checking the configs of %d jobs before any trains", len(jobs))
    forget_compositions(config)
    for overrides in tqdm(jobs, desc="checking configs", unit="job", disable=not show or len(jobs) < 50, leave=False):
        seedless, _ = split_seed(overrides)
        if seedless not in checked:
            job_cfg = compose_job(config, overrides, loader)
            try:
                envelopes = validate(job_cfg)
            except ConfigError as error:
                checked[seedless] = None
                errors.append(f"  {' '.join(overrides)}\n    {error}")
            else:
                _validated[(str(config.hydra.sweep.dir), seedless)] = envelopes
                try:
                    checked[seedless] = effective_config(job_cfg, envelopes, data=data), job_cfg.seed_batch
                except (OSError, ValueError) as error:  # missing or unreadable data: one entry per source
                    checked[seedless] = str(error)
                    data_errors.setdefault(str(error), 0)
        if isinstance(checked[seedless], str):
            data_errors[checked[seedless]] += 1
            invalid += 1
        elif checked[seedless] is None:
            invalid += 1
        else:
            effective, seed_batch = checked[seedless]
            given = next((o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0] == "seed"), effective["seed"])
            try:
                first = int(given)
            except ValueError:
                loader.load_sweep_config(config, overrides)  # raises Hydra's own message for the bad value
                raise ConfigError(f"seed must be an integer, got {given!r}") from None
            # a seed-batched job trains seeds first .. first + seed_batch - 1, each its own run
            run_ids.update(
                config_id({**effective, "seed": seed}, with_seed=True) for seed in range(first, first + seed_batch)
            )
            runs += seed_batch
    if errors or data_errors:
        shown = "\n".join(errors[:10]) + (f"\n  ... and {len(errors) - 10} more" if len(errors) > 10 else "")
        shown += "".join(
            f"\n  data of {n} job{'s' if n > 1 else ''}:\n    {message}" for message, n in data_errors.items()
        )
        what = "an invalid config" + (" or unusable data" if data_errors else "")
        raise ConfigError(f"{invalid} of {len(jobs)} jobs have {what}; nothing was run:\n{shown.lstrip(chr(10))}")
    return len(jobs), runs, len(run_ids)


def wait_for_other_processes(sweep_dir: Path, poll_s: float = 2.0) -> None:
    """Wait while another live process trains runs of this sweep (a concurrent sweep into the same
    directory), so that the report counts their results instead of calling them unfinished."""
    import time

    from runner.claims import live_claims

    announced = None
    while live := live_claims(sweep_dir):
        if len(live) != announced:
            log.info("waiting for %d run(s) that another process is training in %s", len(live), sweep_dir)
            announced = len(live)
        time.sleep(poll_s)


def fail(message: str) -> None:
    """Print one message and end the process with status 2.

    Hydra turns a callback's exception into a warning and goes on;
    ``SystemExit`` is not an ``Exception`` and stops it.
    """
    print(message, file=sys.stderr)
    raise SystemExit(2)


def writable_dir(path: Path, what: str = "the output directory", key: str = "hydra.run.dir or hydra.sweep.dir") -> None:
    """Create ``path`` (and parents) and check that a file can be written in it, or fail with one line."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write_check.{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        fail(f"Error: cannot write {what} {path}: {error.strerror or error} (set {key} to a writable place)")


def check_places(config: DictConfig) -> None:
    """The results cache can be written, before anything trains."""
    if config.get("cache_dir") is not None:
        from tasks.common import resolve_path

        writable_dir(resolve_path(config.cache_dir), "the results cache", "cache_dir")


# what this process is running, for the one line that Ctrl-C prints (run_ablation.py)
ACTIVE = {"what": "the run"}


class SweepCallback(Callback):
    """Validates every job before the first one trains; prints a summary at the end."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        """A single run: check its config, its data, then its output directory, before Hydra creates anything.

        An invalid config prints one line (key, value, what is allowed) and
        leaves no run directory behind; so does missing or unreadable data
        and an output directory that cannot be written.
        """
        try:
            validate(config)
        except ConfigError as error:
            fail(f"Error: {error}")
        from runner.data import data_identity

        try:
            data_identity(config.task)
        except (OSError, ValueError) as error:  # missing or unreadable data, named by its file
            fail(f"Error: {error}")
        check_places(config)
        writable_dir(Path(config.hydra.run.dir))
        ACTIVE["what"] = f"the run in {config.hydra.run.dir}"

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # before the sweeper starts: the Optuna preset keeps its study in the sweep directory
        writable_dir(Path(config.hydra.sweep.dir))
        ACTIVE["what"] = f"the sweep in {config.hydra.sweep.dir}"
        check_places(config)
        n_jobs = config.hydra.launcher.get("n_jobs")
        if n_jobs is not None and (not isinstance(n_jobs, int) or n_jobs == 0):
            fail(
                "Error: hydra.launcher.n_jobs must be a non-zero integer (N: N jobs at once; -1: one per core, "
                f"-2: all cores but one), got {n_jobs!r}"
            )
        if config.hydra.launcher.get("_target_") == RAY_LAUNCHER and config.hydra.launcher.ray.init.get("_temp_dir"):
            keep_ray_inside(Path(config.hydra.launcher.ray.init._temp_dir))
        if config.hydra.sweeper.get("_target_") not in (BASIC_SWEEPER, CHECKED_SWEEPER):
            return  # other sweepers choose jobs as they go; each job still validates itself
        try:
            with paused_gc():  # thousands of configs
                jobs, runs, distinct = check_sweep(config)
        except ConfigError as error:
            fail(f"Error: {error}")
        except Exception as error:  # Hydra's own composition errors (a value of the wrong type, an unknown key)
            cause = f"\n{error.__cause__}" if error.__cause__ is not None else ""
            fail(f"Error: {error}{cause}")
        _checked_sweeps.add(str(config.hydra.sweep.dir))
        message = (
            f"Sweep: {jobs} jobs" + (f" ({runs} runs: seeds batched)" if runs != jobs else "") + ", all configs valid"
        )
        if distinct < runs and config.get("deduplicate", True):
            message += f"; {runs - distinct} runs repeat an effective config already in the sweep and will be skipped"
        log.info(message)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """Write the sweep's report, then exit non-zero if any run failed or the report could not be written.

        Hydra would turn an exception here into a warning; ``SystemExit`` is
        not an ``Exception`` and ends the process with its status.
        """
        sweep_dir = Path(config.hydra.sweep.dir)
        wait_for_other_processes(sweep_dir)
        try:
            self._report(config, sweep_dir)
        finally:
            gc.unfreeze()  # what the batching launcher froze (paused_gc) is the collector's again

    def _report(self, config: DictConfig, sweep_dir: Path) -> None:
        from analysis.load import load_jobs
        from analysis.report import INCOMPLETE, write_report

        try:
            jobs = load_jobs(sweep_dir)
            report = write_report([sweep_dir], sweep_dir, config.report.metric, config.report.mode, jobs=jobs)
            print(f"Report: {report} (and {report.with_suffix('.html').name}, self-contained)")
            if config.get("tensorboard", False) and not jobs.empty:
                from runner.recorder import write_sweep_hparams

                done = jobs.loc[jobs["status"] == "completed", "job_dir"]
                write_sweep_hparams(sweep_dir, [json.loads((Path(d) / "result.json").read_text()) for d in done])
                print(f"TensorBoard (curves, HPARAMS of every run): tensorboard --logdir {sweep_dir}")
        except Exception as error:  # the jobs' results are on disk whatever happens here
            log.exception("analysis of %s failed: %s; run python -m analysis %s", sweep_dir, error, sweep_dir)
            raise SystemExit(1) from None
        failed = int(jobs["status"].isin(INCOMPLETE).sum())
        if failed:
            print(f"Error: {failed} of {len(jobs)} runs did not complete (listed above)", file=sys.stderr)
            raise SystemExit(1)
