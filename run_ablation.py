"""Run one LAE ablation job, or a sweep with ``-m``.

    python run_ablation.py task=digits envelope@envelopes.classification=sigmoid
    python run_ablation.py -m experiment=quick_digits

Composes and validates the config, runs the task with its envelopes, writes
the job's files (see runner/recorder.py) and returns the objective.
"""

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from runner.config import register_configs
from runner.job import run_job

register_configs()


def parallel_threads(hydra_cfg) -> int | None:
    """Torch threads per job where the launcher allocates CPUs to each job: under Slurm (submitit) the job's
    ``cpus_per_task``, under Ray its ``num_cpus``; otherwise None (one thread per process, the default).
    ``threads=`` overrides both.
    """
    launcher = hydra_cfg.launcher
    if launcher.get("cpus_per_task") is not None:
        return int(launcher.cpus_per_task)
    if launcher.get("ray") is not None and launcher.ray.get("remote", {}).get("num_cpus") is not None:
        return int(launcher.ray.remote.num_cpus)
    return None


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    return run_job(
        cfg,
        job_dir=Path(hydra_cfg.runtime.output_dir),
        sweep_dir=Path(hydra_cfg.sweep.dir) if multirun else None,
        overrides=list(hydra_cfg.overrides.task),
        reraise=not multirun,
        default_threads=parallel_threads(hydra_cfg) if multirun else None,
    )


def interrupted() -> str:
    """One line for Ctrl-C: what was interrupted, and that the same command resumes it."""
    from runner.callbacks import ACTIVE

    return (
        f"Interrupted: {ACTIVE['what']}; runs in training were left unfinished (completed runs are kept). "
        "The same command resumes it."
    )


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # claims were released and files closed on the way out
        print(f"\n{interrupted()}", file=sys.stderr)
        sys.exit(130)
